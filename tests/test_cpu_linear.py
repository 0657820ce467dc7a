"""The CPU matmul swaps of engine/kernels/cpu/linear.py: same results as ``nn.Linear``, same parameters, same ties.

``PanelLinear`` runs the ``panel_linear`` CPU kernel (engine/kernels/cpu/csrc/panel_linear.cpp); ``PackedLinear`` is
oneDNN.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from loraplex.engine.core.config import EngineConfig, ModelConfig
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.sequence import Request, SamplingParams
from loraplex.engine.kernels.cpu import extension as cpu_kernels
from loraplex.engine.kernels.cpu.linear import (
    PackedLinear,
    PanelLinear,
    Q4PanelLinear,
    RowMajorLinear,
    WeightFirstLinear,
    pack_for_cpu,
    packing_available,
    uses_packed_weights,
)

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> None:
    assert cpu_kernels.load(tmp_path_factory.mktemp("cache")), "the CPU kernels did not build"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("rows", "in_features", "out_features"),
    # 1-6 rows: one tile of every height; 7, 13, 97, 200: rows split into even tiles (3 + 4, 4 + 4 + 5, ...),
    # and several row blocks;
    # 300 features: a partial 256-deep slice; 37 and 1000 outputs: a partial last panel; 1633 rows: 18 row
    # blocks of 96, the last holding one row
    [(1, 576, 1536), (2, 576, 192), (3, 1536, 576), (4, 64, 48), (5, 576, 576), (6, 300, 37), (7, 576, 1536),
     (13, 64, 1000), (97, 576, 576), (200, 300, 37), (1633, 64, 48)],
)  # fmt: skip
def test_panel_linear_equals_linear(kernels, rows: int, in_features: int, out_features: int, bias: bool) -> None:
    torch.manual_seed(rows * out_features)
    linear = nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(rows, in_features)
    out = PanelLinear(linear)(x)
    assert out.shape == (rows, out_features)
    torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-4)


def test_panel_linear_keeps_leading_dims_and_reads_strided_input(kernels) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=False)
    x = torch.randn(2, 5, 128)[..., ::2]  # not contiguous
    torch.testing.assert_close(PanelLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-4)


def test_panel_linear_row_does_not_depend_on_its_batch_companions(kernels) -> None:
    """Bit-identical alone or among others, across tile heights and row blocks: batching moves no token."""
    torch.manual_seed(0)
    panel = PanelLinear(nn.Linear(576, 1536, bias=False))
    x = torch.randn(200, 576)
    together = panel(x)
    for rows in (1, 2, 5, 6, 7, 8, 13, 48, 97):  # one tile, even splits (4 + 4, 4 + 4 + 5), full tiles, blocks
        assert torch.equal(panel(x[:rows]), together[:rows])
    assert torch.equal(panel(x[150:151]), together[150:151])


def test_panel_linear_refuses_mismatched_inputs(kernels) -> None:
    weight = torch.ops.loraplex.pack_linear_weight(torch.randn(40, 64))
    with pytest.raises(RuntimeError, match="x has 32 features, the weight expects 64"):
        torch.ops.loraplex.panel_linear(torch.randn(3, 32), weight, 40)
    with pytest.raises(RuntimeError, match="out_features 50 does not match 3 panels"):
        torch.ops.loraplex.panel_linear(torch.randn(3, 64), weight, 50)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.loraplex.panel_linear(torch.randn(3, 64, dtype=torch.float64), weight, 40)
    with pytest.raises(RuntimeError, match="pack_linear_weight"):
        torch.ops.loraplex.panel_linear(torch.randn(3, 64), torch.randn(40, 64), 40)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 576), (3, 576), (17, 576), (1, 5, 576)])
def test_packed_linear_equals_linear(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=bias)
    x = torch.randn(shape)
    out = PackedLinear(linear)(x)
    assert out.shape == (*shape[:-1], 1536)
    torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-4)


def test_packed_linear_row_does_not_depend_on_its_batch_companions() -> None:
    """Each row's result is bit-identical alone or among others: batching cannot move a greedy token."""
    torch.manual_seed(0)
    packed = PackedLinear(nn.Linear(576, 576, bias=False))
    x = torch.randn(48, 576)
    together = packed(x)
    for rows in (1, 2, 3, 8):
        assert torch.equal(packed(x[:rows]), together[:rows])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("rows", "in_features", "out_features"),
    # 1-3 rows: every tile width; 7 and 64: tiles plus a remainder; 300 and 13 features: a tail beyond a
    # multiple of 8; 1001 and 6 outputs: weight rows beyond a multiple of 4
    [(1, 576, 4096), (2, 64, 1001), (3, 300, 512), (7, 13, 6), (64, 576, 1000)],
)
def test_row_major_linear_equals_linear_and_keeps_the_weight(
    kernels, rows: int, in_features: int, out_features: int, bias: bool
) -> None:
    torch.manual_seed(rows + out_features)
    linear = nn.Linear(in_features, out_features, bias=bias)
    head = RowMajorLinear(linear)
    x = torch.randn(1, rows, in_features)
    assert head.weight is linear.weight
    out = head(x)
    assert out.shape == (1, rows, out_features) and out.is_contiguous()
    torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-4)


def test_row_major_linear_row_does_not_depend_on_its_batch_companions(kernels) -> None:
    torch.manual_seed(0)
    head = RowMajorLinear(nn.Linear(300, 1001, bias=False))
    x = torch.randn(64, 300)
    together = head(x)
    for rows in (1, 2, 3, 4, 5, 48):
        assert torch.equal(head(x[:rows]), together[:rows])
    assert torch.equal(head(x[62:63]), together[62:63])


def test_row_major_linear_refuses_mismatched_inputs(kernels) -> None:
    with pytest.raises(RuntimeError, match="x has 32 features, the weight expects 64"):
        torch.ops.loraplex.row_major_linear(torch.randn(3, 32), torch.randn(10, 64))
    with pytest.raises(RuntimeError, match="contiguous 2-D float32"):
        torch.ops.loraplex.row_major_linear(torch.randn(3, 64), torch.randn(64, 10).T)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_weight_first_linear_equals_linear_and_keeps_the_weight(rows: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 1000, bias=True)
    head = WeightFirstLinear(linear)
    x = torch.randn(1, rows, 64)
    assert head.weight is linear.weight
    torch.testing.assert_close(head(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("panels", [False, True])
def test_pack_for_cpu_keeps_logits_parameters_and_the_embedding_tie(request, panels: bool) -> None:
    if panels:
        request.getfixturevalue("kernels")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (1, 12))
    with torch.inference_mode():
        expected = model(ids).logits
    params = sum(p.numel() for p in model.parameters())
    assert pack_for_cpu(model, panels=panels) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(type(m) is not nn.Linear for m in model.modules())
    assert any(type(m) is (PanelLinear if panels else PackedLinear) for m in model.modules())
    assert type(model.get_output_embeddings()) is (RowMajorLinear if panels else WeightFirstLinear)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert sum(p.numel() for p in model.parameters()) == params
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, True),
        ({"packed_weights": False}, False),
        ({"dtype": "bfloat16"}, False),
        ({"quantization": "nf4"}, False),
        ({"device": "cuda"}, False),
    ],
)
def test_packing_applies_only_to_a_plain_float32_cpu_base(change: dict, expected: bool) -> None:
    assert uses_packed_weights(dataclasses.replace(ModelConfig(), **change)) is expected


def test_engine_greedy_tokens_are_the_same_packed_or_not(default_config: EngineConfig, engine: LLMEngine) -> None:
    """The oracle suite runs with the kernels' panels over the GGUF file's blocks (the default), and its
    portable-ops test with oneDNN's packing; this pins the unpacked path to the same tokens."""
    unpacked = LLMEngine(
        dataclasses.replace(default_config, model=dataclasses.replace(default_config.model, packed_weights=False))
    )
    assert not any(isinstance(m, (PackedLinear, PanelLinear)) for m in unpacked.model.modules())
    assert any(isinstance(m, Q4PanelLinear) for m in engine.model.modules())  # the default: the GGUF's blocks
    prompts = [engine.tokenizer.encode(text) for text in ("def fibonacci(n):", "The capital of France is", "Hi")]
    requests = [
        Request(f"packed-{i}", endpoint, prompt, SamplingParams(max_tokens=12, ignore_eos=True))
        for i, (endpoint, prompt) in enumerate(zip(["base", "chatbot", "code"], prompts, strict=True))
    ]
    expected = engine.generate(requests)
    got = unpacked.generate([dataclasses.replace(r) for r in requests])
    for request_id, outputs in expected.items():
        assert [t for o in got[request_id] for t in o.new_token_ids] == [t for o in outputs for t in o.new_token_ids]
