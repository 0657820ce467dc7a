"""A model's Modelfile defaults applied to a request, as Ollama applies them.

The system prompt leads unless the request sends its own system message; the model's MESSAGEs follow it, then
the request's messages. Each PARAMETER is the default of its option: a request that sets the option wins, field
by field. A TEMPLATE renders the prompt in place of the model's chat template; a conversation goes through it
turn by turn, as Ollama renders a template without ``.Messages`` (system, prompt, response per turn; the last
turn cut at ``.Response``).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from loraplex.server import tools as tooling
from loraplex.server.generation import Call
from loraplex.server.modelfile import ModelSpec
from loraplex.server.prompts import render_chat, render_go_template
from loraplex.server.schemas import (
    ChatCompletionRequest,
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaOptions,
    OpenAIMessage,
)

# Ollama option -> the OpenAI (or vLLM) request field it fills when the request leaves that field out
_OPENAI_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "stop": "stop",
}


def of(call: Call[Any]) -> ModelSpec:
    """The defaults of the model this request asked for (empty for a model without a Modelfile)."""
    return call.state.models.spec(call.body.model, call.endpoint)


def options(spec: ModelSpec, requested: OllamaOptions | None) -> OllamaOptions | None:
    """The request's options over the model's PARAMETERs, option by option."""
    if not spec.parameters:
        return requested
    sent = requested.model_dump(exclude_none=True) if requested is not None else {}
    return OllamaOptions.model_validate(spec.parameters | sent)


def messages(spec: ModelSpec, sent: list[dict[str, str]]) -> list[dict[str, str]]:
    """System (the request's own, else the model's), the model's MESSAGEs, then the rest of the request."""
    lead = 0
    while lead < len(sent) and sent[lead]["role"] == "system":
        lead += 1
    system = sent[:lead] or ([{"role": "system", "content": spec.system}] if spec.system else [])
    return [*system, *spec.messages, *sent[lead:]]


def render(
    tokenizer: PreTrainedTokenizerBase,
    spec: ModelSpec,
    conversation: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """A chat's prompt: through the model's TEMPLATE when it has one, else the model's chat template (with the
    request's tools, when that template renders them: ``tools.conversation``)."""
    if spec.template is None:
        return render_chat(tokenizer, conversation, tools)
    return render_turns(spec.template, conversation)


def render_turns(template: str, conversation: list[dict[str, str]]) -> str:
    """Ollama's rendering of a conversation through a template without ``.Messages``: one (system, prompt,
    response) turn at a time, each whole, then the open turn up to ``.Response``."""
    out, turn = [], {"system": "", "user": "", "assistant": ""}
    for message in conversation:
        role = message["role"]
        finished = (role == "system" and (turn["user"] or turn["assistant"])) or (role == "user" and turn["assistant"])
        if finished:
            out.append(render_go_template(template, turn["system"], turn["user"], turn["assistant"]))
            turn = {"system": "", "user": "", "assistant": ""}
        turn[role] = message["content"]
    return "".join(out) + render_go_template(template, turn["system"], turn["user"])


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, body: OllamaChatRequest, tools: tooling.Tools | None = None
) -> str:
    sent = [tooling.ollama_turn(i, m) for i, m in enumerate(body.messages)]
    conversation, template_tools = tooling.conversation(tokenizer, messages(spec, sent), tools)
    return render(tokenizer, spec, conversation, template_tools)


def generate_prompt(tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, body: OllamaGenerateRequest) -> str:
    """/api/generate's prompt: raw as sent; else the request's system and template over the model's, and the
    model's MESSAGEs before the prompt unless the request continues a ``context``."""
    if body.raw:
        return body.prompt or ""
    system = body.system or spec.system
    conversation = [{"role": "system", "content": system}] if system else []
    conversation += spec.messages if not body.context else []
    conversation.append({"role": "user", "content": body.prompt or ""})
    template = body.template or spec.template
    if template is None:
        return render_chat(tokenizer, conversation)
    return render_turns(template, conversation)


def openai_chat(spec: ModelSpec, body: ChatCompletionRequest) -> ChatCompletionRequest:
    """The OpenAI chat request with the model's defaults where it leaves a field out; OpenAI's own defaults
    apply to what neither sets. ``num_predict`` becomes ``max_tokens`` (negative: no limit)."""
    if spec == ModelSpec():
        return body
    sent = body.model_fields_set
    update: dict[str, Any] = {
        field: spec.parameters[option]
        for option, field in _OPENAI_FIELDS.items()
        if option in spec.parameters and field not in sent
    }
    num_predict = spec.parameters.get("num_predict")
    if num_predict is not None and not {"max_tokens", "max_completion_tokens"} & sent:
        update["max_tokens"] = num_predict if num_predict > 0 else None
    lead = 0
    while lead < len(body.messages) and body.messages[lead].role in ("system", "developer"):
        lead += 1
    system = [OpenAIMessage(role="system", content=spec.system)] if spec.system and not lead else []
    leading = [OpenAIMessage(role=m["role"], content=m["content"]) for m in spec.messages]
    update["messages"] = [*body.messages[:lead], *system, *leading, *body.messages[lead:]]
    return body.model_copy(update=update)


def num_ctx(spec: ModelSpec) -> int | None:
    return spec.parameters.get("num_ctx")
