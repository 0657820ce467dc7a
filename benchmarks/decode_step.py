"""Time of one decode step at small batch sizes: the default engine against its CPU fallbacks.

Light serving load decodes a few sequences at a time: every step reads all the weights for a few rows, which is
where the CPU kernels' projections (``engine/kernels/cpu/linear.py``, ``engine/kernels/cpu/csrc/panel_linear.cpp``)
are meant to pay. Four engines run in one process:

    default         projections in the kernels' panels over the GGUF file's 4-bit blocks, the LM head over its
                    8-bit ones (engine/kernels/cpu/gguf_weights.py), decode attention and LoRA through the kernels
    float32-weights ``model.gguf_weights = false``: the same kernels over the weights dequantized to float32
                    (the same outputs to the bit, about 5x the base's bytes)
    no-kernels      ``model.cpu_kernels = false``: projections through oneDNN's packed weights, the LM head as
                    weight-first MKL, SDPA over gathered copies, the masked-dense LoRA op
    unpacked        ``model.packed_weights = false``: the kernels for attention, LoRA and the LM head, but the
                    projections through torch's default CPU matmul

For each batch size, ``batch`` requests (one per endpoint in turn, 64-token prompts) are prefilled, then
``--steps`` decode steps of ``LLMEngine.step`` are timed. The engines alternate for ``--rounds`` rounds, so
machine drift hits them alike; each figure is the median step over all rounds.

    python benchmarks/decode_step.py                  # batches 1,2,3,4,8,16,48, results in benchmarks/results/
    python benchmarks/decode_step.py --quick --out /tmp/decode_step
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.harness import cli, report
from benchmarks.harness.engine import decode_steps, engine_config, with_model
from benchmarks.harness.machine import machine_description, source_revision
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.sequence import Request, SamplingParams

PROMPT_LEN = 64
VARIANTS = {
    "default": {},
    "float32-weights": {"gguf_weights": False},
    "no-kernels": {"cpu_kernels": False},
    "unpacked": {"packed_weights": False},
}


def decode_step_seconds(engine: LLMEngine, batch: int, steps: int, tag: str) -> list[float]:
    """Prefill ``batch`` requests (one per endpoint in turn), then time ``steps`` decode-only steps."""
    endpoints = list(engine.endpoint_adapters)
    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
    requests = [
        Request(f"{tag}-{i}", endpoints[i % len(endpoints)], list(range(1000 + i, 1000 + i + PROMPT_LEN)), params)
        for i in range(batch)
    ]
    return decode_steps(engine, requests, steps)


def run(args: argparse.Namespace) -> dict:
    config, threads = engine_config(args)
    engines = {variant: LLMEngine(with_model(config, **change)) for variant, change in VARIANTS.items()}
    times: dict[str, dict[int, list[float]]] = {v: {b: [] for b in args.batches} for v in engines}
    for round_index in range(args.rounds):
        for batch in args.batches:
            for variant, engine in engines.items():
                tag = f"{variant}-{round_index}-{batch}"
                times[variant][batch] += decode_step_seconds(engine, batch, args.steps, tag)
        cli.log(f"round {round_index + 1} of {args.rounds} done")
    rows = []
    others = [variant for variant in engines if variant != "default"]
    for batch in args.batches:
        ms = {variant: statistics.median(times[variant][batch]) * 1e3 for variant in engines}
        row = {"batch": batch} | {f"{variant}_ms": round(value, 1) for variant, value in ms.items()}
        row |= {f"{variant}_vs_default": round(ms[variant] / ms["default"], 2) for variant in others}
        rows.append(row)
    header = ["sequences", *(f"{v} ms/step" for v in engines), *(f"{v} ÷ default" for v in others)]
    cells = [[r["batch"], *(r[f"{v}_ms"] for v in engines), *(r[f"{v}_vs_default"] for v in others)] for r in rows]
    return {
        "benchmark": "decode_step",
        "machine": machine_description(threads),
        "source": source_revision(),
        "variants": VARIANTS,
        "settings": {
            "prompt_len": PROMPT_LEN,
            "steps": args.steps,
            "rounds": args.rounds,
            "num_kv_blocks": config.limits.num_kv_blocks,
        },
        "rows": rows,
        "table": report.table(header, cells, "r" * len(header)),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser(__doc__, "batches 1,3, 3 steps, 1 round, KV pools of 32 blocks", threads=2)
    parser.add_argument("--steps", type=int, help="timed decode steps per batch and round (default 20)")
    parser.add_argument("--rounds", type=int, help="rounds the engines alternate for (default 3)")
    full = {"steps": 20, "rounds": 3, "batches": [1, 2, 3, 4, 8, 16, 48]}
    # 3 sequences of 64 + 5 tokens hold 15 blocks
    quick = {"steps": 3, "rounds": 1, "batches": [1, 3], "num_kv_blocks": 32}
    return cli.parse(parser, argv, full, quick)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data = run(args)
    title = "# Decode step: the default engine against its CPU fallbacks"
    report.write(args.out, "decode_step", data, f"{title}\n\n{data['table']}\n")
    return data


if __name__ == "__main__":
    main()
