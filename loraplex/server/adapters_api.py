"""Adapters at run time: vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, Ollama's
``/api/create`` and ``/api/delete``.

A load reads and validates the adapter off the event loop and off the engine loop (``asyncio.to_thread``),
then registers it on the engine loop thread (``AsyncEngine.call``) together with an endpoint of the same
name, so ``/api/tags``, ``/v1/models``, ``/api/show`` and routing by model name or ``/<name>/`` prefix see it
at once. An unload stops new requests at once; requests already running finish with the adapter, and its
slot is freed when the last one ends. Paths are confined to ``[adapters] roots``; with
``runtime_loading = false`` every route here answers 403.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from loraplex.engine.core.config import EndpointConfig
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.errors import AdapterError, UnknownEndpointError
from loraplex.engine.lora.config import LoRAAdapter
from loraplex.server.errors import APIError
from loraplex.server.modelfile import instructions
from loraplex.server.schemas import parse_body
from loraplex.server.state import ServerState

log = logging.getLogger(__name__)
router = APIRouter()

NDJSON = "application/x-ndjson"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# First path segments of the server's own routes: an endpoint of that name would turn into a path prefix.
_RESERVED = frozenset({"api", "v1", "health", "ready", "metrics"})
_UNSUPPORTED_CREATE_FIELDS = ("quantize", "files", "template", "system", "parameters", "messages", "license", "path")


class RuntimeEndpoint(EndpointConfig):
    """An endpoint added at run time; unloading it removes it from the configuration again."""


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)


class OllamaCreateRequest(BaseModel):
    """Both forms: ``modelfile`` (FROM + ADAPTER lines), and the newer ``from`` + ``adapters``."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str | None = None
    name: str | None = None  # the pre-0.5 field name
    modelfile: str | None = None
    from_: str | None = Field(default=None, alias="from")
    adapters: dict[str, str] | None = None
    stream: bool = True
    quantize: Any = None
    files: Any = None
    template: Any = None
    system: Any = None
    parameters: Any = None
    messages: Any = None
    license: Any = None
    path: Any = None


class OllamaDeleteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = None


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex


def _require_runtime_loading(state: ServerState) -> None:
    if not state.config.adapters.runtime_loading:
        raise APIError(
            403,
            "loading and unloading adapters at run time is turned off on this server "
            "(adapters.runtime_loading = false); set it to true in the config to allow it",
            code="runtime_loading_disabled",
        )


def _endpoint_name(name: str, param: str) -> str:
    """A model name usable as an endpoint: Ollama's ``:latest`` tag dropped, nothing that breaks routing."""
    name = name.strip().removesuffix(":latest")
    if not _NAME.match(name):
        raise APIError(
            400,
            f"{param} = {name!r} cannot name a model here; use letters, digits, '.', '_' or '-' "
            "(at most 128, starting with a letter or digit; no '/' and no tag other than ':latest')",
            param=param,
        )
    if name in _RESERVED:
        raise APIError(400, f"{param} = {name!r} is reserved for the server's own routes; pick another", param=param)
    return name


async def load(state: ServerState, name: str, path: str) -> LoRAAdapter:
    """Read ``path`` in a worker thread, then serve it as endpoint ``name`` (registered on the engine thread)."""
    engine, async_engine = state.require_engine()
    configured = state.config.endpoint(name)
    if configured is not None and configured.name != name:
        raise AdapterError(f"adapter {name!r}: the name is an alias of endpoint {configured.name!r}; pick another")
    if name in engine.endpoint_adapters:
        raise AdapterError(f"adapter {name!r}: the name is already served; unload it first")
    resolved = await asyncio.to_thread(state.config.adapters.allowed_path, path)
    adapter = await asyncio.to_thread(engine.lora.read, name, resolved)
    await async_engine.call(lambda e: _serve(e, adapter))
    targets = ",".join(adapter.target_modules)
    log.info("adapter %s loaded at run time: rank %d, targets %s, from %s", name, adapter.rank, targets, adapter.path)
    return adapter


def _serve(engine: LLMEngine, adapter: LoRAAdapter) -> None:
    """On the engine thread: register the adapter and its endpoint in one step, so no request sees half."""
    engine.add_adapter(adapter)
    config = engine.config
    configured = config.endpoint(adapter.name)
    if configured is not None:  # a configured endpoint unloaded earlier, now loaded again
        configured.adapter = str(adapter.path)
    else:  # a new list, never a mutated one: the event loop may be iterating the old one
        config.endpoints = [*config.endpoints, RuntimeEndpoint(name=adapter.name, adapter=str(adapter.path))]


async def unload(state: ServerState, name: str) -> None:
    """Stop serving adapter ``name``; its requests in flight finish with it."""
    _, async_engine = state.require_engine()
    await async_engine.call(lambda e: _retire(e, name))
    log.info("adapter %s unloaded at run time", name)


def _retire(engine: LLMEngine, name: str) -> None:
    if name in engine.endpoint_adapters and engine.endpoint_adapters[name] is None:
        raise AdapterError(f"{name!r} is the base model, not an adapter; only adapters can be unloaded")
    if engine.endpoint_adapters.get(name) is None:
        served = ", ".join(n for n, a in engine.endpoint_adapters.items() if a is not None) or "none"
        raise UnknownEndpointError(f"adapter {name!r} is not loaded here; loaded adapters: {served}")
    engine.remove_adapter(name)
    config = engine.config
    config.endpoints = [e for e in config.endpoints if not (e.name == name and isinstance(e, RuntimeEndpoint))]


def _not_found_as(error: UnknownEndpointError, param: str) -> APIError:
    return APIError(404, str(error), param=param, code="model_not_found")


# ---- vLLM -----------------------------------------------------------------------------------------------


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> PlainTextResponse:
    state = _state(request)
    _require_runtime_loading(state)
    body = await parse_body(request, LoadLoRARequest)
    name = _endpoint_name(body.lora_name, "lora_name")
    await load(state, name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> PlainTextResponse:
    state = _state(request)
    _require_runtime_loading(state)
    body = await parse_body(request, UnloadLoRARequest)
    name = state.router.endpoint_of_name(body.lora_name) or body.lora_name.removesuffix(":latest")
    try:
        await unload(state, name)
    except UnknownEndpointError as e:
        raise _not_found_as(e, "lora_name") from e
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


# ---- Ollama ---------------------------------------------------------------------------------------------


def _parse_modelfile(modelfile: str) -> tuple[str | None, list[str]]:
    """(FROM, [ADAPTER, ...]); any other instruction is refused by name rather than silently dropped."""
    base, adapters = None, []
    for number, keyword, argument in instructions(modelfile):
        if keyword not in ("FROM", "ADAPTER"):
            raise APIError(
                400,
                f"modelfile line {number}: {keyword} is not supported by loraplex; "
                "a Modelfile here has only FROM <base model> and ADAPTER <adapter directory>",
                param="modelfile",
            )
        if not argument:
            raise APIError(400, f"modelfile line {number}: {keyword} needs an argument", param="modelfile")
        if keyword == "FROM":
            base = argument
        else:
            adapters.append(argument)
    return base, adapters


def _create_source(body: OllamaCreateRequest) -> tuple[str | None, str]:
    """(base model named by FROM / from, adapter directory) from either form of the request."""
    for field in _UNSUPPORTED_CREATE_FIELDS:
        if getattr(body, field) not in (None, "", [], {}):
            raise APIError(
                400,
                f"{field} is not supported by loraplex's /api/create; it only puts one LoRA adapter on the base "
                "model (FROM + ADAPTER)",
                param=field,
            )
    if body.modelfile is not None and (body.from_ is not None or body.adapters is not None):
        raise APIError(400, "send either modelfile or from + adapters, not both", param="modelfile")
    if body.modelfile is not None:
        base, paths = _parse_modelfile(body.modelfile)
    else:
        base, paths = body.from_, list((body.adapters or {}).values())
    if not paths:
        raise APIError(
            400,
            "no adapter given; loraplex serves the base model already, so /api/create needs one adapter "
            '(ADAPTER <dir> in modelfile, or adapters = {"<any name>": "<dir>"})',
            param="adapters",
        )
    if len(paths) > 1:
        raise APIError(400, f"{len(paths)} adapters given; loraplex serves one adapter per model", param="adapters")
    if paths[0].startswith("sha256:"):
        raise APIError(
            400,
            "adapter blobs (sha256 digests uploaded with /api/blobs) are not supported; give the adapter directory "
            "as a path inside the configured adapter roots instead of its digest",
            param="adapters",
        )
    return base, paths[0]


def _check_base(state: ServerState, engine: LLMEngine, base: str | None) -> None:
    """FROM must name the base model this server holds: a base endpoint, or the model's own name or path."""
    if base is None:
        raise APIError(400, "FROM is missing; name the base model the adapter goes on (e.g. FROM base)", param="from")
    endpoint = state.router.endpoint_of_name(base)
    if endpoint is not None and engine.endpoint_adapters.get(endpoint, "") is None:
        return
    if base in (engine.model_name, str(engine.model_path)):
        return
    bases = [n for n, a in engine.endpoint_adapters.items() if a is None]
    raise APIError(
        400,
        f"FROM {base}: loraplex can only put an adapter on the base model it holds; use one of "
        f"{', '.join([*bases, engine.model_name])} (adapters cannot be stacked)",
        param="from",
    )


async def _status_lines(statuses: list[str]) -> AsyncIterator[bytes]:
    for status in statuses:
        yield (json.dumps({"status": status}, separators=(",", ":")) + "\n").encode()


@router.post("/api/create")
async def create(request: Request) -> Any:
    state = _state(request)
    _require_runtime_loading(state)
    body = await parse_body(request, OllamaCreateRequest)
    if not (body.model or body.name):
        raise APIError(400, "model is missing; send the name of the model to create", param="model")
    name = _endpoint_name(body.model or body.name or "", "model")
    base, path = _create_source(body)
    engine, _ = state.require_engine()
    _check_base(state, engine, base)
    adapter = await load(state, name, path)
    if not body.stream:
        return {"status": "success"}
    statuses = [f"using base model {engine.model_name}", f"loading adapter {adapter.path}", "success"]
    return StreamingResponse(_status_lines(statuses), media_type=NDJSON)


@router.api_route("/api/delete", methods=["DELETE", "POST"])
async def delete(request: Request) -> Response:
    state = _state(request)
    _require_runtime_loading(state)
    body = await parse_body(request, OllamaDeleteRequest)
    model = body.model or body.name
    if not model:
        raise APIError(400, "model is missing; send the name of the model to delete", param="model")
    name = state.router.endpoint_of_name(model) or model.removesuffix(":latest")
    try:
        await unload(state, name)
    except UnknownEndpointError as e:
        raise APIError(404, f"model {model!r} not found: {e}", param="model") from e
    return Response(status_code=200)
