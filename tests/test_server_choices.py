"""Several choices per request (``n``, ``best_of``, a list of prompts) and vLLM's extra sampling fields on
the OpenAI routes, through the real ``openai`` client against a real server process."""

from __future__ import annotations

import httpx
import openai
import pytest
from test_server_harness import shared_server

MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
SAMPLED = {"model": "chatbot", "messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 5}


@pytest.fixture(scope="module")
def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{shared_server().url}/v1", api_key="x", max_retries=0)


def texts(response) -> list[str]:
    return [c.message.content if hasattr(c, "message") else c.text for c in response.choices]


def test_n_choices_with_a_seed_are_the_same_every_time(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(**SAMPLED, n=3)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts(client.chat.completions.create(**SAMPLED, n=3)) == texts(first)
    assert len(set(texts(first))) > 1, "each choice draws from its own seed stream"
    assert texts(client.chat.completions.create(**SAMPLED))[0] == texts(first)[0], "choice 0 keeps the seed"
    stream = client.chat.completions.create(**SAMPLED, n=3, stream=True)
    streamed = ["", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts(first)


def test_a_list_of_prompts_gives_prompt_major_choices(client: openai.OpenAI) -> None:
    prompts = ["The capital of France is", "def add(a, b):"]
    greedy = {"model": "code", "max_tokens": 4, "temperature": 0}
    alone = [client.completions.create(prompt=p, **greedy) for p in prompts]
    both = client.completions.create(prompt=prompts, n=2, **greedy)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert texts(both) == [texts(alone[0])[0]] * 2 + [texts(alone[1])[0]] * 2
    assert both.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in alone)
    assert both.usage.completion_tokens == 2 * sum(r.usage.completion_tokens for r in alone)


def test_best_of_returns_the_most_likely_of_its_siblings(client: openai.OpenAI) -> None:
    kwargs = {"model": "base", "prompt": "My favourite animal is", "max_tokens": 5, "temperature": 1.0, "seed": 3}
    siblings = client.completions.create(**kwargs, n=3, logprobs=0).choices
    best = max(siblings, key=lambda c: sum(c.logprobs.token_logprobs))
    chosen = client.completions.create(**kwargs, best_of=3)
    assert texts(chosen) == [best.text] and chosen.choices[0].logprobs is None


def test_logit_bias_forces_a_token(client: openai.OpenAI, tokenizer) -> None:
    token = tokenizer.encode(" banana", add_special_tokens=False)[0]
    response = client.completions.create(
        model="base", prompt="Hello", max_tokens=3, temperature=0, logit_bias={str(token): 100}
    )
    assert texts(response) == [tokenizer.decode([token] * 3)]


def test_vllm_sampling_fields(client: openai.OpenAI, tokenizer) -> None:
    base = {"model": "base", "prompt": "One, two, three,", "max_tokens": 6, "temperature": 0}
    greedy = texts(client.completions.create(**base))[0]
    sampled = base | {"temperature": 1.0, "seed": 9}
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        assert texts(client.completions.create(**sampled, extra_body=extra))[0] == greedy
    word = greedy.split()[1]
    kept = texts(client.completions.create(**base, stop=[word], extra_body={"include_stop_str_in_output": True}))[0]
    assert kept.endswith(word) and kept == greedy[: greedy.index(word) + len(word)]
    eos = tokenizer.eos_token_id
    forced = {"max_tokens": 2, "logit_bias": {str(eos): 100}, "extra_body": {"ignore_eos": True}}
    assert texts(client.completions.create(**base | forced))[0] == ""
    shown = client.completions.create(
        **base | forced | {"extra_body": {"ignore_eos": True, "skip_special_tokens": False}}
    )
    assert texts(shown)[0] == tokenizer.eos_token * 2
    stopped = client.completions.create(**base | {"logit_bias": {str(eos): 100}}, extra_body={"min_tokens": 3})
    assert stopped.usage.completion_tokens == 4 and stopped.choices[0].finish_reason == "stop"
    token = tokenizer.encode(" banana", add_special_tokens=False)[0]
    cut = client.completions.create(
        **base | {"logit_bias": {str(token): 100}}, extra_body={"stop_token_ids": [token], "repetition_penalty": 1.2}
    )
    assert cut.usage.completion_tokens == 1 and cut.choices[0].finish_reason == "stop"


BAD = [
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"n": 2, "best_of": 1}, "best_of"),
    ({"best_of": 2, "stream": True}, "best_of"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"top_k": -2}, "top_k"),
    ({"echo": True, "logprobs": 1}, "echo"),
    ({"prompt": ["a", ""]}, "prompt"),
]


@pytest.mark.parametrize(("fields", "param"), BAD)
def test_bad_values_are_a_400_naming_the_field(fields: dict, param: str) -> None:
    body = {"model": "base", "prompt": "Hi", "max_tokens": 2} | fields
    response = httpx.post(f"{shared_server().url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_echo_puts_the_prompt_before_the_text(client: openai.OpenAI) -> None:
    prompt = "Once upon a time"
    plain = texts(client.completions.create(model="base", prompt=prompt, max_tokens=3, temperature=0))[0]
    echoed = client.completions.create(model="base", prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert texts(echoed) == [prompt + plain]
    chunks = client.completions.create(model="base", prompt=prompt, max_tokens=3, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == prompt + plain
