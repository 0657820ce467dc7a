"""The streaming-overhead benchmark still runs against a real server and writes what it promises; no timing
is checked here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_loader import load_benchmark

bench = load_benchmark("stream_overhead")


@pytest.mark.slow
def test_quick_run_times_the_engine_and_the_server_each_round(tmp_path: Path) -> None:
    report = bench.main(["--quick", "--threads=1", f"--out={tmp_path}"])
    data = json.loads((tmp_path / "stream_overhead.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert len(data["rows"]) == 2
    for row in data["rows"]:
        assert row["tokens"] == 6
        assert row["engine_ms"] > 0 and row["server_step_ms"] > 0 and row["client_gap_ms"] > 0
    assert data["summary"]["client_gap_over_engine"] > 0
    assert "**median**" in (tmp_path / "stream_overhead.md").read_text()
