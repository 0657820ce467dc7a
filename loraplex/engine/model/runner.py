"""Building one step's flattened batch tensors and running the forward pass. No policy here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from loraplex.engine.core.block_manager import BlockManager
from loraplex.engine.core.scheduler import ScheduledChunk
from loraplex.engine.lora.layers import LoRAMapping, LoRASegment
from loraplex.engine.lora.manager import LoRAManager
from loraplex.engine.model.attention import AttentionMetadata, DecodeGroup, PagedDecode, PagedDecodeKernel, PrefillChunk
from loraplex.engine.model.cuda_graphs import LORA, POSITION, SLOT, TOKEN, DecodeGraphs, GraphBatch
from loraplex.engine.model.decoder_step import LlamaDecoderStep
from loraplex.engine.model.kv_cache import KVCache

# Decodes attend in groups of this many sequences of similar context length. On the 2-core CPU this was
# measured on, 48 decodes with contexts of 20-400 tokens took 2.4-3.3 ms per layer in groups of 8-12 against
# 9-25 ms in one call padded to the longest: less padding gathered and read, and a group's K/V stays in cache.
# On CUDA every call is a launch, and the GPU is far from busy at these sizes: all decodes go in one call.
DECODE_GROUP_SEQS = 8


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn_metadata: AttentionMetadata
    lora_mapping: LoRAMapping
    logits_indices: torch.Tensor  # [num_sampled]: the last token of every chunk that samples
    sampled_chunks: list[ScheduledChunk]  # in the order of logits_indices
    chunks: list[ScheduledChunk]  # every chunk of the step, in the order of the flat tensors
    # Set when a captured CUDA graph runs the step; the tensors above are then host-side views of its rows.
    graph_batch: GraphBatch | None = None


class ModelRunner:
    def __init__(
        self, model: PreTrainedModel, lora: LoRAManager, kv_cache: KVCache, block_manager: BlockManager
    ) -> None:
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.lora = lora
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.device = next(model.parameters()).device
        self.graphs: DecodeGraphs | None = None  # set by the engine on CUDA (model/cuda_graphs.py)
        self.decode_group_seqs = DECODE_GROUP_SEQS if self.device.type == "cpu" else None
        # Set by the engine when a paged decode kernel can run here (model/attention.py's PagedDecode).
        self.paged_decode: PagedDecodeKernel | None = None
        # Set by the engine with the CPU kernels and a Llama decoder: its forward in fewer calls (model/decoder_step.py)
        self.decoder_step: LlamaDecoderStep | None = None

    def use_decode_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool) -> None:
        """Run decode-only steps through ``DecodeGraphs``: captured on CUDA, the same static forward without
        capture elsewhere (for tests)."""
        max_blocks = -(-max_model_len // self.block_manager.block_size)
        self.graphs = DecodeGraphs(
            self.decoder, self.lm_head, self.lora, self.kv_cache, max_num_seqs, max_blocks, capture, self.paged_decode
        )

    def prepare_inputs(self, chunks: list[ScheduledChunk]) -> StepInputs:
        """Decodes first (shortest context first), then prefill chunks; one entry per token in every flat list."""
        decodes = sorted((c for c in chunks if c.num_tokens == 1), key=lambda c: c.seq.num_computed_tokens)
        prefills = [c for c in chunks if c.num_tokens > 1]
        if self.graphs is not None and self.graphs.active and not prefills:
            graphed = self._graph_inputs(decodes)
            if graphed is not None:
                return graphed
        ordered = decodes + prefills
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        lora_indices: list[int] = []
        logits_indices: list[int] = []
        prefill_chunks: list[PrefillChunk] = []
        segments: list[LoRASegment] = []
        for chunk in ordered:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            end = start + chunk.num_tokens
            query_start = len(input_ids)
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slot_mapping += [self.block_manager.slot(seq.seq_id, p) for p in range(start, end)]
            lora_indices += [seq.lora_slot] * chunk.num_tokens
            if chunk.samples:
                logits_indices.append(len(input_ids) - 1)
            if chunk.num_tokens > 1:
                prefill_chunks.append(self._prefill_chunk(seq.seq_id, query_start, start, end))
                if seq.lora_slot:
                    segments.append(LoRASegment(query_start, len(input_ids), seq.lora_slot))
        tensor = self._tensor
        group = self.decode_group_seqs or max(len(decodes), 1)
        meta = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=tensor(slot_mapping),
            num_decode_tokens=len(decodes),
            decode_groups=[],
            prefills=prefill_chunks,
        )
        if self.paged_decode is not None:
            meta.paged_decode = PagedDecode(
                len(decodes),
                self._block_tables([c.seq.seq_id for c in decodes]),
                tensor([c.seq.num_computed_tokens + 1 for c in decodes]),
                self.paged_decode,
            )
        else:
            meta.decode_groups = [
                self._decode_group(start, decodes[start : start + group]) for start in range(0, len(decodes), group)
            ]
        lora_slots = frozenset(lora_indices) - {0}
        mapping = LoRAMapping(
            tensor(lora_indices),
            lora_slots,
            num_mixed_rows=len(decodes),
            segments=tuple(segments),
            mixed_slots=frozenset(c.seq.lora_slot for c in decodes) - {0},
        )
        return StepInputs(
            input_ids=tensor(input_ids),
            positions=tensor(positions),
            attn_metadata=meta,
            lora_mapping=mapping,
            logits_indices=tensor(logits_indices),
            sampled_chunks=[c for c in ordered if c.samples],
            chunks=ordered,
        )

    def _graph_inputs(self, decodes: list[ScheduledChunk]) -> StepInputs | None:
        """A step of one-token chunks laid out for a captured graph; None when no bucket holds it.

        A one-token chunk is usually a decode, but may be a prompt's next token when the budget left a prompt
        one token of room: whether a row is sampled comes from the sequence (``chunk.samples``), as eagerly."""
        block_size, tables = self.block_manager.block_size, self.block_manager.block_tables
        rows = []
        for chunk in decodes:
            seq, position = chunk.seq, chunk.seq.num_computed_tokens
            table = tables[seq.seq_id][: position // block_size + 1]
            slot = self.block_manager.slot(seq.seq_id, position)
            rows.append((seq.token_ids[position], position, slot, seq.lora_slot, table))
        batch = self.graphs.layout(rows)
        if batch is None:
            return None
        host = batch.rows[: len(decodes)]
        lora_slots = frozenset(c.seq.lora_slot for c in decodes) - {0}
        return StepInputs(
            input_ids=host[:, TOKEN],
            positions=host[:, POSITION],
            attn_metadata=AttentionMetadata(self.kv_cache, host[:, SLOT], len(decodes), [], []),
            lora_mapping=LoRAMapping(host[:, LORA], lora_slots),
            logits_indices=torch.tensor([i for i, c in enumerate(decodes) if c.samples], dtype=torch.long),
            sampled_chunks=[c for c in decodes if c.samples],
            chunks=decodes,
            graph_batch=batch,
        )

    def _tensor(self, values: list[int]) -> torch.Tensor:
        host = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":  # pinned + non_blocking: the upload does not wait for the GPU
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _prefill_chunk(self, seq_id: str, query_start: int, start: int, end: int) -> PrefillChunk:
        causal_mask = None
        if start > 0:  # earlier chunks are cached: query i sees keys 0 .. start + i
            key_pos = torch.arange(end, device=self.device)
            query_pos = torch.arange(start, end, device=self.device)
            causal_mask = key_pos[None, :] <= query_pos[:, None]  # [q, end]
        table = self.block_manager.block_tables[seq_id][: -(-end // self.block_manager.block_size)]
        return PrefillChunk(query_start, end - start, end, self._tensor(table)[None], causal_mask)

    def _decode_group(self, start: int, decodes: list[ScheduledChunk]) -> DecodeGroup:
        return DecodeGroup(
            start,
            len(decodes),
            self._block_tables([c.seq.seq_id for c in decodes]),
            self._decode_mask([c.seq.num_computed_tokens + 1 for c in decodes]),
        )

    def _block_tables(self, seq_ids: list[str]) -> torch.Tensor:  # [B, max_blocks]
        tables = [self.block_manager.block_tables[s] for s in seq_ids]
        width = max((len(t) for t in tables), default=0)
        return self._tensor([t + [0] * (width - len(t)) for t in tables]).view(len(tables), width)

    def _decode_mask(self, context_lens: list[int]) -> torch.Tensor:  # [B, 1, 1, max_blocks * block_size]
        block_size = self.block_manager.block_size
        width = max((-(-n // block_size) for n in context_lens), default=0) * block_size
        key_pos = torch.arange(width, device=self.device)
        return (key_pos[None, :] < self._tensor(context_lens)[:, None])[:, None, None, :]

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass; returns (float32 logits [num_sampled, vocab], last hidden states [T, hidden])."""
        if inputs.graph_batch is not None:
            graphed = self.graphs.run(inputs.graph_batch)
            if graphed is not None:
                logits, hidden = graphed  # every row's logits: keep the sampled rows'
                if len(inputs.sampled_chunks) < len(inputs.chunks):
                    logits = logits[inputs.logits_indices.to(logits.device)]
                return logits, hidden
            inputs = self.prepare_inputs(inputs.chunks)  # capture failed: the eager layout of this step
        with self.lora.batch.use(inputs.lora_mapping):
            if self.decoder_step is not None:
                hidden = self.decoder_step(inputs.input_ids, inputs.positions, inputs.attn_metadata)
            else:
                hidden = self.decoder(
                    input_ids=inputs.input_ids[None],
                    position_ids=inputs.positions[None],
                    attn_metadata=inputs.attn_metadata,
                    use_cache=False,
                ).last_hidden_state[0]  # [T, hidden]
        logits = self.lm_head(hidden[inputs.logits_indices])
        return logits.float(), hidden
