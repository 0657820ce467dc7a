"""The sampler benchmark still runs and writes what it promises; no timing is checked here."""

from __future__ import annotations

import json
from pathlib import Path

from benchmark_loader import load_benchmark

bench = load_benchmark("sampler_step")


def test_quick_run_times_every_profile(tmp_path: Path) -> None:
    report = bench.main(["--quick", "--threads=1", f"--out={tmp_path}"])
    data = json.loads((tmp_path / "sampler_step.json").read_text())
    assert data == json.loads(json.dumps(report, default=str))
    assert {(r["profile"], r["batch"]) for r in data["rows"]} == {(p, b) for p in bench.PROFILES for b in (1, 4)}
    assert all(r["current_ms"] > 0 for r in data["rows"])
    assert "| ollama | 4 |" in (tmp_path / "sampler_step.md").read_text()
