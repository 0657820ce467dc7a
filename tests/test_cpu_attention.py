"""The CPU paged decode-attention kernel against SDPA over each sequence's gathered context."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_attention
from engine.config import ModelConfig
from engine.engine import LLMEngine
from engine.kv_cache import KVCache


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> None:
    # CI must build it: a machine that cannot is served by the SDPA path, but the tests should say so loudly
    assert cpu_attention.load(tmp_path_factory.mktemp("cache")), "the CPU attention kernel did not build"


def reference(q, cache: KVCache, tables, lens, scale):
    """SDPA per sequence over its own gathered context, query heads grouped on their KV head."""
    out = torch.empty_like(q)
    heads, kv_heads, dim = q.shape[1], cache.key_cache[0].shape[2], q.shape[2]
    for b in range(q.shape[0]):
        k, v = cache.gather(0, tables[b : b + 1])
        n = int(lens[b])
        grouped = q[b : b + 1].view(1, kv_heads, heads // kv_heads, dim)
        out[b] = F.scaled_dot_product_attention(grouped, k[:, :, :n], v[:, :, :n], scale=scale).reshape(heads, dim)
    return out


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size", "max_len"),
    [(9, 3, 64, 16, 400), (8, 8, 32, 4, 37), (32, 8, 128, 16, 70), (4, 1, 16, 1, 9)],
)
def test_kernel_matches_sdpa(kernel, heads: int, kv_heads: int, dim: int, block_size: int, max_len: int) -> None:
    torch.manual_seed(heads * dim + block_size)
    num_blocks = 256
    cache = KVCache(1, num_blocks, block_size, kv_heads, dim, torch.float32, "cpu")
    cache.key_cache[0].normal_()
    cache.value_cache[0].normal_(std=2.0)
    lens = torch.tensor([1, max_len, 2, block_size, block_size + 1, max_len // 2], dtype=torch.long)
    width = -(-max_len // block_size)
    free = torch.randperm(num_blocks)  # blocks scattered through the pool, as after many requests
    tables = torch.zeros(len(lens), width, dtype=torch.long)  # padded with block 0, never read past a length
    used = 0
    for b, n in enumerate(lens.tolist()):
        count = -(-n // block_size)
        tables[b, :count] = free[used : used + count]
        used += count
    q = torch.randn(len(lens), heads, dim)
    out = torch.full_like(q, float("nan"))
    scale = dim**-0.5
    torch.ops.loraplex.paged_decode_attention(q, cache.key_cache[0], cache.value_cache[0], tables, lens, scale, out)
    torch.testing.assert_close(out, reference(q, cache, tables, lens, scale), rtol=1e-5, atol=1e-5)


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


def test_engine_uses_kernel_only_for_float32_cpu(engine: LLMEngine) -> None:
    assert engine.runner.paged_decode_kernel, "the default engine decodes through the kernel"
    assert not cpu_attention.wanted(ModelConfig(dtype="bfloat16"))
    assert not cpu_attention.wanted(ModelConfig(cpu_attention_kernel=False))
    assert cpu_attention.wanted(ModelConfig())
