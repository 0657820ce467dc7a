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
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from loraplex.engine.core.config import load_config  # noqa: E402
from loraplex.engine.core.engine import LLMEngine  # noqa: E402
from loraplex.engine.core.sequence import Request, SamplingParams  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"
PROMPT_LEN = 64


def decode_step_seconds(engine: LLMEngine, batch: int, steps: int, tag: str) -> list[float]:
    """Prefill ``batch`` requests, then time ``steps`` decode-only steps; the requests are aborted after."""
    endpoints = list(engine.endpoint_adapters)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for i, request_id in enumerate(ids):
        prompt = list(range(1000 + i, 1000 + i + PROMPT_LEN))
        params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
        engine.add_request(Request(request_id, endpoints[i % len(endpoints)], prompt, params))
    while any(t.seq.num_computed_tokens < len(t.seq.request.prompt_token_ids) for t in engine.tracked.values()):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for request_id in ids:
        engine.abort(request_id)
    return times


VARIANTS = {
    "default": {},
    "float32-weights": {"gguf_weights": False},
    "no-kernels": {"cpu_kernels": False},
    "unpacked": {"packed_weights": False},
}


def run(args: argparse.Namespace) -> dict:
    transformers.logging.set_verbosity_error()
    from engine_throughput import cpu_model, source_revision, with_kv_pool

    config = with_kv_pool(load_config(), args.num_kv_blocks)
    config.model.num_threads = args.threads
    torch.set_num_threads(args.threads)
    engines = {
        variant: LLMEngine(dataclasses.replace(config, model=dataclasses.replace(config.model, **change)))
        for variant, change in VARIANTS.items()
    }
    times: dict[str, dict[int, list[float]]] = {v: {b: [] for b in args.batches} for v in engines}
    for round_index in range(args.rounds):
        for batch in args.batches:
            for variant, engine in engines.items():
                tag = f"{variant}-{round_index}-{batch}"
                times[variant][batch] += decode_step_seconds(engine, batch, args.steps, tag)
        print(f"round {round_index + 1} of {args.rounds} done", flush=True)
    rows = []
    others = [variant for variant in engines if variant != "default"]
    for batch in args.batches:
        ms = {variant: statistics.median(times[variant][batch]) * 1e3 for variant in engines}
        row = {"batch": batch} | {f"{variant}_ms": round(value, 1) for variant, value in ms.items()}
        row |= {f"{variant}_vs_default": round(ms[variant] / ms["default"], 2) for variant in others}
        rows.append(row)
    table = "\n".join(
        [
            "| sequences | "
            + " | ".join(f"{v} ms/step" for v in engines)
            + " | "
            + " | ".join(f"{v} ÷ default" for v in others)
            + " |",
            "| ---: " * (1 + len(engines) + len(others)) + "|",
        ]
        + [
            f"| {r['batch']} | "
            + " | ".join(str(r[f"{v}_ms"]) for v in engines)
            + " | "
            + " | ".join(str(r[f"{v}_vs_default"]) for v in others)
            + " |"
            for r in rows
        ]
    )
    return {
        "benchmark": "decode_step",
        "machine": {
            "cpu_model": cpu_model(),
            "logical_cores": os.cpu_count(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
        },
        "source": source_revision(),
        "variants": VARIANTS,
        "settings": {
            "prompt_len": PROMPT_LEN,
            "steps": args.steps,
            "rounds": args.rounds,
            "num_kv_blocks": config.limits.num_kv_blocks,
        },
        "rows": rows,
        "table": table,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batches 1,3, 3 steps, 1 round, KV pools of 32 blocks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--num-kv-blocks", type=int, help="limits.num_kv_blocks of every engine (default: the config's)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.batches = [1, 3] if args.quick else [1, 2, 3, 4, 8, 16, 48]
    if args.quick:
        args.steps, args.rounds = 3, 1
        args.num_kv_blocks = args.num_kv_blocks or 32  # 3 sequences of 64 + 5 tokens hold 15
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if str(ROOT / "benchmarks") not in sys.path:  # for engine_throughput's machine helpers
        sys.path.insert(0, str(ROOT / "benchmarks"))
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_step.json").write_text(json.dumps(report, indent=2) + "\n")
    title = "# Decode step: the default engine against its CPU fallbacks"
    (args.out / "decode_step.md").write_text(f"{title}\n\n{report['table']}\n")
    print(report["table"])
    return report


if __name__ == "__main__":
    main()
