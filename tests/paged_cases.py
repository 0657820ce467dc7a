"""Paged-cache cases shared by the tests of the two paged decode kernels (the CPU one and the Triton one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraplex.engine.model.kv_cache import KVCache


def scattered_case(
    heads: int, kv_heads: int, dim: int, block_size: int, lengths: list[int], dtype: torch.dtype, num_blocks: int
) -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A one-layer cache of random K/V, and one query per sequence of ``lengths`` tokens, each sequence's
    blocks scattered through the pool as after many requests. Returns (cache, query [B, H, D], block tables
    [B, W] padded with block 0, which is never read past a length, and lengths [B])."""
    cache = KVCache(1, num_blocks, block_size, kv_heads, dim, dtype, "cpu")
    cache.key_cache[0].normal_()
    cache.value_cache[0].normal_(std=2.0)
    lens = torch.tensor(lengths, dtype=torch.long)
    width = -(-max(lengths) // block_size)
    free = torch.randperm(num_blocks)
    tables = torch.zeros(len(lengths), width, dtype=torch.long)
    used = 0
    for b, n in enumerate(lengths):
        count = -(-n // block_size)
        tables[b, :count] = free[used : used + count]
        used += count
    return cache, torch.randn(len(lengths), heads, dim).to(dtype), tables, lens


def sdpa_reference(q: torch.Tensor, cache: KVCache, tables: torch.Tensor, lens: torch.Tensor, scale: float):
    """SDPA per sequence over its own gathered context, in float64, query heads grouped on their KV head."""
    out = torch.empty(q.shape, dtype=torch.float64)
    heads, kv_heads, dim = q.shape[1], cache.key_cache[0].shape[2], q.shape[2]
    for b in range(q.shape[0]):
        k, v = cache.gather(0, tables[b : b + 1])
        n = int(lens[b])
        grouped = q[b : b + 1].double().view(1, kv_heads, heads // kv_heads, dim)
        k, v = k[:, :, :n].double(), v[:, :, :n].double()
        out[b] = F.scaled_dot_product_attention(grouped, k, v, scale=scale).reshape(heads, dim)
    return out
