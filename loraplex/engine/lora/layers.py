"""The multi-LoRA layer that replaces each targeted projection of the base model.

Lifecycle (as vLLM's LoRA layers): ``set_lora(slot, a, b)`` writes one adapter, ``reset_lora(slot)`` clears it,
and the per-step token -> slot mapping arrives through the shared ``LoRABatch`` that the runner enters for each
forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from loraplex.engine.lora.ops import add_product, column_mask, lora_masked_dense


@dataclass(frozen=True)
class LoRASegment:
    """Rows ``start .. end`` of the flattened batch all use adapter ``slot`` (one prefill chunk)."""

    start: int
    end: int
    slot: int


@dataclass
class LoRAMapping:
    """Which adapter slot each token of one forward pass uses.

    Rows ``0 .. num_mixed_rows`` mix adapters (decodes, one token per sequence) and take the masked-dense op;
    the rows after them are prefill chunks, one adapter each, listed in ``segments`` (base chunks left out),
    and take one pair of matmuls over that adapter's own columns: at hundreds of rows a chunk would otherwise
    pay for every resident slot's columns.
    """

    token_lora_indices: torch.Tensor  # [T], 0 = no adapter
    slots_in_batch: frozenset[int]  # distinct non-zero slots, known on the host
    num_mixed_rows: int | None = None  # None: every row is mixed (no segments)
    segments: tuple[LoRASegment, ...] = ()
    mixed_slots: frozenset[int] | None = None  # non-zero slots among the mixed rows; None = slots_in_batch
    masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (slots, rank) -> [rows, slots*rank]

    def column_mask(self, num_slots: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """Shared by every layer with the same packed width, so it is built once per step."""
        key = (num_slots, rank)
        if key not in self.masks:
            indices = self.token_lora_indices[: self.num_mixed_rows]
            self.masks[key] = column_mask(indices, num_slots, rank, dtype)
        return self.masks[key]


class LoRABatch:
    """Holds the mapping of the forward pass in progress; one instance is shared by all layers of a model.

    ``decode_kernel``: the engine loaded kernels/cpu/extension.py, so float32 decode rows on the CPU take
    ``lora_decode_delta`` (each row through its own adapter, one call) instead of the masked-dense op."""

    def __init__(self) -> None:
        self.mapping: LoRAMapping | None = None
        self.decode_kernel = False

    @contextmanager
    def use(self, mapping: LoRAMapping) -> Iterator[None]:
        assert self.mapping is None, "LoRA mappings do not nest"
        self.mapping = mapping
        try:
            yield
        finally:
            self.mapping = None


class MultiLoRALinear(nn.Module):
    """``base_layer(x)`` plus, for every token, the delta of that token's adapter slot.

    The adapters are held once, in the two packed matrices every op reads: slots 1..L side by side, each padded
    to the largest resident rank r, A as [L*r, in] and B transposed, scaling folded in, as [L*r, out] (the
    layout the CPU kernel reads, and a plain right operand for the masked-dense op's matmul). A prefill segment
    reads its slot's rows of both as views. Slot 0 (the base) has no columns and adds exactly nothing.
    """

    def __init__(
        self, base_layer: nn.Module, max_loras: int, max_lora_rank: int, dtype: torch.dtype, batch: LoRABatch
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.dtype = dtype
        self.batch = batch
        self.device = next(base_layer.parameters()).device
        self.slot_ranks: dict[int, int] = {}  # resident slot -> its adapter's rank in this layer
        self.a_packed = torch.empty(0, self.in_features, dtype=dtype, device=self.device)  # [L*r, in]
        self.b_packed_t = torch.empty(0, self.out_features, dtype=dtype, device=self.device)  # [L*r, out]
        self.packed_slots = 0  # L: highest resident slot
        self.packed_rank = 0  # r: highest resident rank
        self.packed_slot_ranks = torch.zeros(0, dtype=torch.long)  # [L] each slot's own rank (0: none), host

    def slot_rows(self, slot: int) -> slice:
        """The rows of ``a_packed`` and ``b_packed_t`` that hold ``slot``'s adapter."""
        first = (slot - 1) * self.packed_rank
        return slice(first, first + self.slot_ranks[slot])

    def set_lora(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Write one adapter (``lora_a`` [r, in], ``lora_b`` [out, r]) into ``slot``; scaling folds into b.

        Replaces whatever the slot held. Written in place when the packed matrices already have room (the
        common swap: same or smaller rank into an existing slot); rebuilt only when they must grow.
        """
        assert 1 <= slot <= self.max_loras, f"slot {slot} outside 1..{self.max_loras} (0 is the base)"
        rank = lora_a.shape[0]
        assert rank <= self.max_lora_rank, "ranks are checked against max_lora_rank at load time"
        b_scaled_t = (lora_b.float() * scaling).to(self.dtype).t()  # one rounding; [r, out]
        if slot > self.packed_slots or rank > self.packed_rank:
            self._repack(self.slot_ranks | {slot: rank})
        self.slot_ranks[slot] = rank
        first = (slot - 1) * self.packed_rank
        a = self.a_packed[first : first + self.packed_rank]
        b = self.b_packed_t[first : first + self.packed_rank]
        a.zero_()
        b.zero_()
        a[:rank] = lora_a
        b[:rank] = b_scaled_t
        self._note_ranks()

    def reset_lora(self, slot: int) -> None:
        ranks = dict(self.slot_ranks)
        ranks.pop(slot, None)
        self._repack(ranks)
        self.slot_ranks = ranks
        self._note_ranks()

    def _note_ranks(self) -> None:
        """The CPU kernel reads each slot to its own rank, not the padded one."""
        self.packed_slot_ranks = torch.tensor(
            [self.slot_ranks.get(slot, 0) for slot in range(1, self.packed_slots + 1)], dtype=torch.long
        )

    def _repack(self, ranks: dict[int, int]) -> None:
        """Rebuild the packed matrices for the slots and ranks in ``ranks`` (trimmed to them), carrying over
        every slot still resident; an adapter comes or goes, or a larger one needs room."""
        num_slots, rank = max(ranks, default=0), max(ranks.values(), default=0)
        a = torch.zeros(num_slots * rank, self.in_features, dtype=self.dtype, device=self.device)
        b = torch.zeros(num_slots * rank, self.out_features, dtype=self.dtype, device=self.device)
        for slot in ranks.keys() & self.slot_ranks.keys():
            old, first = self.slot_rows(slot), (slot - 1) * rank
            keep = slice(first, first + min(self.slot_ranks[slot], rank))
            a[keep] = self.a_packed[old][: keep.stop - keep.start]
            b[keep] = self.b_packed_t[old][: keep.stop - keep.start]
        self.a_packed, self.b_packed_t = a, b
        self.packed_slots, self.packed_rank = num_slots, rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        self.add_delta(x, y.view(-1, self.out_features))  # the base layer's fresh output: added in place
        return y

    def add_delta(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add each token's adapter delta to ``out`` [tokens, out_features], the base layer's output for ``x``
        (its rows may be strided: a column slice of projections computed together, model/decoder_step.py)."""
        mapping = self.batch.mapping
        if mapping is None or not mapping.slots_in_batch.intersection(self.slot_ranks):
            return
        flat = x.reshape(-1, self.in_features).to(self.a_packed.dtype)
        mixed_rows = flat.shape[0] if mapping.num_mixed_rows is None else mapping.num_mixed_rows
        mixed_slots = mapping.slots_in_batch if mapping.mixed_slots is None else mapping.mixed_slots
        if mixed_rows and mixed_slots.intersection(self.slot_ranks):
            if self.batch.decode_kernel and flat.dtype == out.dtype == torch.float32 and not flat.is_cuda:
                torch.ops.loraplex.lora_decode_delta(
                    flat[:mixed_rows].contiguous(),
                    self.a_packed,
                    self.b_packed_t,
                    mapping.token_lora_indices[:mixed_rows],
                    self.packed_rank,
                    self.packed_slot_ranks,
                    out[:mixed_rows],
                )
            else:
                mask = mapping.column_mask(self.packed_slots, self.packed_rank, flat.dtype)
                lora_masked_dense(flat[:mixed_rows], self.a_packed, self.b_packed_t, mask, out=out[:mixed_rows])
        for segment in mapping.segments:
            if segment.slot in self.slot_ranks:
                own = self.slot_rows(segment.slot)
                rows = slice(segment.start, segment.end)
                add_product(out[rows], flat[rows] @ self.a_packed[own].T, self.b_packed_t[own])
