"""The Ollama API, field for field as Ollama's api.md documents it.

Generation streams NDJSON by default (``"stream": false`` for one object); every response carries
Ollama's counts and nanosecond durations, taken from the engine's timestamps.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from transformers import PreTrainedTokenizerBase

from loraplex.engine.core.engine import RequestOutput
from loraplex.engine.core.errors import RequestError
from loraplex.engine.core.sequence import FinishReason, TokenLogprob
from loraplex.server import catalog, guides, model_defaults
from loraplex.server import tools as tooling
from loraplex.server.errors import APIError
from loraplex.server.generation import (
    Call,
    Completed,
    Timings,
    context_limit,
    embed,
    logprobs_count,
    receive,
    request_id,
)
from loraplex.server.limits import check_embed_tokens
from loraplex.server.logprobs import token_entries
from loraplex.server.modelfile import parameters_text, write_modelfile
from loraplex.server.ollama_params import DEFAULTS, refuse_unsupported, sampling_params
from loraplex.server.schemas import (
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaPullRequest,
    OllamaShowRequest,
    parse_body,
)
from loraplex.server.state import ServerState

router = APIRouter()
NDJSON = "application/x-ndjson"
VERSION = "0.1.0"  # loraplex's version, reported where Ollama reports its own


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex


def _now() -> str:
    return catalog.iso(datetime.now(UTC))


def _final_fields(out: RequestOutput) -> dict[str, Any]:
    timings = Timings.of(out)
    return {
        "done": True,
        "done_reason": out.finish_reason.value if out.finish_reason else "stop",
        "total_duration": timings.total_duration,
        "load_duration": timings.load_duration,
        "prompt_eval_count": out.num_prompt_tokens,
        "prompt_eval_duration": timings.prompt_eval_duration,
        "eval_count": out.num_output_tokens,
        "eval_duration": timings.eval_duration,
    }


def _content(text: str, chat: bool) -> dict[str, Any]:
    """The generated text where each route puts it: a chat message, or the generate route's response."""
    return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}


@dataclass
class _Reply:
    """What one generation request's chunks and answer carry besides the counts."""

    model: str
    chat: bool
    prompt_ids: list[int]
    tokenizer: PreTrainedTokenizerBase | None  # set when the request asked for logprobs
    tools: tooling.Tools | None = None  # a chat's tools: calls are parsed out of the answer

    def fields(
        self, text: str, logprobs: list[TokenLogprob], calls: list[tooling.Call] | None = None
    ) -> dict[str, Any]:
        fields = {"model": self.model, "created_at": _now(), **_content(text, self.chat)}
        if calls:
            fields["message"]["tool_calls"] = tooling.ollama_calls(calls)
        if self.tokenizer is not None:
            fields["logprobs"] = token_entries(self.tokenizer, logprobs)
        return fields

    def context(self, output_ids: list[int]) -> dict[str, Any]:
        """/api/generate's final ``context``: the prompt's and the answer's token ids, to continue from."""
        return {} if self.chat else {"context": self.prompt_ids + output_ids}

    def answer(self, completed: list[Completed]) -> dict[str, Any]:
        (done,) = completed
        text, calls = self.tools.parse(done.text) if self.tools else (done.text, [])
        return self.fields(text, done.logprobs, calls) | _final_fields(done.last) | self.context(done.token_ids)

    def stream(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> StreamingResponse:
        calls = tooling.CallStream(self.tools) if self.tools else None

        async def lines() -> AsyncIterator[bytes]:
            output_ids: list[int] = []
            async for _, out in outputs:  # one request: index 0
                output_ids += out.new_token_ids
                if out.finish_reason is FinishReason.ERROR:
                    yield _line({"error": f"generation failed in the engine: {out.error}"})
                    return
                if calls is None:
                    chunk = self.fields(out.text_delta, out.logprobs or [])
                else:  # text once it is surely content; the calls when the answer ends
                    text, made = calls.feed(out.text_delta), []
                    if out.finished:
                        tail, made = calls.finish()
                        text += tail
                    chunk = self.fields(text, out.logprobs or [], made)
                if out.finished:
                    chunk |= _final_fields(out) | self.context(output_ids)
                else:
                    chunk["done"] = False
                yield _line(chunk)

        return StreamingResponse(lines(), media_type=NDJSON)


async def _generate(
    call: Call[OllamaGenerateRequest | OllamaChatRequest], prompt_ids: list[int], tools: tooling.Tools | None = None
) -> Any:
    """Both generation routes once the prompt is tokenized: Ollama's options, then NDJSON or one object."""
    body, chat = call.body, isinstance(call.body, OllamaChatRequest)
    options = model_defaults.options(model_defaults.of(call), body.options)
    limit = context_limit(call.state, options.num_ctx if options else None)
    logprobs = logprobs_count(body.logprobs, body.top_logprobs)
    guide, field = tooling.constraint(tools, guides.ollama_format(body.format), "format")
    await call.compile_guide(guide, field)
    params = sampling_params(options, len(prompt_ids), limit, logprobs, guide)
    reply = _Reply(body.model, chat, prompt_ids, call.engine.tokenizer if logprobs is not None else None, tools)
    requests = call.requests(request_id("chat" if chat else "gen"), [prompt_ids], [params])
    return await call.respond(requests, body.stream, reply.stream, reply.answer)


_ZERO_DURATION = re.compile(r"0+(\.0*)?(ns|us|µs|ms|s|m|h)?")


def _lifecycle(model: str, keep_alive: float | str | None, chat: bool) -> dict[str, Any]:
    """Ollama's answer to a request with nothing to generate: a preload (``done_reason: "load"``), or with
    ``keep_alive: 0`` an unload. Nothing is loaded or freed here: the base and every adapter stay resident."""
    unload = keep_alive is not None and (
        keep_alive == 0 if isinstance(keep_alive, int | float) else bool(_ZERO_DURATION.fullmatch(keep_alive.strip()))
    )
    reason = "unload" if unload else "load"
    return {"model": model, "created_at": _now(), **_content("", chat), "done": True, "done_reason": reason}


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


@router.post("/api/generate")
async def generate(request: Request) -> Any:
    call = await receive(request, OllamaGenerateRequest)
    body = call.body
    if not body.prompt and not body.context:  # what `ollama run` sends to preload a model
        return _lifecycle(body.model, body.keep_alive, chat=False)
    refuse_unsupported(body)
    text = model_defaults.generate_prompt(call.engine.tokenizer, model_defaults.of(call), body)
    return await _generate(call, [*(body.context or []), *call.encode(text)])


@router.post("/api/chat")
async def chat(request: Request) -> Any:
    call = await receive(request, OllamaChatRequest)
    body = call.body
    if not body.messages:
        return _lifecycle(body.model, body.keep_alive, chat=True)
    refuse_unsupported(body)
    tools = tooling.read(body.tools, body.tool_choice, call.state.config.model.tool_parser)
    prompt = model_defaults.chat_prompt(call.engine.tokenizer, model_defaults.of(call), body, tools)
    return await _generate(call, call.encode(prompt), tools)


async def _embed(
    call: Call[OllamaEmbedRequest | OllamaEmbeddingsRequest], texts: list[str], truncate: bool
) -> tuple[list, int, int]:
    """Vectors, prompt token count, and the nanoseconds the longest-waiting input waited to be scheduled."""
    limit = call.state.config.limits.max_model_len
    token_lists = []
    for i, text in enumerate(texts):
        ids = call.encode(text)
        if not ids:
            raise APIError(400, f"input {i} is empty; send non-empty text to embed", param="input")
        if len(ids) > limit and not truncate:
            raise RequestError(f"input {i} has {len(ids)} tokens, over the context of {limit}; send truncate=true")
        token_lists.append(ids[:limit])
    check_embed_tokens(call.state, token_lists)
    outputs = await embed(call.state, call.http, call.endpoint, token_lists, time.monotonic())
    waited = max(Timings.of(out).load_duration for out in outputs)
    return [out.embedding for out in outputs], sum(len(t) for t in token_lists), waited


@router.post("/api/embed")
async def embed_route(request: Request) -> dict[str, Any]:
    call = await receive(request, OllamaEmbedRequest)
    body = call.body
    if body.dimensions is not None:
        raise APIError(400, "dimensions is not supported yet by loraplex; remove it", param="dimensions")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise APIError(400, "input is empty; send a string or a list of strings", param="input")
    vectors, count, waited = await _embed(call, texts, body.truncate)
    return {
        "model": body.model,
        "embeddings": vectors,
        "total_duration": round((time.monotonic() - call.arrival_time) * 1e9),
        "load_duration": waited,
        "prompt_eval_count": count,
    }


@router.post("/api/embeddings")
async def embeddings_route(request: Request) -> dict[str, Any]:
    """The legacy single-prompt form; an empty prompt gets an empty vector, as in Ollama."""
    call = await receive(request, OllamaEmbeddingsRequest)
    if not call.body.prompt:
        return {"embedding": []}
    vectors, _, _ = await _embed(call, [call.body.prompt], truncate=True)
    return {"embedding": vectors[0]}


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    state = _state(request)
    engine, _ = state.require_engine()
    only = state.router.fixed_endpoint(request.scope)
    return {"models": [e.tags_entry() for e in catalog.entries(engine, only, state.models.aliases())]}


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    """The endpoints loaded now: the base always, an adapter endpoint while its adapter sits in a LoRA slot."""
    state = _state(request)
    engine, _ = state.require_engine()
    only = state.router.fixed_endpoint(request.scope)
    on_gpu = engine.config.model.device.startswith("cuda")
    expires = catalog.iso(state.started_at + timedelta(days=365 * 100))  # never unloaded, like keep_alive -1
    context_length = engine.config.limits.max_model_len
    running = []
    for e in catalog.entries(engine, only, state.models.aliases()):
        if e.endpoint.adapter and e.endpoint.name not in engine.lora.slot_of:
            continue
        size_vram = e.size if on_gpu else 0
        running.append(
            e.tags_entry() | {"expires_at": expires, "size_vram": size_vram, "context_length": context_length}
        )
    return {"models": running}


@router.post("/api/show")
async def show(request: Request) -> dict[str, Any]:
    body = await parse_body(request, OllamaShowRequest)
    model = body.model or body.name
    if not model:
        raise APIError(400, "model is missing; send the model name to describe", param="model")
    state = _state(request)
    endpoint = state.router.resolve(request.scope, model)
    engine, _ = state.require_engine()
    entry = catalog.entry(engine, endpoint)
    text_config = engine.model.config.get_text_config()
    arch = entry.family
    model_info: dict[str, Any] = {
        "general.architecture": arch,
        "general.basename": engine.model_name,
        "general.parameter_count": sum(p.numel() for p in engine.model.parameters()),
        f"{arch}.context_length": engine.config.limits.max_model_len,
        f"{arch}.embedding_length": text_config.hidden_size,
        f"{arch}.block_count": text_config.num_hidden_layers,
        f"{arch}.attention.head_count": text_config.num_attention_heads,
        f"{arch}.attention.head_count_kv": text_config.num_key_value_heads,
        f"{arch}.vocab_size": text_config.vocab_size,
    }
    adapter = entry.adapter()
    if adapter is not None:
        model_info |= {f"adapter.{k}": v for k, v in adapter.items()}
    spec = state.models.spec(model, endpoint)
    name = model.removesuffix(":latest")
    modelfile = write_modelfile(spec, name, str(engine.model_path), adapter["path"] if adapter else None)
    if not spec.parameters:  # no PARAMETER of its own: the defaults it runs with
        modelfile += "".join(f"PARAMETER {k} {v}\n" for k, v in DEFAULTS.items())
    return {
        "license": "\n".join(spec.license),
        "modelfile": modelfile,
        "parameters": parameters_text(spec.parameters or DEFAULTS),
        "template": spec.template if spec.template is not None else engine.tokenizer.chat_template or "",
        "system": spec.system or "",
        "messages": spec.messages,
        "details": entry.details(),
        "model_info": model_info,
        "adapter": adapter,
        "capabilities": ["completion"],
        "modified_at": catalog.iso(entry.modified_at),
    }


@router.post("/api/pull")
async def pull(request: Request) -> Any:
    """Clients pull before they run; a served model is already here, so the pull succeeds at once. loraplex
    never downloads: a model it does not serve is a 404 that lists what it serves."""
    body = await parse_body(request, OllamaPullRequest)
    model = body.model or body.name
    if not model:
        raise APIError(400, "model is missing; send the model name to pull", param="model")
    _state(request).router.resolve(request.scope, model)
    if not body.stream:
        return {"status": "success"}
    lines = [_line({"status": "pulling manifest"}), _line({"status": "success"})]
    return StreamingResponse(iter(lines), media_type=NDJSON)


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": VERSION}


@router.api_route("/", methods=["GET", "HEAD"])
async def root() -> PlainTextResponse:
    """Ollama answers its root with this line; some clients probe it to find a server."""
    return PlainTextResponse("Ollama is running (loraplex)")
