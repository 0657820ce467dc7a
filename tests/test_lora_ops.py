"""Batched LoRA ops against the per-token reference loop, and the layer against PEFT's own LoRA layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex.engine.lora.layers import LoRABatch, LoRAMapping, LoRASegment, MultiLoRALinear
from loraplex.engine.lora.ops import column_mask, lora_grouped, lora_masked_dense, lora_reference

NUM_SLOTS = 4  # resident adapters, slots 1..4


def popularity(kind: str, num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Token -> slot assignments; the popularity axis is what catches segment bugs."""
    if kind == "distinct":
        return torch.arange(num_tokens) % (NUM_SLOTS + 1)
    if kind == "uniform":
        return torch.randint(0, NUM_SLOTS + 1, (num_tokens,), generator=gen)
    if kind == "skewed":  # zipf-like: slot 1 dominates
        weights = torch.tensor([0.1, 0.6, 0.2, 0.07, 0.03])
        return torch.multinomial(weights, num_tokens, replacement=True, generator=gen)
    if kind == "identical":
        return torch.full((num_tokens,), 2)
    raise ValueError(kind)


def stacked(rank: int, fan_in: int, fan_out: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(NUM_SLOTS + 1, rank, fan_in, generator=gen)
    b = torch.randn(NUM_SLOTS + 1, fan_out, rank, generator=gen)
    a[0], b[0] = 0, 0
    return a, b


@pytest.mark.parametrize("rank", [1, 8, 16, 64])
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("kind", ["distinct", "uniform", "skewed", "identical"])
def test_masked_dense_and_grouped_equal_the_reference_loop(rank: int, num_tokens: int, kind: str) -> None:
    gen = torch.Generator().manual_seed(rank * 1000 + num_tokens)
    fan_in, fan_out = 48, 40
    a, b = stacked(rank, fan_in, fan_out, gen)
    x = torch.randn(num_tokens, fan_in, generator=gen)
    indices = popularity(kind, num_tokens, gen)
    want = lora_reference(x, a, b, indices)
    a_packed = a[1:].reshape(-1, fan_in)
    b_packed_t = b[1:].transpose(1, 2).reshape(-1, fan_out)  # [L*r, out]
    got = lora_masked_dense(x, a_packed, b_packed_t, column_mask(indices, NUM_SLOTS, rank, x.dtype))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    slots = sorted(set(indices.tolist()) - {0})
    torch.testing.assert_close(lora_grouped(x, a, b, indices, slots), want, rtol=1e-5, atol=1e-4)
    assert torch.all(got[indices == 0] == 0), "slot 0 adds exactly nothing"


def test_layer_equals_peft_lora_layer_per_token_and_base_exactly_for_slot_zero() -> None:
    from peft import LoraConfig, get_peft_model

    gen = torch.Generator().manual_seed(0)
    fan_in, fan_out = 32, 24
    configs = {
        "a": LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]),
        "b": LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_rslora=True),
    }

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(fan_in, fan_out, bias=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    base = Net()
    peft_model = get_peft_model(Net(), configs["a"], adapter_name="a")
    peft_model.add_adapter("b", configs["b"])
    peft_model.base_model.model.proj.base_layer.load_state_dict(base.proj.state_dict())
    peft_layer = peft_model.base_model.model.proj
    for name in configs:  # PEFT initialises B to zero; give both matrices real values
        peft_layer.lora_A[name].weight.data = torch.randn(peft_layer.lora_A[name].weight.shape, generator=gen)
        peft_layer.lora_B[name].weight.data = torch.randn(peft_layer.lora_B[name].weight.shape, generator=gen)

    batch = LoRABatch()
    layer = MultiLoRALinear(base.proj, max_loras=3, max_lora_rank=16, dtype=torch.float32, batch=batch)
    for slot, name in ((1, "a"), (3, "b")):
        layer.set_lora(slot, peft_layer.lora_A[name].weight, peft_layer.lora_B[name].weight, peft_layer.scaling[name])

    x = torch.randn(1, 6, fan_in, generator=gen)
    indices = torch.tensor([0, 1, 3, 3, 0, 1])
    with torch.no_grad(), batch.use(LoRAMapping(indices, frozenset({1, 3}))):
        got = layer(x)[0]
    with torch.no_grad():
        base_out = base.proj(x)[0]  # same batch shape, so the same matmul kernel as inside the layer
        for t, slot in enumerate(indices.tolist()):
            if slot == 0:
                assert torch.equal(got[t], base_out[t]), "slot 0 must equal the base layer exactly"
                continue
            peft_model.set_adapter("a" if slot == 1 else "b")
            torch.testing.assert_close(got[t], peft_model(x[0, t]), rtol=1e-5, atol=1e-5)
    layer.reset_lora(1)
    layer.reset_lora(3)
    with torch.no_grad(), batch.use(LoRAMapping(indices, frozenset({1, 3}))):
        assert torch.equal(layer(x), base.proj(x)), "after reset_lora the layer is the base layer"


def test_swapping_a_slot_in_place_equals_packing_from_scratch() -> None:
    """A smaller adapter written over a resident one leaves no trace of it: same output as a fresh layer."""
    gen = torch.Generator().manual_seed(1)
    fan_in, fan_out = 32, 24
    base = nn.Linear(fan_in, fan_out)

    def adapter(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(rank, fan_in, generator=gen), torch.randn(fan_out, rank, generator=gen)

    first, second, replacement = adapter(16), adapter(8), adapter(4)
    swapped = MultiLoRALinear(base, max_loras=2, max_lora_rank=16, dtype=torch.float32, batch=LoRABatch())
    swapped.set_lora(1, *first, 0.5)
    swapped.set_lora(2, *second, 2.0)
    packed = swapped.a_packed
    swapped.set_lora(1, *replacement, 1.5)
    assert swapped.a_packed is packed, "room was there: the swap must write in place, not rebuild"
    assert swapped.packed_slot_ranks.tolist() == [4, 8], "the CPU kernel reads each slot to its own rank"

    fresh = MultiLoRALinear(base, max_loras=2, max_lora_rank=16, dtype=torch.float32, batch=LoRABatch())
    fresh.set_lora(1, *replacement, 1.5)
    fresh.set_lora(2, *second, 2.0)
    x = torch.randn(1, 5, fan_in, generator=gen)
    indices = torch.tensor([1, 2, 0, 1, 2])
    outputs = []
    for layer in (swapped, fresh):
        with torch.no_grad(), layer.batch.use(LoRAMapping(indices, frozenset({1, 2}))):
            outputs.append(layer(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("base_layer", [nn.Linear(48, 40), nn.Linear(48, 40, bias=False)])
def test_mixed_rows_then_segments_equal_the_reference_loop(base_layer: nn.Linear) -> None:
    """The runner's layout: decodes of mixed adapters, then prefill chunks of one adapter each (base ones unlisted)."""
    gen = torch.Generator().manual_seed(2)
    ranks = {1: 4, 2: 16, 3: 8}
    layer = MultiLoRALinear(base_layer, max_loras=3, max_lora_rank=16, dtype=torch.float32, batch=LoRABatch())
    a = torch.zeros(4, 16, 48)
    b = torch.zeros(4, 40, 16)
    for slot, rank in ranks.items():
        a[slot, :rank] = torch.randn(rank, 48, generator=gen)
        b[slot, :, :rank] = torch.randn(40, rank, generator=gen)
        layer.set_lora(slot, a[slot, :rank], b[slot, :, :rank], 1.0)
    decodes = [2, 0, 1, 2, 3]
    chunks = [(3, 7), (0, 5), (1, 9)]  # (slot, tokens)
    indices = torch.tensor(decodes + [slot for slot, n in chunks for _ in range(n)])
    segments, start = [], len(decodes)
    for slot, n in chunks:
        if slot:
            segments.append(LoRASegment(start, start + n, slot))
        start += n
    x = torch.randn(1, len(indices), 48, generator=gen)
    mapping = LoRAMapping(
        indices, frozenset({1, 2, 3}), len(decodes), tuple(segments), mixed_slots=frozenset({1, 2, 3})
    )
    with torch.no_grad(), layer.batch.use(mapping):
        got = layer(x)[0]
    want = base_layer(x)[0] + lora_reference(x[0], a, b, indices)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    base_rows = indices == 0
    assert torch.equal(got[base_rows], base_layer(x)[0][base_rows]), "base rows are the base layer exactly"
