"""The app factory, its lifecycle, and ``run_server``: one event loop, one listener per port.

Start-up: the listeners open first, so ``/health`` answers and ``/ready`` says 503 while the model loads in a
thread; once the engine runs, ``/ready`` turns 200 and one log line says where the server listens and what
it serves. SIGTERM (or Ctrl-C): new requests get 503 and ``/ready`` fails, requests in flight (streams
included) finish within ``server.grace_period`` seconds, then the listeners close and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from loraplex.engine.core.config import EngineConfig
from loraplex.server import adapters_api, ollama, ollama_models, openai_api, schemas
from loraplex.server.auth import auth_middleware
from loraplex.server.errors import APIError, error_response, install_error_handlers
from loraplex.server.limits import limits_middleware
from loraplex.server.metrics import CONTENT_TYPE
from loraplex.server.routing import ASGIApp, Scope
from loraplex.server.state import ServerState

log = logging.getLogger(__name__)

OPS_PATHS = frozenset({"/health", "/ready", "/metrics"})  # answered even while shutting down
CLOSE_TIMEOUT_S = 2  # after the grace period, how long uvicorn waits before cancelling what is left


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="loraplex", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.loraplex = state
    install_error_handlers(app)
    app.include_router(ollama.router)
    app.include_router(openai_api.router)
    app.include_router(adapters_api.router)
    app.include_router(ollama_models.router)
    app.openapi = lambda: _openapi(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: the process is up and, once loaded, the engine loop has not died."""
        engine = state.async_engine
        if engine is not None and not engine.is_alive:
            return JSONResponse({"status": "dead", "error": str(engine.error)}, status_code=503)
        return JSONResponse({"status": "ok" if engine is not None else "loading"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: the model is loaded and the server is not shutting down."""
        status = "ready" if state.ready else "shutting down" if state.shutting_down else "loading"
        return JSONResponse({"status": status}, status_code=200 if state.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return app


# The handlers read their bodies with ``parse_body`` (a 400 in the API's own shape), so FastAPI cannot see
# the models: the published schema gets them from here.
_BODIES = {
    "/api/generate": schemas.OllamaGenerateRequest,
    "/api/chat": schemas.OllamaChatRequest,
    "/api/embed": schemas.OllamaEmbedRequest,
    "/api/embeddings": schemas.OllamaEmbeddingsRequest,
    "/api/show": schemas.OllamaShowRequest,
    "/api/pull": schemas.OllamaPullRequest,
    "/v1/chat/completions": schemas.ChatCompletionRequest,
    "/v1/completions": schemas.CompletionRequest,
    "/v1/load_lora_adapter": adapters_api.LoadLoRARequest,
    "/v1/unload_lora_adapter": adapters_api.UnloadLoRARequest,
    "/api/create": ollama_models.OllamaCreateRequest,
    "/api/copy": ollama_models.OllamaCopyRequest,
    "/api/delete": ollama_models.OllamaDeleteRequest,
}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with each route's JSON request body and the error shape of its route family."""
    if app.openapi_schema:
        return app.openapi_schema
    with warnings.catch_warnings():  # routes serving two methods share a name; the IDs are rewritten below
        warnings.simplefilter("ignore")
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    ollama_error = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    openai_error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    }
    components["OllamaError"], components["OpenAIError"] = ollama_error, openai_error
    for path, methods in spec.get("paths", {}).items():
        error = "OpenAIError" if path.startswith("/v1") else "OllamaError"
        for method, operation in methods.items():
            operation["operationId"] = f"{method}_{path.strip('/').replace('/', '_') or 'root'}"
            operation.get("responses", {}).pop("422", None)  # bad bodies are 400s in the API's own shape
            operation.setdefault("responses", {})["4XX"] = {
                "description": "the request cannot be served as sent",
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}},
            }
            model = _BODIES.get(path)
            if model is None or method not in ("post", "put", "delete"):
                continue
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = spec
    return spec


def lifecycle_middleware(state: ServerState, app: ASGIApp) -> ASGIApp:
    """Counts requests in flight for the drain, and refuses new ones with 503 once shutdown has begun."""

    async def guard(scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]):
        if scope["type"] != "http" or scope["path"] in OPS_PATHS:
            return await app(scope, receive, send)
        if state.shutting_down:
            error = APIError(503, "the server is shutting down; retry on another worker")
            return await error_response(error, scope["path"])(scope, receive, send)
        state.in_flight += 1
        try:
            await app(scope, receive, send)
        finally:
            state.in_flight -= 1

    return guard


def build_asgi(state: ServerState) -> ASGIApp:
    """Routing outermost (it rewrites prefixed paths), then API keys, body and per-client limits, the lifecycle
    guard, then FastAPI."""
    app = lifecycle_middleware(state, create_app(state))
    return state.router.middleware(auth_middleware(state.config.auth, limits_middleware(state, app)))


class _Listener(uvicorn.Server):
    """A uvicorn server that leaves signals to ``serve``, so several listeners can share one loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(config: EngineConfig) -> None:
    """Listen on every port, load the engine, serve until SIGTERM/SIGINT, drain, stop."""
    state = ServerState(config)
    asgi = build_asgi(state)
    host = config.server.host
    listeners = [
        _Listener(
            uvicorn.Config(
                asgi, host=host, port=port, lifespan="off", log_config=None, timeout_graceful_shutdown=CLOSE_TIMEOUT_S
            )
        )
        for port in state.router.ports
    ]
    stop, force = asyncio.Event(), asyncio.Event()  # a second signal cuts the drain short
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: force.set() if stop.is_set() else stop.set())
    tasks = [asyncio.create_task(listener.serve()) for listener in listeners]
    try:
        await asyncio.to_thread(state.load)
        log.info("listening on %s; serving %s", _where(config, state), _what(config))
        await stop.wait()
        log.info("shutting down: refusing new requests, %d in flight", state.in_flight)
        await _drain(state, config.server.grace_period, force)
    finally:
        state.shutting_down = True
        for listener in listeners:
            listener.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        state.close()
    log.info("stopped")


async def _drain(state: ServerState, grace_period: float, force: asyncio.Event) -> None:
    state.shutting_down = True
    deadline = time.monotonic() + grace_period
    while state.in_flight and time.monotonic() < deadline and not force.is_set():
        await asyncio.sleep(0.05)
    if state.in_flight:
        log.warning("drain cut short (grace period %.0f s); ending %d request(s)", grace_period, state.in_flight)


def _where(config: EngineConfig, state: ServerState) -> str:
    host = config.server.host
    extra = [f"{name} on http://{host}:{port}" for port, name in sorted(state.router.port_endpoints.items())]
    return ", ".join([f"http://{host}:{config.server.port}", *extra])


def _what(config: EngineConfig) -> str:
    return ", ".join(f"{e.name} ({', '.join(e.aliases)})" if e.aliases else e.name for e in config.endpoints)


def run_server(config: EngineConfig) -> None:
    """``loraplex serve``: one event loop until SIGTERM or SIGINT."""
    asyncio.run(serve(config))
