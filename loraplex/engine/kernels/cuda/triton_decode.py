"""Paged decode attention on CUDA: a Triton kernel that reads K/V through the block table, in place.

Why: without it, decodes on CUDA go through SDPA over a padded copy of every decoding sequence's blocks,
gathered per layer and step. The copy is written once and read once more, so about three times the K/V bytes
a paged kernel reads, and on an H200 the gather plus the attention call were a third of the GPU time of a
64-sequence decode step (benchmarks/gpu/README.md). Here each K/V byte is read once, straight from the cache.

One program per (sequence, KV head). The query heads that share that KV head (grouped-query attention) are
the rows of one tile, padded to 16, the smallest ``tl.dot``. The context is read ``TILE`` tokens at a time,
block ids looked up per token, with FlashAttention's online softmax in float32. Scores are float32; the
probabilities are rounded to the cache's dtype before the product with V, as FlashAttention does, so bfloat16
results match SDPA to rounding, not bit for bit (the GPU oracle's near-tie rule covers that).

Triton is optional: without it, or off CUDA, ``available`` is False and the engine keeps the SDPA path. The
CPU tests run this kernel in Triton's interpreter (``TRITON_INTERPRET=1``) against the SDPA reference.
"""

import os

import torch

TILE = 64  # context tokens per loop iteration
MIN_DOT = 16  # tl.dot needs every dimension to be at least 16


try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install: the kernel is simply not offered
    triton = tl = None
# Triton chose its interpreter (kernels run on CPU tensors, for the tests) when it was imported, from this.
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device, head_dim: int) -> bool:
    """The kernel can run: Triton importable, a CUDA device, a power-of-two head size (``tl.arange``)."""
    return device.type == "cuda" and head_dim >= MIN_DOT and head_dim & (head_dim - 1) == 0 and triton is not None


# No ``from __future__ import annotations`` in this module: Triton tells constexpr parameters by their
# annotation objects, and its interpreter does not read string annotations.
if tl is not None:

    @triton.jit
    def _attend_tile(
        q, start, length, running_max, running_sum, acc,
        k_ptr, v_ptr, table_row_ptr, kv_head, stride_cb, stride_ct, stride_ch, scale,
        HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Context tokens ``start .. start + TILE`` into the online softmax: the tokens past ``length`` are
        masked, so a tile wholly past it leaves the running max, sum and output exactly as they were."""
        positions = start + tl.arange(0, TILE)
        dims = tl.arange(0, HEAD_DIM)
        valid = positions < length
        blocks = tl.load(table_row_ptr + positions // BLOCK_SIZE, mask=valid, other=0)
        token = blocks.to(tl.int64) * stride_cb + (positions % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
        k = tl.load(k_ptr + token[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        if IEEE:  # noqa: SIM108 - a constexpr branch, resolved when Triton compiles the kernel
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(valid[None, :], scores * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        correction = tl.exp(running_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, 1)
        v = tl.load(v_ptr + token[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        if IEEE:  # noqa: SIM108
            update = tl.dot(probs, v, input_precision="ieee")
        else:
            update = tl.dot(probs.to(v.dtype), v)
        return new_max, running_sum, acc * correction[:, None] + update

    @triton.jit
    def _paged_decode(
        q_ptr,  # [B, H, D]
        k_ptr,  # [num_blocks, block_size, H_kv, D]
        v_ptr,
        tables_ptr,  # [B, W] block ids
        lens_ptr,  # [B] context length, this step's token included
        out_ptr,  # [B, H, D]
        scale,
        stride_qb,
        stride_qh,
        stride_cb,
        stride_ct,
        stride_ch,
        stride_tb,
        stride_ob,
        stride_oh,
        GROUP: tl.constexpr,  # query heads per KV head
        GROUP_ROWS: tl.constexpr,  # GROUP padded to a power of two, at least 16
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr,
        IEEE: tl.constexpr,  # float32 cache: full-precision products, not TF32
        # Triton's interpreter cannot take a runtime scalar as a loop bound: there the loop runs to the block
        # tables' width in tokens, given here; 0 (compiled) runs it to the sequence's own length.
        INTERPRETER_LOOP_END: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        rows = tl.arange(0, GROUP_ROWS)
        dims = tl.arange(0, HEAD_DIM)
        real_row = rows < GROUP
        heads = kv_head * GROUP + rows
        q = tl.load(
            q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=real_row[:, None], other=0.0
        )
        length = tl.load(lens_ptr + seq)
        table_row_ptr = tables_ptr + seq * stride_tb
        m = tl.full([GROUP_ROWS], float("-inf"), tl.float32)  # running max of each row's scores
        total = tl.zeros([GROUP_ROWS], tl.float32)  # running sum of exp(score - max)
        acc = tl.zeros([GROUP_ROWS, HEAD_DIM], tl.float32)
        if INTERPRETER_LOOP_END > 0:
            for start in range(0, INTERPRETER_LOOP_END, TILE):
                m, total, acc = _attend_tile(
                    q, start, length, m, total, acc, k_ptr, v_ptr, table_row_ptr, kv_head,
                    stride_cb, stride_ct, stride_ch, scale, HEAD_DIM, BLOCK_SIZE, TILE, IEEE,
                )  # fmt: skip
        else:
            for start in range(0, length, TILE):
                m, total, acc = _attend_tile(
                    q, start, length, m, total, acc, k_ptr, v_ptr, table_row_ptr, kv_head,
                    stride_cb, stride_ct, stride_ch, scale, HEAD_DIM, BLOCK_SIZE, TILE, IEEE,
                )  # fmt: skip
        out = acc / total[:, None]
        out_rows = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=real_row[:, None])


def self_check(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> str | None:
    """Run the kernel once on a small random case against SDPA over the same context; None when it agrees,
    else why not. The engine calls this before choosing the kernel, so a Triton that cannot compile it or a
    wrong result costs speed (the SDPA path), never requests."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        block_size, lengths = 16, [1, 40, 77]
        cache = torch.randn(2, 16, block_size, kv_heads, head_dim, generator=gen, device=device).to(dtype)
        tables = torch.randperm(16, generator=gen, device=device)[:15].view(3, 5)
        lens = torch.tensor(lengths, device=device)
        query = torch.randn(3, heads, head_dim, generator=gen, device=device).to(dtype)
        out = torch.zeros_like(query)
        paged_decode_attention(query, cache[0], cache[1], tables, lens, head_dim**-0.5, out)
        for b, n in enumerate(lengths):
            k, v = (c[tables[b]].reshape(-1, kv_heads, head_dim)[:n].transpose(0, 1).float() for c in cache)
            grouped = query[b].float().view(kv_heads, heads // kv_heads, head_dim)
            expected = torch.nn.functional.scaled_dot_product_attention(grouped, k, v).reshape(heads, head_dim)
            error = (out[b].float() - expected).abs().max().item()
            if not error < (1e-4 if dtype == torch.float32 else 5e-2):
                return f"sequence {b} of the check differs from SDPA by {error:.3g}"
    except Exception as e:  # any failure to build or run it means: do not use it
        return f"{type(e).__name__}: {e}"
    return None


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D]
    key_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W]
    context_lens: torch.Tensor,  # [B]
    scale: float,
    out: torch.Tensor,  # [B, H, D], written
) -> None:
    """Each sequence's query heads over its own context, read from the cache through its block table; the
    same contract as the CPU kernel ``torch.ops.loraplex.paged_decode_attention``. No host synchronisation:
    the context lengths are read on the device, so the call can be captured in a CUDA graph."""
    batch, heads, head_dim = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    if batch == 0:
        return
    assert query.stride(2) == 1 and key_cache.is_contiguous() and value_cache.is_contiguous() and out.stride(2) == 1
    assert key_cache.stride() == value_cache.stride() and block_tables.stride(1) == 1 and heads % kv_heads == 0
    group = heads // kv_heads
    group_rows = max(MIN_DOT, 1 << (group - 1).bit_length())
    _paged_decode[(batch, kv_heads)](
        query,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        out,
        scale,
        query.stride(0),
        query.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_ROWS=group_rows,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE=TILE,
        IEEE=key_cache.dtype == torch.float32,
        INTERPRETER_LOOP_END=block_tables.shape[1] * block_size if INTERPRETED else 0,
    )
