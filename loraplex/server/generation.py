"""Running one request through the engine for a route: limits, submission, timings and stream hygiene.

Both APIs share this path: ``receive`` reads a body up to its endpoint, the route translates its API's fields
into engine ``Request``s (``Call.requests``: one, or ``n`` siblings per prompt), and ``Call.respond`` submits
them and hands their outputs to the route's formatter, streamed or whole. ``start`` waits for the first output
before the route answers, so every refusal the engine makes (bad prompt, full queue, dead loop) becomes an
HTTP status instead of a broken stream; the stream it returns closes the engine's generator however the
response ends, so a client that disconnects aborts its request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, TypeVar

from fastapi import Request as HTTPRequest
from fastapi import Response

from loraplex.engine.core.engine import LLMEngine, RequestOutput
from loraplex.engine.core.errors import RequestError
from loraplex.engine.core.sequence import FinishReason, Guide, Request, SamplingParams, TokenLogprob
from loraplex.server import limits
from loraplex.server.errors import APIError
from loraplex.server.schemas import parse_body
from loraplex.server.state import ServerState

NS = 1_000_000_000
T = TypeVar("T")


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def logprobs_count(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    """The engine's ``logprobs`` from the pair both chat APIs take: None (off), or how many alternatives
    to return with each token. ``top_logprobs`` alone is refused, as OpenAI and vLLM refuse it."""
    if top_logprobs is not None and not logprobs:
        raise APIError(
            400, "top_logprobs needs logprobs: true; send both, or leave top_logprobs out", param="top_logprobs"
        )
    return (top_logprobs or 0) if logprobs else None


def context_limit(state: ServerState, num_ctx: int | None = None) -> int:
    """Tokens one sequence may hold: max_model_len, or less when the request asks for a smaller context."""
    max_len = state.config.limits.max_model_len
    return min(num_ctx, max_len) if num_ctx else max_len


def max_new_tokens(requested: int | None, num_prompt_tokens: int, limit: int) -> int:
    """Tokens to generate: as requested but within the context; None or negative means up to the limit."""
    room = limit - num_prompt_tokens
    if room < 1:
        raise RequestError(
            f"the prompt has {num_prompt_tokens} tokens but the context holds {limit}; shorten it to at most "
            f"{limit - 1} tokens"
        )
    if requested is None or requested < 0:
        return room
    if requested == 0:
        raise RequestError("max tokens = 0 would generate nothing; ask for 1 or more (or -1 for no limit)")
    return min(requested, room)


class ModelBody(Protocol):
    """What every body of a model route has, in both APIs: the model it asks for."""

    model: str


Body = TypeVar("Body", bound=ModelBody)


@dataclass
class Call(Generic[Body]):
    """A model route's HTTP request, read up to the endpoint it reaches."""

    http: HTTPRequest
    body: Body
    state: ServerState
    endpoint: str
    arrival_time: float

    @property
    def engine(self) -> LLMEngine:
        return self.state.require_engine()[0]

    def encode(self, text: str) -> list[int]:
        return self.engine.encode_prompt(text)

    async def compile_guide(self, guide: Guide | None, field: str) -> None:
        """A guide that does not compile is a 400 that names the field it came from, before anything is queued;
        the compiled grammar stays in the engine's cache for the request."""
        if guide is None:
            return
        try:
            await asyncio.to_thread(self.engine.grammars.compile, guide)
        except RequestError as e:
            raise APIError(400, f"{field}: {e}", param=field) from e

    def requests(self, rid: str, prompts: list[list[int]], params: list[SamplingParams], n: int = 1) -> list[Request]:
        """The engine requests this call runs: ``n`` siblings per prompt, prompt-major, each with its own seed
        stream (``sibling_seed``). One request takes ``rid`` as its id; several add their index to it."""
        count = len(prompts) * n
        return [
            Request(
                rid if count == 1 else f"{rid}-{i * n + j}",
                self.endpoint,
                prompt,
                replace(p, seed=sibling_seed(p.seed, j)),
                arrival_time=self.arrival_time,
            )
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))
            for j in range(n)
        ]

    async def respond(
        self,
        requests: list[Request],
        stream: bool,
        streamed: Callable[[AsyncIterator[tuple[int, RequestOutput]]], Response],
        whole: Callable[[list[Completed]], dict[str, Any]],
    ) -> Response | dict[str, Any]:
        """Submit ``requests``; then ``streamed`` formats their outputs as they come, each with its request's
        index (``merged``), or ``whole`` formats them once all are finished. The client leaving before the
        answer starts aborts them in the engine."""
        admits = self.state.admission.endpoint_cap(self.endpoint)
        if len(requests) > admits:
            raise APIError(
                400,
                f"n = {len(requests)} sequences (choices times prompts) is invalid; endpoint {self.endpoint!r} "
                f"runs at most {admits} at once: send fewer",
                param="n",
            )
        streams = await unless_disconnected(self.http, start_all(self.state, requests))
        if stream:
            return streamed(merged(streams))
        return whole(await unless_disconnected(self.http, all_of([collect(s) for s in streams])))


def sibling_seed(seed: int | None, index: int) -> int | None:
    """The seed of sibling ``index``: the request's own for the first, one derived from (seed, index) for the
    others, so the same request gives the same choices every time; None (a random seed) stays None."""
    if seed is None or index == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest())


async def receive(http: HTTPRequest, model: type[Body]) -> Call[Body]:
    """Parse the body and resolve its endpoint; the arrival time is taken first, so parsing counts in it."""
    arrival = time.monotonic()
    body = await parse_body(http, model)
    state: ServerState = http.app.state.loraplex
    return Call(http, body, state, state.router.resolve(http.scope, body.model), arrival)


@dataclass
class Completed:
    """Everything a non-streaming response needs from a finished request."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]  # one per token when the request asked for them, else empty
    last: RequestOutput


async def start(state: ServerState, request: Request) -> AsyncIterator[RequestOutput]:
    """Submit a request and wait for its first output; returns the stream of all its outputs."""
    _, async_engine = state.require_engine()
    limits.check_sampling(state, request.params)
    outputs = limits.guarded(state, request.endpoint, async_engine.generate(request), request.arrival_time)
    try:
        first = await anext(outputs)
        raise_if_failed(first)  # failed in its first step: still an HTTP status, not a 200 with an error chunk
    except BaseException:
        await outputs.aclose()
        raise
    return _stream(state, request.endpoint, first, outputs)


async def start_all(state: ServerState, requests: list[Request]) -> list[AsyncIterator[RequestOutput]]:
    """``start`` for each request. Siblings of one prompt start once the first of them has its first output,
    so its prompt's KV blocks are in the prefix cache and they share them."""
    first_of: dict[tuple[int, ...], int] = {}
    for i, request in enumerate(requests):
        first_of.setdefault(tuple(request.prompt_token_ids), i)
    firsts = set(first_of.values())
    waves = [sorted(firsts), [i for i in range(len(requests)) if i not in firsts]]
    streams: dict[int, AsyncIterator[RequestOutput]] = {}
    try:
        for wave in waves:
            started = await asyncio.gather(*(start(state, requests[i]) for i in wave), return_exceptions=True)
            streams |= {i: s for i, s in zip(wave, started, strict=True) if not isinstance(s, BaseException)}
            failed = next((s for s in started if isinstance(s, BaseException)), None)
            if failed is not None:
                raise failed
    except BaseException:
        for stream in streams.values():  # abort the siblings that did start now, not whenever they are collected
            await stream.aclose()
        raise
    return [streams[i] for i in range(len(requests))]


async def all_of(works: list[Awaitable[T]]) -> list[T]:
    """Await ``works`` together; the first failure cancels the others and is raised alone, as one request's."""
    if len(works) == 1:
        return [await works[0]]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(work) for work in works]
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return [task.result() for task in tasks]


async def merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The ``deltas`` of every stream as they come, each with its stream's index; leaving early closes them all,
    which aborts their requests in the engine."""
    if len(streams) == 1:
        async for out in deltas(streams[0]):
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in deltas(stream):
                queue.put_nowait((index, out))
        finally:
            queue.put_nowait((index, None))  # the stream is over, however it ended

    pumps = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(pumps)
        while running:
            index, out = await queue.get()
            if out is None:
                running -= 1
            else:
                yield index, out
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _stream(
    state: ServerState, endpoint: str, first: RequestOutput, rest: AsyncIterator[RequestOutput]
) -> AsyncIterator[RequestOutput]:
    try:
        async for out in _prepend(first, rest):
            if out.finished:
                state.metrics.observe(endpoint, out)
            yield out
    finally:
        await rest.aclose()  # leaving early aborts the request in the engine


async def _prepend(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    yield first
    async for out in rest:
        yield out


async def unless_disconnected(request: HTTPRequest, work: Awaitable[T], poll_s: float = 0.25) -> T:
    """Await ``work`` but cancel it if the client goes away: a non-streaming request (or a stream still
    waiting for its first token) is aborted in the engine instead of running on for nobody."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "the client closed the request")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def embed(
    state: ServerState, http_request: HTTPRequest, endpoint: str, token_lists: list[list[int]], arrival_time: float
) -> list[RequestOutput]:
    """Embed each input as a request of its own: the scheduler batches and chunks them with everyone else's
    steps, and they count against the queue, the deadline and the endpoint's limits like any request. At most
    half the endpoint's admission cap is in flight at once (a long list goes in waves instead of a 503). The
    first failure, or the client leaving, aborts the rest."""
    window = asyncio.Semaphore(max(1, state.admission.endpoint_cap(endpoint) // 2))

    async def one(token_ids: list[int]) -> RequestOutput:
        async with window:
            request = Request(
                request_id("embed"), endpoint, token_ids, SamplingParams(max_tokens=1), arrival_time, embed=True
            )
            return (await collect(await start(state, request))).last

    return await unless_disconnected(http_request, all_of([one(ids) for ids in token_lists]))


async def deltas(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """The outputs worth a chunk of their own: those with text, and the last. An output whose text is held
    back (a partial stop string or character) gives its tokens to the next one, so no chunk is empty."""
    held: list[RequestOutput] = []
    async with contextlib.aclosing(outputs):  # leaving early aborts the request in the engine
        async for out in outputs:
            if not out.finished and not out.text_delta:
                held.append(out)
                continue
            yield _joined([*held, out]) if held else out
            held = []


def _joined(outputs: list[RequestOutput]) -> RequestOutput:
    """The last output, carrying the tokens (and log-probabilities) of all of them."""
    token_ids = [t for out in outputs for t in out.new_token_ids]
    logprobs = [lp for out in outputs for lp in out.logprobs or []]
    return replace(outputs[-1], new_token_ids=token_ids, logprobs=logprobs)


async def collect(outputs: AsyncIterator[RequestOutput]) -> Completed:
    """Run a request to the end for a non-streaming response; an engine failure is a 500."""
    text, token_ids, logprobs, last = [], [], [], None
    async with contextlib.aclosing(outputs):  # a cancelled collect aborts its request at once
        async for out in outputs:
            text.append(out.text_delta)
            token_ids += out.new_token_ids
            logprobs += out.logprobs or []
            last = out
    assert last is not None and last.finished, "an engine stream ends with a finished output"
    raise_if_failed(last)
    return Completed("".join(text), token_ids, logprobs, last)


def raise_if_failed(out: RequestOutput) -> None:
    if isinstance(out, limits.DeadlineExceeded):
        raise APIError(504, str(out.error))
    if out.finish_reason is FinishReason.ERROR:
        raise APIError(500, f"generation failed in the engine: {out.error}")


@dataclass
class Timings:
    """Ollama's durations in nanoseconds, all measured by the engine (monotonic clock).

    load_duration is the time the request waited before the engine first scheduled it: the model itself is
    always loaded, so queueing is the only delay before work starts.
    """

    total_duration: int
    load_duration: int
    prompt_eval_duration: int
    eval_duration: int

    @classmethod
    def of(cls, out: RequestOutput) -> Timings:
        finish = out.finish_time or time.monotonic()
        scheduled = out.first_scheduled_time or out.arrival_time
        prefill_done = out.prefill_done_time or finish
        return cls(
            total_duration=_ns(finish - out.arrival_time),
            load_duration=_ns(scheduled - out.arrival_time),
            prompt_eval_duration=_ns(prefill_done - scheduled),
            eval_duration=_ns(finish - prefill_done),
        )


def _ns(seconds: float) -> int:
    return max(0, round(seconds * NS))
