"""Optional API keys: ``Authorization: Bearer <key>``, as the ``openai`` client sends its ``api_key`` and as
the ``ollama`` client sends it through ``headers``.

Keys come only from files or environment variables (``[auth]``), are kept as SHA-256 digests and compared
with ``hmac.compare_digest`` against every configured key (no early exit), and are never logged. With no
keys configured every route is open, as before. Adapter management routes follow ``auth.admin_routes``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from loraplex.engine.core.config import AuthConfig
from loraplex.engine.core.errors import ConfigError
from loraplex.server.errors import APIError, error_response
from loraplex.server.routing import ASGIApp, Scope

log = logging.getLogger(__name__)

ADMIN_PATHS = frozenset(
    {
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/api/create",
        "/api/delete",
        "/api/copy",
        "/api/push",
    }
)
ADMIN_PREFIXES = ("/api/blobs/",)  # Ollama's upload step of /api/create


def is_admin_path(path: str) -> bool:
    return path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_keys(env: str, file: str) -> list[bytes]:
    """Digests of the keys in environment variable ``env`` (comma-separated) and ``file`` (one per line)."""
    keys = [k.strip() for k in os.environ.get(env, "").split(",")] if env else []
    if file:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"auth: cannot read key file {file}: {e.strerror}") from e
        keys += [line.split("#", 1)[0].strip() for line in lines]
    return [_digest(k) for k in keys if k]


class KeyChecker:
    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.api_keys = read_keys(config.api_keys_env, config.api_keys_file)
        self.admin_keys = read_keys(config.admin_keys_env, config.admin_keys_file)
        self.public = frozenset(config.public_paths)
        log.info(
            "auth: %d API key(s), %d admin key(s), admin routes %s",
            len(self.api_keys),
            len(self.admin_keys),
            config.admin_routes,
        )

    @staticmethod
    def _matches(presented: bytes, keys: list[bytes]) -> bool:
        found = False
        for key in keys:  # every key is compared, so the time does not say which one matched
            found |= hmac.compare_digest(presented, key)
        return found

    def check(self, path: str, authorization: str | None) -> APIError | None:
        """None when the request may go on, else the 401/403/404 to answer."""
        admin = is_admin_path(path)
        if path in self.public and not admin:
            return None
        mode = self.config.admin_routes
        if admin and mode == "off":
            return APIError(403, f'{path} is turned off on this server (auth.admin_routes = "off")')
        needs_admin = admin and (mode == "admin" or (mode == "auto" and self.admin_keys))
        allowed = self.admin_keys if needs_admin else self.api_keys + self.admin_keys
        if not needs_admin and not self.api_keys:
            return None  # no API keys configured: open, as without [auth]
        presented = _bearer(authorization)
        if presented is None:
            return APIError(
                401,
                "missing API key; send the header 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        digest = _digest(presented)
        if self._matches(digest, allowed):
            return None
        if needs_admin and self._matches(digest, self.api_keys):
            return APIError(403, f"{path} needs an admin key; this API key may not manage adapters")
        return APIError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def auth_middleware(config: AuthConfig, app: ASGIApp) -> ASGIApp:
    checker = KeyChecker(config)

    async def guard(scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization")
        refusal = checker.check(scope["path"], header.decode("latin-1") if header is not None else None)
        if refusal is not None:
            return await error_response(refusal, scope["path"])(scope, receive, send)
        return await app(scope, receive, send)

    return guard
