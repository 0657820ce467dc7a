"""The prefix-cache benchmark still runs, both engines agree, and the cache supplies tokens; no timing is
checked here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_loader import load_benchmark

bench = load_benchmark("prefix_cache")


@pytest.mark.slow
def test_quick_run_reuses_the_conversation_so_far(tmp_path: Path) -> None:
    report = bench.main(["--quick", "--threads=1", f"--out={tmp_path}"])
    data = json.loads((tmp_path / "prefix_cache.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert data["summary"]["prompt_tokens_from_cache"] > 0.3
    assert all(v > 0 for v in data["summary"]["ttft_ms_median"].values())
    assert "| off |" in (tmp_path / "prefix_cache.md").read_text()
