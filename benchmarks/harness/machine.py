"""What ran a benchmark: the machine, how busy it was, the package versions and the source revision."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

from benchmarks.harness.cli import ROOT

PACKAGES = ("torch", "transformers", "peft", "httpx")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def cpu_flags() -> list[str]:
    """The vector extensions the CPU has (the kernels are built with -march=native; peers pick theirs too)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma")))
    return []


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions, read from their metadata (importing torch here would fix OpenMP's wait policy)."""
    found = {}
    for name in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def machine_description(threads: int | None = None) -> dict:
    """The machine as a benchmark's JSON records it; ``load_average_at_start`` says how quiet it was."""
    machine = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_start": load_average(),
        "python": platform.python_version(),
        **versions(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if threads is not None:
        machine["torch_threads"] = threads
    return machine


def source_revision(paths: tuple[str, ...] = ("loraplex", "adapters", "benchmarks")) -> dict:
    """The commit measured, and which files under ``paths`` differed from it (others may be editing them)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    changed = git("status", "--porcelain", "--", *paths)
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": changed.splitlines()}
