"""LoRA adapters in llama.cpp's GGUF format: a PEFT adapter converted by llama.cpp's own converter
(tests/fixtures/random_lora_r2.gguf, made by tests/fixtures/make_gguf_lora.py) reads back to the PEFT
original's weights bit for bit, Q and K rows un-permuted, and the engine serves it with transformers + PEFT's
greedy tokens, alone and mixed in one batch with other adapters."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loraplex.engine.core.config import AdaptersConfig
from loraplex.engine.core.errors import AdapterError
from loraplex.engine.core.sequence import Request, SamplingParams
from loraplex.engine.lora.config import load_adapter
from loraplex.engine.model.loader import default_gguf_path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_gguf_lora import FIXTURE, make_peft  # noqa: E402

NEW_TOKENS = 12
HEADS = (9, 3)  # SmolLM2-135M: attention heads, key-value heads


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft(tmp_path_factory.mktemp("gguf") / "peft")


def read(engine, path: Path, heads=HEADS):
    return load_adapter("g", path, engine.lora.module_shapes, engine.lora.max_lora_rank, heads)


def test_the_converted_file_reads_back_to_the_peft_weights_bit_for_bit(engine, peft_dir: Path) -> None:
    gguf, peft = read(engine, FIXTURE), read(engine, peft_dir)
    assert (gguf.rank, gguf.scaling, gguf.target_modules) == (peft.rank, peft.scaling, peft.target_modules)
    assert set(gguf.lora_a) == set(peft.lora_a) and len(gguf.lora_a) == 30 * 7
    for module in peft.lora_a:
        assert torch.equal(gguf.lora_a[module], peft.lora_a[module].float()), module
        assert torch.equal(gguf.lora_b[module], peft.lora_b[module].float()), module


def test_without_unpermuting_q_and_k_the_rows_would_differ(engine, peft_dir: Path) -> None:
    """The permutation is real in the fixture: read as if every head were one, Q's rows come out permuted."""
    wrong, peft = read(engine, FIXTURE, heads=(1, 1)), read(engine, peft_dir)
    module = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(wrong.lora_b[module], peft.lora_b[module].float())


@pytest.mark.parametrize("qtype", ["F32", "BF16", "Q8_0"])
def test_other_tensor_types_read_as_the_gguf_package_dequantizes_them(engine, tmp_path: Path, qtype: str) -> None:
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from gguf.quants import dequantize, quantize

    kind = GGMLQuantizationType[qtype]
    source = GGUFReader(FIXTURE)
    path = tmp_path / f"lora-{qtype}.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 4.0)
    expected = {}
    for tensor in source.tensors:
        data = dequantize(tensor.data, tensor.tensor_type).reshape(tensor.data.shape)
        # Q8_0 blocks are 32 wide: a rank-2 lora_b stays F32, as llama.cpp's converter keeps such tensors
        own = kind if kind != GGMLQuantizationType.Q8_0 or data.shape[-1] % 32 == 0 else GGMLQuantizationType.F32
        stored = data.astype(np.float32) if own == GGMLQuantizationType.F32 else quantize(data, own)
        writer.add_tensor(tensor.name, stored, raw_dtype=own)
        expected[tensor.name] = dequantize(stored, own).reshape(data.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    got, exact = read(engine, path), read(engine, FIXTURE)
    module = "model.layers.5.mlp.down_proj"
    assert np.array_equal(got.lora_a[module].numpy(), expected["blk.5.ffn_down.weight.lora_a"])
    assert np.array_equal(got.lora_b[module].numpy(), expected["blk.5.ffn_down.weight.lora_b"])
    tolerance = 0 if qtype == "F32" else 1e-2 * float(exact.lora_a[module].abs().max())
    assert torch.allclose(got.lora_a[module], exact.lora_a[module], atol=tolerance, rtol=0), "close to the original"


def test_served_alone_and_mixed_it_equals_transformers_and_peft(engine, model_dir: Path, peft_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine.add_adapter(engine.lora.read("from-gguf", FIXTURE))
    try:
        ids = engine.encode_prompt("The three most useful Python built-ins are")
        params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
        alone = engine.generate([Request("alone", "from-gguf", list(ids), params)])["alone"]
        mixed = engine.generate(
            [Request(f"m-{name}", name, list(ids), params) for name in ("from-gguf", "chatbot", "base", "code")]
        )
    finally:
        engine.remove_adapter("from-gguf")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    with torch.inference_mode():
        want = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    want = want[0, len(ids) :].tolist()
    assert [t for out in alone for t in out.new_token_ids] == want
    assert [t for out in mixed["m-from-gguf"] for t in out.new_token_ids] == want


def test_what_is_not_a_lora_gguf_is_refused_by_name(engine, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        read(engine, default_gguf_path())  # a model file, general.type = model
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF not really")
    with pytest.raises(AdapterError, match="cannot read"):
        read(engine, broken)


def test_run_time_loading_accepts_a_gguf_file_inside_the_roots(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(FIXTURE.read_bytes())
    (tmp_path / "x.bin").write_bytes(b"")
    roots = AdaptersConfig(roots=[str(tmp_path)])
    assert roots.allowed_path("x.gguf") == (tmp_path / "x.gguf").resolve()
    with pytest.raises(AdapterError, match="not a PEFT adapter directory or a GGUF LoRA file"):
        roots.allowed_path("x.bin")
