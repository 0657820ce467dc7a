"""Every failure becomes a status and a message that says what to change, in the shape the client expects.

Ollama clients read ``{"error": "..."}``; OpenAI clients read ``{"error": {"message", "type", "param",
"code"}}``. The shape follows the route family (``/v1/...`` is OpenAI), so one exception type serves both.
User input never produces a 500: engine errors map to 400/404/503, pydantic errors to 400.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.engine.core.errors import (
    AdapterError,
    EngineDeadError,
    QueueFullError,
    RequestError,
    UnknownEndpointError,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
_PARAM = re.compile(r"^(\w+) = ")  # engine messages start with "<field> = <value> is invalid"


class APIError(Exception):
    """An HTTP error with a message for the caller; ``param`` and ``code`` fill OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def unsupported(feature: str, param: str) -> APIError:
    return APIError(400, f"loraplex does not support {feature} yet; remove {param!r} from the request", param=param)


def describe_validation(error: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """One readable line per bad field, and the first field's name for OpenAI's ``param``."""
    parts, first = [], None
    for item in error.errors():
        loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        first = first or loc or None
        parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
    return "invalid request: " + "; ".join(parts), first


def to_api_error(exc: Exception) -> APIError:
    """Map an engine or validation error to its HTTP status; anything unexpected is a logged 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnknownEndpointError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, RequestError | AdapterError):
        match = _PARAM.match(str(exc))
        return APIError(400, str(exc), param=match.group(1) if match else None)
    if isinstance(exc, QueueFullError):
        return APIError(503, str(exc), headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc))
    if isinstance(exc, ValidationError | RequestValidationError):
        message, param = describe_validation(exc)
        return APIError(400, message, param=param)
    if isinstance(exc, StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail))  # unknown route (404) or method (405)
    log.error("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_body(error: APIError, path: str) -> dict:
    if not is_openai_path(path):
        return {"error": error.message}
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}


def error_response(exc: Exception, path: str, method: str = "") -> JSONResponse:
    error = to_api_error(exc)
    if isinstance(exc, StarletteHTTPException) and exc.status_code in (404, 405):
        error.message = f"{method} {path} is not a loraplex route ({exc.detail}); see the README's Server API"
    return JSONResponse(error_body(error, path), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc, request.url.path, request.method)

    for exc_type in (APIError, RequestError, AdapterError, QueueFullError, EngineDeadError, ValidationError):
        app.add_exception_handler(exc_type, handle)
    app.add_exception_handler(RequestValidationError, handle)
    app.add_exception_handler(StarletteHTTPException, handle)
    app.add_exception_handler(Exception, handle)
