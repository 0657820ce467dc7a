"""The multi-LoRA layer that replaces each targeted projection of the base model.

Lifecycle (as vLLM's LoRA layers): the stacked slot tensors are created once, ``set_lora(slot, a, b)`` writes
one adapter, ``reset_lora(slot)`` clears it, and the per-step token -> slot mapping arrives through the shared
``LoRABatch`` that the runner enters for each forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.lora.ops import column_mask, lora_masked_dense


@dataclass
class LoRAMapping:
    """Which adapter slot each token of one forward pass uses."""

    token_lora_indices: torch.Tensor  # [T], 0 = no adapter
    slots_in_batch: frozenset[int]  # distinct non-zero slots, known on the host
    masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (slots, rank) -> [T, slots*rank]

    def column_mask(self, num_slots: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """Shared by every layer with the same packed width, so it is built once per step."""
        key = (num_slots, rank)
        if key not in self.masks:
            self.masks[key] = column_mask(self.token_lora_indices, num_slots, rank, dtype)
        return self.masks[key]


class LoRABatch:
    """Holds the mapping of the forward pass in progress; one instance is shared by all layers of a model."""

    def __init__(self) -> None:
        self.mapping: LoRAMapping | None = None

    @contextmanager
    def use(self, mapping: LoRAMapping) -> Iterator[None]:
        assert self.mapping is None, "LoRA mappings do not nest"
        self.mapping = mapping
        try:
            yield
        finally:
            self.mapping = None


class MultiLoRALinear(nn.Module):
    """``base_layer(x)`` plus, for every token, the delta of that token's adapter slot."""

    def __init__(
        self, base_layer: nn.Module, max_loras: int, max_lora_rank: int, dtype: torch.dtype, batch: LoRABatch
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.batch = batch
        device = next(base_layer.parameters()).device
        num_slots = max_loras + 1  # slot 0 = no adapter, always zero
        self.register_buffer(
            "lora_a_stacked", torch.zeros(num_slots, max_lora_rank, self.in_features, dtype=dtype, device=device)
        )  # [S, r_max, in]
        self.register_buffer(
            "lora_b_stacked", torch.zeros(num_slots, self.out_features, max_lora_rank, dtype=dtype, device=device)
        )  # [S, out, r_max], scaling folded in
        self.slot_ranks: dict[int, int] = {}  # resident slot -> its adapter's rank in this module
        self.a_packed = torch.empty(0, self.in_features, dtype=dtype, device=device)  # [L*r, in]
        self.b_packed = torch.empty(self.out_features, 0, dtype=dtype, device=device)  # [out, L*r]
        self.packed_slots = 0  # L: highest resident slot
        self.packed_rank = 0  # r: highest resident rank

    def set_lora(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Write one adapter (``lora_a`` [r, in], ``lora_b`` [out, r]) into ``slot``."""
        assert slot >= 1, "slot 0 is the base model and stays zero"
        self.reset_lora(slot, repack=False)
        rank = lora_a.shape[0]
        self.lora_a_stacked[slot, :rank] = lora_a.to(self.lora_a_stacked)
        self.lora_b_stacked[slot, :, :rank] = (lora_b.float() * scaling).to(self.lora_b_stacked)  # one rounding
        self.slot_ranks[slot] = rank
        self._repack()

    def reset_lora(self, slot: int, repack: bool = True) -> None:
        self.lora_a_stacked[slot].zero_()
        self.lora_b_stacked[slot].zero_()
        self.slot_ranks.pop(slot, None)
        if repack:
            self._repack()

    def _repack(self) -> None:
        """Rebuild the compact [L*r] matrices the served op multiplies by, trimmed to what is resident."""
        self.packed_slots = max(self.slot_ranks, default=0)
        self.packed_rank = max(self.slot_ranks.values(), default=0)
        slots, rank = slice(1, self.packed_slots + 1), self.packed_rank
        self.a_packed = self.lora_a_stacked[slots, :rank].reshape(-1, self.in_features).contiguous()
        self.b_packed = self.lora_b_stacked[slots, :, :rank].permute(1, 0, 2).reshape(self.out_features, -1)
        self.b_packed = self.b_packed.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        mapping = self.batch.mapping
        if mapping is None or not mapping.slots_in_batch.intersection(self.slot_ranks):
            return y
        flat = x.reshape(-1, self.in_features)
        mask = mapping.column_mask(self.packed_slots, self.packed_rank, flat.dtype)
        delta = lora_masked_dense(flat.to(self.a_packed.dtype), self.a_packed, self.b_packed, mask)
        return y + delta.view(y.shape).to(y.dtype)
