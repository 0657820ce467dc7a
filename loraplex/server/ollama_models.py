"""Ollama's model management: ``/api/create`` (a Modelfile, or the fields the ``ollama`` client sends),
``/api/copy`` and ``/api/delete``, and serving again at start what was made before a restart.

A model with an ADAPTER is an endpoint of its own (``adapters_api.load``); one without is an alias of the
endpoint its FROM names, with defaults of its own; a copy is an alias of the source's endpoint with a copy of
its defaults. Everything a request could get wrong is checked before anything changes, and each step that
changes something is undone if a later one fails, so a failed create leaves nothing behind: no endpoint, no
alias, no file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.errors import AdapterError, ConfigError, RequestError, UnknownEndpointError
from loraplex.engine.lora.gguf_adapter import is_gguf_file
from loraplex.server import model_defaults
from loraplex.server.adapters_api import endpoint_name, load, require_runtime_loading, unload
from loraplex.server.errors import APIError
from loraplex.server.generation import context_limit
from loraplex.server.model_store import StoredModel
from loraplex.server.modelfile import ModelfileError, ModelSpec, parse_modelfile, spec_from_fields
from loraplex.server.ollama_params import sampling_params
from loraplex.server.schemas import RequestBody, parse_body
from loraplex.server.state import ServerState

log = logging.getLogger(__name__)
router = APIRouter()

NDJSON = "application/x-ndjson"
_UNSUPPORTED_CREATE_FIELDS = ("quantize", "files", "path")
_FIELDS = ("from_", "adapters", "system", "template", "parameters", "messages", "license")


class OllamaCreateRequest(BaseModel):
    """Both forms: ``modelfile`` (what older clients send), or the fields the current ``ollama`` client sends."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str | None = None
    name: str | None = None  # the pre-0.5 field name
    modelfile: str | None = None
    from_: str | None = Field(default=None, alias="from")
    adapters: dict[str, str] | None = None
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[Any] | None = None
    license: str | list[str] | None = None
    stream: bool = True
    quantize: Any = None
    files: Any = None
    path: Any = None  # the pre-0.5 path of a Modelfile on the server's disk


class OllamaCopyRequest(RequestBody):
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)


class OllamaDeleteRequest(RequestBody):
    model: str | None = None
    name: str | None = None


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex


def _spec(body: OllamaCreateRequest) -> ModelSpec:
    for field in _UNSUPPORTED_CREATE_FIELDS:
        if getattr(body, field) not in (None, "", [], {}):
            raise APIError(
                400,
                f"{field} is not supported by loraplex's /api/create; give the base (from) and the adapter's path "
                "inside the configured adapter roots (adapters)",
                param=field,
            )
    fields = [f.rstrip("_") for f in _FIELDS if getattr(body, f) is not None]
    if body.modelfile is not None and fields:
        raise APIError(400, f"send either modelfile or {', '.join(fields)}, not both", param="modelfile")
    try:
        if body.modelfile is not None:
            spec = parse_modelfile(body.modelfile)
        else:
            spec = spec_from_fields(
                body.from_, body.adapters, body.system, body.template, body.parameters, body.messages, body.license
            )
    except ModelfileError as e:
        raise APIError(400, str(e), param=e.where) from e
    if spec.adapter is not None and spec.adapter.startswith("sha256:"):
        raise APIError(
            400,
            "adapter blobs (sha256 digests uploaded with /api/blobs) are not supported; give the adapter's path "
            "inside the configured adapter roots instead of its digest",
            param="adapters",
        )
    return spec


def _parent(state: ServerState, engine: LLMEngine, spec: ModelSpec) -> tuple[str, ModelSpec]:
    """The endpoint FROM names and the defaults the new model inherits from it: a base endpoint, the base model
    by its name or path, or (without an ADAPTER: adapters cannot be stacked) any served model."""
    if not spec.base:
        raise APIError(400, "FROM is missing; name the base model (e.g. FROM base)", param="from")
    bases = [n for n, a in engine.endpoint_adapters.items() if a is None]
    endpoint = state.router.endpoint_of_name(spec.base)
    if endpoint is None and spec.base in (engine.model_name, str(engine.model_path)) and bases:
        return bases[0], ModelSpec()
    served = endpoint is not None and endpoint in engine.endpoint_adapters
    if served and (engine.endpoint_adapters[endpoint] is None or spec.adapter is None):
        return endpoint, state.models.spec(spec.base, endpoint)
    raise APIError(
        400,
        f"FROM {spec.base}: {'adapters cannot be stacked; ' if endpoint else ''}put an adapter on the base model "
        f"this server holds ({', '.join([*bases, engine.model_name])}), or name a served model without ADAPTER",
        param="from",
    )


def _checked(state: ServerState, spec: ModelSpec) -> tuple[ModelSpec, list[str]]:
    """The spec with num_ctx clamped to max_model_len, and the warnings for the create response; a parameter out
    of its range is a 400, here rather than on every request to the model."""
    warnings = list(spec.warnings)
    max_len = state.config.limits.max_model_len
    num_ctx = spec.parameters.get("num_ctx")
    if num_ctx is not None and num_ctx > max_len:
        warnings.append(f"num_ctx {num_ctx} is above this server's max_model_len; clamped to {max_len}")
        spec = dataclasses.replace(spec, parameters=spec.parameters | {"num_ctx": max_len})
    if num_ctx is not None and num_ctx < 2:
        raise APIError(400, f"PARAMETER num_ctx = {num_ctx} is invalid; use 2 or more", param="parameters")
    try:
        options = model_defaults.options(spec, None)
        sampling_params(options, 1, context_limit(state, num_ctx and min(num_ctx, max_len)))
    except RequestError as e:
        raise APIError(400, f"PARAMETER {e}", param="parameters") from e
    return spec, warnings


async def make(state: ServerState, name: str, spec: ModelSpec, confined: bool = True) -> tuple[StoredModel, list[str]]:
    """Serve ``spec`` as model ``name`` and write it to the state folder; all or nothing."""
    engine, _ = state.require_engine()
    endpoint, parent = _parent(state, engine, spec)
    spec, warnings = _checked(state, spec.inherit(parent))
    model = StoredModel(name, name if spec.adapter else endpoint, spec)
    existing = state.models.get(name)
    if existing is not None and existing.endpoint == model.endpoint and spec.adapter is None:
        model.adapter = existing.adapter  # the same model again with other defaults: replace them in place
        _save(state, model)
        state.models.add(model)
        return model, warnings
    await _publish(state, model, spec.adapter, confined, "model")
    return model, warnings


async def _publish(state: ServerState, model: StoredModel, adapter: str | None, confined: bool, param: str) -> None:
    """Serve a new model (its adapter as an endpoint of its own, else as an alias) and write its file; a step
    that fails undoes the ones before it."""
    if state.config.endpoint(model.name) is not None:
        raise APIError(400, f"model {model.name!r} already exists; delete it first or pick another name", param=param)
    state.models.add(model)
    served = False
    try:
        if adapter is not None:
            model.adapter = str((await load(state, model.name, adapter, confined)).path)
        else:
            await _add_alias(state, model.endpoint, model.name)
        served = True
        _save(state, model)
    except BaseException:
        state.models.discard(model.name)
        if served:
            await _unserve(state, model)
        raise


def _save(state: ServerState, model: StoredModel) -> None:
    try:
        state.models.save(model)
    except OSError as e:
        raise APIError(500, f"cannot write model {model.name!r} to {state.models.folder}: {e}") from e


async def _unserve(state: ServerState, model: StoredModel) -> None:
    """Stop serving a model this request served, when a later step of it failed."""
    if model.is_alias:
        await _remove_alias(state, model.name)
    else:
        await unload(state, model.name)


async def _add_alias(state: ServerState, endpoint: str, alias: str) -> None:
    def add(engine: LLMEngine) -> None:
        config = engine.config
        if config.endpoint(alias) is not None:
            raise AdapterError(f"model {alias!r} already exists; delete it first or pick another name")
        config.endpoints = [  # a new list, never a mutated one: the event loop may be iterating the old one
            dataclasses.replace(e, aliases=[*e.aliases, alias]) if e.name == endpoint else e for e in config.endpoints
        ]

    await state.require_engine()[1].call(add)


async def _remove_alias(state: ServerState, alias: str) -> None:
    def remove(engine: LLMEngine) -> None:
        config = engine.config
        config.endpoints = [
            dataclasses.replace(e, aliases=[a for a in e.aliases if a != alias]) if alias in e.aliases else e
            for e in config.endpoints
        ]

    await state.require_engine()[1].call(remove)


async def _status_lines(statuses: list[str]) -> AsyncIterator[bytes]:
    for status in statuses:
        yield (json.dumps({"status": status}, separators=(",", ":")) + "\n").encode()


@router.post("/api/create")
async def create(request: Request) -> Any:
    state = _state(request)
    require_runtime_loading(state)
    body = await parse_body(request, OllamaCreateRequest)
    if not (body.model or body.name):
        raise APIError(400, "model is missing; send the name of the model to create", param="model")
    name = endpoint_name(body.model or body.name or "", "model")
    async with state.models.lock:  # one change at a time: a name is checked and taken in one step
        model, warnings = await make(state, name, _spec(body))
    if not body.stream:
        return {"status": "success"} | ({"warnings": warnings} if warnings else {})
    source = f"loading adapter {model.adapter}" if model.adapter else f"using model {model.endpoint}"
    statuses = [source, *(f"warning: {w}" for w in warnings), "writing manifest", "success"]
    return StreamingResponse(_status_lines(statuses), media_type=NDJSON)


@router.post("/api/copy")
async def copy(request: Request) -> Response:
    """The destination is an alias of the source's endpoint with a copy of its defaults: it shares the source's
    adapter (and its slot), and changing or deleting it leaves the source as it was."""
    state = _state(request)
    require_runtime_loading(state)
    body = await parse_body(request, OllamaCopyRequest)
    endpoint = state.router.endpoint_of_name(body.source)
    if endpoint is None or endpoint not in state.require_engine()[0].endpoint_adapters:
        raise APIError(404, f"model {body.source!r} not found", param="source")
    name = endpoint_name(body.destination, "destination")
    async with state.models.lock:
        model = StoredModel(name, endpoint, state.models.spec(body.source, endpoint))
        await _publish(state, model, None, True, "destination")
    return Response(status_code=200)


@router.api_route("/api/delete", methods=["DELETE", "POST"])
async def delete(request: Request) -> Response:
    state = _state(request)
    require_runtime_loading(state)
    body = await parse_body(request, OllamaDeleteRequest)
    model = body.model or body.name
    if not model:
        raise APIError(400, "model is missing; send the name of the model to delete", param="model")
    async with state.models.lock:
        await _delete(state, model)
    return Response(status_code=200)


async def _delete(state: ServerState, model: str) -> None:
    stored = state.models.get(model)
    if stored is not None and stored.is_alias:
        await _remove_alias(state, stored.name)
        name = stored.name
    else:
        name = state.router.endpoint_of_name(model) or model.removesuffix(":latest")
        try:
            await unload(state, name)
        except UnknownEndpointError as e:
            raise APIError(404, f"model {model!r} not found: {e}", param="model") from e
    state.models.discard(name)
    try:
        state.models.remove(name)
    except OSError as e:
        raise APIError(500, f"model {name!r} is deleted but its file in {state.models.folder} is not: {e}") from e


# ---- at start -------------------------------------------------------------------------------------------


async def restore(state: ServerState) -> None:
    """Serve again what the state folder holds, and apply the Modelfiles of configured endpoints. A saved model
    that cannot be served any more (its adapter gone) is logged and left on disk, and the others still serve."""
    engine, _ = state.require_engine()
    for endpoint in state.config.endpoints:
        if endpoint.modelfile:
            state.models.add(StoredModel(endpoint.name, endpoint.name, _startup_spec(state, engine, endpoint)))
    for saved in state.models.saved():
        try:
            if saved.adapter is None and saved.endpoint not in engine.endpoint_adapters:
                raise UnknownEndpointError(f"its endpoint {saved.endpoint!r} is not served any more")
            state.models.add(saved)
            if saved.is_alias:
                await _add_alias(state, saved.endpoint, saved.name)
            elif saved.adapter is not None:
                await load(state, saved.name, saved.adapter, confined=False)
        except (AdapterError, RequestError, OSError) as e:
            state.models.discard(saved.name)
            log.error("model %s was created before but cannot be served now: %s", saved.name, e)
            continue
        log.info("model %s served again (%s)", saved.name, f"alias of {saved.endpoint}" if saved.is_alias else "")


def _startup_spec(state: ServerState, engine: LLMEngine, endpoint: Any) -> ModelSpec:
    """An endpoint's Modelfile (``serve --modelfile``, or ``modelfile`` in the config): its defaults. Its
    ADAPTER must be the endpoint's adapter; FROM is taken to name the one base this server holds (a model name,
    or its file, as `loraplex migrate` writes it)."""
    path = Path(endpoint.modelfile)
    try:
        spec = parse_modelfile(path.read_text())
    except (OSError, ModelfileError) as e:
        raise ConfigError(f"endpoint {endpoint.name}: Modelfile {path}: {e}") from e
    adapter = str(modelfile_adapter(path, spec) or "")
    if adapter != endpoint.adapter:
        raise ConfigError(
            f"endpoint {endpoint.name}: Modelfile {path} has ADAPTER {adapter or '(none)'} but the endpoint serves "
            f"{endpoint.adapter or 'the base'}; make them agree"
        )
    named = spec.base and (state.router.endpoint_of_name(spec.base) is not None or spec.base == engine.model_name)
    base_file = state.config.model.path and Path(state.config.model.path).resolve()
    if spec.base and not named and (path.parent / Path(spec.base).expanduser()).resolve() != base_file:
        log.warning(
            "endpoint %s: Modelfile %s says FROM %s; served on %s", endpoint.name, path, spec.base, engine.model_name
        )
    try:
        spec, warnings = _checked(state, spec)
    except APIError as e:
        raise ConfigError(f"endpoint {endpoint.name}: Modelfile {path}: {e.message}") from e
    for warning in warnings:
        log.warning("endpoint %s: Modelfile %s: %s", endpoint.name, path, warning)
    return spec


def modelfile_adapter(path: Path, spec: ModelSpec) -> Path | None:
    """The Modelfile's ADAPTER resolved against the Modelfile's folder, as Ollama resolves it."""
    if spec.adapter is None:
        return None
    adapter = (path.parent / Path(spec.adapter).expanduser()).resolve()
    if not (adapter.is_dir() or is_gguf_file(adapter)):
        raise ConfigError(f"Modelfile {path}: ADAPTER {spec.adapter} is not a PEFT adapter folder or a GGUF LoRA file")
    return adapter


def restore_blocking(state: ServerState) -> None:
    """``restore`` from the loading thread, before the server says it is ready."""
    asyncio.run(restore(state))
