"""The adapter-swap benchmark still runs end to end and writes what it promises; no timing is checked here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from benchmark_loader import load_benchmark

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported


bench = load_benchmark("adapter_swap")


def test_zipf_workload_is_seeded_and_skewed() -> None:
    pool = [list(range(1000))]
    names = [f"a{i}" for i in range(20)]
    settings = bench.Settings(num_requests=200)
    workload = bench.make_zipf_workload(pool, names, settings)
    assert workload == bench.make_zipf_workload(pool, names, settings)
    counts = sorted((sum(r.endpoint == n for r in workload) for n in names), reverse=True)
    assert counts[0] > 3 * counts[9], f"Zipf s=1 should be skewed: {counts}"
    assert all(16 <= len(r.prompt_token_ids) <= 64 and r.max_tokens == 16 for r in workload)


@pytest.mark.slow
def test_quick_run_writes_json_and_table(tmp_path: Path) -> None:
    report = bench.main(["--quick", "--threads=1", f"--out={tmp_path}"])
    data = json.loads((tmp_path / "adapter_swap.json").read_text())
    assert data == json.loads(json.dumps(report))
    keys = {"machine", "model", "settings", "swap_adapter", "ttft_idle", "batch_impact", "throughput", "targets"}
    assert keys | {"table", "wall_seconds"} <= set(data)
    assert {"cpu_model", "logical_cores", "torch_threads", "date"} <= set(data["machine"])
    quick = bench.QUICK

    ttft = data["ttft_idle"]["ttft_ms"]
    assert ttft["resident"]["n"] == ttft["cold"]["n"] == quick.trials
    impact = data["batch_impact"]
    counts = {kind: s["n"] for kind, s in impact["step_ms"].items()}
    assert counts == {
        "decode": bench.DECODE_STEPS_PER_TRIAL * quick.trials,
        "resident_join": quick.trials,
        "cold_join": quick.trials,
    }
    assert impact["load_slot_ms"]["n"] == quick.trials, "exactly one slot load per cold join"
    assert impact["background_token_every_step"] and impact["background_tokens_each"] > 0
    assert {"swap_added_ms", "decode_step_ms", "swap_added_in_decode_steps"} <= set(impact)

    throughput = data["throughput"]
    assert throughput["workload"]["num_requests"] == quick.num_requests
    assert throughput["workload"]["zipf_s"] == quick.zipf_s
    swapping, resident = throughput["systems"].values()
    for system in (swapping, resident):  # every request produced exactly its tokens (run_loraplex checks each)
        assert system["tokens"] == quick.num_requests * quick.output_len
        assert {"seconds", "tokens_per_s", "slot_loads", "time_to_first_token_s"} <= set(system)
    assert swapping["max_loras"] == quick.max_loras and resident["max_loras"] == quick.num_adapters
    assert resident["slot_loads"] == 0, "every adapter was loaded by the warm-up"
    assert "swapping_over_all_resident" in throughput
    assert [t["maximum"] for t in data["targets"]] == [1.0]
    assert "## Throughput" in (tmp_path / "adapter_swap.md").read_text()
