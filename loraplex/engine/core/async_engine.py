"""The engine loop in its own thread, and async streams of its outputs for the server.

The event loop never runs model code: ``generate`` validates the request (cheap, read-only), hands it to the
loop thread through a thread-safe inbox, and awaits outputs that the loop thread posts back with
``call_soon_threadsafe``. Aborts travel through the same inbox, so only the loop thread mutates the engine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from loraplex.engine.core.engine import EngineStats, LLMEngine, RequestOutput
from loraplex.engine.core.errors import EngineDeadError, QueueFullError
from loraplex.engine.core.sequence import Request

log = logging.getLogger(__name__)


T = TypeVar("T")


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[RequestOutput | BaseException]


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self.streams: dict[str, _Stream] = {}
        self.lock = threading.Lock()  # guards streams, shared by the event loop and the loop thread
        self.wakeup = threading.Event()
        self.stopping = False
        self.error: BaseException | None = None  # set if the loop thread died
        self.thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @classmethod
    def build_on_loop_thread(cls, build: Callable[[], LLMEngine]) -> AsyncEngine:
        """Build the engine on the thread that will step it, start its loop there, and return once it is built.

        Why: every thread that runs torch ops on the CPU gets its own OpenMP team. An engine built on one thread
        and stepped on another leaves two teams, more team threads than the 2 cores here; the likely mechanism
        is that libgomp then stops spin-waiting between parallel regions, so each of a decode step's ~2,000
        ops waits for a worker to wake. Measured: a one-sequence decode step through the server took 1.2-1.4x
        the same step in process (``benchmarks/stream_overhead.py``); with one thread doing all the torch work,
        1.01x.
        """
        built: queue.SimpleQueue[AsyncEngine | BaseException] = queue.SimpleQueue()

        def main() -> None:
            try:
                async_engine = cls(build())
            except BaseException as e:  # the caller raises it
                built.put(e)
                return
            async_engine.thread = threading.current_thread()
            built.put(async_engine)
            async_engine._run()

        threading.Thread(target=main, name="loraplex-engine", daemon=True).start()
        result = built.get()
        if isinstance(result, BaseException):
            raise result
        return result

    @property
    def is_alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    @property
    def num_in_flight(self) -> int:
        with self.lock:
            return len(self.streams)

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters; read without locking, values may be one step old."""
        return self.engine.update_stats()

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Submit ``request`` and yield its outputs as they are produced; leaving early aborts it."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop has stopped; this worker cannot serve requests")
        self.engine.validate(request)
        if request.params.guide is not None:  # compiling a new schema takes milliseconds: not on the event loop
            await asyncio.to_thread(self.engine.compile_guide, request)
        limit = self.engine.config.limits.max_waiting
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self.lock:
            # live count (stats.num_running is refreshed only when stats are read); len() is atomic
            waiting = len(self.streams) - len(self.engine.scheduler.running)
            if waiting >= limit:
                raise QueueFullError(f"the waiting queue is full ({limit} requests); retry shortly")
            self.streams[request.request_id] = stream
        self._send("add", request)
        finished = False
        try:
            while True:
                out = await stream.outputs.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the loop thread between two steps (adapter changes, embeddings) and await it."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop has stopped; this worker cannot serve requests")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._send("call", (fn, loop, future))
        return await future

    def shutdown(self, timeout: float = 5.0) -> None:
        self.stopping = True
        self.wakeup.set()
        self.thread.join(timeout)

    def _send(self, kind: str, item: object) -> None:
        self.inbox.put((kind, item))
        self.wakeup.set()

    def _deliver(self, out: RequestOutput | BaseException, request_id: str) -> None:
        with self.lock:
            stream = self.streams.get(request_id)
            if stream is not None and (isinstance(out, BaseException) or out.finished):
                del self.streams[request_id]
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, out)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_request(item)
                except Exception as e:  # validated already; anything left is reported to that caller only
                    self._deliver(e, item.request_id)
            elif kind == "call":
                self._run_call(*item)
            else:
                out = self.engine.abort(item)
                with self.lock:
                    self.streams.pop(item, None)
                if out is not None:
                    log.debug("aborted %s after %d tokens", item, out.num_output_tokens)

    def _run_call(
        self, fn: Callable[[LLMEngine], object], loop: asyncio.AbstractEventLoop, future: asyncio.Future
    ) -> None:
        try:
            result = fn(self.engine)
        except Exception as e:  # reported to the caller; the loop goes on
            loop.call_soon_threadsafe(_settle, future, None, e)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    def _run(self) -> None:
        try:
            while not self.stopping:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self.wakeup.wait(timeout=0.5)
                    self.wakeup.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out, out.request_id)
        except BaseException as e:  # the loop must never die silently: health checks read self.error
            log.exception("engine loop died")
            self.error = e
            with self.lock:
                pending = list(self.streams)
            for request_id in pending:
                self._deliver(EngineDeadError(f"the engine loop died: {e}"), request_id)
