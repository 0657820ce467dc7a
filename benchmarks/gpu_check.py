"""The GPU check: correctness on CUDA, then throughput at the Llama-3-8B shape, in one run of a few minutes.

Stages, each with a time budget (seconds on a GPU; ``--tiny`` scales them down) and its own section in the JSON:

    env         torch / CUDA / GPU, measured device-to-device copy bandwidth (the decode floor's denominator)
    oracle      the engine (decode steps from CUDA graphs, then eager) against transformers + PEFT, one request
                at a time, on the default model in bf16 on CUDA: greedy tokens equal except at near-ties (oracle
                top-2 margin < tolerance); prefill logits
    lora_op     the batched LoRA op at 8B projection shapes: masked dense, grouped (segment), gathered (BGMV in
                torch) against an fp32 reference, each timed with CUDA events next to the base matmul
    attention   the decode attention call at 8B shapes: the engine's Triton paged kernel (reads the cache in
                place), and SDPA under each backend and as GQA-as-rows over blocks gathered out of the cache;
                RMSNorm of the same rows through transformers' ops and the engine's Triton kernel
    serve       the server's app over HTTP on loopback on the default model: seeded sampling, an OpenAI stream,
                an embedding, the metrics, nothing left running
    throughput  8B shape, random weights, real Llama 3 tokenizer: 64 and 128 concurrent requests (prompt 512,
                256 outputs, EOS ignored) for (a) base only, (b) one adapter, (c) three adapters mixed in the
                engine, and (d) PEFT's mixed-adapter batch generate; decode step time against the weight-read
                floor, a step-phase breakdown, a profile of the decode step, peak GPU memory; (c) again with
                eager steps and with SDPA over gathered blocks instead of the Triton kernel

    python benchmarks/gpu_check.py                          # on the GPU: everything, ~6-7 min on an H200
    python benchmarks/gpu_check.py --device cpu --tiny      # every stage on a tiny shape on the CPU, ~1-2 min
    bash benchmarks/gpu_check.sh                            # the GPU run under a hard timeout, results to $OUT

Results: benchmarks/results/gpu_check.json (rewritten after every stage) and gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.gpu.common import Budget, Plan, log, reset_peak  # noqa: E402
from benchmarks.gpu.env import stage_env  # noqa: E402
from benchmarks.gpu.llama3_8b import LLAMA3_8B, TINY  # noqa: E402
from benchmarks.gpu.ops import stage_attention, stage_lora_op  # noqa: E402
from benchmarks.gpu.oracle import stage_oracle  # noqa: E402
from benchmarks.gpu.serve import stage_serve  # noqa: E402
from benchmarks.gpu.throughput import stage_throughput  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"
STAGES = ("env", "oracle", "lora_op", "attention", "serve", "throughput")
GPU_BUDGET_S = {"env": 20, "oracle": 90, "lora_op": 40, "attention": 20, "serve": 45, "throughput": 300}  # < 9 min
TINY_BUDGET_S = {"env": 5, "oracle": 20, "lora_op": 5, "attention": 5, "serve": 60, "throughput": 40}
GPU_PLAN = Plan(LLAMA3_8B, (64, 128), 512, 256, 32, 8, (64, 128, 4096), 64, 640, 2**30, 64, 16, GPU_BUDGET_S)
# the tiny run times each op after 1 warm-up call over 3 calls: on the CPU the Triton kernels run interpreted
TINY_PLAN = Plan(TINY, (4, 8), 32, 8, 8, 4, (8, 32), 4, 64, 2**24, 4, 2, TINY_BUDGET_S, timing=(1, 3))
STAGE_RUNS = {"oracle": stage_oracle, "lora_op": stage_lora_op, "attention": stage_attention, "serve": stage_serve}


# ---- the run -----------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = ["# GPU check", ""]
    env = report["stages"].get("env", {}).get("result", {})
    lines.append(
        f"{env.get('gpu', env.get('device'))}, torch {env.get('torch')}, {env.get('dtype')}; copy bandwidth "
        f"{env.get('copy_bandwidth_gb_s')} GB/s; total {report.get('wall_seconds')} s"
    )
    lines += ["", "| stage | status | seconds | budget |", "| --- | --- | ---: | ---: |"]
    for name, stage in report["stages"].items():
        lines.append(f"| {name} | {stage['status']} | {stage['seconds']} | {stage['budget_s']} |")
    summary = report["stages"].get("throughput", {}).get("result", {}).get("summary")
    if summary:
        lines += [
            "",
            "| concurrent | (a) base tok/s | (b) one tok/s | (c) three tok/s | (d) PEFT tok/s | (c)/(a) | "
            "(c)/(d) | step ms (c) | step / floor (c) | peak GB (c) | (c) eager tok/s | graphs / eager |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for n, r in summary["by_concurrency"].items():
            d = f"{r['d_peft_tok_s']}{'' if r['d_measured'] else ' (extrapolated)'}"
            lines.append(
                f"| {n} | {r['a_base_tok_s']} | {r['b_one_adapter_tok_s']} | {r['c_three_adapters_tok_s']} | "
                f"{d} | {r['c_over_a']} | {r['c_over_d']} | {r['decode_step_ms_c']} | "
                f"{r['decode_step_over_floor_c']} | {r['peak_gpu_memory_gb_c']} | {r['c_eager_tok_s']} | "
                f"{r['c_graphs_over_eager']} |"
            )
        lines += [""] + [
            f"- {t['target']}: {t['measured']} ({'met' if t['met'] else 'missed' if t['met'] is False else 'n/a'})"
            for t in summary["targets"]
        ]
        throughput = report["stages"]["throughput"]["result"]
        lines.append(f"- decode attention: {throughput.get('decode_attention')}")
        for n, r in summary["by_concurrency"].items():
            if r.get("c_sdpa_tok_s"):
                lines.append(
                    f"- (c) at {n} with SDPA over gathered blocks instead: {r['c_sdpa_tok_s']} tok/s, decode step "
                    f"{r['c_sdpa_decode_step_ms']} ms (with the paged kernel: {r['decode_step_ms_c']} ms)"
                )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape and workload, for the CPU and tests")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--work", type=Path, help="folder for generated adapters (default: <cache>/gpu_check)")
    parser.add_argument("--near-tie", type=float, default=0.5, help="bf16 oracle: top-2 logit margin of a near-tie")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f"--stages: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    if args.work is None:
        from benchmarks.gpu.llama3_8b import cache_dir

        args.work = cache_dir() / "gpu_check"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; use --device cpu --tiny here")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plan = TINY_PLAN if args.tiny else GPU_PLAN
    report: dict = {"benchmark": "gpu_check", "tiny": args.tiny, "device": str(device), "stages": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.stages:
        budget = Budget(plan.budgets[name])
        log(f"stage {name}: budget {budget.seconds} s")
        entry = {"budget_s": budget.seconds}
        try:
            if name == "env":
                entry["result"] = stage_env(plan, device, dtype, budget)
            elif name == "throughput":
                entry["result"] = stage_throughput(plan, device, dtype, budget, args, report)
            else:
                entry["result"] = STAGE_RUNS[name](plan, device, dtype, budget, args)
            passed = entry["result"].get("passed", True)
            entry["status"] = "skipped" if "skipped" in entry["result"] else "passed" if passed else "FAILED"
        except Exception as e:
            traceback.print_exc()
            entry["status"] = "error"
            entry["error"] = f"{type(e).__name__}: {e}"
        entry["seconds"] = round(budget.elapsed, 1)
        entry["over_budget"] = budget.left < 0
        report["stages"][name] = entry
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"stage {name}: {entry['status']} in {entry['seconds']} s")
        reset_peak(device)
    (args.out / "gpu_check.md").write_text(markdown(report))
    print()
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
