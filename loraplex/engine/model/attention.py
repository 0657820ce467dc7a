"""Paged attention for a flattened batch, plugged into transformers' attention interface.

One forward pass carries decode tokens (one query each) and prefill chunks of different sequences, flattened
into a single row of T tokens: decodes first, then the chunks. Each layer writes this step's K/V into the
paged cache, then every sequence attends over its own context read back through its block table.

Backend: torch's ``scaled_dot_product_attention``. Decodes, sorted by context length by the runner, go in
groups of a few sequences on the CPU and in one group on CUDA, one call per group over its block tables padded
to the group's longest context, with a length mask; each prefill chunk goes in its own call with a causal mask offset by
the tokens already cached (a chunk that is its sequence's whole context attends over its own K/V directly).
On CUDA the same calls dispatch to fused kernels. Where a paged decode kernel is available, all decodes go
in one call to it instead, reading the cache in place through the block tables (``PagedDecode``): on the CPU
in float32 the compiled kernel of kernels/cpu/extension.py, on CUDA the Triton kernel of kernels/cuda/triton_decode.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from loraplex.engine.model.kv_cache import KVCache

ATTN_IMPLEMENTATION = "loraplex_paged"


@dataclass
class PrefillChunk:
    query_start: int  # index of the chunk's first token in the flattened batch
    query_len: int
    context_len: int  # cached tokens after this step, this chunk included
    block_table: torch.Tensor  # [1, num_blocks]
    causal_mask: torch.Tensor | None  # [query_len, context_len] bool; None when the chunk is the whole context


@dataclass
class DecodeGroup:
    """Decode tokens ``start .. start + count`` of the flattened batch, attended in one call."""

    start: int
    count: int
    block_tables: torch.Tensor  # [count, max_blocks], padded with block 0
    mask: torch.Tensor  # [count, 1, 1, max_blocks * block_size] bool, True where the key counts


# A paged decode kernel: (query [B, H, D], key cache, value cache, block tables [B, W], context lengths [B],
# scale, out [B, H, D]) -> None, writing ``out``. The CPU one is ``torch.ops.loraplex.paged_decode_attention``
# (kernels/cpu/extension.py), the CUDA one ``kernels.cuda.triton_decode.paged_decode_attention``.
PagedDecodeKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor], None
]


@dataclass
class PagedDecode:
    """All decode tokens (the first ``count`` of the batch), attended by a kernel straight from the cache."""

    count: int
    block_tables: torch.Tensor  # [count, max_blocks] int64, padded with block 0
    context_lens: torch.Tensor  # [count] int64, this step's token included
    kernel: PagedDecodeKernel


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step; built by the runner, passed to the model as a kwarg."""

    kv_cache: KVCache
    slot_mapping: torch.Tensor  # [T] flat cache slot of each token
    num_decode_tokens: int  # the first num_decode_tokens tokens are decodes, one per sequence
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
    paged_decode: PagedDecode | None = None  # set instead of decode_groups when a paged kernel runs them


def paged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, H_kv, T, D]
    value: torch.Tensor,  # [1, H_kv, T, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    attn_metadata: AttentionMetadata | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:  # [1, T, H, D]
    assert attn_metadata is not None, "the paged attention backend needs attn_metadata for every forward pass"
    meta, layer = attn_metadata, module.layer_idx
    meta.kv_cache.write(layer, key[0].transpose(0, 1), value[0].transpose(0, 1), meta.slot_mapping)
    q = query[0]  # [H, T, D]
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)  # [T, H, D]
    heads, kv_heads, head_dim = q.shape[0], key.shape[1], q.shape[2]
    if meta.paged_decode is not None and meta.paged_decode.count:
        decode = meta.paged_decode
        decode.kernel(
            q[:, : decode.count].transpose(0, 1).contiguous(),
            meta.kv_cache.key_cache[layer],
            meta.kv_cache.value_cache[layer],
            decode.block_tables,
            decode.context_lens,
            scaling if scaling is not None else head_dim**-0.5,
            out[: decode.count],
        )
    for group in meta.decode_groups:
        rows = slice(group.start, group.start + group.count)
        k, v = meta.kv_cache.gather(layer, group.block_tables)  # [count, H_kv, L, D]
        # Grouped-query attention as rows: the query heads that share a KV head become that head's query rows,
        # so SDPA reads each gathered K/V once instead of expanding it per query head (enable_gqa copies it).
        decode_q = q[:, rows].transpose(0, 1).reshape(group.count, kv_heads, heads // kv_heads, head_dim)
        decoded = F.scaled_dot_product_attention(decode_q, k, v, attn_mask=group.mask, scale=scaling)
        out[rows] = decoded.reshape(group.count, heads, head_dim)
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        if chunk.causal_mask is None:  # the chunk is the whole context: its own K/V, no read-back
            k, v = key[:, :, rows], value[:, :, rows]
        else:
            k, v = meta.kv_cache.gather(layer, chunk.block_table)
            k, v = k[:, :, : chunk.context_len], v[:, :, : chunk.context_len]
        attended = F.scaled_dot_product_attention(
            q[None, :, rows],
            k,
            v,
            attn_mask=chunk.causal_mask,
            is_causal=chunk.causal_mask is None,
            scale=scaling,
            enable_gqa=True,
        )  # [1, H, q, D]
        out[rows] = attended[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register_paged_attention() -> str:
    """Register the backend with transformers; returns the name to set as ``attn_implementation``.

    No mask function is registered: the runner builds the per-sequence masks, and for a backend without one
    transformers builds no mask at all (its path for vLLM-style backends). It also skips its packed-sequence
    check over the position ids, which would cost a host synchronisation in every eager forward on CUDA."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION
