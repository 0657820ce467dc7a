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
from loraplex.engine.core.sequence import FinishReason, SamplingParams, TokenLogprob
from loraplex.server import catalog
from loraplex.server.errors import APIError, error_body, unsupported
from loraplex.server.generation import Call, Completed, context_limit, logprobs_count, max_new_tokens, receive
from loraplex.server.logprobs import completion_logprobs, token_entries
from loraplex.server.prompts import render_chat
from loraplex.server.schemas import ChatCompletionRequest, CompletionRequest, OpenAIMessage
from loraplex.server.state import ServerState

router = APIRouter(prefix="/v1")


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex


def _sampling(
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int | None,
    num_prompt: int,
    limit: int,
    logprobs: int | None,
) -> SamplingParams:
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens = {max_tokens} is invalid; use 1 or more, or leave it out", param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_tokens=max_new_tokens(max_tokens, num_prompt, limit),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=stop,
        logprobs=logprobs,
    )


def _refuse_common(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.n != 1:
        raise APIError(400, f"n = {body.n} is not supported; loraplex returns one choice, send n = 1", param="n")
    if body.logit_bias:
        raise unsupported("logit_bias", "logit_bias")


def _messages(messages: list[OpenAIMessage]) -> list[dict[str, str]]:
    """OpenAI messages as the chat template expects them: plain text content, developer as system."""
    out = []
    for i, message in enumerate(messages):
        if message.role == "tool":
            raise unsupported("tool calling", f"messages[{i}]")
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise unsupported("non-text content (images, audio, files)", f"messages[{i}].content")
            content = "".join(part.text or "" for part in content)
        out.append({"role": "system" if message.role == "developer" else message.role, "content": content or ""})
    return out


def _refuse_chat(body: ChatCompletionRequest) -> None:
    _refuse_common(body)
    if body.tools or body.functions or body.tool_choice not in (None, "none") or body.function_call:
        raise unsupported("tool calling", "tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise unsupported("structured output (response_format)", "response_format")
    if not body.messages:
        raise APIError(400, "messages is empty; send at least one message", param="messages")


def _usage(out: RequestOutput) -> dict[str, Any]:
    return {
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": out.num_output_tokens,
        "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
        "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},  # served from the prefix cache
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
    text: str, out: RequestOutput, chat: bool, streamed: bool, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    """One choice of an answer or a chunk: chat has a message (a delta when streamed), completions text."""
    if not chat:
        content: dict[str, Any] = {"text": text}
    elif streamed:
        content = {"delta": {"content": text} if text else {}}
    else:
        content = {"message": {"role": "assistant", "content": text, "refusal": None}}
    return {"index": 0, **content, "logprobs": logprobs, "finish_reason": _finish_reason(out)}


def _event_stream(
    outputs: AsyncIterator[RequestOutput], base: dict[str, Any], chat: bool, include_usage: bool, logprobs: _Logprobs
) -> StreamingResponse:
    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        return base | {"choices": [choice]} | ({"usage": None} if include_usage else {})

    async def events() -> AsyncIterator[bytes]:
        if chat:
            opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
            yield _sse(chunk(opening | {"finish_reason": None}))
        async for out in outputs:
            if out.finish_reason is FinishReason.ERROR:
                yield _sse(error_body(APIError(500, f"generation failed in the engine: {out.error}"), "/v1"))
                break
            yield _sse(chunk(_choice(out.text_delta, out, chat, True, logprobs(out.logprobs or []))))
            if out.finished and include_usage:
                yield _sse(base | {"choices": [], "usage": _usage(out)})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _generate(
    call: Call[ChatCompletionRequest | CompletionRequest], prompt_ids: list[int], max_tokens: int | None
) -> Any:
    """Both routes once the prompt is tokenized: OpenAI's sampling fields, then SSE chunks or one object."""
    body, chat = call.body, isinstance(call.body, ChatCompletionRequest)
    count = logprobs_count(body.logprobs, body.top_logprobs) if chat else body.logprobs
    params = _sampling(body, max_tokens, len(prompt_ids), context_limit(call.state), count)
    logprobs = _Logprobs(call.engine.tokenizer if count is not None else None, chat)
    request = call.request("chatcmpl" if chat else "cmpl", prompt_ids, params)
    base = {"id": request.request_id, "created": int(time.time()), "model": body.model, "system_fingerprint": None}

    def streamed(outputs: AsyncIterator[RequestOutput]) -> StreamingResponse:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        kind = "chat.completion.chunk" if chat else "text_completion"
        return _event_stream(outputs, base | {"object": kind}, chat, include_usage, logprobs)

    def whole(done: Completed) -> dict[str, Any]:
        choice = _choice(done.text, done.last, chat, False, logprobs(done.logprobs))
        kind = "chat.completion" if chat else "text_completion"
        return base | {"object": kind, "choices": [choice], "usage": _usage(done.last)}

    return await call.respond(request, body.stream, streamed, whole)


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Any:
    call = await receive(request, ChatCompletionRequest)
    body = call.body
    _refuse_chat(body)
    prompt_ids = call.encode(render_chat(call.engine.tokenizer, _messages(body.messages)))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return await _generate(call, prompt_ids, max_tokens)


def _completion_prompt(call: Call[CompletionRequest]) -> list[int]:
    prompt = call.body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return list(prompt)  # token ids
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, f"prompt has {len(prompt)} strings; send one prompt per request", param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise APIError(400, "prompt is empty; send the text to complete", param="prompt")
    return call.encode(prompt)


@router.post("/completions")
async def completions(request: Request) -> Any:
    call = await receive(request, CompletionRequest)
    body = call.body
    _refuse_common(body)
    if body.suffix:
        raise unsupported("suffix (fill-in-the-middle)", "suffix")
    if body.echo:
        raise unsupported("echo", "echo")
    if body.best_of not in (None, 1):
        raise APIError(400, f"best_of = {body.best_of} is not supported; send 1", param="best_of")
    return await _generate(call, _completion_prompt(call), body.max_tokens)


def _model_object(entry: catalog.ModelEntry) -> dict[str, Any]:
    return {
        "id": entry.endpoint.name,
        "object": "model",
        "created": int(entry.modified_at.timestamp()),
        "owned_by": "loraplex",
    }


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    engine, _ = state.require_engine()
    only = state.router.fixed_endpoint(request.scope)
    return {"object": "list", "data": [_model_object(e) for e in catalog.entries(engine, only)]}


@router.get("/models/{model}")
async def model(request: Request, model: str) -> dict[str, Any]:
    state = _state(request)
    engine, _ = state.require_engine()
    endpoint = state.router.resolve(request.scope, model)
    return _model_object(catalog.entry(engine, endpoint))
