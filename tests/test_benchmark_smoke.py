"""The throughput benchmark still runs end to end and writes what it promises; no timing is checked here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_loader import load_benchmark
from transformers import AutoTokenizer

bench = load_benchmark("engine_throughput")


def test_workload_is_seeded_spread_and_within_ranges(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    endpoints = ["chatbot", "code", "summarization"]
    workload = bench.make_workload(tokenizer, endpoints, bench.FULL)
    assert workload == bench.make_workload(tokenizer, endpoints, bench.FULL)
    assert [r.endpoint for r in workload].count("code") == 16
    assert {r.endpoint for r in workload} == set(endpoints)
    assert all(16 <= len(r.prompt_token_ids) <= 256 and 16 <= r.max_tokens <= 128 for r in workload)
    assert len({r.request_id for r in workload}) == 48


@pytest.mark.slow
def test_quick_run_writes_json_table_and_plot(tmp_path: Path) -> None:
    report = bench.main(
        [
            "--quick",
            "--num-requests=3",
            "--output-len=4",
            "--skip=copies,base-only,float32-weights,unpacked,torch-ops,thread-sweep",
            "--threads=1",
            "--num-kv-blocks=128",
            "--kv-fractions=0.125,1",  # the smallest pool (it preempts) and the whole need: one engine each
            f"--out={tmp_path}",
        ]
    )
    data = json.loads((tmp_path / "engine_throughput.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert {"machine", "model", "workload", "systems", "thread_sweep", "targets", "table", "wall_seconds"} <= set(data)
    assert {"cpu_model", "logical_cores", "torch", "date"} <= set(data["machine"])
    assert data["workload"]["output_tokens"] == {"min": 4, "max": 4, "total": 12}
    assert set(data["systems"]) == {"loraplex", "peft-sequential", "peft-batched"}
    for name, system in data["systems"].items():
        assert {"tokens", "seconds", "tokens_per_s", "loraplex_speedup", "memory", "latency_s"} <= set(system), name
        assert system["tokens"] == 12, name
        assert system["memory"]["model_mb"] > 0 and "peak_rss_growth_mb" in system["memory"], name
    assert len(data["systems"]["loraplex"]["seconds_per_round"]) == 2
    assert data["systems"]["loraplex"]["same_tokens_every_round"] is True
    assert data["systems"]["peft-batched"]["batch_size"] == 16
    assert "| loraplex (1 thr) | 3 | 12 |" in (tmp_path / "engine_throughput.md").read_text()
    assert (tmp_path / "engine_throughput.png").stat().st_size > 0
    # The KV pool sweep: pools grow with the fraction, each run gives the reference's tokens whatever it preempts.
    sweep = data["kv_pool_sweep"]
    assert [p["fraction_of_need"] for p in sweep] == [0.125, 1.0]
    assert sweep[0]["num_kv_blocks"] < sweep[1]["num_kv_blocks"]
    assert all(p["same_tokens_as_loraplex"] == "3/3" and p["peak_rss_growth_mb"] > 0 for p in sweep)
    assert all(p["speedup_vs_a"] > 0 and "both_targets_met" not in p for p in sweep)  # (c) skipped
    assert "## KV pool size" in (tmp_path / "engine_throughput.md").read_text()


@pytest.mark.slow
def test_peer_compare_without_peers_runs_every_scenario_on_loraplex(tmp_path: Path) -> None:
    peer_compare = load_benchmark("peer_compare")
    report = peer_compare.main(["--peers", "none", "--quick", "--threads=1", f"--out={tmp_path}"])
    data = json.loads((tmp_path / "peer_compare.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert set(data["systems"]) == {"loraplex"} and data["systems"]["loraplex"]["status"] == "ran"
    quick = peer_compare.QUICK
    loraplex = data["systems"]["loraplex"]
    for scenario, count in (("base", quick.num_requests), ("mixed", quick.num_requests), ("single", 1)):
        s = loraplex[scenario]
        assert s["completed"] == s["requests"] == count and s["errors"] == {}, scenario
        assert s["output_tokens"] == count * quick.output_len and s["ended_early"] == 0, scenario  # ignore_eos
        assert s["ttft_s"]["p50"] > 0 and s["itl_s"]["p50"] > 0, scenario
    assert len(loraplex["single"]["long_prompt_ttft_s"]) == quick.ttft_trials
    assert "| loraplex |" in (tmp_path / "peer_compare.md").read_text()
    assert (tmp_path / "peer_compare.png").stat().st_size > 0
