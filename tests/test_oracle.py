"""The engine's greedy tokens equal transformers + PEFT run on each request alone, token for token.

Batches mix the base and three adapters (ranks 16 / 8 / 4, different target sets, one rsLoRA), prompts of
1 to several hundred tokens, requests that arrive while others run, prompts split by chunked prefill, and
preemption forced by a tiny KV pool.
"""

from __future__ import annotations

import inspect
import textwrap

import pytest

from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.sequence import Request, SamplingParams
from loraplex.engine.kernels.cpu.linear import PackedLinear

NEW_TOKENS = 32
ENDPOINTS = ["base", "chatbot", "code", "summarization"]
QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash table works and when you would use one.",
    "List five tips for staying productive while working from home, with one sentence each.",
    "Describe the water cycle to a ten year old.",
]


def build_prompts(tokenizer) -> list[list[int]]:
    chats = [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        for q in QUESTIONS
    ]
    source = textwrap.dedent(inspect.getsource(textwrap.TextWrapper))
    long_doc = tokenizer.encode("Summarize this code:\n" + source, add_special_tokens=False)[:380]
    medium = tokenizer.encode(source[2000:3200], add_special_tokens=False)[:150]
    one_token = tokenizer.encode("Once", add_special_tokens=False)
    assert len(one_token) == 1
    return [one_token, *chats, medium, long_doc]


def run_and_compare(engine: LLMEngine, oracle, cases: list[tuple[str, list[int]]], stagger: int = 0) -> None:
    """Submit ``cases`` (the first ``stagger`` of them first, the rest after two steps) and compare each."""
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    requests = [Request(f"req-{i}", ep, list(p), params) for i, (ep, p) in enumerate(cases)]
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    first, later = (requests[:stagger], requests[stagger:]) if stagger else (requests, [])
    for request in first:
        engine.add_request(request)
    steps = 0
    while engine.has_unfinished() or later:
        if later and steps == 2:
            for request in later:
                engine.add_request(request)
            later = []
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
        steps += 1
    assert engine.block_manager.num_used_blocks == 0, "KV blocks leaked"
    for request in requests:
        got = outputs[request.request_id]
        want = oracle.greedy(request.endpoint, request.prompt_token_ids, NEW_TOKENS)
        if got != want:
            at = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
            margin = oracle.margin(request.endpoint, request.prompt_token_ids + want[:at])
            pytest.fail(
                f"{request.request_id} ({request.endpoint}, {len(request.prompt_token_ids)}-token prompt) differs "
                f"at token {at}: engine {got[at]} vs oracle {want[at]} (oracle top-2 margin {margin:.4f})"
            )
        assert len(got) == NEW_TOKENS


@pytest.fixture(scope="module")
def prompts(engine: LLMEngine) -> list[list[int]]:
    return build_prompts(engine.tokenizer)


def test_mixed_batch_matches_oracle(engine: LLMEngine, oracle, prompts: list[list[int]]) -> None:
    """Every prompt on a different endpoint, all in one batch with the default limits."""
    cases = [(ENDPOINTS[i % 4], p) for i, p in enumerate(prompts)]
    cases += [(ENDPOINTS[(i + 1) % 4], p) for i, p in enumerate(prompts[:4])]
    run_and_compare(engine, oracle, cases)


def test_chunked_prefill_preemption_and_late_arrivals_match_oracle(make_engine, oracle, prompts) -> None:
    """A 64-token budget splits every long prompt; 40 blocks of 16 cannot hold all of them, so some are
    preempted and recomputed; half the requests arrive after the others started."""
    engine = make_engine(max_num_batched_tokens=64, num_kv_blocks=40, max_model_len=512)
    cases = [(ENDPOINTS[(i + 2) % 4], p) for i, p in enumerate(prompts)]
    run_and_compare(engine, oracle, cases, stagger=3)
    assert engine.stats.preemptions_total > 0, "the tiny KV pool should have forced a preemption"


def test_portable_ops_match_oracle(make_engine, oracle, prompts) -> None:
    """Without the CPU kernels: decode attention through SDPA over gathered copies and decode rows' LoRA
    through the masked-dense op (the path of machines that cannot build the kernels, and of CUDA's eager
    steps) and the projections through oneDNN's packed weights, with chunked prefill and late arrivals."""
    engine = make_engine(model={"cpu_kernels": False}, max_num_batched_tokens=128)
    assert engine.runner.paged_decode is None and not engine.lora.batch.decode_kernel
    assert any(isinstance(m, PackedLinear) for m in engine.model.modules())
    cases = [(ENDPOINTS[(i + 1) % 4], p) for i, p in enumerate(prompts)]
    run_and_compare(engine, oracle, cases, stagger=4)


def test_prefix_cache_reuse_matches_oracle(make_engine, oracle, prompts) -> None:
    """Requests sharing a 200-token prefix, run one after another, reuse its cached blocks within their own
    adapter only; a repeated prompt reuses all but the block of its last token. Outputs equal the oracle."""
    engine = make_engine()  # nothing cached yet
    long_doc = prompts[-1]
    shared = long_doc[:200]
    first, second = shared + long_doc[300:340], shared + long_doc[340:370]

    def hits() -> int:
        return engine.update_stats().prefix_cache_hits_total

    run_and_compare(engine, oracle, [("code", first)])
    assert hits() == 0
    run_and_compare(engine, oracle, [("code", second), ("chatbot", second)])
    assert hits() == 192, "code reuses the 12 full blocks of the shared prefix; chatbot's K/V differ"
    run_and_compare(engine, oracle, [("code", first)])
    assert hits() == 192 + (len(first) - 1) // 16 * 16
    assert engine.block_manager.num_cached_blocks > 0


def test_static_decode_path_matches_oracle(make_engine, oracle, prompts) -> None:
    """The forward pass that CUDA graphs capture (engine/model/cuda_graphs.py), run here without capture: decode-only
    steps padded to a batch bucket and a power-of-two block-table width, padding rows writing into the scratch
    block. Late arrivals and chunked prefill interleave eager mixed steps with padded decode-only ones."""
    engine = make_engine(max_num_batched_tokens=96, max_num_seqs=12)
    engine.runner.use_decode_graphs(12, engine.config.limits.max_model_len, capture=False)
    cases = [(ENDPOINTS[(i + 3) % 4], p) for i, p in enumerate(prompts)]
    cases += [(ENDPOINTS[i % 4], p) for i, p in enumerate(prompts[1:5])]
    run_and_compare(engine, oracle, cases, stagger=4)
    graphs = engine.runner.graphs
    assert graphs.replays > NEW_TOKENS // 2, "most steps should have been decode-only"
    assert {batch for batch, _, _ in graphs.graphs} > {12}, "shrinking batches should use smaller buckets"
    run_and_compare(engine, oracle, [("base", prompts[2]), ("base", prompts[3])])
    assert {lora for _, _, lora in graphs.graphs} == {True, False}, "base-only batches take graphs without LoRA"


def test_one_token_prompt_chunks_on_the_static_decode_path_match_oracle(make_engine, oracle, prompts) -> None:
    """A token budget of ``max_num_seqs`` leaves a late prompt one token of room beside seven decodes, so its
    steps hold only one-token chunks, one of them mid-prompt. Such steps take the static decode path; only
    rows at a prompt's last token or decoding may be sampled there."""
    engine = make_engine(max_num_batched_tokens=8, max_num_seqs=8)
    engine.runner.use_decode_graphs(8, engine.config.limits.max_model_len, capture=False)
    one_token, chat = prompts[0], prompts[1][:16]  # 16 tokens of a chat prompt: 16 one-token steps
    cases = [(ENDPOINTS[i % 4], one_token) for i in range(7)] + [("chatbot", chat)]
    run_and_compare(engine, oracle, cases, stagger=7)
    assert engine.runner.graphs.replays > len(chat), "the late prompt's one-token chunks ran on the static path"
