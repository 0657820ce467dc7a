"""Engine behaviour on the real model: bad input, stop conditions, seeds, aborts, and no leaked KV blocks."""

from __future__ import annotations

import pytest

from loraplex.engine.core.engine import LLMEngine, RequestOutput
from loraplex.engine.core.errors import QueueFullError, RequestError, UnknownEndpointError
from loraplex.engine.core.sequence import FinishReason, Request, SamplingParams


def prompt(engine: LLMEngine, text: str = "Tell me about the moon.") -> list[int]:
    chat = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return engine.encode_prompt(chat)


def run(engine: LLMEngine, requests: list[Request]) -> dict[str, list[RequestOutput]]:
    results = engine.generate(requests)
    assert engine.block_manager.num_used_blocks == 0, "KV blocks leaked"
    return results


def tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_bad_sampling_params_say_what_to_change(params: dict, field: str) -> None:
    with pytest.raises(RequestError, match=field):
        SamplingParams(**params)


def test_bad_requests_are_refused_and_the_engine_keeps_serving(engine: LLMEngine) -> None:
    ids = prompt(engine)
    with pytest.raises(UnknownEndpointError, match="use one of: base, chatbot, code, summarization"):
        engine.add_request(Request("x1", "poetry", ids))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request(Request("x2", "base", []))
    too_long = [100] * engine.config.limits.max_model_len
    with pytest.raises(RequestError, match="max_model_len"):
        engine.add_request(Request("x3", "base", too_long))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request(Request("x4", "base", [10**7]))
    assert not engine.has_unfinished()
    out = run(engine, [Request("ok", "chatbot", ids, SamplingParams(max_tokens=4))])
    assert len(tokens(out["ok"])) == 4


def test_queue_bound_refuses_past_max_waiting(make_engine) -> None:
    engine = make_engine(max_waiting=2)
    ids = prompt(engine)
    engine.add_request(Request("a", "base", ids))
    engine.add_request(Request("b", "base", ids))
    with pytest.raises(QueueFullError):
        engine.add_request(Request("c", "base", ids))
    engine.abort("a")
    engine.abort("b")
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()


def test_abort_mid_generation_frees_blocks_and_reports_abort(engine: LLMEngine) -> None:
    ids = prompt(engine)
    for i in range(3):
        engine.add_request(Request(f"ab{i}", "code", ids, SamplingParams(max_tokens=50, ignore_eos=True)))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    out = engine.abort("ab1")
    assert out is not None and out.finished and out.finish_reason is FinishReason.ABORT
    assert engine.abort("ab1") is None
    engine.abort("ab0")
    engine.abort("ab2")
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()


def test_max_tokens_eos_and_stop_token_ids(engine: LLMEngine) -> None:
    ids = prompt(engine, "What is the capital of France? Answer in one sentence.")
    results = run(
        engine,
        [
            Request("len", "base", ids, SamplingParams(max_tokens=3)),
            Request("eos", "base", ids, SamplingParams(max_tokens=40)),
        ],
    )
    assert results["len"][-1].finish_reason is FinishReason.LENGTH and len(tokens(results["len"])) == 3
    eos_out = results["eos"]
    assert eos_out[-1].finish_reason is FinishReason.STOP
    assert tokens(eos_out)[-1] in engine.eos_token_ids
    assert "".join(o.text_delta for o in eos_out).strip() == "The capital of France is Paris."
    third = tokens(eos_out)[2]
    stopped = run(engine, [Request("tok", "base", ids, SamplingParams(max_tokens=40, stop_token_ids=[third]))])
    assert tokens(stopped["tok"]) == tokens(eos_out)[:3] and stopped["tok"][-1].finish_reason is FinishReason.STOP


def test_stop_strings_cut_the_text_even_across_tokens(engine: LLMEngine) -> None:
    ids = prompt(engine, "What is the capital of France? Answer in one sentence.")
    results = run(engine, [Request("s", "base", ids, SamplingParams(max_tokens=40, stop=["is Par"]))])
    text = "".join(o.text_delta for o in results["s"])
    assert text == "The capital of France "
    assert results["s"][-1].finish_reason is FinishReason.STOP


def test_same_seed_same_tokens_whatever_the_batch_companions(engine: LLMEngine) -> None:
    ids = prompt(engine, "Write a poem about rivers.")
    params = dict(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = run(engine, [Request("alone", "chatbot", ids, SamplingParams(**params))])
    companions = [
        Request(
            f"c{i}",
            ep,
            prompt(engine, f"Question {i}: why is the sky blue?"),
            SamplingParams(max_tokens=30, temperature=1.0, seed=i),
        )
        for i, ep in enumerate(["base", "code", "summarization", "chatbot"])
    ]
    crowded = run(
        engine, [*companions[:2], Request("crowd", "chatbot", ids, SamplingParams(**params)), *companions[2:]]
    )
    assert tokens(alone["alone"]) == tokens(crowded["crowd"])
    other_seed = run(engine, [Request("other", "chatbot", ids, SamplingParams(**{**params, "seed": 99}))])
    assert tokens(other_seed["other"]) != tokens(alone["alone"])


def test_penalties_change_greedy_output_and_stay_deterministic(engine: LLMEngine) -> None:
    ids = prompt(engine, "Repeat the word cat ten times.")
    plain = run(engine, [Request("p", "base", ids, SamplingParams(max_tokens=20, ignore_eos=True))])
    penal = run(
        engine,
        [
            Request(
                f"q{i}",
                "base",
                ids,
                SamplingParams(
                    max_tokens=20, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=0.5
                ),
            )
            for i in range(2)
        ],
    )
    assert tokens(penal["q0"]) == tokens(penal["q1"])
    assert tokens(penal["q0"]) != tokens(plain["p"])
    generated = tokens(penal["q0"])
    assert len(set(generated)) > len(generated) // 2, "penalties should discourage repeats"


def test_prefix_cache_is_off_when_configured_and_never_crosses_an_adapter_reload(make_engine) -> None:
    ids = list(range(1000, 1100))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    off = make_engine(prefix_caching=False)
    for i in range(2):
        run(off, [Request(f"off{i}", "code", ids, params)])
    assert off.update_stats().prefix_cache_hits_total == 0 and off.block_manager.num_cached_blocks == 0

    engine = make_engine()
    path = engine.config.endpoint("code").adapter
    engine.add_adapter(engine.lora.read("extra", path))
    run(engine, [Request("a", "extra", ids, params)])
    engine.remove_adapter("extra")
    engine.add_adapter(engine.lora.read("extra", path))  # same name, a new version: its cache starts empty
    run(engine, [Request("b", "extra", ids, params)])
    assert engine.update_stats().prefix_cache_hits_total == 0
    run(engine, [Request("c", "extra", ids, params)])
    assert engine.update_stats().prefix_cache_hits_total == 96
