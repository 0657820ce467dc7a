"""Structured output in the engine: constrained and unconstrained requests for different adapters share every
step; each constrained request equals transformers + PEFT with the same grammar as a logits processor, and each
unconstrained one still equals transformers + PEFT alone, token for token."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.errors import RequestError
from loraplex.engine.core.sequence import Guide, GuideKind, Request, SamplingParams

NEW_TOKENS = 40
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "maximum": 150}},
    "required": ["name", "age"],
}


def chat(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def guided_oracle(oracle, endpoint: str, prompt: list[int], grammar: xgr.CompiledGrammar) -> list[int]:
    """transformers + PEFT greedy ``generate`` with xgrammar's logits processor, alone."""
    processor = xgr.contrib.hf.LogitsProcessor(grammar)
    return oracle.generate(
        endpoint, prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2, logits_processor=[processor]
    )


def test_a_batch_mixing_guided_and_free_requests_equals_the_oracle(engine: LLMEngine, oracle) -> None:
    tok = engine.tokenizer
    person, capital = "Describe a person as JSON with a name and an age.", "What is the capital of France?"
    guided = [
        ("chatbot", person, Guide(GuideKind.JSON_SCHEMA, json.dumps(PERSON))),
        ("code", "Write a JSON object with one key.", Guide(GuideKind.JSON)),
        ("base", capital, Guide(GuideKind.CHOICE, '["Paris", "Lyon"]')),
        ("summarization", "Give a date in ISO format.", Guide(GuideKind.REGEX, r"\d{4}-\d{2}-\d{2}")),
    ]
    free = [
        ("base", person),
        ("chatbot", "Explain how a hash table works."),
        ("code", "Write a Python function that reverses a string."),
    ]
    requests = [
        Request(f"guided-{i}", ep, chat(tok, q), SamplingParams(max_tokens=NEW_TOKENS, guide=g))
        for i, (ep, q, g) in enumerate(guided)
    ] + [
        Request(f"free-{i}", ep, chat(tok, q), SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
        for i, (ep, q) in enumerate(free)
    ]
    results = engine.generate(requests)
    assert engine.block_manager.num_used_blocks == 0, "KV blocks leaked"
    texts = {}
    for request in requests:
        got = [t for out in results[request.request_id] for t in out.new_token_ids]
        texts[request.request_id] = tok.decode(got, skip_special_tokens=True)
        if request.params.guide is None:
            want = oracle.greedy(request.endpoint, request.prompt_token_ids, NEW_TOKENS)
        else:
            want = guided_oracle(oracle, request.endpoint, request.prompt_token_ids, request.grammar)
        assert got == want, f"{request.request_id} ({request.endpoint}): {tok.decode(got)!r} != {tok.decode(want)!r}"
    answer = json.loads(texts["guided-0"])
    assert set(answer) == {"name", "age"} and isinstance(answer["age"], int), texts
    assert isinstance(json.loads(texts["guided-1"]), dict)
    assert texts["guided-2"] in ("Paris", "Lyon")
    assert results["guided-3"][-1].finish_reason == "stop"
    assert len(texts["guided-3"]) == 10 and texts["guided-3"][4] == "-"


@pytest.mark.parametrize(
    ("guide", "says"),
    [
        (Guide(GuideKind.JSON_SCHEMA, '{"type": "object", "properties": {"a": {"type": "strin"}}}'), '"strin"'),
        (Guide(GuideKind.JSON_SCHEMA, "{not json"), "JSON schema"),
        (Guide(GuideKind.REGEX, "a(b"), "parenthesis"),
        (Guide(GuideKind.GRAMMAR, "root ::= foo"), '"foo"'),
    ],
)
def test_a_guide_that_does_not_compile_is_refused_with_its_reason(engine: LLMEngine, guide: Guide, says: str) -> None:
    request = Request("bad", "base", [1, 2, 3], SamplingParams(guide=guide))
    with pytest.raises(RequestError, match="cannot be compiled") as refused:
        engine.add_request(request)
    assert says in str(refused.value)
    assert not engine.has_unfinished()
