"""The OpenAI API: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``.

Streaming is server-sent events ending in ``data: [DONE]``; with ``stream_options.include_usage`` every
chunk carries ``"usage": null`` and one last chunk with no choices carries the counts, as OpenAI sends them.
Sampling defaults are OpenAI's (temperature 1, top_p 1, no repetition penalty), not Ollama's.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from transformers import PreTrainedTokenizerBase

from loraplex.engine.core.engine import RequestOutput
from loraplex.engine.core.sequence import FinishReason, Guide, SamplingParams, TokenLogprob
from loraplex.server import catalog, guides, model_defaults
from loraplex.server import tools as tooling
from loraplex.server.errors import APIError, error_body, unsupported
from loraplex.server.generation import (
    Call,
    Completed,
    context_limit,
    logprobs_count,
    max_new_tokens,
    receive,
    request_id,
)
from loraplex.server.logprobs import completion_logprobs, token_entries
from loraplex.server.schemas import ChatCompletionRequest, CompletionRequest, OpenAIMessage
from loraplex.server.state import ServerState

router = APIRouter(prefix="/v1")


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex


MAX_CHOICES = 16  # n and best_of: more siblings than this would crowd out the endpoint's other requests


def _sampling(
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int | None,
    num_prompt: int,
    limit: int,
    logprobs: int | None,
    guide: Guide | None,
) -> SamplingParams:
    """OpenAI's sampling fields and vLLM's extra ones (``top_k``, ``min_p``, ``repetition_penalty``, ...)."""
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens = {max_tokens} is invalid; use 1 or more, or leave it out", param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_tokens=max_new_tokens(max_tokens, num_prompt, limit),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k, 0),  # vLLM's -1 (and 0) = off
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        repeat_last_n=-1,  # vLLM's repetition penalty sees the whole prompt and output
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=stop,
        stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
        logit_bias=_logit_bias(body.logit_bias),
        logprobs=logprobs,
        guide=guide,
    )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's keys are token ids written as strings; the engine checks the ids and the values' range."""
    try:
        return {int(token): value for token, value in (bias or {}).items()}
    except ValueError:
        keys = ", ".join(repr(k) for k in bias or {} if not k.strip().lstrip("-").isdigit())
        raise APIError(
            400, f"logit_bias has keys that are not token ids ({keys}); use token ids as strings", param="logit_bias"
        ) from None


def _choices(n: int, best_of: int | None, stream: bool) -> tuple[int, int]:
    """How many choices to return, and how many to generate to pick them from."""
    if not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"n = {n} is invalid; use 1 to {MAX_CHOICES}", param="n")
    best = n if best_of is None else best_of
    if not n <= best <= MAX_CHOICES:
        raise APIError(400, f"best_of = {best_of} is invalid; use n ({n}) to {MAX_CHOICES}", param="best_of")
    if best > n and stream:
        raise APIError(
            400, "best_of > n cannot stream (the best are known only at the end); send stream: false", param="best_of"
        )
    return n, best


def _messages(messages: list[OpenAIMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as the chat template expects them: plain text content, developer as system, an
    assistant's calls and a tool's result in transformers' shape (``tools.conversation`` renders them)."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise unsupported("non-text content (images, audio, files)", f"messages[{i}].content")
            content = "".join(part.text or "" for part in content)
        turn: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
        turn["content"] = content or ""
        if message.role == "tool":
            if not message.tool_call_id:
                raise APIError(
                    400,
                    f"messages[{i}] is a tool result without tool_call_id; send the id of the call it answers",
                    param=f"messages[{i}].tool_call_id",
                )
            turn["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            turn["tool_calls"] = tooling.template_calls(message.tool_calls, f"messages[{i}].tool_calls", json_text=True)
        out.append(turn)
    return out


def _refuse_chat(body: ChatCompletionRequest) -> None:
    if body.functions or body.function_call:
        raise unsupported("functions and function_call (replaced by tools and tool_choice)", "functions")
    if not body.messages:
        raise APIError(400, "messages is empty; send at least one message", param="messages")


def _usage(lasts: list[RequestOutput], siblings: int) -> dict[str, Any]:
    """Counts over every sequence generated; each prompt's tokens once, however many siblings share it."""
    firsts = lasts[::siblings]
    prompt, completion = sum(o.num_prompt_tokens for o in firsts), sum(o.num_output_tokens for o in lasts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in firsts)},  # prefix cache
    }


def _finish_reason(out: RequestOutput) -> str | None:
    if not out.finished:
        return None
    return "length" if out.finish_reason is FinishReason.LENGTH else "stop"


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class _Logprobs:
    """Each choice's ``logprobs`` in its route's shape, or None when the request did not ask for them.
    Completions count ``text_offset`` on from where the text of the chunk before ended."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, chat: bool) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.offset = 0

    def __call__(self, logprobs: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.tokenizer is None:
            return None
        if self.chat:
            return {"content": token_entries(self.tokenizer, logprobs), "refusal": None}
        shaped = completion_logprobs(self.tokenizer, logprobs, self.offset)
        self.offset += sum(len(token) for token in shaped["tokens"])
        return shaped


def _choice(
    index: int,
    text: str,
    out: RequestOutput,
    chat: bool,
    streamed: bool,
    logprobs: dict[str, Any] | None,
    tools: tooling.Tools | None = None,
) -> dict[str, Any]:
    """One choice of an answer or a chunk: chat has a message (a delta when streamed), completions text. A whole
    chat answer to a request with tools carries the calls it made, parsed out of its text."""
    reason = _finish_reason(out)
    if not chat:
        content: dict[str, Any] = {"text": text}
    elif streamed:
        content = {"delta": {"content": text} if text else {}}
    else:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        text, calls = tools.parse(text) if tools else (text, [])
        if calls:
            calls = [{k: v for k, v in c.items() if k != "index"} for c in tooling.openai_calls(calls)]
            message |= {"content": text or None, "tool_calls": calls}
            reason = "tool_calls"
        content = {"message": message}
    return {"index": index, **content, "logprobs": logprobs, "finish_reason": reason}


def _tool_chunks(
    index: int, stream: tooling.CallStream, text: str, out: RequestOutput, logprobs: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """A streamed chat choice of a request with tools: text once it is surely content, and when the answer
    ends, its calls as one ``tool_calls`` delta, then the finish reason."""
    content = stream.feed(text)
    if not out.finished:
        delta = {"content": content} if content else {}
        held = not delta and logprobs is None  # nothing to send yet (held text's logprobs still go out)
        return [] if held else [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}]
    tail, calls = stream.finish()
    delta = {"content": content + tail} if content + tail else {}
    if calls:
        delta["tool_calls"] = tooling.openai_calls(calls)
    reason = "tool_calls" if calls else _finish_reason(out)
    last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
    return [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}, last]


def _event_stream(
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    base: dict[str, Any],
    chat: bool,
    include_usage: bool,
    logprobs: list[_Logprobs],
    echoes: list[str],
    tools: tooling.Tools | None = None,
) -> StreamingResponse:
    """One choice per request, indexed as the requests; ``echoes`` go before each choice's first text."""
    calls = [tooling.CallStream(tools) for _ in logprobs] if tools else None

    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        return base | {"choices": [choice]} | ({"usage": None} if include_usage else {})

    async def events() -> AsyncIterator[bytes]:
        if chat:
            for index in range(len(logprobs)):
                opening = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                yield _sse(chunk(opening | {"finish_reason": None}))
        unsent, lasts = list(echoes), {}
        async for index, out in outputs:
            if out.finish_reason is FinishReason.ERROR:
                yield _sse(error_body(APIError(500, f"generation failed in the engine: {out.error}"), "/v1"))
                break
            text, unsent[index] = unsent[index] + out.text_delta, ""
            shaped = logprobs[index](out.logprobs or [])
            if calls is None:
                yield _sse(chunk(_choice(index, text, out, chat, True, shaped)))
            else:
                for choice in _tool_chunks(index, calls[index], text, out, shaped):
                    yield _sse(chunk(choice))
            if out.finished:
                lasts[index] = out
        if include_usage and len(lasts) == len(logprobs):
            yield _sse(base | {"choices": [], "usage": _usage([lasts[i] for i in sorted(lasts)], 1)})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _best(completed: list[Completed], n: int, best_of: int) -> list[Completed]:
    """Per prompt, the ``n`` of its ``best_of`` sequences with the highest cumulative log-probability."""
    if best_of == n:
        return completed
    groups = [completed[i : i + best_of] for i in range(0, len(completed), best_of)]
    ranked = [sorted(group, key=lambda done: -sum(lp.logprob for lp in done.logprobs)) for group in groups]
    return [done for group in ranked for done in group[:n]]


async def _generate(
    call: Call[ChatCompletionRequest | CompletionRequest],
    prompts: list[list[int]],
    max_tokens: int | None,
    echoes: list[str] | None = None,
    tools: tooling.Tools | None = None,
) -> Any:
    """Both routes once the prompts are tokenized: ``n`` (or ``best_of``) sibling requests per prompt with
    OpenAI's and vLLM's sampling fields, then SSE chunks or one object with a choice per sibling kept."""
    body, chat = call.body, isinstance(call.body, ChatCompletionRequest)
    count = logprobs_count(body.logprobs, body.top_logprobs) if chat else body.logprobs
    n, best_of = _choices(body.n, None if chat else body.best_of, body.stream)
    ranking = 0 if best_of > n and count is None else count  # best_of ranks by the tokens' log-probabilities
    limit = context_limit(call.state, model_defaults.num_ctx(model_defaults.of(call)))
    guide, field = tooling.constraint(tools, *guides.openai_guide(body))
    await call.compile_guide(guide, field)
    params = [_sampling(body, max_tokens, len(prompt), limit, ranking, guide) for prompt in prompts]
    rid = request_id("chatcmpl" if chat else "cmpl")
    requests = call.requests(rid, prompts, params, best_of)
    base = {"id": rid, "created": int(time.time()), "model": body.model, "system_fingerprint": None}
    tokenizer = call.engine.tokenizer if count is not None else None
    echoes = [text for text in echoes or [""] * len(prompts) for _ in range(n)]  # one per choice

    def streamed(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> StreamingResponse:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        kind = "chat.completion.chunk" if chat else "text_completion"
        shapes = [_Logprobs(tokenizer, chat) for _ in requests]
        return _event_stream(outputs, base | {"object": kind}, chat, include_usage, shapes, echoes, tools)

    def whole(completed: list[Completed]) -> dict[str, Any]:
        choices = [
            _choice(i, echo + done.text, done.last, chat, False, _Logprobs(tokenizer, chat)(done.logprobs), tools)
            for i, (echo, done) in enumerate(zip(echoes, _best(completed, n, best_of), strict=True))
        ]
        usage = _usage([done.last for done in completed], best_of)
        return base | {"object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": usage}

    return await call.respond(requests, body.stream, streamed, whole)


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Any:
    call = await receive(request, ChatCompletionRequest)
    spec = model_defaults.of(call)
    body = call.body = model_defaults.openai_chat(spec, call.body)
    _refuse_chat(body)
    tools = tooling.read(body.tools, body.tool_choice, call.state.config.model.tool_parser)
    tokenizer = call.engine.tokenizer
    conversation, template_tools = tooling.conversation(tokenizer, _messages(body.messages), tools)
    prompt_ids = call.encode(model_defaults.render(tokenizer, spec, conversation, template_tools))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return await _generate(call, [prompt_ids], max_tokens, tools=tools)


def _completion_prompts(call: Call[CompletionRequest]) -> list[list[int]]:
    """A string, a list of token ids, or a list of either: each prompt as token ids."""
    prompt = call.body.prompt
    many = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
    prompts = list(prompt) if many else [prompt]
    for i, text in enumerate(prompts):
        if not text:
            where = f"prompt[{i}] is empty" if many else "prompt is empty"
            raise APIError(400, f"{where}; send the text to complete", param="prompt")
    return [list(p) if isinstance(p, list) else call.encode(p) for p in prompts]


@router.post("/completions")
async def completions(request: Request) -> Any:
    call = await receive(request, CompletionRequest)
    body = call.body
    if body.suffix:
        raise unsupported("suffix (fill-in-the-middle)", "suffix")
    if body.echo and body.logprobs is not None:
        raise unsupported("echo with logprobs (the prompt's log-probabilities)", "echo")
    prompts = _completion_prompts(call)
    echoes = [call.engine.tokenizer.decode(p, skip_special_tokens=False) for p in prompts] if body.echo else None
    return await _generate(call, prompts, body.max_tokens, echoes)


def _model_object(entry: catalog.ModelEntry) -> dict[str, Any]:
    return {
        "id": entry.name,
        "object": "model",
        "created": int(entry.modified_at.timestamp()),
        "owned_by": "loraplex",
    }


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    engine, _ = state.require_engine()
    only = state.router.fixed_endpoint(request.scope)
    entries = catalog.entries(engine, only, state.models.aliases())
    return {"object": "list", "data": [_model_object(e) for e in entries]}


@router.get("/models/{model}")
async def model(request: Request, model: str) -> dict[str, Any]:
    state = _state(request)
    engine, _ = state.require_engine()
    endpoint = state.router.resolve(request.scope, model)
    return _model_object(catalog.entry(engine, endpoint))
