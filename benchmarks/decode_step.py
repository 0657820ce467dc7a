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

    transformers-forward  ``model.fused_forward = false``: the default kernels under transformers' own forward
                    instead of model/decoder_step.py (q/k/v and gate/up each in one kernel call)

For each batch size, ``batch`` requests (one per endpoint in turn, 64-token prompts) are prefilled, then
``--steps`` decode steps of ``LLMEngine.step`` are timed. The engines alternate for ``--rounds`` rounds, so
machine drift hits them alike; each figure is the median step over all rounds.

How much of the machine a default step uses: its arithmetic (two FLOPs per multiply-add of every projection, the
LM head, attention over each sequence's context and each row's LoRA delta) over its median time, against the
CPU's float32 peak (cores x two 8-lane FMA pipes x 2 FLOPs x the clock /proc/cpuinfo reports: AVX2 Zen 3 and
Zen 4, whose 512-bit FMAs take two cycles) and against what torch's own matmul reaches on a large square float32
product with the same threads (what the machine gives in practice).

    python benchmarks/decode_step.py                  # batches 1,2,3,4,8,16,48, results in benchmarks/results/
    python benchmarks/decode_step.py --quick --out /tmp/decode_step
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import torch

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
    "transformers-forward": {"fused_forward": False},
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


def flops_per_row(engine: LLMEngine, context: int) -> float:
    """FLOPs of one decode row with an adapter at ``context`` tokens: 2 per multiply-add of the projections, the
    LM head, attention (q.k and p.v over the context, every head) and the largest resident adapter's delta."""
    model = engine.model
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    macs = 0
    for module in model.get_decoder().modules():
        if hasattr(module, "base_layer"):  # a projection with its adapters
            macs += module.in_features * module.out_features
            macs += module.packed_rank * (module.in_features + module.out_features)
    macs += text.hidden_size * text.vocab_size  # the LM head
    macs += text.num_hidden_layers * 2 * text.num_attention_heads * head_dim * context
    return 2.0 * macs


def cpu_peak_gflops(threads: int) -> float:
    """Nominal float32 peak: threads x 2 FMA pipes x 8 lanes x 2 FLOPs x the clock in /proc/cpuinfo."""
    mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines() if "MHz" in line]
    return threads * 2 * 8 * 2 * (max(mhz) if mhz else 0.0) / 1e3


def gemm_gflops(threads: int, size: int = 1536, repeats: int = 5) -> float:
    """torch's float32 matmul on a large square product: the rate the machine reaches in practice."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def efficiency(rows: list[dict], flops: float, peak: float, gemm: float) -> list[dict]:
    """The default engine's arithmetic rate at each batch size, against the peak and the large matmul."""
    out = []
    for row in rows:
        gflops = row["batch"] * flops / (row["default_ms"] / 1e3) / 1e9
        out.append(
            {
                "batch": row["batch"],
                "gflop_per_step": round(row["batch"] * flops / 1e9, 2),
                "gflop_per_s": round(gflops, 1),
                "of_peak": round(gflops / peak, 3) if peak else None,
                "of_large_matmul": round(gflops / gemm, 3),
            }
        )
    return out


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
    flops = flops_per_row(engines["default"], PROMPT_LEN + args.steps // 2)
    peak, gemm = cpu_peak_gflops(threads), gemm_gflops(threads)
    used = efficiency(rows, flops, peak, gemm)
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
        "efficiency": {
            "flops_per_row": flops,
            "peak_gflop_per_s": round(peak, 1),
            "large_matmul_gflop_per_s": round(gemm, 1),
            "rows": used,
            "table": report.table(
                ["sequences", "GFLOP/step", "GFLOP/s", "of the peak", "of a large matmul"],
                [[u["batch"], u["gflop_per_step"], u["gflop_per_s"], u["of_peak"], u["of_large_matmul"]] for u in used],
                "rrrrr",
            ),
        },
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
    eff = data["efficiency"]
    used = (
        f"## How much of the machine a default step uses\n\nPeak {eff['peak_gflop_per_s']} GFLOP/s (nominal float32); "
        f"torch's large matmul {eff['large_matmul_gflop_per_s']} GFLOP/s.\n\n{eff['table']}\n"
    )
    report.write(args.out, "decode_step", data, f"{title}\n\n{data['table']}\n\n{used}")
    return data


if __name__ == "__main__":
    main()
