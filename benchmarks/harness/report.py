"""Results: ``NAME.json`` (everything), ``NAME.md`` (the tables, also printed) and plots, in one folder."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness.machine import load_average


def write(out: Path, name: str, report: dict, markdown: str, plot: Callable[[Path], None] | None = None) -> None:
    """Write ``out/NAME.json``, ``out/NAME.md`` and, with ``plot``, ``out/NAME.png``; print the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    written = ["json", "md"]
    if plot is not None:
        plot(out / f"{name}.png")
        written.append("png")
    print(f"\n{markdown}\nwrote {out}/{name}.{{{','.join(written)}}}", flush=True)


def run_end(started: float) -> dict:
    """What every report ends with: the load average at the end (how quiet the run stayed) and its wall time
    since ``started`` (``time.perf_counter``)."""
    return {"load_average_at_end": load_average(), "wall_seconds": round(time.perf_counter() - started, 1)}


def page(heading: str, title: str, sections: list[str], name: str, wall_seconds: float) -> str:
    """A results page: the heading, what ran where, the sections, the run's time and where the details are."""
    parts = [f"# {heading}", title, *sections, f"Full run took {wall_seconds} s. Details: {name}.json."]
    return "\n\n".join(parts) + "\n"


def target_lines(targets: list[dict]) -> list[str]:
    """One line per target: what it asks, what was measured, met or missed."""
    return [f"- {t['target']}: {t['measured']} ({'met' if t['met'] else 'missed'})" for t in targets]


def table(header: list[str], rows: list[list[Any]], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, title: str = "") -> None:
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
