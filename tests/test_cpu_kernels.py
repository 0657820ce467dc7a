"""The CPU kernels against their torch references: paged decode attention against SDPA over each sequence's
gathered context, the decode-row LoRA delta against the per-token loop."""

from __future__ import annotations

import pytest
import torch
from paged_cases import scattered_case, sdpa_reference

from loraplex.engine.core.config import ModelConfig
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.kernels.cpu import extension as cpu_kernels
from loraplex.engine.lora.ops import lora_reference
from loraplex.engine.model.kv_cache import KVCache


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> None:
    # CI must build it: a machine that cannot is served by the SDPA path, but the tests should say so loudly
    assert cpu_kernels.load(tmp_path_factory.mktemp("cache")), "the CPU kernels did not build"


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size", "max_len"),
    [(9, 3, 64, 16, 400), (8, 8, 32, 4, 37), (32, 8, 128, 16, 70), (4, 1, 16, 1, 9)],
)
def test_kernel_matches_sdpa(kernel, heads: int, kv_heads: int, dim: int, block_size: int, max_len: int) -> None:
    torch.manual_seed(heads * dim + block_size)
    lengths = [1, max_len, 2, block_size, block_size + 1, max_len // 2]
    cache, q, tables, lens = scattered_case(heads, kv_heads, dim, block_size, lengths, torch.float32, num_blocks=256)
    out = torch.full_like(q, float("nan"))
    scale = dim**-0.5
    torch.ops.loraplex.paged_decode_attention(q, cache.key_cache[0], cache.value_cache[0], tables, lens, scale, out)
    torch.testing.assert_close(out.double(), sdpa_reference(q, cache, tables, lens, scale), rtol=1e-5, atol=1e-5)


def test_kernel_refuses_what_it_cannot_read(kernel) -> None:
    cache = KVCache(1, 4, 4, 2, 8, torch.float32, "cpu")
    k, v = cache.key_cache[0], cache.value_cache[0]
    q, out = torch.randn(1, 4, 8), torch.empty(1, 4, 8)
    ok_tables, ok_lens = torch.tensor([[0, 1]]), torch.tensor([6])
    op = torch.ops.loraplex.paged_decode_attention
    with pytest.raises(RuntimeError, match="block id outside the cache"):
        op(q, k, v, torch.tensor([[0, 99]]), ok_lens, 1.0, out)
    with pytest.raises(RuntimeError, match="context length outside the block table"):
        op(q, k, v, ok_tables, torch.tensor([9]), 1.0, out)
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), k, v, ok_tables, ok_lens, 1.0, out)
    op(q, k, v, ok_tables, ok_lens, 1.0, out)  # and the same call with good inputs works


@pytest.mark.parametrize("rows", [1, 2, 7, 48])
@pytest.mark.parametrize("popularity", ["distinct", "skewed", "identical", "with_base"])
def test_lora_kernel_matches_reference_loop(kernel, rows: int, popularity: str) -> None:
    """Slots 1..3 packed at rank 16 (smaller ranks zero-padded, as the layer packs them); slot 4 is resident
    elsewhere but not in this layer, so its rows add nothing, as in the masked-dense op."""
    torch.manual_seed(rows)
    in_features, out_features, rank, num_slots = 576, 192, 16, 3
    ranks = {1: 16, 2: 8, 3: 4}
    lora_a = torch.zeros(num_slots + 1, rank, in_features)
    lora_b = torch.zeros(num_slots + 1, out_features, rank)
    for slot, r in ranks.items():
        lora_a[slot, :r] = torch.randn(r, in_features)
        lora_b[slot, :, :r] = torch.randn(out_features, r) * 0.1
    slots = {
        "distinct": torch.arange(rows) % 5,  # 0..4: the base, three adapters and one this layer lacks
        "skewed": torch.where(torch.rand(rows) < 0.8, 1, torch.randint(0, 4, (rows,))),
        "identical": torch.full((rows,), 2),
        "with_base": torch.where(torch.arange(rows) % 2 == 0, 0, 3),
    }[popularity].long()
    x = torch.randn(rows, in_features)
    base = torch.randn(rows, out_features)
    out = base.clone()
    a_packed = lora_a[1:].reshape(-1, in_features)
    b_packed_t = lora_b[1:].permute(1, 0, 2).reshape(out_features, -1).t().contiguous()
    slot_ranks = torch.tensor([ranks[s] for s in range(1, num_slots + 1)])
    torch.ops.loraplex.lora_decode_delta(x, a_packed, b_packed_t, slots, rank, slot_ranks, out)
    in_layer = torch.where(slots <= num_slots, slots, 0)
    want = base + lora_reference(x, lora_a, lora_b, in_layer)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[slots == 0], base[slots == 0]), "base rows are left exactly as they were"


def test_lora_kernel_row_does_not_depend_on_its_batch_companions(kernel) -> None:
    """Bit-identical alone or among others, on both sides of the kernel's few-rows path (under 8 rows with an
    adapter) and its slot-grouped path. Slots of ranks 6, 3 and 5 packed at rank 6, with non-zero padding that
    only a kernel reading past a slot's own rank would add, and widths that are not multiples of 8 or 64 take
    every tail."""
    torch.manual_seed(0)
    in_features, out_features, rank, ranks = 60, 100, 6, [6, 3, 5]
    num_slots = len(ranks)
    lora_a = torch.zeros(num_slots + 1, rank, in_features)
    lora_b = torch.zeros(num_slots + 1, out_features, rank)
    for slot, r in enumerate(ranks, start=1):
        lora_a[slot, :r] = torch.randn(r, in_features)
        lora_b[slot, :, :r] = torch.randn(out_features, r) * 0.1
    a_packed = lora_a[1:].reshape(-1, in_features).clone()
    b_packed_t = lora_b[1:].transpose(1, 2).reshape(-1, out_features).contiguous()
    for slot, r in enumerate(ranks, start=1):  # padding the kernel must not read: it would change the result
        a_packed[(slot - 1) * rank + r : slot * rank] = 1e3
        b_packed_t[(slot - 1) * rank + r : slot * rank] = 1e3
    slot_ranks = torch.tensor(ranks)
    x, base = torch.randn(48, in_features), torch.randn(48, out_features)
    slots = torch.randint(0, num_slots + 1, (48,))
    together = base.clone()
    torch.ops.loraplex.lora_decode_delta(x, a_packed, b_packed_t, slots, rank, slot_ranks, together)
    torch.testing.assert_close(together, base + lora_reference(x, lora_a, lora_b, slots), rtol=1e-5, atol=1e-5)
    for rows in (slice(0, 1), slice(0, 2), slice(3, 10), slice(0, 8), slice(20, 48)):
        alone = base[rows].clone()
        torch.ops.loraplex.lora_decode_delta(x[rows], a_packed, b_packed_t, slots[rows], rank, slot_ranks, alone)
        assert torch.equal(alone, together[rows])


def test_lora_kernel_refuses_bad_shapes(kernel) -> None:
    op = torch.ops.loraplex.lora_decode_delta
    x, out, slots, ranks = torch.randn(2, 8), torch.zeros(2, 4), torch.tensor([1, 0]), torch.tensor([3, 3])
    a, b = torch.randn(6, 8), torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="adapter shapes"):
        op(x, a, torch.randn(6, 5), slots, 3, ranks, out)
    with pytest.raises(RuntimeError, match="whole number of ranks"):
        op(x, a, b, slots, 4, ranks, out)
    with pytest.raises(RuntimeError, match="negative adapter slot"):
        op(x, a, b, torch.tensor([-1, 0]), 3, ranks, out)
    with pytest.raises(RuntimeError, match="one rank per packed slot"):
        op(x, a, b, slots, 3, torch.tensor([3]), out)
    with pytest.raises(RuntimeError, match="within the packed rank"):
        op(x, a, b, slots, 3, torch.tensor([4, 3]), out)
    op(x, a, b, slots, 3, ranks, out)
    assert out[1].abs().sum() == 0 and out[0].abs().sum() > 0


def test_engine_uses_kernels_only_for_float32_cpu(engine: LLMEngine) -> None:
    assert engine.runner.paged_decode is not None and engine.lora.batch.decode_kernel, "the default engine uses them"
    assert not cpu_kernels.wanted(ModelConfig(dtype="bfloat16"))
    assert not cpu_kernels.wanted(ModelConfig(cpu_kernels=False))
    assert cpu_kernels.wanted(ModelConfig())


def test_no_compiler_means_torch_ops_not_a_crash(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    assert cpu_kernels._build_and_load(tmp_path) is False
    assert "CPU kernels not built" in caplog.text


def test_an_edited_header_changes_the_build_folder(tmp_path, monkeypatch) -> None:
    """torch's builder would not rebuild for an edited header: the sources' and headers' hash names the folder."""
    assert all(path.is_file() for path in cpu_kernels.SOURCES + cpu_kernels.HEADERS)
    header = tmp_path / "vec8.h"
    monkeypatch.setattr(cpu_kernels, "HEADERS", [header])
    header.write_text("// one version\n")
    first = cpu_kernels._sources_key()
    header.write_text("// another\n")
    assert cpu_kernels._sources_key() != first


def test_the_same_sources_in_another_folder_build_in_another_folder(tmp_path, monkeypatch) -> None:
    """Two checkouts with the same sources: torch's builder names sources by path and would rebuild one shared
    folder back and forth, rewriting the library under the other checkout's running processes."""
    here = cpu_kernels._sources_key()
    copies = []
    for path in cpu_kernels.HEADERS:
        copies.append(tmp_path / path.name)
        copies[-1].write_bytes(path.read_bytes())
    monkeypatch.setattr(cpu_kernels, "HEADERS", copies)
    assert cpu_kernels._sources_key() != here
