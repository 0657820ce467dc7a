"""A streaming HTTP load and what it measures: time to first token (TTFT), inter-token latency (ITL), time per
output token (TPOT), latency and throughput.

Two streaming formats: Ollama's NDJSON (``/api/...``: one JSON object a line, the last with ``done`` and the
counts) and OpenAI's server-sent events (``/v1/...``: ``data: {...}`` lines, ``data: [DONE]``; the token count
from ``usage`` when the server sends it, else one token per chunk with text). Requests arrive open loop at
``offset / rate`` seconds (``rate`` = inf: all at once), optionally at most ``concurrency`` in flight."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from benchmarks.harness.stats import percentiles


@dataclass(frozen=True)
class HttpRequest:
    endpoint: str  # which server takes it (a key of the urls), and usually the model name in the body
    path: str  # "/api/generate", "/v1/completions", ...
    body: dict
    num_predict: int  # tokens asked for
    offset: float = 0.0  # arrival time at rate 1 (seconds); at rate r it arrives at offset / r


@dataclass
class Outcome:
    endpoint: str
    num_predict: int
    error: str = ""  # "" = completed
    ttft: float = math.nan  # seconds from send to the first token
    latency: float = math.nan  # seconds from send to the end of the stream
    eval_count: int = 0  # output tokens
    prompt_eval_count: int = 0
    send_lag: float = 0.0  # how late the client sent it after its scheduled arrival
    gaps: list[float] = field(default_factory=list, repr=False)  # between successive chunks with tokens

    @property
    def tpot(self) -> float:
        """Seconds per output token after the first, from the real token count."""
        if self.error or self.eval_count < 2:
            return math.nan
        return (self.latency - self.ttft) / (self.eval_count - 1)


class _Stream:
    """Reads one response's chunks into an outcome."""

    def __init__(self, outcome: Outcome, sent: float) -> None:
        self.outcome, self.sent, self.last, self.chunks = outcome, sent, sent, 0

    def token(self) -> None:
        now = time.perf_counter()
        if self.chunks:
            self.outcome.gaps.append(now - self.last)
        else:
            self.outcome.ttft = now - self.sent
        self.chunks += 1
        self.last = now

    def ollama(self, line: str) -> bool:
        """One NDJSON line; True at the end."""
        chunk = json.loads(line)
        if "error" in chunk:
            self.outcome.error = "stream error"
            return True
        if chunk.get("done"):
            if not self.chunks:
                self.token()
            self.outcome.eval_count = chunk.get("eval_count", 0)
            self.outcome.prompt_eval_count = chunk.get("prompt_eval_count", 0)
            return True
        self.token()
        return False

    def openai(self, line: str) -> bool:
        """One server-sent event line; True at the end."""
        data = line.removeprefix("data:").strip()
        if not line.startswith("data:"):
            return False
        if data == "[DONE]":
            self.outcome.eval_count = self.outcome.eval_count or self.chunks
            return True
        chunk = json.loads(data)
        if "error" in chunk:
            self.outcome.error = "stream error"
            return True
        choices = chunk.get("choices") or [{}]
        if choices[0].get("text") or (choices[0].get("delta") or {}).get("content"):
            self.token()
        usage = chunk.get("usage") or {}
        self.outcome.eval_count = usage.get("completion_tokens", self.outcome.eval_count)
        self.outcome.prompt_eval_count = usage.get("prompt_tokens", self.outcome.prompt_eval_count)
        return False


async def _stream(client: httpx.AsyncClient, url: str, request: HttpRequest, outcome: Outcome, sent: float) -> None:
    reader = _Stream(outcome, sent)
    read = reader.ollama if request.path.startswith("/api/") else reader.openai
    async with client.stream("POST", url + request.path, json=request.body) as response:
        if response.status_code != 200:
            await response.aread()
            outcome.error = f"http {response.status_code}"
            return
        async for line in response.aiter_lines():
            if line.strip() and read(line):
                outcome.latency = time.perf_counter() - sent
                return
    outcome.error = "stream ended without done"


async def send(client: httpx.AsyncClient, url: str, request: HttpRequest, timeout: float, lag: float = 0.0) -> Outcome:
    """One request; every failure becomes the outcome's ``error`` (its kind), never an exception."""
    outcome = Outcome(request.endpoint, request.num_predict, send_lag=lag)
    sent = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            await _stream(client, url, request, outcome, sent)
    except TimeoutError:
        outcome.error = "timeout"
    except httpx.HTTPError as e:
        outcome.error = type(e).__name__
    except json.JSONDecodeError:
        outcome.error = "bad json"
    return outcome


async def run_load(
    urls: dict[str, str],
    requests: list[HttpRequest],
    rate: float = math.inf,
    concurrency: int | None = None,
    timeout: float = 600.0,
    label: str = "",
) -> tuple[list[Outcome], float]:
    """Each request sent at its arrival time whatever is still in flight (at most ``concurrency`` when given);
    returns the outcomes in request order and the wall time from the first arrival to the last completion."""
    from tqdm import tqdm

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    bar = tqdm(total=len(requests), desc=label, unit="req", leave=True, dynamic_ncols=True)
    errors = Counter()
    slots = asyncio.Semaphore(concurrency or len(requests) or 1)

    async def tracked(r: HttpRequest, lag: float) -> Outcome:
        async with slots:
            outcome = await send(client, urls[r.endpoint], r, timeout, lag)
        errors[outcome.error] += bool(outcome.error)
        bar.set_postfix(errors=sum(errors.values()), refresh=False)
        bar.update()
        return outcome

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for r in requests:
            arrival = r.offset / rate if math.isfinite(rate) else 0.0
            delay = start + arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(tracked(r, time.perf_counter() - start - arrival)))
        outcomes = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    bar.close()
    return list(outcomes), wall


def warm_up(urls: dict[str, str], requests: list[HttpRequest], timeout: float = 600.0) -> list[str]:
    """Send ``requests`` at once, not measured (first forward passes, adapter activation, compiles); returns
    the errors, also printed: the run goes on."""

    async def all_at_once() -> list[Outcome]:
        async with httpx.AsyncClient(timeout=timeout) as client:
            return await asyncio.gather(*(send(client, urls[r.endpoint], r, timeout) for r in requests))

    failed = [f"{o.endpoint}: {o.error}" for o in asyncio.run(all_at_once()) if o.error]
    if failed:
        print(f"warm-up errors (the run goes on): {failed}", flush=True)
    return failed


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    """Counts, errors by kind, throughput over ``wall``, and TTFT / TPOT / ITL / latency percentiles."""
    done = [o for o in outcomes if not o.error]
    tokens = sum(o.eval_count for o in done)
    return {
        "requests": len(outcomes),
        "completed": len(done),
        "errors": dict(Counter(o.error for o in outcomes if o.error)),
        "throughput_rps": round(len(done) / wall, 3) if wall else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
        "ended_early": sum(o.eval_count < o.num_predict for o in done),
        "ttft_s": percentiles([o.ttft for o in done]),
        "tpot_s": percentiles([o.tpot for o in done]),
        "itl_s": percentiles([g for o in done for g in o.gaps]),
        "latency_s": percentiles([o.latency for o in done]),
    }
