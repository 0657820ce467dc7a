"""The HTTP load benchmark still runs end to end against real servers and writes what it promises.

No timing is checked: the machine is shared. What must hold is that both systems start, every request of the
quick run completes without an error, and the JSON, table and plot are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_loader import load_benchmark
from transformers import AutoTokenizer

bench = load_benchmark("http_load")


def test_workload_is_seeded_and_within_ranges(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    workload = bench.make_workload(tokenizer, bench.FULL, bench.SKEWED)
    assert workload == bench.make_workload(tokenizer, bench.FULL, bench.SKEWED)
    assert len(workload) == bench.FULL.num_requests
    assert [r.endpoint for r in workload].count("chatbot") == 16
    assert all(32 <= r.prompt_tokens <= 256 and 16 <= r.num_predict <= 64 and r.prompt for r in workload)
    offsets = [r.offset for r in workload]
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_endpoint_counts_follow_popularity() -> None:
    assert bench.endpoint_counts(bench.SKEWED, 40) == {"chatbot": 16, "code": 12, "summarization": 6, "base": 6}
    assert sum(bench.endpoint_counts(bench.SKEWED, 7).values()) == 7
    assert bench.endpoint_counts(bench.UNIFORM, 4) == {"chatbot": 1, "code": 1, "summarization": 1, "base": 1}


def test_percentiles_by_nearest_rank() -> None:
    assert bench.percentiles([3.0, 1.0, 2.0, 4.0]) == {"mean": 2.5, "p50": 2.0, "p99": 4.0}
    assert bench.percentiles([]) == {"mean": None, "p50": None, "p99": None}


@pytest.mark.slow
def test_quick_run_completes_every_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = bench.main(["--quick", f"--out={tmp_path}"])
    data = json.loads((tmp_path / "http_load.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert {"machine", "settings", "workload", "systems", "target", "table", "wall_seconds"} <= set(data)
    assert set(data["systems"]) == {"loraplex", "old-design"}
    assert data["systems"]["loraplex"]["processes"] == 1
    assert data["systems"]["old-design"]["processes"] == 4
    assert {"target", "rate", "met"} <= set(data["target"])
    for name, system in data["systems"].items():
        assert [r["rate"] for r in system["rates"]] == list(bench.QUICK.rates), name
        for rate in system["rates"]:
            overall = rate["overall"]
            assert overall["errors"] == {} and overall["completed"] == overall["requests"] == 6, (name, rate)
            assert sum(e["completed"] for e in rate["endpoints"].values()) == 6
            assert set(rate["endpoints"]) == set(bench.SKEWED)  # 6 requests reach every endpoint
            for key in ("throughput_rps", "output_tokens_per_s", "ttft_s", "tpot_s", "latency_s"):
                assert key in overall, key
            assert overall["output_tokens"] > 0 and overall["latency_s"]["p99"] > 0
    assert "| loraplex | 2 | **overall** | 6/6 | 0 |" in (tmp_path / "http_load.md").read_text()
    assert (tmp_path / "http_load.png").stat().st_size > 0
