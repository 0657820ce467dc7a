"""Limits on what one caller controls, so no single request holds the worker for unbounded time or memory.

- Body size: ``server.max_body_bytes``, checked on ``Content-Length`` and again on the bytes actually read (413).
- Requests per client address: ``server.max_requests_per_client`` (0 = off). HTTP/1.1 answers one request
  at a time per connection, so this is what bounds one client opening many connections (429).
- Stop list: ``server.max_stop_sequences`` entries of at most ``server.max_stop_length`` characters (400).
- Embedding inputs: ``server.max_embed_tokens`` tokens over all inputs of one request (400).
- Prompt and output length: ``limits.max_model_len`` bounds prompt + output (the engine and ``max_new_tokens``).
- Deadline: ``server.request_timeout`` seconds from arrival to the last token. Before the first token it is
  a 504; after it, the stream ends with the API's error chunk; either way the engine aborts the request.
- Admission per endpoint: an endpoint may hold its slots plus its share of the waiting queue in flight; past
  that its requests get 503 with Retry-After at once, so a flood on one endpoint cannot fill the queue that
  the others need (``server.max_queued_per_endpoint``, 0 = ``limits.max_waiting`` / number of endpoints).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from loraplex.engine.core.engine import RequestOutput
from loraplex.engine.core.errors import RequestError
from loraplex.engine.core.sequence import FinishReason, SamplingParams
from loraplex.server.errors import RETRY_AFTER_S, APIError, error_response
from loraplex.server.routing import ASGIApp, Scope


class DeadlineExceeded(RequestOutput):
    """The last output of a request ended by ``server.request_timeout``; ``raise_if_failed`` makes it a 504."""


class Admission:
    """Requests in flight per endpoint and per client address, counted on the event loop (no lock needed)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.per_endpoint: Counter[str] = Counter()
        self.per_client: Counter[str] = Counter()

    def endpoint_cap(self, endpoint: str) -> int:
        config = self.state.config
        engine = self.state.engine
        share = config.server.max_queued_per_endpoint
        if not share:
            endpoints = len(engine.endpoint_adapters) if engine is not None else len(config.endpoints)
            share = max(1, config.limits.max_waiting // max(1, endpoints))
        slots = engine.scheduler.endpoint_slots.get(endpoint, 0) if engine is not None else 0
        return slots + share

    def enter(self, endpoint: str) -> None:
        cap = self.endpoint_cap(endpoint)
        if self.per_endpoint[endpoint] >= cap:
            raise APIError(
                503,
                f"endpoint {endpoint!r} has {cap} requests in flight, its slots plus its share of the waiting "
                "queue; retry shortly",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        self.per_endpoint[endpoint] += 1

    def leave(self, endpoint: str) -> None:
        self.per_endpoint[endpoint] -= 1
        if self.per_endpoint[endpoint] <= 0:
            del self.per_endpoint[endpoint]


def check_sampling(state: Any, params: SamplingParams) -> None:
    """Stop-list size and length; the output length is already bounded by the context (``max_new_tokens``)."""
    server = state.config.server
    if len(params.stop) > server.max_stop_sequences:
        raise RequestError(f"stop = {len(params.stop)} sequences is invalid; send at most {server.max_stop_sequences}")
    for text in params.stop:
        if not isinstance(text, str) or len(text) > server.max_stop_length:
            size = len(text) if isinstance(text, str) else type(text).__name__
            raise RequestError(
                f"stop = a string of {size} characters is invalid; send strings of at most "
                f"{server.max_stop_length} characters"
            )


def check_embed_tokens(state: Any, token_lists: list[list[int]]) -> None:
    total, limit = sum(len(t) for t in token_lists), state.config.server.max_embed_tokens
    if total > limit:
        raise RequestError(
            f"input = {len(token_lists)} texts of {total} tokens in all is invalid; send at most {limit} tokens "
            "per request (split it into several requests)"
        )


async def guarded(
    state: Any, endpoint: str, outputs: AsyncIterator[RequestOutput], arrival_time: float
) -> AsyncIterator[RequestOutput]:
    """The engine's outputs under per-endpoint admission and the request deadline.

    Errors before the first output propagate (they become HTTP statuses); after it, a deadline or a dead
    engine loop ends the stream with a finished ERROR output, so the route sends its error chunk and a clean
    end instead of cutting the connection. Closing this generator aborts the request in the engine.
    """
    admission: Admission = state.admission
    admission.enter(endpoint)
    timeout = state.config.server.request_timeout
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout - (time.monotonic() - arrival_time)
    first, last = True, None
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    out = await anext(outputs)
            except StopAsyncIteration:
                return
            except TimeoutError:
                message = f"the request ran past server.request_timeout ({timeout:g} s) and was stopped"
                if first:
                    raise APIError(504, message) from None
                yield _failed(DeadlineExceeded, last, message)
                return
            except Exception as e:
                if first:
                    raise
                yield _failed(RequestOutput, last, str(e))
                return
            first, last = False, out
            yield out
    finally:
        try:
            await outputs.aclose()  # aborts the request in the engine if it has not finished
        finally:
            admission.leave(endpoint)


def _failed(cls: type[RequestOutput], last: RequestOutput | None, error: str) -> RequestOutput:
    assert last is not None
    return cls(
        request_id=last.request_id,
        new_token_ids=[],
        text_delta="",
        finished=True,
        finish_reason=FinishReason.ERROR,
        num_prompt_tokens=last.num_prompt_tokens,
        num_output_tokens=last.num_output_tokens,
        error=error,
        arrival_time=last.arrival_time,
        first_scheduled_time=last.first_scheduled_time,
        prefill_done_time=last.prefill_done_time,
        finish_time=time.monotonic(),
    )


def limits_middleware(state: Any, app: ASGIApp) -> ASGIApp:
    """Body size (413) and requests in flight per client address (429), before the app reads anything."""
    server = state.config.server

    async def guard(scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        limit = server.max_body_bytes
        too_big = APIError(413, f"the request body is over server.max_body_bytes ({limit} bytes); send less")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await error_response(too_big, scope["path"])(scope, receive, send)
        client = (scope.get("client") or ("?", 0))[0]
        per_client, cap = state.admission.per_client, server.max_requests_per_client
        if cap and per_client[client] >= cap:
            busy = APIError(
                429,
                f"this client has {cap} requests in flight (server.max_requests_per_client); wait for one to end",
                headers={"Retry-After": RETRY_AFTER_S},
            )
            return await error_response(busy, scope["path"])(scope, receive, send)
        received = 0

        async def counted() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_big
            return message

        per_client[client] += 1
        try:
            await app(scope, counted, send)
        finally:
            per_client[client] -= 1
            if per_client[client] <= 0:
                del per_client[client]

    return guard
