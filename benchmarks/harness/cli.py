"""A benchmark script's set-up: environment, the flags every script shares, and its log lines."""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model and tokenizer are local; never ask the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices inside generate

COMMON = ("threads", "seed", "config", "num_kv_blocks")


def parser(doc: str | None, quick: str, common: tuple[str, ...] = COMMON, threads: int = 0) -> argparse.ArgumentParser:
    """A parser with ``--quick`` (``quick`` says what it runs), ``--out`` and the ``common`` flags.

    ``threads`` is the default of ``--threads`` (0 = the config's ``model.num_threads``)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"a small run for development and CI: {quick}")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON, Markdown and plot")
    flags = {
        "threads": (("--threads",), dict(type=int, default=threads, help="torch threads (0 = the config's)")),
        "seed": (("--seed",), dict(type=int, default=0, help="seed of the workload")),
        "config": (("--config",), dict(help="engine TOML config (default: the shipped one)")),
        "num_kv_blocks": (
            ("--num-kv-blocks",),
            dict(type=int, help="limits.num_kv_blocks (KV pool size) of every engine; max_model_len cut to fit"),
        ),
    }
    for name in common:
        names, kwargs = flags[name]
        p.add_argument(*names, **kwargs)
    return p


def parse(
    p: argparse.ArgumentParser, argv: list[str] | None, full: dict | None = None, quick: dict | None = None
) -> argparse.Namespace:
    """Parse ``argv``; every flag left at None takes its value from ``quick`` under ``--quick`` (then ``full``),
    else from ``full``."""
    args = p.parse_args(argv)
    defaults = {**(full or {}), **(quick or {})} if args.quick else (full or {})
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
