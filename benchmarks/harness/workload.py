"""Seeded workloads: prompts cut from Python standard-library source (real text, present on every machine).

The prompts are token ids of the model's tokenizer; a request's ``max_tokens`` is generated in full (EOS
ignored) wherever the API allows, so every system computes the same number of tokens."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import platform
import random
from collections import Counter
from dataclasses import dataclass

# Standard-library modules whose source (code and docstrings) the prompts are cut from.
SOURCE_MODULES = (
    "argparse",
    "collections",
    "dataclasses",
    "email.message",
    "functools",
    "http.client",
    "inspect",
    "json.decoder",
    "logging",
    "pathlib",
    "subprocess",
    "textwrap",
    "typing",
    "unittest.case",
    "urllib.parse",
    "zipfile",
)
SOURCE_CHARS = 12_000  # of each module: thousands of tokens, far more than the longest prompt


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 48
    prompt_len: tuple[int, int] = (16, 256)  # inclusive range, uniform
    output_len: tuple[int, int] = (16, 128)
    seed: int = 0


FULL = WorkloadSpec()
QUICK = WorkloadSpec(num_requests=8, prompt_len=(16, 64), output_len=(8, 16))


@dataclass
class BenchRequest:
    request_id: str
    endpoint: str
    prompt_token_ids: list[int]
    max_tokens: int


def source_token_pool(tokenizer: object, modules: tuple[str, ...] = SOURCE_MODULES) -> list[list[int]]:
    """Token ids of the first SOURCE_CHARS characters of each source module."""
    texts = [inspect.getsource(importlib.import_module(name))[:SOURCE_CHARS] for name in modules]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def cut_prompt(rng: random.Random, pool: list[list[int]], length: int) -> list[int]:
    """``length`` tokens at a random offset of a random text of the pool long enough for them."""
    tokens = rng.choice([t for t in pool if len(t) > length])
    start = rng.randrange(len(tokens) - length)
    return tokens[start : start + length]


def make_workload(tokenizer: object, endpoints: list[str], spec: WorkloadSpec) -> list[BenchRequest]:
    """``spec.num_requests`` requests spread evenly over ``endpoints``, in a seeded random arrival order."""
    rng = random.Random(spec.seed)
    pool = source_token_pool(tokenizer)
    assigned = [endpoints[i % len(endpoints)] for i in range(spec.num_requests)]
    rng.shuffle(assigned)
    requests = []
    for i, endpoint in enumerate(assigned):
        prompt_len, max_tokens = rng.randint(*spec.prompt_len), rng.randint(*spec.output_len)
        requests.append(BenchRequest(f"req-{i:03d}", endpoint, cut_prompt(rng, pool, prompt_len), max_tokens))
    return requests


def describe_workload(workload: list[BenchRequest], spec: WorkloadSpec) -> dict:
    prompts = [len(r.prompt_token_ids) for r in workload]
    outputs = [r.max_tokens for r in workload]
    digest = hashlib.sha256(json.dumps([(r.endpoint, r.prompt_token_ids, r.max_tokens) for r in workload]).encode())
    return {
        "num_requests": len(workload),
        "seed": spec.seed,
        "requests_per_endpoint": dict(Counter(r.endpoint for r in workload)),
        "prompt_tokens": {"min": min(prompts), "max": max(prompts), "total": sum(prompts)},
        "output_tokens": {"min": min(outputs), "max": max(outputs), "total": sum(outputs)},
        "prompt_source": source_description(),
        "arrivals": "all submitted at once",
        "decoding": "greedy, EOS ignored",
        "sha256": digest.hexdigest()[:16],
    }


def source_description(modules: tuple[str, ...] = SOURCE_MODULES) -> str:
    return f"Python {platform.python_version()} stdlib source of {', '.join(modules)}"


def endpoint_counts(popularity: dict[str, float], n: int) -> dict[str, int]:
    """Requests per endpoint in proportion to its popularity, rounded by largest remainder (sums to ``n``)."""
    total = sum(popularity.values())
    exact = {name: n * share / total for name, share in popularity.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: counts[name] - exact[name])
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts
