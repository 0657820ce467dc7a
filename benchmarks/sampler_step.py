"""Time the sampler takes per engine step, for the parameter sets clients send by default.

The sampler runs on the engine loop between forward passes, so its time adds to every step. Rows are
random logits over the default model's 49,152-token vocabulary with 200-token histories; the parameter sets:

- greedy: temperature 0 (the benchmarks and the oracle);
- ollama: Ollama's defaults (temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1 over 64 tokens);
- openai: OpenAI's defaults (temperature 1, top_p 1, no penalties);
- penalties: temperature 0.7, top_p 0.95, presence and frequency penalties 0.5.

``--against REV`` also times ``loraplex/engine/model/sampling.py`` as of git revision REV (one with the
``loraplex/`` layout) in the same process, alternating with the working tree's, so the two see the same machine.

    python benchmarks/sampler_step.py                          # results in benchmarks/results/
    python benchmarks/sampler_step.py --against HEAD~1 --out /tmp/sampler
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.harness import cli, report
from benchmarks.harness.cli import ROOT
from benchmarks.harness.machine import machine_description, source_revision
from loraplex.engine.core.sequence import Request, SamplingParams, Sequence
from loraplex.engine.model.sampling import Sampler

SAMPLING = "loraplex/engine/model/sampling.py"  # --against reads it at a revision that has this layout
VOCAB = 49152
HISTORY = 200
PROFILES = {
    "greedy": SamplingParams(),
    "ollama": SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1, repeat_last_n=64),
    "openai": SamplingParams(temperature=1.0),
    "penalties": SamplingParams(temperature=0.7, top_p=0.95, presence_penalty=0.5, frequency_penalty=0.5),
}


def batch(profile: str, size: int, seed: int) -> tuple[torch.Tensor, list[Sequence], list[torch.Generator]]:
    rng = torch.Generator().manual_seed(seed)
    logits = torch.randn(size, VOCAB, generator=rng) * 4
    seqs = []
    for i in range(size):
        history = torch.randint(0, VOCAB, (HISTORY,), generator=rng).tolist()
        seq = Sequence(Request(f"r{i}", "base", history[: HISTORY // 2], PROFILES[profile]))
        seq.output_token_ids = history[HISTORY // 2 :]
        seqs.append(seq)
    return logits, seqs, [torch.Generator().manual_seed(i) for i in range(size)]


def sampler_at(revision: str) -> Callable:
    """``Sampler`` from ``loraplex/engine/model/sampling.py`` as of ``revision``."""
    source = subprocess.run(
        ["git", "show", f"{revision}:{SAMPLING}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    folder = Path(tempfile.mkdtemp())
    (folder / "sampling_at_revision.py").write_text(source)
    spec = importlib.util.spec_from_file_location("sampling_at_revision", folder / "sampling_at_revision.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.Sampler()


def time_once(sampler: Callable, profile: str, size: int, seed: int) -> float:
    logits, seqs, generators = batch(profile, size, seed)
    start = time.perf_counter()
    sampler(logits, seqs, generators)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    samplers = {"current": Sampler()}
    if args.against:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", args.against], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        samplers[commit] = sampler_at(commit)
    rows = []
    for profile in PROFILES:
        for size in args.batches:
            times: dict[str, list[float]] = {name: [] for name in samplers}
            for repeat in range(args.repeats):
                for name, sampler in samplers.items():
                    times[name].append(time_once(sampler, profile, size, seed=repeat))
            row = {"profile": profile, "batch": size}
            row.update({f"{name}_ms": round(statistics.median(t) * 1e3, 2) for name, t in times.items()})
            rows.append(row)
            cli.log(str(row))
    names = list(samplers)
    cells = [[r["profile"], r["batch"], *(r[f"{n}_ms"] for n in names)] for r in rows]
    return {
        "benchmark": "sampler_step",
        "machine": machine_description(args.threads),
        "source": source_revision(),
        "settings": {"vocab": VOCAB, "history": HISTORY, "repeats": args.repeats, "against": args.against},
        "profiles": {name: vars(params) for name, params in PROFILES.items()},
        "rows": rows,
        "table": report.table(["params", "batch", *(f"{n} ms" for n in names)], cells),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser(__doc__, "batches 1,4, 2 repeats", ("threads",), threads=2)
    parser.add_argument("--against", default="", help=f"also time {SAMPLING} at this git revision")
    parser.add_argument("--repeats", type=int, help="timed calls per profile and batch (default 7)")
    return cli.parse(parser, argv, {"repeats": 7, "batches": [1, 8, 64, 128]}, {"repeats": 2, "batches": [1, 4]})


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data = run(args)
    report.write(args.out, "sampler_step", data, f"# Sampler time per step\n\n{data['table']}\n")
    return data


if __name__ == "__main__":
    main()
