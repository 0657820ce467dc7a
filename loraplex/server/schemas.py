"""Request bodies of both APIs as pydantic models, and reading a body into one with a 400 on any mistake.

Unknown fields are ignored, as Ollama and vLLM ignore them; fields the server cannot honour yet are declared
here so the route can refuse them by name instead of silently dropping them.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loraplex.engine.core.sequence import MAX_LOGPROBS
from loraplex.server.errors import APIError, describe_validation

Model = TypeVar("Model", bound=BaseModel)


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- Ollama ---------------------------------------------------------------------------------------------


class OllamaOptions(BaseModel):
    """The runtime options Ollama documents that change generation; others (num_gpu, mirostat, ...) are ignored."""

    model_config = ConfigDict(extra="allow")

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    num_predict: int | None = None
    stop: list[str] | str | None = None
    seed: int | None = None  # -1 (Ollama's default) = random; any other integer, modulo 2**64, a fixed seed
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = Field(default=None, ge=1)


class OllamaMessage(RequestBody):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls: {"function": {"name", "arguments"}}
    tool_name: str | None = None  # a tool turn: the tool that answered


class _OllamaGenerateBase(RequestBody):
    model: str = Field(min_length=1)
    format: Any = None
    options: OllamaOptions | None = None
    keep_alive: float | str | None = None  # accepted: the model and every adapter stay resident anyway
    stream: bool = True
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


class OllamaGenerateRequest(_OllamaGenerateBase):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[Any] | None = None


class OllamaChatRequest(_OllamaGenerateBase):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Any] | None = None
    tool_choice: Any = None  # loraplex's extension, as OpenAI's: Ollama itself always lets the model choose (auto)


class OllamaEmbedRequest(RequestBody):
    model: str = Field(min_length=1)
    input: str | list[str]
    truncate: bool = True
    dimensions: int | None = None
    options: OllamaOptions | None = None
    keep_alive: float | str | None = None


class OllamaEmbeddingsRequest(RequestBody):
    model: str = Field(min_length=1)
    prompt: str = ""
    options: OllamaOptions | None = None
    keep_alive: float | str | None = None


class OllamaShowRequest(RequestBody):
    model: str | None = None
    name: str | None = None  # the pre-0.5 field name; still sent by older clients
    verbose: bool = False


class OllamaPullRequest(RequestBody):
    model: str | None = None
    name: str | None = None  # the pre-0.5 field name
    insecure: bool = False
    stream: bool = True


# ---- OpenAI ---------------------------------------------------------------------------------------------


class StreamOptions(RequestBody):
    include_usage: bool = False


class ContentPart(RequestBody):
    type: str
    text: str | None = None


class OpenAIMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers


class _OpenAISampling(RequestBody):
    model: str = Field(min_length=1)
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, le=2)
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None  # any integer, modulo 2**64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int = Field(default=-1, ge=-1)  # -1 (or 0) = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # structured output (server/guides.py): OpenAI's, and vLLM's current and older extra fields
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI's spec makes most request fields nullable, and clients send ``null`` for "the default"."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class ChatCompletionRequest(_OpenAISampling):
    messages: list[OpenAIMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's documented default for legacy completions
    suffix: str | None = None
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # alternatives per token (OpenAI: 0-5)


async def parse_body(request: Request, model: type[Model]) -> Model:
    """The JSON body as ``model``; a 400 that names the field and the problem otherwise."""
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from e
    if not isinstance(data, dict):
        raise APIError(400, f"the request body is a JSON {type(data).__name__}; send a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = describe_validation(e)
        raise APIError(400, message, param=param) from e
