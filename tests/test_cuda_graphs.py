"""Bucketing and layout of decode-only steps for CUDA graphs (loraplex/engine/model/cuda_graphs.py), on the CPU.

The forward pass itself is checked against the oracle in test_oracle.py; capture and replay need a GPU and are
checked by benchmarks/gpu_check.py's oracle stage."""

from __future__ import annotations

import pytest

from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.scheduler import ScheduledChunk
from loraplex.engine.core.sequence import Request, SamplingParams, Sequence
from loraplex.engine.model.cuda_graphs import (
    CONTEXT,
    FIELDS,
    LORA,
    POSITION,
    SLOT,
    TOKEN,
    batch_buckets,
    bucket_for,
    width_for,
)


def test_batch_buckets_end_at_max_num_seqs() -> None:
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(1) == (1,)
    assert bucket_for(9, batch_buckets(64)) == 16
    assert bucket_for(65, batch_buckets(64)) is None


@pytest.mark.parametrize(
    ("blocks", "max_blocks", "width"), [(1, 128, 4), (4, 128, 4), (5, 128, 8), (65, 128, 128), (40, 49, 49)]
)
def test_width_is_a_power_of_two_capped_at_the_longest_sequence(blocks: int, max_blocks: int, width: int) -> None:
    assert width_for(blocks, max_blocks) == width


def test_layout_pads_rows_into_the_scratch_block(engine: LLMEngine) -> None:
    engine.runner.use_decode_graphs(8, 256, capture=False)
    try:
        graphs, cache = engine.runner.graphs, engine.kv_cache
        step = graphs.layout([(11, 20, 333, 2, [20, 21]), (12, 5, 97, 0, [6])])
        assert (step.num_seqs, step.batch, step.width, step.lora) == (2, 2, 4, True)
        assert step.rows[0].tolist() == [11, 20, 333, 2, 21, 20, 21, 0, 0]
        step = graphs.layout([(7, 70, 1, 0, list(range(5)))] * 3)
        assert (step.batch, step.width, step.lora) == (4, 8, False)
        pad = step.rows[3].tolist()
        assert pad[SLOT] == cache.scratch_slot == cache.scratch_block * cache.block_size
        assert pad[CONTEXT] == 1 and pad[LORA] == 0 and pad[FIELDS:] == [cache.scratch_block] * 8
        assert (pad[TOKEN], pad[POSITION]) == (0, 0)
        assert graphs.layout([(1, 1, 1, 0, [1])] * 9) is None, "over the largest bucket: eager"
    finally:
        engine.runner.graphs = None


def test_a_changed_adapter_slot_drops_captured_graphs(make_engine) -> None:
    engine = make_engine(max_num_seqs=8)
    engine.runner.use_decode_graphs(8, 256, capture=False)
    graphs = engine.runner.graphs
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.generate([Request("a", "chatbot", [1, 2, 3], params)])
    assert graphs.graphs and graphs.replays > 0
    before = engine.lora.version
    engine.lora.clear_slot(engine.lora.slot_of["chatbot"])
    assert engine.lora.version == before + 1
    engine.generate([Request("b", "base", [1, 2, 3], params)])
    assert graphs.lora_version == engine.lora.version
    assert set(graphs.graphs) == {(1, 4, False)}, "only the graph used since the change is held: base, no LoRA"


def test_a_failed_capture_runs_the_step_eagerly_and_stays_eager(make_engine, monkeypatch) -> None:
    engine = make_engine(max_num_seqs=8)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    want = engine.generate([Request("eager", "code", [5, 6, 7, 8], params)])["eager"]
    engine.runner.use_decode_graphs(8, 256, capture=False)
    graphs = engine.runner.graphs

    def broken(batch: int, width: int, lora: bool):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", broken)
    got = engine.generate([Request("graphs", "code", [5, 6, 7, 8], params)])["graphs"]
    assert [o.new_token_ids for o in got] == [o.new_token_ids for o in want]
    assert "not permitted" in graphs.failed and not graphs.active and graphs.replays == 0
    assert engine.block_manager.num_used_blocks == 0


def test_a_one_token_prompt_chunk_is_run_but_not_sampled_on_the_static_path(engine: LLMEngine) -> None:
    """Whether a row samples comes from its sequence (last prompt token or decode), not its chunk length."""
    mid_prompt = Sequence(Request("mid", "chatbot", [5, 6, 7, 8, 9]), num_computed_tokens=2)
    decoding = Sequence(Request("dec", "base", [5, 6, 7]), output_token_ids=[10], num_computed_tokens=3)
    chunks = [ScheduledChunk(mid_prompt, 1), ScheduledChunk(decoding, 1)]
    for chunk in chunks:
        assert engine.block_manager.may_allocate(chunk.seq.seq_id, chunk.seq.num_computed_tokens + 1)
    engine.runner.use_decode_graphs(8, 256, capture=False)
    try:
        inputs = engine.runner.prepare_inputs(chunks)
        assert inputs.graph_batch is not None, "one-token chunks only: the static path"
        assert [c.seq.seq_id for c in inputs.chunks] == ["mid", "dec"]
        assert [c.seq.seq_id for c in inputs.sampled_chunks] == ["dec"]
        logits, _ = engine.runner.execute(inputs)
        assert logits.shape[0] == 1
    finally:
        engine.runner.graphs = None
        for chunk in chunks:
            engine.block_manager.free(chunk.seq.seq_id)
