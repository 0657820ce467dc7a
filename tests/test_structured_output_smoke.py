"""The structured-output benchmark still runs end to end and writes what it promises; no timing is checked here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_loader import load_benchmark

bench = load_benchmark("structured_output")


def run_with(texts: dict[str, str], reasons: dict[str, str]) -> object:
    return bench.RunResult("constrained", 0, 1.0, [], {}, texts, reasons)


def test_check_constrained_validates_only_what_ended_with_stop() -> None:
    good = json.dumps(
        {"title": "zipfile", "language": "python", "difficulty": 2, "topics": ["io"], "summary": "Reads zips."}
    )
    bad = json.dumps({"title": "x", "language": "rust", "difficulty": 2, "topics": [], "summary": ""})
    run = run_with(
        {"a": good, "b": bad, "c": good[:10], "d": "not json", "e": "{"},
        {"a": "stop", "b": "stop", "c": "length", "d": "stop", "e": "length"},
    )
    check = bench.check_constrained(run, ["a", "b", "c", "d"], bench.SCHEMA)
    assert (check["finished_stop"], check["finished_length"], check["valid_of_stop"]) == (3, 1, "1/3")
    assert [f["request_id"] for f in check["failures"]] == ["b", "d"]


def test_fresh_schemas_differ_only_in_a_property_name() -> None:
    assert bench.schema() == bench.SCHEMA
    fresh = bench.schema("title_7")
    assert "title_7" in fresh["properties"] and "title_7" in fresh["required"] and "title" not in fresh["required"]
    assert bench.json_schema_guide(fresh) != bench.json_schema_guide(bench.SCHEMA)


@pytest.mark.slow
def test_quick_run_writes_json_and_table(tmp_path: Path) -> None:
    report = bench.main(["--quick", "--threads=1", "--num-kv-blocks=128", "--compile-trials=2", f"--out={tmp_path}"])
    data = json.loads((tmp_path / "structured_output.json").read_text())
    assert data == json.loads(json.dumps(report))
    keys = {"machine", "model", "workload", "schema", "runs", "ratios", "decode_step_ratio", "masks", "compile"}
    assert keys | {"constrained_outputs", "targets", "table", "wall_seconds"} <= set(data)
    assert {"cpu_model", "logical_cores", "torch_threads", "load_average_at_start", "date"} <= set(data["machine"])
    quick = bench.QUICK
    assert data["workload"]["num_requests"] == quick.num_requests
    unconstrained, constrained = data["runs"]["unconstrained"], data["runs"]["constrained"]
    assert unconstrained["tokens"] == data["workload"]["output_tokens"]["total"]  # every request to max_tokens
    assert 0 < constrained["tokens"] <= unconstrained["tokens"]
    assert len(data["ratios"]["per_round"]) == 1 and data["ratios"]["median"] > 0
    assert data["masks"]["steps_with_masks"] > 0 and data["masks"]["fill_us_per_row"]["n"] > 0
    compiles = data["compile"]
    assert compiles["new_schema_ms"]["n"] == compiles["cached_schema_ms"]["n"] == 2
    assert compiles["vocabulary_scan_ms"] > 0 and compiles["first_schema_compile_ms"] > 0
    outputs = data["constrained_outputs"]
    assert outputs["constrained_requests"] == quick.num_requests // 2
    assert outputs["failures"] == [] and outputs["same_tokens_every_round"] is True
    assert outputs["unconstrained_half_same_tokens_as_unconstrained_run"].endswith(f"/{quick.num_requests // 2}")
    assert "| constrained |" in (tmp_path / "structured_output.md").read_text()
