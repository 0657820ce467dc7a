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
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.harness import cli, report
from benchmarks.harness.engine import engine_config, with_limits
from benchmarks.harness.machine import machine_description, source_revision
from benchmarks.harness.workload import source_token_pool
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.sequence import Request, SamplingParams


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
    config, threads = engine_config(args)
    engines = {
        name: LLMEngine(with_limits(config, prefix_caching=on)) for name, on in (("cached", True), ("uncached", False))
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
        cli.log(f"conversation {c + 1} of {args.conversations} done")
    stats = engines["cached"].update_stats()
    medians = {name: round(statistics.median(v) * 1e3, 1) for name, v in ttft.items()}
    summary = {
        "ttft_ms_median": medians,
        "uncached_over_cached": round(medians["uncached"] / medians["cached"], 2),
        "prompt_tokens_from_cache": round(stats.prefix_cache_hits_total / stats.prefix_cache_queries_total, 3),
    }
    header = ["prefix caching", "median time to first token, turns 2+ (ms)"]
    table = report.table(header, [["on", medians["cached"]], ["off", medians["uncached"]]])
    return {
        "benchmark": "prefix_cache",
        "machine": machine_description(threads),
        "source": source_revision(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "summary": summary,
        "table": table,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    quick_help = "2 conversations of 3 short turns, 4 new tokens each, KV pools of 32 blocks"
    parser = cli.parser(__doc__, quick_help, ("threads", "num_kv_blocks"), threads=2)
    parser.add_argument("--conversations", type=int, help="conversations, one per endpoint in turn (default 4)")
    parser.add_argument("--turns", type=int, help="turns of each (default 6)")
    parser.add_argument("--context", type=int, help="tokens of the document each starts from (default 600)")
    parser.add_argument("--turn-len", type=int, help="tokens each turn adds (default 40)")
    parser.add_argument("--new-tokens", type=int, help="greedy tokens each turn asks for (default 16)")
    full = {"conversations": 4, "turns": 6, "context": 600, "turn_len": 40, "new_tokens": 16}
    # one block of context and one per turn: turns 2 and 3 find all but their last block in the cache
    quick = {"conversations": 2, "turns": 3, "context": 16, "turn_len": 16, "new_tokens": 4, "num_kv_blocks": 32}
    return cli.parse(parser, argv, full, quick)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data = run(args)
    s = data["summary"]
    text = (
        f"# Prefix caching, a growing conversation\n\n{data['table']}\n\n"
        f"off ÷ on: {s['uncached_over_cached']}; prompt tokens from the cache: {s['prompt_tokens_from_cache']:.0%}\n"
    )
    report.write(args.out, "prefix_cache", data, text)
    return data


if __name__ == "__main__":
    main()
