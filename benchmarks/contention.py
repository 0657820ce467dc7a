"""Single-stream decode when another process keeps a core busy: how much more a token costs.

With one busy process on 2 cores, a fair share would make a token cost about 2x; threads that spin, or wait at a
barrier for a peer the kernel has descheduled, made it 4-5x. Each variant runs in its own process (OpenMP reads
its wait policy when torch loads, so it cannot change within one):

    old    as before: OpenMP's default spin (torch imported before the engine), the CPU kernels through
           at::parallel_for (one static chunk per thread, a barrier at the end), ``model.num_threads = 2``
    new    the defaults: passive OpenMP threads (loraplex/engine/__init__.py), the kernels' dynamic chunks
           (handed out one at a time; engine/kernels/cpu/csrc/parallel.h), ``model.num_threads = 0`` (the
           cgroup's CPU quota)

plus, with ``--variants``, ``passive`` (old with passive OpenMP) and ``dynamic`` (old with dynamic chunks), to tell
the two changes apart, and ``brief`` (new, but spinning ``GOMP_SPINCOUNT=10000`` before sleeping). Every round
measures each variant quiet, then with one ``yes > /dev/null`` process that this script starts and kills, in an
order that alternates between rounds, so machine drift hits all alike. A measurement is one request of ``--tokens``
greedy tokens on the chatbot adapter; its median decode step gives tokens/s. Figures are medians over the rounds;
the slowdown is quiet tokens/s over busy tokens/s.

    python benchmarks/contention.py                  # results in benchmarks/results/contention.json
    python benchmarks/contention.py --quick --out /tmp/contention
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# No torch at the top (the harness's cli, machine and report modules import none): a variant's process must
# choose whether torch or the engine loads first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.harness import cli, report
from benchmarks.harness.machine import machine_description, source_revision

ENDPOINT = "chatbot"
PROMPT = list(range(1000, 1064))  # token ids: greedy decoding runs on for the tokens asked
REPLY = "@@ "  # marks the lines of the measurement protocol on a child's stdout


@dataclasses.dataclass(frozen=True)
class Variant:
    passive: bool  # OpenMP threads sleep at once (loraplex/engine/__init__.py) instead of spinning first
    dynamic: bool  # the CPU kernels hand out chunks one at a time instead of one static chunk per thread
    num_threads: int  # model.num_threads
    spin_count: int | None = None  # GOMP_SPINCOUNT: how long an OpenMP thread spins before it sleeps


VARIANTS = {
    "old": Variant(passive=False, dynamic=False, num_threads=2),
    "new": Variant(passive=True, dynamic=True, num_threads=0),
    "passive": Variant(passive=True, dynamic=False, num_threads=2),
    "dynamic": Variant(passive=False, dynamic=True, num_threads=2),
    "brief": Variant(passive=False, dynamic=True, num_threads=0, spin_count=10_000),
}


def serve_measurements(variant: Variant, num_kv_blocks: int | None = None) -> None:
    """A variant's process: build the default engine (with a KV pool of ``num_kv_blocks``, when given), then
    answer each line ``N`` on stdin with the median decode step (seconds) of one request of N tokens."""
    if variant.passive:
        import loraplex.engine  # noqa: F401  before torch: it sets OpenMP's wait policy, read when torch loads

    import torch

    from benchmarks.harness.engine import median_decode_step, with_kv_pool, with_model
    from loraplex.engine.core.config import load_config
    from loraplex.engine.core.engine import LLMEngine

    engine = LLMEngine(with_model(with_kv_pool(load_config(), num_kv_blocks), num_threads=variant.num_threads))
    if hasattr(torch.ops.loraplex, "set_dynamic_split"):
        torch.ops.loraplex.set_dynamic_split(variant.dynamic)
    for count, line in enumerate(sys.stdin):
        step_s = median_decode_step(engine, f"r{count}", ENDPOINT, PROMPT, int(line))
        print(REPLY + json.dumps({"step_s": step_s, "threads": torch.get_num_threads()}), flush=True)


class Child:
    """One variant's process, and the protocol to ask it for a measurement."""

    def __init__(self, name: str, num_kv_blocks: int | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        if VARIANTS[name].spin_count is not None:
            env["GOMP_SPINCOUNT"] = str(VARIANTS[name].spin_count)
        env.setdefault("HF_HUB_OFFLINE", "1")
        pool = [f"--num-kv-blocks={num_kv_blocks}"] if num_kv_blocks else []
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--child", name, *pool],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def measure(self, tokens: int) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{tokens}\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line.removeprefix(REPLY))
        raise RuntimeError(f"the variant's process ended (exit code {self.process.wait()})")

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait()


def measure_round(children: dict[str, Child], tokens: int, round_index: int) -> list[dict]:
    """Every variant quiet and with a hog, the order of loads and variants reversed on odd rounds."""
    names = list(children)[:: -1 if round_index % 2 else 1]
    rows = []
    for load in ("quiet", "hog")[:: -1 if round_index % 2 else 1]:
        hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if load == "hog" else None
        try:
            for name in names:
                reply = children[name].measure(tokens)
                step_ms = reply["step_s"] * 1e3
                rows.append(
                    {
                        "round": round_index,
                        "variant": name,
                        "load": load,
                        "step_ms": round(step_ms, 2),
                        "tok_s": round(1e3 / step_ms, 2),
                        "threads": reply["threads"],
                    }
                )
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    return rows


def summarise(rows: list[dict], names: list[str]) -> dict:
    """Per variant: median quiet and busy tokens/s, and their ratio."""
    summary = {}
    for name in names:
        tok_s = {
            load: statistics.median(r["tok_s"] for r in rows if r["variant"] == name and r["load"] == load)
            for load in ("quiet", "hog")
        }
        summary[name] = {
            "quiet_tok_s": round(tok_s["quiet"], 2),
            "hog_tok_s": round(tok_s["hog"], 2),
            "slowdown": round(tok_s["quiet"] / tok_s["hog"], 2),
        }
    return summary


def run(args: argparse.Namespace) -> dict:
    children = {name: Child(name, args.num_kv_blocks) for name in args.variants}
    rows: list[dict] = []
    try:
        for child in children.values():  # warm-up: the first request's one-off costs
            child.measure(2)
        for round_index in range(args.rounds):
            rows += measure_round(children, args.tokens, round_index)
            latest = ", ".join(f"{r['variant']} {r['load']} {r['tok_s']} tok/s" for r in rows[-2 * len(children) :])
            cli.log(f"round {round_index + 1} of {args.rounds}: {latest}")
    finally:
        for child in children.values():
            child.close()
    summary = summarise(rows, list(children))
    return {
        "benchmark": "contention",
        "machine": machine_description(),
        "source": source_revision(),
        "variants": {name: dataclasses.asdict(VARIANTS[name]) for name in children},
        "settings": {
            "endpoint": ENDPOINT,
            "prompt_tokens": len(PROMPT),
            "tokens": args.tokens,
            "rounds": args.rounds,
            "hog": "yes > /dev/null",
            "num_kv_blocks": args.num_kv_blocks,
        },
        "rows": rows,
        "summary": summary,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser(__doc__, "1 round of 3 tokens, KV pools of 32 blocks", ("num_kv_blocks",))
    parser.add_argument("--tokens", type=int, help="greedy tokens per measurement (default 32)")
    parser.add_argument("--rounds", type=int, help="rounds, each variant quiet and busy in each (default 7)")
    parser.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=["old", "new"],
        help=f"comma-separated, of {', '.join(VARIANTS)}",
    )
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    # each variant's engine allocates its whole pool at start
    args = cli.parse(parser, argv, {"tokens": 32, "rounds": 7}, {"tokens": 3, "rounds": 1, "num_kv_blocks": 32})
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}; use {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        serve_measurements(VARIANTS[args.child], args.num_kv_blocks)
        return {}
    data = run(args)
    lines = [
        f"- {name}: quiet {s['quiet_tok_s']} tok/s, with a busy process {s['hog_tok_s']} tok/s: {s['slowdown']}x slower"
        for name, s in data["summary"].items()
    ]
    report.write(args.out, "contention", data, "# Single-stream decode beside a busy process\n\n" + "\n".join(lines))
    return data


if __name__ == "__main__":
    main()
