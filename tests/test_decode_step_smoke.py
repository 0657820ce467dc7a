"""The decode-step benchmark still runs and writes what it promises; no timing is checked here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_loader import load_benchmark

bench = load_benchmark("decode_step")


@pytest.mark.slow
def test_quick_run_times_every_engine_at_each_batch(tmp_path: Path) -> None:
    report = bench.main(["--quick", "--threads=1", f"--out={tmp_path}"])
    data = json.loads((tmp_path / "decode_step.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert [row["batch"] for row in data["rows"]] == [1, 3]
    assert all(row[f"{variant}_ms"] > 0 for row in data["rows"] for variant in bench.VARIANTS)
    assert "| 3 |" in (tmp_path / "decode_step.md").read_text()
