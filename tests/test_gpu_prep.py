"""The GPU check's CPU side: the tiny Llama 3 shape, its tokenizer and adapters, and every stage of the script.

The GPU itself is not needed: ``gpu_check.py --device cpu --tiny`` runs every stage on a two-layer model with
the real Llama 3 vocabulary. No timing is checked here, only that each stage runs and reports what it promises.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from benchmarks.gpu.llama3_8b import (
    LLAMA3_8B,
    TINY,
    build_model,
    load_llama3_tokenizer,
    load_random_llama3,
    make_random_adapters,
)
from loraplex.engine.core.config import EndpointConfig, EngineConfig, LimitsConfig, ModelConfig
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.sequence import Request, SamplingParams

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_models") is None, reason="the Llama 3 tokenizer needs: pip install llama-models"
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_llama3_tokenizer()


def test_llama3_tokenizer_is_the_real_one(tokenizer) -> None:
    assert len(tokenizer) == 128256
    assert tokenizer("Hello world!").input_ids == [128000, 9906, 1917, 0]  # BOS, then Llama 3's ids
    assert tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"]) == [128009, 128001]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")
    assert tokenizer.decode(tokenizer.encode("naïve café 東京", add_special_tokens=False)) == "naïve café 東京"


def test_8b_shape_is_llama_3_8b() -> None:
    assert LLAMA3_8B.num_parameters == 8_030_261_248
    assert LLAMA3_8B.kv_bytes_per_token(torch.bfloat16) == 128 * 1024
    with torch.device("meta"):  # the real config, built without memory
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM._from_config(LLAMA3_8B.config(), dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == LLAMA3_8B.num_parameters


def test_tiny_model_is_seeded_and_finite() -> None:
    a, b = build_model(TINY, "cpu", torch.float32, seed=3), build_model(TINY, "cpu", torch.float32, seed=3)
    assert sum(p.numel() for p in a.parameters()) == TINY.num_parameters
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    ids = torch.tensor([[128000, 9906, 1917]])
    with torch.inference_mode():
        logits = a(ids).logits
    assert logits.shape == (1, 3, TINY.vocab_size) and torch.isfinite(logits).all()


def test_tiny_adapters_load_into_the_engine(tmp_path: Path, tokenizer) -> None:
    adapters = make_random_adapters(tmp_path, TINY, rank=16)
    endpoints = [EndpointConfig(name="base"), *(EndpointConfig(name=n, adapter=str(p)) for n, p in adapters.items())]
    config = EngineConfig(
        model=ModelConfig(dtype="float32", device="cpu", num_threads=0),
        limits=LimitsConfig(max_num_seqs=8, num_kv_blocks=64, max_model_len=256, max_lora_rank=16),
        endpoints=endpoints,
    )
    engine = LLMEngine(config, loaded=load_random_llama3(TINY, "cpu", torch.float32, tokenizer=tokenizer))
    for name in adapters:
        adapter = engine.lora.adapters[name]
        assert adapter.rank == 16 and len(adapter.lora_a) == 7 * TINY.num_layers
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    results = engine.generate([Request(f"r-{n}", n, prompt, params) for n in ["base", *adapters]])
    assert all(sum(len(o.new_token_ids) for o in outs) == 3 for outs in results.values())


def test_gpu_check_tiny_on_cpu_writes_every_field(tmp_path: Path) -> None:
    from benchmarks import gpu_check

    threads = torch.get_num_threads()
    try:
        report = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    finally:
        torch.set_num_threads(threads)  # the script sets its own; later tests keep theirs
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["stages"].keys() == set(gpu_check.STAGES)
    for name, stage in saved["stages"].items():
        assert stage["status"] == "passed", (name, stage.get("error"))
        assert {"budget_s", "seconds", "over_budget", "result"} <= stage.keys()
    env = saved["stages"]["env"]["result"]
    assert env["copy_bandwidth_gb_s"] > 0
    oracle = saved["stages"]["oracle"]["result"]
    for mode in ("graphs", "eager"):
        result = oracle["by_mode"][mode]
        assert result["mismatches"] == 0 and result["exact_matches"] == len(oracle["requests"]), mode
    assert oracle["by_mode"]["graphs"]["decode_graphs"]["replays"] > 0
    lora = saved["stages"]["lora_op"]["result"]
    assert {c["module"] for c in lora["cases"]} == set(TINY.projection_shapes)
    assert {"masked_dense", "grouped", "gathered"} == set(lora["worst_relative_error"])
    attention = saved["stages"]["attention"]["result"]
    assert attention["fastest"] and attention["gather_ms"] > 0
    assert attention["variants"]["paged_triton"]["rel_err"] < 1e-5, "the engine's CUDA kernel, interpreted"
    assert attention["rms_norm"]["rel_err"] < 1e-6 and attention["rms_norm"]["triton_ms"] > 0
    serve = saved["stages"]["serve"]["result"]
    assert len(serve["checks"]) == 7 and all(serve["checks"].values()), serve["checks"]
    throughput = saved["stages"]["throughput"]["result"]
    for n in ("4", "8"):
        row = throughput["summary"]["by_concurrency"][n]
        for key in ("a_base_tok_s", "b_one_adapter_tok_s", "c_three_adapters_tok_s", "d_peft_tok_s", "c_over_a"):
            assert row[key] and row[key] > 0, (n, key)
        assert row["decode_step_over_floor_c"] > 0
        for mode in ("a_base", "b_one_adapter", "c_three_adapters"):
            run = throughput["engine"][f"{mode}/{n}"]
            assert run["output_tokens"] == int(n) * 8 and run["full_batch_decode_steps"] > 0
    assert throughput["engine"]["c_three_adapters_eager/4"]["output_tokens"] == 4 * 8
    # on the CPU the paged kernel is the compiled one; its run against SDPA over gathered blocks is the same code
    assert throughput["decode_attention"] == "cpu paged kernel"
    assert throughput["summary"]["by_concurrency"]["4"]["c_sdpa_tok_s"] > 0
    assert throughput["decode_graphs"]["replays"] > 0 and not throughput["decode_graphs"]["capture_failed"]
    assert throughput["summary"]["by_concurrency"]["4"]["c_graphs_over_eager"] > 0
    assert throughput["profile"]["top_ops"] and throughput["profile_eager"]["top_ops"]
    assert len(throughput["summary"]["targets"]) == 5
    assert "| 8 |" in (tmp_path / "gpu_check.md").read_text()
    assert report["stages"].keys() == saved["stages"].keys()
