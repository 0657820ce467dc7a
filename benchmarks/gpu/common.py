"""What every stage of the GPU check shares: the plan of a run, its time budgets, timing and memory helpers."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.gpu.llama3_8b import (
    ModelShape,
)

ROOT = Path(__file__).resolve().parents[2]


ADAPTERS = ("a0", "a1", "a2")
SOURCE_MODULES = ("argparse", "collections", "dataclasses", "inspect", "logging", "pathlib", "subprocess", "typing")
ORACLE_QUESTIONS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash table works and when you would use one.",
    "List five tips for staying productive while working from home, with one sentence each.",
    "Describe the water cycle to a ten year old.",
)
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run: the real ones on the GPU, a tiny copy of each on the CPU."""

    shape: ModelShape
    concurrency: tuple[int, ...]
    prompt_len: int
    output_len: int
    oracle_new_tokens: int
    oracle_requests: int
    lora_tokens: tuple[int, ...]
    attention_batch: int
    attention_context: int
    copy_bytes: int
    profile_batch: int
    peft_probe_tokens: int
    budgets: dict[str, float]
    timing: tuple[int, int] = (3, 20)  # warm-up and timed calls of each op in the lora_op and attention stages


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- timing and memory helpers --------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_op(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeat: int = 20) -> float:
    """Median milliseconds of ``fn``: CUDA events on a GPU, the host clock (after a sync) elsewhere."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def reset_peak(device: torch.device) -> None:
    """Start the next peak of GPU memory from what is live now; on other devices nothing (memory is not
    reported there, and a full collection in a large process takes a quarter of a second)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory_gb(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"note": "GPU memory is reported on CUDA only"}
    return {
        "allocated_gb": round(torch.cuda.memory_allocated(device) / GB, 2),
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / GB, 2),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / GB, 2),
    }


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


class Budget:
    """One stage's clock: how long it may run, how long it has run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def left(self) -> float:
        return self.seconds - self.elapsed
