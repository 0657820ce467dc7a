"""One in-process ``LLMEngine``: its config from the common flags, a whole workload at once, timed decode steps."""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
import transformers

from benchmarks.harness.stats import percentiles
from benchmarks.harness.workload import BenchRequest
from loraplex.engine.core.config import EngineConfig, load_config
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.sequence import FinishReason, Request, SamplingParams


def with_kv_pool(config: EngineConfig, num_kv_blocks: int | None) -> EngineConfig:
    """``config`` with a KV pool of ``num_kv_blocks``, ``max_model_len`` cut to fit it; unchanged for None or 0.
    For small runs: an engine allocates and zeroes its whole pool as it starts (the default's is 755 MB)."""
    if not num_kv_blocks:
        return config
    limits = config.limits
    max_model_len = min(limits.max_model_len, num_kv_blocks * limits.block_size)
    limits = dataclasses.replace(limits, num_kv_blocks=num_kv_blocks, max_model_len=max_model_len)
    return dataclasses.replace(config, limits=limits)


def engine_config(args: argparse.Namespace) -> tuple[EngineConfig, int]:
    """The config of ``--config`` with ``--threads`` and ``--num-kv-blocks`` applied, and the torch threads (set
    for this process too)."""
    transformers.logging.set_verbosity_error()
    config = with_kv_pool(load_config(getattr(args, "config", None)), getattr(args, "num_kv_blocks", None))
    threads = args.threads or config.model.num_threads or torch.get_num_threads()
    config.model.num_threads = threads
    torch.set_num_threads(threads)
    return config, threads


def with_model(config: EngineConfig, **changes: object) -> EngineConfig:
    """``config`` with ``model`` settings changed (``gguf_weights=False``, ...)."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **changes))


def with_limits(config: EngineConfig, **changes: object) -> EngineConfig:
    return dataclasses.replace(config, limits=dataclasses.replace(config.limits, **changes))


@dataclass
class SystemResult:
    """One system's run of a workload: tokens, wall time, latencies, what it produced."""

    name: str
    description: str
    tokens: int
    seconds: float
    threads: int
    memory: dict = field(default_factory=dict)
    latency_s: dict = field(default_factory=dict)  # from submission (all at once) to each request's finish
    extra: dict = field(default_factory=dict)
    outputs: dict[str, list[int]] = field(default_factory=dict, repr=False)  # request id -> token ids
    load_average: float = field(default_factory=lambda: round(os.getloadavg()[0], 2))  # others' work adds noise

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_json(self, reference: SystemResult | None) -> dict:
        data = {
            "description": self.description,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "loraplex_speedup": round(reference.tokens_per_s / self.tokens_per_s, 3) if reference else None,
            "threads": self.threads,
            "memory": self.memory,
            "latency_s": self.latency_s,
            "load_average_1min_at_end": self.load_average,
            **self.extra,
        }
        if reference is not None and reference is not self and reference.outputs:
            data["same_tokens_as_loraplex"] = self.same_tokens(reference)
        return data

    def same_tokens(self, reference: SystemResult) -> str:
        same = sum(self.outputs.get(rid) == tokens for rid, tokens in reference.outputs.items())
        return f"{same}/{len(reference.outputs)}"


def mean_of_rounds(runs: list[SystemResult]) -> SystemResult:
    """Repeated runs of one system as one result: mean seconds; latencies and outputs from the first round."""
    first = runs[0]
    extra = {
        **first.extra,
        "seconds_per_round": [round(r.seconds, 3) for r in runs],
        "same_tokens_every_round": all(r.outputs == first.outputs for r in runs),
    }
    return dataclasses.replace(first, seconds=statistics.fmean(r.seconds for r in runs), extra=extra)


def check_counts(name: str, workload: list[BenchRequest], outputs: dict[str, list[int]]) -> int:
    """Every request got exactly the tokens it asked for; returns the total. A miscount voids the run."""
    for r in workload:
        got = len(outputs.get(r.request_id, []))
        if got != r.max_tokens:
            raise RuntimeError(f"{name}: request {r.request_id} produced {got} tokens, asked for {r.max_tokens}")
    return sum(r.max_tokens for r in workload)


def run_loraplex(
    engine: LLMEngine, workload: list[BenchRequest], name: str, description: str, endpoint: str | None = None
) -> SystemResult:
    """Submit every request at once and step the engine until all finish (``endpoint`` overrides each one's)."""
    requests = [
        Request(
            r.request_id,
            endpoint or r.endpoint,
            list(r.prompt_token_ids),
            SamplingParams(r.max_tokens, ignore_eos=True),
        )
        for r in workload
    ]
    engine.block_manager.reset_prefix_cache()  # a replayed workload must not reuse the previous run's K/V
    steps, preemptions = engine.stats.steps_total, engine.stats.preemptions_total
    start, start_monotonic = time.perf_counter(), time.monotonic()
    results = engine.generate(requests)
    seconds = time.perf_counter() - start
    outputs = {rid: [t for out in outs for t in out.new_token_ids] for rid, outs in results.items()}
    errors = [outs[-1].error for outs in results.values() if outs and outs[-1].finish_reason is FinishReason.ERROR]
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} requests failed in the engine: {errors[0]}")
    finals = [outs[-1] for outs in results.values()]
    first_token = [o.prefill_done_time - start_monotonic for o in finals if o.prefill_done_time is not None]
    return SystemResult(
        name=name,
        description=description,
        tokens=check_counts(name, workload, outputs),
        seconds=seconds,
        threads=torch.get_num_threads(),
        latency_s=percentiles([o.finish_time - start_monotonic for o in finals]),
        extra={
            "time_to_first_token_s": percentiles(first_token),
            "engine_steps": engine.stats.steps_total - steps,
            "preemptions": engine.stats.preemptions_total - preemptions,
        },
        outputs=outputs,
    )


def decode_steps(engine: LLMEngine, requests: list[Request], steps: int | None = None) -> list[float]:
    """Add ``requests``, step until every prompt is computed, then time ``steps`` decode steps (None: until all
    finish); whatever is still running after is aborted. Returns each timed step's seconds."""
    for request in requests:
        engine.add_request(request)
    while any(t.seq.num_computed_tokens < len(t.seq.request.prompt_token_ids) for t in engine.tracked.values()):
        engine.step()
    times = []
    while engine.has_unfinished() and (steps is None or len(times) < steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for request in requests:
        engine.abort(request.request_id)
    return times


def median_decode_step(engine: LLMEngine, request_id: str, endpoint: str, prompt: list[int], tokens: int) -> float:
    """Median decode step of one request of ``tokens`` greedy tokens alone in the engine."""
    request = Request(request_id, endpoint, list(prompt), SamplingParams(max_tokens=tokens, ignore_eos=True))
    return statistics.median(decode_steps(engine, [request]))
