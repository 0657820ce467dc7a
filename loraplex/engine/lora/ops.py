"""Batched multi-LoRA operations: each token adds the delta of its own adapter.

Semantics (the loop every implementation must equal)::

    for t in range(num_tokens):
        s = token_lora_indices[t]          # 0 = no adapter
        if s != 0:
            y[t] += (x[t] @ lora_a[s].T) @ lora_b[s].T     # lora_b already carries the scaling

``lora_reference`` is that loop in plain torch, used by the tests. ``lora_masked_dense`` is the form served
for decode rows, where adapters interleave token by token: with few resident adapters, two dense matmuls over
all slots plus a per-token column mask cost a few percent of the base matmul and need no data-dependent control
flow (no host sync, CUDA-graph friendly). A prefill chunk is a contiguous run of one adapter's rows, so the
layer gives it one pair of matmuls over that adapter's own columns instead (``MultiLoRALinear.forward``).
``lora_grouped`` gathers each adapter's rows wherever they are (the general segment form); it wins when many
slots are resident but few are used, and is kept for measurement.
"""

from __future__ import annotations

import torch


def lora_reference(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [S, r, in], slot 0 unused
    lora_b: torch.Tensor,  # [S, out, r], scaling folded in
    token_lora_indices: torch.Tensor,  # [T], int, 0 = no adapter
) -> torch.Tensor:  # [T, out]
    """The per-token loop, literally."""
    y = torch.zeros(x.shape[0], lora_b.shape[1], dtype=x.dtype, device=x.device)
    for t, s in enumerate(token_lora_indices.tolist()):
        if s != 0:
            y[t] = (x[t] @ lora_a[s].T) @ lora_b[s].T
    return y


def lora_masked_dense(
    x: torch.Tensor,  # [T, in]
    a_packed: torch.Tensor,  # [L*r, in]: slots 1..L, each r rows
    b_packed_t: torch.Tensor,  # [L*r, out]: B transposed, slots in the same rows as a_packed
    column_mask: torch.Tensor,  # [T, L*r]: 1 where the column belongs to the token's slot, else 0
    out: torch.Tensor | None = None,  # [T, out]: add the delta into it instead of returning a new tensor
) -> torch.Tensor:  # [T, out]
    """All slots at once; the mask keeps each token's own adapter's rank columns."""
    shrunk = (x @ a_packed.T) * column_mask
    if out is None:
        return shrunk @ b_packed_t
    add_product(out, shrunk, b_packed_t)
    return out


def add_product(out: torch.Tensor, shrunk: torch.Tensor, b_t: torch.Tensor) -> None:
    """``out += shrunk @ b_t`` in place (``b_t`` is B transposed, [r, out]): one fused GEMM with no temporary
    when the dtypes agree."""
    if out.dtype == shrunk.dtype:
        out.addmm_(shrunk, b_t)
    else:  # a quantized base computes in half precision, the adapters in the engine's dtype
        out += (shrunk @ b_t).to(out.dtype)


def lora_grouped(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [S, r, in]
    lora_b: torch.Tensor,  # [S, out, r]
    token_lora_indices: torch.Tensor,  # [T]
    slots_in_batch: list[int],  # distinct non-zero slots present in token_lora_indices (host side)
) -> torch.Tensor:  # [T, out]
    """One pair of matmuls per adapter present (segment form)."""
    y = torch.zeros(x.shape[0], lora_b.shape[1], dtype=x.dtype, device=x.device)
    for s in slots_in_batch:
        rows = (token_lora_indices == s).nonzero().squeeze(1)
        y.index_add_(0, rows, (x[rows] @ lora_a[s].T) @ lora_b[s].T)
    return y


def column_mask(
    token_lora_indices: torch.Tensor,  # [T]
    num_slots: int,  # L: slots 1..L
    rank: int,  # r columns per slot
    dtype: torch.dtype,
) -> torch.Tensor:  # [T, L*r]
    """Column c of the packed layout belongs to slot c // r + 1."""
    column_slot = torch.arange(num_slots * rank, device=token_lora_indices.device) // rank + 1
    return (token_lora_indices[:, None] == column_slot[None, :]).to(dtype)
