"""Embeddings are requests: scheduled, chunked within the token budget and batched with other requests' steps.

Before, an /api/embed request ran as one forward pass of all its tokens on the engine thread, outside the
scheduler: every stream on every endpoint stopped while it ran. Here the longest forward pass while a 2k-token
embedding runs beside eight streams must stay within ``max_num_batched_tokens``, every stream must keep
getting tokens meanwhile, and the vector must equal transformers + PEFT's mean-pooled last hidden states.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from reliability_server import InProcessServer, config

from loraplex.engine.core.sequence import Request, SamplingParams

BUDGET = 256  # the harness's max_num_batched_tokens
EMBED_TOKENS = 2048


def oracle_embedding(oracle, endpoint: str, token_ids: list[int]) -> torch.Tensor:
    """transformers + PEFT: the mean of the last hidden states (after the final norm), L2-normalised."""
    ids = torch.tensor([token_ids])
    with torch.inference_mode():
        if endpoint == "base":
            with oracle.model.disable_adapter():
                hidden = oracle.model(ids, output_hidden_states=True).hidden_states[-1][0]
        else:
            oracle.model.set_adapter(endpoint)
            hidden = oracle.model(ids, output_hidden_states=True).hidden_states[-1][0]
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)


def test_chunked_embeddings_equal_the_oracle_beside_generation(make_engine, oracle) -> None:
    """Embeddings of several adapters, split into 16-token chunks, share steps with a generation that grows
    until a 20-block KV pool forces an embedding out (recomputed from its start); each vector equals the
    oracle's, and no block or LoRA slot stays held."""
    engine = make_engine(max_num_batched_tokens=16, num_kv_blocks=20, max_model_len=320)
    text = "Paged attention keeps the KV cache in fixed-size blocks. " * 30
    ids = engine.encode_prompt(text)[:300]
    cases = {"e-base": ("base", ids), "e-code": ("code", ids[:200]), "e-chat": ("chatbot", ids[:77])}
    requests = [Request("gen", "summarization", ids[:40], SamplingParams(max_tokens=60, ignore_eos=True))]
    requests += [Request(rid, ep, t, SamplingParams(max_tokens=1), embed=True) for rid, (ep, t) in cases.items()]
    results = engine.generate(requests)
    assert engine.stats.preemptions_total > 0, "the tiny KV pool should have preempted an embedding"
    for rid, (endpoint, token_ids) in cases.items():
        (out,) = results[rid]
        assert out.finished and out.new_token_ids == [] and out.num_output_tokens == 0
        got = torch.tensor(out.embedding)
        assert (got - oracle_embedding(oracle, endpoint, token_ids)).abs().max() < 1e-4, rid
    assert results["gen"][-1].num_output_tokens == 60
    assert engine.block_manager.num_used_blocks == 0 and not engine.lora.slots.refs


@contextlib.contextmanager
def recorded_forwards(engine) -> Iterator[list[tuple[float, int]]]:
    """(end time, tokens) of every forward pass the engine's runner makes meanwhile."""
    forwards: list[tuple[float, int]] = []
    execute = engine.runner.execute

    def recorded(inputs):
        out = execute(inputs)
        forwards.append((time.monotonic(), inputs.input_ids.shape[0]))
        return out

    engine.runner.execute = recorded
    try:
        yield forwards
    finally:
        engine.runner.execute = execute


@pytest.fixture(scope="module")
def server():
    limits = {"max_model_len": EMBED_TOKENS + 64, "num_kv_blocks": 512, "max_num_batched_tokens": BUDGET}
    server = InProcessServer(config(limits=limits, server={"max_embed_tokens": 2 * EMBED_TOKENS}))
    yield server
    server.stop()


def test_a_long_embedding_does_not_stall_streams(server: InProcessServer) -> None:
    """A 2k-token embedding while eight streams decode: no forward pass exceeds the token budget, the streams
    keep getting tokens while it runs, and its vector equals the same input embedded alone."""
    engine = server.engine
    token_times: dict[int, list[float]] = {i: [] for i in range(8)}

    def stream(i: int) -> None:
        body = {"model": ["base", "chatbot", "code", "summarization"][i % 4], "prompt": "Count: 1, 2, 3,"}
        body |= {"raw": True, "options": {"num_predict": 60, "temperature": 0, "repeat_penalty": 1.0}}
        with httpx.stream("POST", f"{server.url}/api/generate", json=body, timeout=300) as response:
            assert response.status_code == 200
            for _ in response.iter_lines():
                token_times[i].append(time.monotonic())

    text = " ".join(f"word{i}" for i in range(EMBED_TOKENS))
    with recorded_forwards(engine) as forwards:
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        while min(len(v) for v in token_times.values()) < 3:  # every stream is decoding
            time.sleep(0.01)
        started = time.monotonic()
        body = {"model": "chatbot", "input": text, "truncate": True}
        response = httpx.post(f"{server.url}/api/embed", json=body, timeout=300)
        ended = time.monotonic()
        for t in threads:
            t.join()
    assert response.status_code == 200, response.text
    count = response.json()["prompt_eval_count"]
    assert count >= EMBED_TOKENS, "the input should fill the context"
    during = [n for at, n in forwards if started <= at <= ended]
    assert sum(during) >= count, "the embedding's tokens ran in forward passes of this engine"
    assert max(n for _, n in forwards) <= BUDGET, "a forward pass exceeded max_num_batched_tokens"
    while_embedding = [sum(started <= at <= ended for at in times) for times in token_times.values()]
    assert min(while_embedding) >= len(during) // 2, "every stream kept decoding beside the embedding"
    gaps = [b - a for times in token_times.values() for a, b in itertools.pairwise(times)]
    seconds = ended - started
    print(f"\nembed: {count} tokens in {len(during)} forwards, {seconds:.2f} s; longest stream gap {max(gaps):.3f} s")
    alone = httpx.post(f"{server.url}/api/embed", json=body, timeout=300).json()["embeddings"][0]
    assert max(abs(a - b) for a, b in zip(alone, response.json()["embeddings"][0], strict=True)) < 1e-4
    assert server.idle()


def test_an_embedding_list_is_scheduled_as_requests(server: InProcessServer) -> None:
    """Each input of a list is a request of its own: they prefill together in shared forward passes."""
    texts = [f"Sentence number {i} about the sea." for i in range(6)]
    with recorded_forwards(server.engine) as forwards:
        response = httpx.post(f"{server.url}/api/embed", json={"model": "code", "input": texts}, timeout=120)
    assert response.status_code == 200, response.text
    vectors = response.json()["embeddings"]
    assert len(vectors) == 6
    assert 0 < len(forwards) < 6, f"six inputs in {len(forwards)} forward passes: looped, not batched"
    single = httpx.post(f"{server.url}/api/embed", json={"model": "code", "input": texts[3]}, timeout=120).json()
    assert max(abs(a - b) for a, b in zip(single["embeddings"][0], vectors[3], strict=True)) < 1e-4
    assert server.idle()
