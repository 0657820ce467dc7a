"""Adapters at run time: vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, and the loading
and unloading that Ollama's ``/api/create`` and ``/api/delete`` (ollama_models.py) share with them.

A load reads and validates the adapter off the event loop and off the engine loop (``asyncio.to_thread``),
then registers it on the engine loop thread (``AsyncEngine.call``) together with an endpoint of the same
name, so ``/api/tags``, ``/v1/models``, ``/api/show`` and routing by model name or ``/<name>/`` prefix see it
at once. An unload stops new requests at once; requests already running finish with the adapter, and its
slot is freed when the last one ends. Paths are confined to ``[adapters] roots``; with
``runtime_loading = false`` every route here answers 403.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import Field

from loraplex.engine.core.config import EndpointConfig
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.errors import AdapterError, UnknownEndpointError
from loraplex.engine.lora.config import LoRAAdapter
from loraplex.server.errors import APIError
from loraplex.server.schemas import RequestBody, parse_body
from loraplex.server.state import ServerState

log = logging.getLogger(__name__)
router = APIRouter()

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# First path segments of the server's own routes: an endpoint of that name would turn into a path prefix.
_RESERVED = frozenset({"api", "v1", "health", "ready", "metrics"})


class RuntimeEndpoint(EndpointConfig):
    """An endpoint added at run time; unloading it removes it from the configuration again."""


class LoadLoRARequest(RequestBody):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRARequest(RequestBody):
    lora_name: str = Field(min_length=1)


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex


def require_runtime_loading(state: ServerState) -> None:
    if not state.config.adapters.runtime_loading:
        raise APIError(
            403,
            "loading and unloading adapters at run time is turned off on this server "
            "(adapters.runtime_loading = false); set it to true in the config to allow it",
            code="runtime_loading_disabled",
        )


def endpoint_name(name: str, param: str) -> str:
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


async def load(state: ServerState, name: str, path: str, confined: bool = True) -> LoRAAdapter:
    """Read ``path`` in a worker thread, then serve it as endpoint ``name`` (registered on the engine thread).
    ``confined``: the path must be inside ``[adapters] roots`` (a request's path; not one the server wrote)."""
    engine, async_engine = state.require_engine()
    configured = state.config.endpoint(name)
    if configured is not None and configured.name != name:
        raise AdapterError(f"adapter {name!r}: the name is an alias of endpoint {configured.name!r}; pick another")
    if name in engine.endpoint_adapters:
        raise AdapterError(f"adapter {name!r}: the name is already served; unload it first")
    resolved = await asyncio.to_thread(state.config.adapters.allowed_path, path) if confined else Path(path)
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
    """Stop serving adapter ``name``; its requests in flight finish with it. Models made as its aliases
    (``/api/copy``) keep it."""
    _, async_engine = state.require_engine()
    dependants = state.models.aliases_of(name)
    if dependants:
        used = ", ".join(dependants)
        raise AdapterError(f"{name!r} is used by {used} (copies, or models made FROM it); delete those first")
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
    require_runtime_loading(state)
    body = await parse_body(request, LoadLoRARequest)
    name = endpoint_name(body.lora_name, "lora_name")
    await load(state, name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> PlainTextResponse:
    state = _state(request)
    require_runtime_loading(state)
    body = await parse_body(request, UnloadLoRARequest)
    name = state.router.endpoint_of_name(body.lora_name) or body.lora_name.removesuffix(":latest")
    try:
        await unload(state, name)
    except UnknownEndpointError as e:
        raise _not_found_as(e, "lora_name") from e
    state.models.discard(name)  # made by /api/create: gone for good, not served again after a restart
    state.models.remove(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
