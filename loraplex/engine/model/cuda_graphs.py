"""Decode-only steps replayed from CUDA graphs: one launch per step instead of thousands.

Why: at the Llama-3-8B shape on an H200 an eager decode step of 64 sequences launched about 4,200 kernels and
the GPU was busy for 15% of it (benchmarks/gpu_check.py's profile); the rest was Python and launch overhead.
A graph captured once per shape replays the same kernels with none of that host work.

A graph needs static shapes and static tensors, so a decode-only step is padded to a *bucket*: its batch
rounded up to one of ``batch_buckets`` and its block tables to a power-of-two width. Everything the forward
pass reads per step (token ids, positions, cache slots, adapter slots, context lengths, block tables) travels in
one int64 tensor, ``rows`` [batch, FIELDS + width], uploaded with a single copy into the graph's own input
buffer before replay. Padding rows write their K/V into the cache's scratch slot, attend over one key, use no
adapter, and their outputs are dropped.

Python decisions inside the forward pass are frozen at capture: which LoRA layers hold an adapter, the packed
LoRA tensors themselves, and whether the LoRA op runs at all (a base-only batch has graphs of its own, so base
traffic does not pay for adapters). The LoRA manager's ``version`` changes whenever a slot is written or cleared, and
every graph captured under an older version is dropped.

Steps with a prefill chunk, and decode batches larger than the largest bucket, run eagerly. On the CPU the same
static forward runs without capture (``capture=False``): that is how the tests check padding and metadata
against the oracle without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.engine.lora.layers import LoRAMapping
from loraplex.engine.lora.manager import LoRAManager
from loraplex.engine.model.attention import AttentionMetadata, DecodeGroup, PagedDecode, PagedDecodeKernel
from loraplex.engine.model.kv_cache import KVCache

log = logging.getLogger(__name__)

# Columns of ``rows`` before the block table.
TOKEN, POSITION, SLOT, LORA, CONTEXT = range(5)
FIELDS = 5
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def batch_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """The padded batch sizes: the defaults up to ``max_num_seqs``, and ``max_num_seqs`` itself."""
    return tuple(sorted({b for b in DEFAULT_BATCH_BUCKETS if b < max_num_seqs} | {max_num_seqs}))


def bucket_for(value: int, buckets: Sequence[int]) -> int | None:
    return next((b for b in buckets if b >= value), None)


def width_for(num_blocks: int, max_blocks: int) -> int:
    """Block-table width: the next power of two (at least 4), capped at a sequence's most blocks."""
    width = 4
    while width < num_blocks:
        width *= 2
    return min(width, max_blocks)


@dataclass
class GraphBatch:
    """One decode-only step, laid out for a graph of ``batch`` rows and ``width`` blocks per row."""

    num_seqs: int  # real rows; the rest are padding
    batch: int
    width: int
    lora: bool  # some row uses an adapter; a base-only step replays a graph without the LoRA op
    rows: torch.Tensor  # [batch, FIELDS + width] int64 on the host (pinned on CUDA)


@dataclass
class _Captured:
    """A graph's static input and outputs (no graph, outputs None: the uncaptured CPU path)."""

    rows: torch.Tensor
    graph: torch.cuda.CUDAGraph | None
    logits: torch.Tensor | None
    hidden: torch.Tensor | None


class DecodeGraphs:
    """Captures (lazily, per bucket) and replays the decode-only forward pass."""

    def __init__(
        self,
        decoder: torch.nn.Module,
        lm_head: torch.nn.Module,
        lora: LoRAManager,
        kv_cache: KVCache,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        capture: bool,
        paged_decode: PagedDecodeKernel | None = None,
    ) -> None:
        self.decoder, self.lm_head, self.lora, self.kv_cache = decoder, lm_head, lora, kv_cache
        self.paged_decode = paged_decode  # attend through this kernel, not SDPA over gathered blocks
        self.buckets = batch_buckets(max_num_seqs)
        self.max_blocks = max_blocks_per_seq
        self.capture = capture
        self.device = kv_cache.key_cache[0].device
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.lora_version = lora.version
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0  # steps served from a graph (a counter for tests and benchmarks)
        self.failed: str | None = None  # why capture failed; decode steps then stay eager

    @property
    def active(self) -> bool:
        return self.failed is None

    def layout(self, decodes: list[tuple[int, int, int, int, list[int]]]) -> GraphBatch | None:
        """``decodes``: (token, position, cache slot, adapter slot, block table) per sequence, in batch order.
        None when the batch is larger than the largest bucket."""
        batch = bucket_for(len(decodes), self.buckets)
        if batch is None or not decodes:
            return None
        width = width_for(max(len(d[4]) for d in decodes), self.max_blocks)
        rows = [
            [token, position, slot, lora, position + 1, *table, *[0] * (width - len(table))]
            for token, position, slot, lora, table in decodes
        ]
        padding = [0, 0, self.kv_cache.scratch_slot, 0, 1] + [self.kv_cache.scratch_block] * width
        rows += [padding] * (batch - len(decodes))
        host = torch.tensor(rows, dtype=torch.long)
        lora = any(d[3] for d in decodes)
        return GraphBatch(len(decodes), batch, width, lora, host.pin_memory() if self.capture else host)

    def run(self, step: GraphBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(float32 logits [num_seqs, vocab], hidden states [num_seqs, hidden]) of one decode-only step; None
        when the graph could not be captured (the caller runs the step eagerly, and so do later steps). The
        hidden states are a view of the graph's output buffer: the next replay overwrites them."""
        if self.lora.version != self.lora_version:  # an adapter slot changed: the frozen LoRA state is stale
            self.graphs.clear()
            self.lora_version = self.lora.version
        key = (step.batch, step.width, step.lora)
        captured = self.graphs.get(key)
        if captured is None:
            started = time.perf_counter()
            try:
                captured = self._capture(*key)
            except Exception as e:  # a kernel that cannot be captured must cost speed, never requests
                self.failed = f"{type(e).__name__}: {e}"
                self.graphs.clear()
                log.exception("CUDA graph capture failed; decode steps run eagerly from now on")
                return None
            self.graphs[key] = captured
            log.info(
                "captured the decode graph for %d rows x %d blocks (LoRA %s) in %.2f s",
                *key,
                time.perf_counter() - started,
            )
        captured.rows.copy_(step.rows, non_blocking=True)
        if captured.graph is not None:
            captured.graph.replay()
            logits, hidden = captured.logits, captured.hidden
        else:
            logits, hidden = self._forward(captured.rows, step.width, step.lora)
        self.replays += 1
        return logits[: step.num_seqs].float(), hidden[: step.num_seqs]

    def _capture(self, batch: int, width: int, lora: bool) -> _Captured:
        rows = torch.zeros(batch, FIELDS + width, dtype=torch.long, device=self.device)
        rows[:, SLOT] = self.kv_cache.scratch_slot  # a warm-up on zeros must not write into a real block
        rows[:, CONTEXT] = 1
        rows[:, FIELDS:] = self.kv_cache.scratch_block
        if not self.capture:
            return _Captured(rows, None, None, None)
        # Warm up on a side stream first (lazy initialisation, cuBLAS workspaces), as torch's docs advise.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(rows, width, lora)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits, hidden = self._forward(rows, width, lora)
        return _Captured(rows, graph, logits, hidden)

    def _forward(self, rows: torch.Tensor, width: int, lora: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode forward pass over static ``rows``; every per-step value is read from the tensor, so a
        captured graph sees new values on replay. Metadata objects are rebuilt on every call: a mask cached
        by an eager call must not stand in for the captured computation. With ``lora`` every LoRA layer
        holding an adapter runs its op over all rows (each row's mask picks its slot); without, none does."""
        batch = rows.shape[0]
        tables = rows[:, FIELDS:].contiguous()
        meta = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=rows[:, SLOT].contiguous(),
            num_decode_tokens=batch,
            decode_groups=[],
            prefills=[],
        )
        if self.paged_decode is not None:
            meta.paged_decode = PagedDecode(batch, tables, rows[:, CONTEXT].contiguous(), self.paged_decode)
        else:
            key_pos = torch.arange(width * self.kv_cache.block_size, device=rows.device)
            mask = (key_pos[None, :] < rows[:, CONTEXT, None])[:, None, None, :]
            meta.decode_groups = [DecodeGroup(0, batch, tables, mask)]
        every_slot = frozenset(range(1, self.lora.max_loras + 1)) if lora else frozenset()
        mapping = LoRAMapping(rows[:, LORA].contiguous(), every_slot, num_mixed_rows=batch, mixed_slots=every_slot)
        with self.lora.batch.use(mapping):
            hidden = self.decoder(
                input_ids=rows[None, :, TOKEN],
                position_ids=rows[None, :, POSITION],
                attn_metadata=meta,
                use_cache=False,
            ).last_hidden_state[0]
        return self.lm_head(hidden), hidden
