"""A LoRA slot load that fails part-way fails only its adapter's requests, and never leaves a half-written slot.

The failure is injected into the slot copy itself (``MultiLoRALinear.set_lora`` raises after some of the
adapter's layers are written), in a batch that mixes the base and two adapters. The others' tokens must
still equal transformers + PEFT; once the failure is gone, the adapter must be loaded again, not served from
what the failed copy left in its slot.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.sequence import FinishReason, Request, SamplingParams
from loraplex.engine.lora.layers import MultiLoRALinear
from loraplex.engine.lora.slots import SlotTable
from tests.test_engine import prompt, run, tokens

NEW_TOKENS = 16
FAILING = "code"


def fail_copies_of(monkeypatch: pytest.MonkeyPatch, engine: LLMEngine, name: str, after: int) -> None:
    """``set_lora`` raises once ``after`` layers of adapter ``name`` were written in one load."""
    tensors = {id(t) for t in engine.lora.adapters[name].lora_a.values()}
    assert len(tensors) > after, "the failure must come part-way through the adapter's layers"
    original = MultiLoRALinear.set_lora
    written = 0

    def set_lora(self: MultiLoRALinear, slot: int, lora_a, lora_b, scaling: float) -> None:
        nonlocal written
        if id(lora_a) in tensors:
            if written == after:
                raise RuntimeError("injected: out of memory while copying")
            written += 1
        original(self, slot, lora_a, lora_b, scaling)

    monkeypatch.setattr(MultiLoRALinear, "set_lora", set_lora)


@pytest.fixture(scope="module")
def fresh_engine(make_engine: Callable[..., LLMEngine]) -> LLMEngine:
    """No adapter resident yet, so the batch below loads both of its adapters."""
    return make_engine()


def test_failed_slot_load_fails_only_its_requests_and_is_loaded_again(
    fresh_engine: LLMEngine, oracle, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = fresh_engine
    prompts = {
        "base": prompt(engine, "Describe the water cycle to a ten year old."),
        "chatbot": prompt(engine, "Tell me about the moon."),
        FAILING: prompt(engine, "Write a Python function that reverses a string."),
    }
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    requests = [Request(f"{ep}-{i}", ep, prompts[ep], params) for ep in prompts for i in range(2)]
    with monkeypatch.context() as patch:
        fail_copies_of(patch, engine, FAILING, after=len(engine.lora.adapters[FAILING].lora_a) // 2)
        results = run(engine, requests)

    for request in requests:
        outputs = results[request.request_id]
        if request.endpoint == FAILING:
            assert outputs[-1].finish_reason is FinishReason.ERROR
            assert f"adapter {FAILING!r}" in outputs[-1].error
            assert tokens(outputs) == []
        else:
            assert tokens(outputs) == oracle.greedy(request.endpoint, request.prompt_token_ids, NEW_TOKENS)
    assert FAILING not in engine.lora.slot_of, "a failed load must not leave the adapter resident"
    assert not engine.lora.slots.refs, "every request released its adapter"

    again = Request("again", FAILING, prompts[FAILING], params)
    got = tokens(run(engine, [again])["again"])
    assert got == oracle.greedy(FAILING, prompts[FAILING], NEW_TOKENS)


def test_a_discarded_placement_frees_its_slot_and_is_placed_anew() -> None:
    slots = SlotTable(max_loras=1)
    assert slots.acquire("a") == (1, None)
    slots.discard("a")  # its load failed while one request held it
    slots.release("a")
    assert "a" not in slots.slot_of and not slots.idle and not slots.refs
    assert slots.acquire("b") == (1, None), "the slot is free, not held by a half-loaded adapter"
    slots.release("b")
    assert slots.acquire("a") == (1, "b")
