"""Embeddings: mean-pooled, L2-normalised last hidden states of an endpoint's model (base + its adapter).

The forward pass reuses the runner's tensor building, but with a KV cache and block manager of its own,
sized to this batch, so no KV blocks are taken from requests. The model and its LoRA slots are shared: the
caller runs this on the engine loop thread, between steps (``AsyncEngine.call``), as the server does.
"""

from __future__ import annotations

import torch

from engine.block_manager import BlockManager
from engine.engine import LLMEngine
from engine.errors import QueueFullError
from engine.kv_cache import KVCache
from engine.runner import ModelRunner
from engine.scheduler import ScheduledChunk
from engine.sequence import Request, SamplingParams, Sequence


def embed(engine: LLMEngine, token_ids_list: list[list[int]], endpoint: str) -> list[list[float]]:
    """One vector per input; every input is one prefill of its own sequence in a single forward pass."""
    assert all(token_ids_list), "every input needs at least one token"
    name = engine.resolve_endpoint(endpoint)
    block_size = engine.config.limits.block_size
    num_blocks = sum(-(-len(ids) // block_size) for ids in token_ids_list)
    source = engine.kv_cache.key_cache[0]
    _, _, num_kv_heads, head_dim = source.shape
    kv_cache = KVCache(
        len(engine.kv_cache.key_cache), num_blocks, block_size, num_kv_heads, head_dim, source.dtype, source.device
    )
    block_manager = BlockManager(num_blocks, block_size)
    runner = ModelRunner(engine.model, engine.lora, kv_cache, block_manager)
    adapter = engine.endpoint_adapters[name]
    slot = _acquire_slot(engine, adapter) if adapter else 0
    chunks = []
    for i, ids in enumerate(token_ids_list):
        request = Request(f"embed-{i}", name, list(ids), SamplingParams(max_tokens=1))
        seq = Sequence(request, lora_name=adapter, lora_slot=slot)
        assert block_manager.may_allocate(seq.seq_id, len(ids)), "the cache was sized for every input"
        chunks.append(ScheduledChunk(seq, len(ids)))
    try:
        inputs = runner.prepare_inputs(chunks)
        _, hidden = runner.execute(inputs)  # [T, hidden]
    finally:
        if adapter:
            engine.lora.slots.release(adapter)
    vectors, start = {}, 0
    for chunk in inputs.sampled_chunks:  # the runner's token order; every chunk is a whole prompt, so all sample
        rows = hidden[start : start + chunk.num_tokens].float()
        vectors[chunk.seq.seq_id] = torch.nn.functional.normalize(rows.mean(dim=0), dim=0)
        start += chunk.num_tokens
    return [vectors[f"embed-{i}"].tolist() for i in range(len(token_ids_list))]


def _acquire_slot(engine: LLMEngine, adapter: str) -> int:
    """Make ``adapter`` resident for this forward pass, as the scheduler would for a sequence."""
    resident = adapter in engine.lora.slot_of
    acquired = engine.lora.slots.acquire(adapter)
    if acquired is None:
        raise QueueFullError(f"every LoRA slot is in use; retry shortly to embed with adapter {adapter!r}")
    if not resident:
        engine.lora.load_slot(adapter, acquired[0])
    return acquired[0]
