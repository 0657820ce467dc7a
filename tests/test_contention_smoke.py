"""The contention benchmark still runs its variants quiet and beside a busy process and writes what it promises;
no timing is checked here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_loader import load_benchmark

from loraplex.engine.model.threads import available_cpus, cgroup_cpu_limit, default_threads

bench = load_benchmark("contention")


@pytest.mark.slow
def test_quick_run_measures_old_and_new_quiet_and_busy(tmp_path: Path) -> None:
    report = bench.main(["--quick", f"--out={tmp_path}"])
    data = json.loads((tmp_path / "contention.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert sorted((r["variant"], r["load"]) for r in data["rows"]) == [
        ("new", "hog"),
        ("new", "quiet"),
        ("old", "hog"),
        ("old", "quiet"),
    ]
    assert all(r["tok_s"] > 0 and r["step_ms"] > 0 for r in data["rows"])
    threads = {r["variant"]: r["threads"] for r in data["rows"]}
    assert threads == {"old": 2, "new": default_threads(available_cpus(), cgroup_cpu_limit())}
    for summary in data["summary"].values():
        assert summary["quiet_tok_s"] > 0 and summary["hog_tok_s"] > 0 and summary["slowdown"] > 0


def test_unknown_variants_are_refused() -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "old,fastest"])
