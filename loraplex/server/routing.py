"""Which endpoint a request reaches: its listener, a ``/<endpoint>/`` path prefix, or the model name.

Precedence, most specific first: a path prefix names the endpoint outright; a request on an endpoint's own
listener (its ``port`` in the config) goes to that endpoint whatever model name it sends, so a client that
was pointed at one old per-adapter Ollama pod keeps working unchanged; on the main listener the model name
(or an alias, with an optional Ollama ``:latest`` tag) decides.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from loraplex.engine.core.config import EngineConfig
from loraplex.engine.core.errors import ConfigError, UnknownEndpointError

SCOPE_KEY = "loraplex.endpoint"  # set on the ASGI scope when the listener or a path prefix fixes the endpoint

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class EndpointRouter:
    """Endpoint resolution from the configuration alone; no engine needed, so it is unit-testable."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.main_port = config.server.port
        self.port_endpoints: dict[int, str] = {e.port: e.name for e in config.endpoints if e.port}
        if self.main_port in self.port_endpoints:
            endpoint = self.port_endpoints[self.main_port]
            raise ConfigError(f"endpoint {endpoint!r} has port {self.main_port}, the main port; give it another one")

    @property
    def ports(self) -> list[int]:
        """Every port to listen on: the main one first, then one per endpoint that asks for its own."""
        return [self.main_port, *sorted(self.port_endpoints)]

    def endpoint_of_name(self, model: str) -> str | None:
        """The endpoint a model name reaches: a name or alias, optionally with the Ollama tag ``:latest``."""
        for candidate in (model, model.removesuffix(":latest")):
            endpoint = self.config.endpoint(candidate)
            if endpoint is not None:
                return endpoint.name
        return None

    def split_prefix(self, path: str) -> tuple[str | None, str]:
        """``/chatbot/api/chat`` -> ("chatbot", "/api/chat"); a path without an endpoint prefix is unchanged."""
        first, sep, rest = path.lstrip("/").partition("/")
        if not sep:
            return None, path
        endpoint = self.config.endpoint(first)
        return (endpoint.name, "/" + rest) if endpoint is not None else (None, path)

    def fixed_endpoint(self, scope: Scope) -> str | None:
        """The endpoint the listener or path prefix fixed for this request, if any."""
        return scope.get(SCOPE_KEY)

    def resolve(self, scope: Scope, model: str) -> str:
        """The endpoint that serves this request; raises UnknownEndpointError (404) naming what exists."""
        fixed = self.fixed_endpoint(scope)
        if fixed is not None:
            return fixed
        endpoint = self.endpoint_of_name(model)
        if endpoint is None:
            served = ", ".join(e.name for e in self.config.endpoints)
            raise UnknownEndpointError(f"model {model!r} is not served here; use one of: {served}")
        return endpoint

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """ASGI middleware: strip an endpoint path prefix and record the fixed endpoint on the scope."""

        async def route(scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]):
            if scope["type"] == "http":
                endpoint, path = self.split_prefix(scope["path"])
                if endpoint is not None:
                    scope = dict(scope, path=path, raw_path=path.encode())
                else:
                    server = scope.get("server") or (None, None)
                    endpoint = self.port_endpoints.get(server[1])
                scope[SCOPE_KEY] = endpoint
            await app(scope, receive, send)

        return route
