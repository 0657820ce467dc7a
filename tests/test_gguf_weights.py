"""Weights kept in the GGUF file's own blocks (loraplex/engine/kernels/cpu/gguf_weights.py): 4-bit projections through
``panel_linear_q4``, 8-bit tied embeddings and LM head through ``row_major_linear_q8``.

The claim is exactness: the blocks are used only where they reproduce the loaded float32 weight, and the
kernels' outputs equal the float32 kernels' on that weight to the bit, so nothing downstream can move.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from loraplex.engine.core.config import EngineConfig, ModelConfig
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.sequence import Request, SamplingParams
from loraplex.engine.kernels.cpu import extension as cpu_kernels
from loraplex.engine.kernels.cpu.gguf_weights import (
    Q4Panels,
    Q8Rows,
    _dequantize,
    _row_order,
    _unpack_blocks,
    read_q4_projections,
    read_q8_tied_embeddings,
    to_panels,
    unpack_q8_blocks,
)
from loraplex.engine.kernels.cpu.linear import (
    FusedPanels,
    PanelLinear,
    Q4PanelLinear,
    Q8Embedding,
    Q8RowMajorLinear,
    RowMajorLinear,
)
from loraplex.engine.model.loader import load_model


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> None:
    assert cpu_kernels.load(tmp_path_factory.mktemp("cache")), "the CPU kernels did not build"


def random_blocks(rows: int, in_features: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes 0..15 and half-precision scales and minimums, as a GGUF file holds them."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (rows, in_features), dtype=np.uint8)
    groups = (rows, in_features // 32)
    scales = (rng.standard_normal(groups) * 0.01).astype(np.float16).astype(np.float32)
    minimums = (rng.standard_normal(groups) * 0.05).astype(np.float16).astype(np.float32)
    return codes, scales, minimums


def panel_weight(panels: Q4Panels) -> torch.Tensor:
    """The float32 weight [out, in] that ``panels`` hold, read back from the layout ``Q4Panels`` documents."""
    by_k = np.repeat(panels.codes.numpy(), 2, axis=1)  # [panels, in, 16]: each byte serves k = 2j and 2j + 1
    by_k[:, 0::2] &= 0x0F
    by_k[:, 1::2] >>= 4
    scales = np.repeat(panels.scales.numpy(), 32, axis=1)  # one per 32 k
    minimums = np.repeat(panels.minimums.numpy(), 32, axis=1)
    weight = scales * by_k.astype(np.float32) + minimums  # [panels, in, 16]
    return torch.from_numpy(weight.transpose(0, 2, 1).reshape(-1, panels.in_features)[: panels.out_features].copy())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("rows", "in_features", "out_features"),
    # one tile of each height, even tiles, several row blocks; 288 and 1536 features: a partial 256-deep
    # slice and six full ones; 37 and 200 outputs: a partial last panel
    # (up to 6 rows: the kernel's few-row path, its weights rebuilt in registers; more: through a rebuilt slice)
    [(1, 576, 1536), (2, 576, 192), (3, 1536, 576), (4, 32, 48), (5, 288, 37), (6, 576, 576), (7, 576, 200),
     (13, 64, 1000), (97, 288, 37), (200, 576, 48)],
)  # fmt: skip
def test_q4_panels_give_the_float32_panels_outputs_to_the_bit(
    kernels, rows: int, in_features: int, out_features: int, bias: bool
) -> None:
    panels = to_panels(*random_blocks(out_features, in_features, seed=rows))
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(panel_weight(panels))
    x = torch.randn(rows, in_features)
    q4 = Q4PanelLinear(linear, panels)(x)
    assert torch.equal(q4, PanelLinear(linear)(x))
    torch.testing.assert_close(q4, linear(x), rtol=1e-4, atol=1e-4)
    assert Q4PanelLinear(linear, panels)(x[:0]).shape == (0, out_features)


@pytest.mark.parametrize("rows", [1, 5, 48])
@pytest.mark.parametrize("four_bit", [True, False])
def test_fused_projections_equal_each_projection_to_the_bit(kernels, rows: int, four_bit: bool) -> None:
    """q/k/v-like projections (576, 192, 192 outputs) in one call give each one's outputs; the projections then
    read views of the joined weights, and still give them on their own."""
    projections = []
    for seed, out_features in enumerate((576, 192, 192)):
        panels = to_panels(*random_blocks(out_features, 288, seed=seed))
        linear = nn.Linear(288, out_features, bias=False)
        with torch.no_grad():
            linear.weight.copy_(panel_weight(panels))
        projections.append(Q4PanelLinear(linear, panels) if four_bit else PanelLinear(linear))
    x = torch.randn(rows, 288)
    alone = [p(x) for p in projections]
    assert FusedPanels.can_fuse(projections)
    fused = FusedPanels(projections)
    assert torch.equal(fused(x), torch.cat(alone, dim=1))
    assert all(torch.equal(p(x), y) for p, y in zip(projections, alone, strict=True))
    joined = getattr(fused, fused.packed_tensors[0]).untyped_storage().data_ptr()
    assert all(getattr(p, p.packed_tensors[0]).untyped_storage().data_ptr() == joined for p in projections)


def test_projections_of_different_kinds_or_widths_are_not_fused(kernels) -> None:
    linear = nn.Linear(64, 48, bias=False)
    panels = to_panels(*random_blocks(48, 64, seed=0))
    assert not FusedPanels.can_fuse([Q4PanelLinear(linear, panels), PanelLinear(linear)])
    assert not FusedPanels.can_fuse([PanelLinear(linear), PanelLinear(nn.Linear(32, 48, bias=False))])
    assert not FusedPanels.can_fuse([PanelLinear(nn.Linear(64, 40, bias=False)), PanelLinear(linear)])
    assert not FusedPanels.can_fuse([PanelLinear(nn.Linear(64, 48)), PanelLinear(linear)])


def test_q4_panel_linear_refuses_mismatched_shapes(kernels) -> None:
    panels = to_panels(*random_blocks(48, 64, seed=0))
    with pytest.raises(RuntimeError, match="x has 32 features, the weight expects 64"):
        torch.ops.loraplex.panel_linear_q4(torch.zeros(2, 32), panels.codes, panels.scales, panels.minimums, 48)
    with pytest.raises(RuntimeError, match="scales and minimums must be float32"):
        torch.ops.loraplex.panel_linear_q4(torch.zeros(2, 64), panels.codes, panels.scales[:, :1], panels.minimums, 48)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_unpacked_blocks_dequantize_as_gguf_does(kind: str) -> None:
    rng = np.random.default_rng(1)
    rows, blocks, size = 24, 6, 18 if kind == "Q4_0" else 20
    raw = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    halves = 1 if kind == "Q4_0" else 2  # the scale, then for Q4_1 the minimum
    raw[..., : 2 * halves] = (rng.standard_normal((rows, blocks, halves)) * 0.02).astype(np.float16).view(np.uint8)
    raw = raw.reshape(rows, blocks * size)
    expected = dequantize(raw, GGMLQuantizationType[kind])
    assert np.array_equal(_dequantize(*_unpack_blocks(raw, kind)), expected)


def test_panels_hold_the_blocks_they_were_made_from() -> None:
    codes, scales, minimums = random_blocks(37, 96, seed=2)  # 37 outputs: three panels, the last padded
    panels = to_panels(codes, scales, minimums)
    assert panels.codes.shape == (3, 48, 16) and panels.scales.shape == (3, 3, 16)
    assert np.array_equal(panel_weight(panels).numpy(), _dequantize(codes, scales, minimums))


def test_rows_are_matched_whatever_their_order() -> None:
    """transformers reorders the rows of q and k (undoing llama.cpp's rotary permutation); blocks follow."""
    values = np.random.default_rng(4).standard_normal((6, 8)).astype(np.float32)
    order = np.array([3, 0, 5, 1, 4, 2])
    assert np.array_equal(_row_order(values, values), np.arange(6))
    assert np.array_equal(_row_order(values, values[order]), order)
    changed = values[order].copy()
    changed[2, 5] += 1e-3
    assert _row_order(values, changed) is None


def random_q8(rows: int, features: int, seed: int) -> Q8Rows:
    rng = np.random.default_rng(seed)
    codes = rng.integers(-128, 128, (rows, features), dtype=np.int8)
    scales = (rng.standard_normal((rows, features // 32)) * 0.01).astype(np.float16).astype(np.float32)
    return Q8Rows(torch.from_numpy(codes), torch.from_numpy(scales))


@pytest.mark.parametrize(
    ("rows", "in_features", "out_features"),
    # 1-4 and 7 rows: tiles of 1, 2 and 3 input rows (one row: the weights rebuilt in registers, 8 rows at a
    # time); 7 and 1001 outputs: a last group of weight rows that repeats its last row; 544 features: an odd
    # number of blocks
    [(1, 576, 1001), (1, 32, 7), (1, 544, 64), (2, 32, 7), (3, 576, 64), (4, 544, 1000), (7, 64, 4097)],
)
def test_q8_lm_head_gives_the_float32_logits_to_the_bit(kernels, rows: int, in_features: int, out_features: int):
    q8 = random_q8(out_features, in_features, seed=rows)
    weight = q8.dequantize()
    embedding = Q8Embedding(q8)
    head = Q8RowMajorLinear(embedding)
    assert head.codes is embedding.codes
    x = torch.randn(rows, in_features)
    dense = RowMajorLinear(nn.Linear(in_features, out_features, bias=False))
    with torch.no_grad():
        dense.weight.copy_(weight)
    assert torch.equal(head(x), dense(x))
    torch.testing.assert_close(head(x), x @ weight.T, rtol=1e-4, atol=1e-4)
    ids = torch.randint(0, out_features, (2, 5))
    assert torch.equal(embedding(ids), torch.nn.functional.embedding(ids, weight))


def test_unpacked_q8_blocks_dequantize_as_gguf_does() -> None:
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (5, 2, 34), dtype=np.uint8)  # a float16 scale, then 32 codes, per block
    raw[..., :2] = (rng.standard_normal((5, 2, 1)) * 0.01).astype(np.float16).view(np.uint8)
    raw = raw.reshape(5, -1)
    expected = dequantize(raw, GGMLQuantizationType.Q8_0)
    rows = unpack_q8_blocks(raw)
    assert np.array_equal(rows.dequantize().numpy(), expected)
    ids = torch.tensor([4, 0, 4])
    assert np.array_equal(rows.dequantize(ids).numpy(), expected[[4, 0, 4]])


@pytest.fixture(scope="module")
def loaded(default_config: EngineConfig):
    return load_model(default_config.model)


@pytest.fixture(scope="module")
def gguf_tensors(loaded) -> list:
    return GGUFReader(loaded.gguf_path).tensors


def test_the_default_models_tied_embeddings_are_read_exactly(loaded, gguf_tensors) -> None:
    rows = read_q8_tied_embeddings(gguf_tensors, loaded.model)
    assert rows is not None
    assert torch.equal(rows.dequantize(), loaded.model.get_input_embeddings().weight)
    untied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, tie_word_embeddings=False))  # fmt: skip
    assert read_q8_tied_embeddings(gguf_tensors, untied) is None


def test_every_projection_of_the_default_model_is_read_exactly(loaded, gguf_tensors) -> None:
    q4 = read_q4_projections(gguf_tensors, loaded.model)
    linears = [m for m in loaded.model.get_decoder().modules() if type(m) is nn.Linear]
    assert len(linears) == 30 * 7 and set(q4) == set(linears)
    for linear, panels in q4.items():
        assert torch.equal(panel_weight(panels), linear.weight)


def test_a_projection_that_does_not_match_its_blocks_stays_float32(loaded, gguf_tensors, caplog) -> None:
    down = loaded.model.get_decoder().layers[3].mlp.down_proj
    original = down.weight[5, 7].item()
    with torch.no_grad():
        down.weight[5, 7] = original + 1e-3
    try:
        with caplog.at_level(logging.INFO, logger="loraplex.engine.kernels.cpu.gguf_weights"):
            q4 = read_q4_projections(gguf_tensors, loaded.model)
    finally:
        with torch.no_grad():
            down.weight[5, 7] = original
    assert down not in q4 and len(q4) == 30 * 7 - 1
    assert "1 Q4_1 blocks not equal to the loaded weight" in caplog.text


def test_engine_tokens_and_memory_with_q4_projections(
    default_config: EngineConfig, engine: LLMEngine, make_engine
) -> None:
    """The default engine keeps the GGUF file's blocks; float32 weights give the same greedy tokens from more
    than 5x the projection memory (3x the whole model's)."""
    float32 = make_engine(model={"gguf_weights": False})
    assert sum(isinstance(m, Q4PanelLinear) for m in engine.model.modules()) == 210
    assert isinstance(engine.model.get_input_embeddings(), Q8Embedding)
    assert isinstance(engine.model.get_output_embeddings(), Q8RowMajorLinear)
    assert not any(isinstance(m, (Q4PanelLinear, Q8Embedding)) for m in float32.model.modules())

    def projection_bytes(e: LLMEngine) -> int:
        modules = [m for m in e.model.modules() if isinstance(m, (PanelLinear, Q4PanelLinear))]
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())

    def model_bytes(e: LLMEngine) -> int:
        return sum(p.numel() * p.element_size() for p in e.model.parameters())

    assert projection_bytes(float32) > 5 * projection_bytes(engine)
    assert model_bytes(float32) > 3 * model_bytes(engine)
    prompts = [engine.tokenizer.encode(t) for t in ("def fibonacci(n):", "Summarize: the cat sat.", "Hi", "1, 2,")]
    requests = [
        Request(f"q4-{i}", endpoint, prompt, SamplingParams(max_tokens=24, ignore_eos=True))
        for i, (endpoint, prompt) in enumerate(zip(["base", "chatbot", "code", "summarization"], prompts, strict=True))
    ]
    expected = float32.generate(requests)
    got = engine.generate([dataclasses.replace(r) for r in requests])
    for request_id, outputs in expected.items():
        assert [t for o in got[request_id] for t in o.new_token_ids] == [t for o in outputs for t in o.new_token_ids]


def test_gguf_weights_setting_is_a_bool() -> None:
    from loraplex.engine.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.gguf_weights"):
        ModelConfig(gguf_weights="yes")
