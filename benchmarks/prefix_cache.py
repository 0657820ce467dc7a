"""Time to first token of a growing conversation, with prefix caching on and off.

A chat client resends the whole conversation every turn. Here each of ``--conversations`` conversations (one
per endpoint in turn) starts from a ``--context``-token document and gains a ``--turn-len``-token message per
turn; each turn is one request (``--new-tokens`` greedy tokens, default 16) sent after the previous one
finished. Two engines in one process, ``limits.prefix_caching`` true and false, take every turn in
alternation, so machine drift hits both alike; they must produce the same tokens. Reported: the median time to
first token per engine, their ratio, and the share of prompt tokens the cache supplied.

    python benchmarks/prefix_cache.py                 # results in benchmarks/results/
    python benchmarks/prefix_cache.py --quick --out /tmp/prefix_cache
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):  # run as a script from anywhere; engine_throughput's helpers
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
import transformers  # noqa: E402
from engine_throughput import cpu_model, source_revision, source_token_pool, with_kv_pool  # noqa: E402

from loraplex.engine.core.config import load_config  # noqa: E402
from loraplex.engine.core.engine import LLMEngine  # noqa: E402
from loraplex.engine.core.sequence import Request, SamplingParams  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"


def conversations(engine: LLMEngine, args: argparse.Namespace) -> list[tuple[str, list[list[int]]]]:
    """Per conversation: its endpoint and the prompt of every turn (each extends the one before)."""
    pool = [t for t in source_token_pool(engine.tokenizer) if len(t) >= args.context + args.turns * args.turn_len]
    endpoints = list(engine.endpoint_adapters)
    out = []
    for c in range(args.conversations):
        tokens = pool[c % len(pool)]
        turns = [tokens[: args.context + (t + 1) * args.turn_len] for t in range(args.turns)]
        out.append((endpoints[c % len(endpoints)], turns))
    return out


def ask(
    engine: LLMEngine, request_id: str, endpoint: str, prompt: list[int], new_tokens: int
) -> tuple[float, list[int]]:
    """(time to first token, tokens) of one request alone."""
    request = Request(request_id, endpoint, list(prompt), SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    start = time.monotonic()
    outputs = engine.generate([request])[request_id]
    return outputs[-1].prefill_done_time - start, [t for o in outputs for t in o.new_token_ids]


def run(args: argparse.Namespace) -> dict:
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    config = with_kv_pool(load_config(), args.num_kv_blocks)
    engines = {
        name: LLMEngine(dataclasses.replace(config, limits=dataclasses.replace(config.limits, prefix_caching=on)))
        for name, on in (("cached", True), ("uncached", False))
    }
    ttft: dict[str, list[float]] = {name: [] for name in engines}
    for c, (endpoint, turns) in enumerate(conversations(engines["cached"], args)):
        for t, prompt in enumerate(turns):
            tokens = {}
            for name, engine in engines.items() if t % 2 == 0 else reversed(engines.items()):
                seconds, tokens[name] = ask(engine, f"c{c}-t{t}", endpoint, prompt, args.new_tokens)
                if t > 0:  # the first turn has nothing to reuse
                    ttft[name].append(seconds)
            if tokens["cached"] != tokens["uncached"]:
                raise RuntimeError(f"conversation {c} turn {t}: the two engines disagree")
        print(f"conversation {c + 1} of {args.conversations} done", flush=True)
    stats = engines["cached"].update_stats()
    medians = {name: round(statistics.median(v) * 1e3, 1) for name, v in ttft.items()}
    summary = {
        "ttft_ms_median": medians,
        "uncached_over_cached": round(medians["uncached"] / medians["cached"], 2),
        "prompt_tokens_from_cache": round(stats.prefix_cache_hits_total / stats.prefix_cache_queries_total, 3),
    }
    table = "\n".join(
        [
            "| prefix caching | median time to first token, turns 2+ (ms) |",
            "| --- | ---: |",
            f"| on | {medians['cached']} |",
            f"| off | {medians['uncached']} |",
        ]
    )
    return {
        "benchmark": "prefix_cache",
        "machine": {"cpu_model": cpu_model(), "logical_cores": os.cpu_count(), "torch_threads": args.threads},
        "source": source_revision(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "summary": summary,
        "table": table,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 conversations of 3 short turns, 4 new tokens each, KV pools of 32 blocks",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--context", type=int, default=600, help="tokens of the document each starts from")
    parser.add_argument("--turn-len", type=int, default=40, help="tokens each turn adds")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens each turn asks for")
    parser.add_argument(
        "--num-kv-blocks", type=int, help="limits.num_kv_blocks of both engines (default: the config's)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        # one block of context and one per turn: turns 2 and 3 find all but their last block in the cache
        args.conversations, args.turns, args.context, args.turn_len, args.new_tokens = 2, 3, 16, 16, 4
        args.num_kv_blocks = args.num_kv_blocks or 32
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    s = report["summary"]
    text = (
        f"# Prefix caching, a growing conversation\n\n{report['table']}\n\n"
        f"off ÷ on: {s['uncached_over_cached']}; prompt tokens from the cache: {s['prompt_tokens_from_cache']:.0%}\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_cache.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "prefix_cache.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
