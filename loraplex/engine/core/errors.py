"""Typed errors: the server maps each to an HTTP status and shows the message to the caller."""


class LoraplexError(Exception):
    """Base of every error the engine raises on purpose."""


class ConfigError(LoraplexError, ValueError):
    """The configuration file or a value in it is wrong; the message names the key."""


class AdapterError(LoraplexError, ValueError):
    """An adapter cannot be served; the message names the adapter, the field and the value."""


class RequestError(LoraplexError, ValueError):
    """A request is invalid (HTTP 400); the message says what to change."""


class UnknownEndpointError(RequestError):
    """The request names an endpoint or adapter this worker does not serve (HTTP 404)."""


class QueueFullError(LoraplexError):
    """The waiting queue is at its bound (HTTP 503 with Retry-After)."""


class EngineDeadError(LoraplexError):
    """The engine loop has stopped; nothing more can be served (HTTP 503)."""
