"""Log-probabilities through the real ``openai`` and ``ollama`` clients, against a real server process.

Each value must be the log-softmax of the model's raw logits at that position: the same as transformers +
PEFT running the prompt and the generated tokens in one forward pass (the oracle, tests/conftest.py).
"""

from __future__ import annotations

from typing import Any

import httpx
import ollama
import openai
import pytest
import torch
from test_server_harness import ServerProcess, shared_server
from transformers import PreTrainedTokenizerBase

ATOL = 1e-4
NEW_TOKENS = 6
GREEDY = {"temperature": 0, "num_predict": NEW_TOKENS, "repeat_penalty": 1.0}  # Ollama penalises by default
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server()


@pytest.fixture(scope="module")
def openai_client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def ollama_client(server: ServerProcess) -> ollama.Client:
    return ollama.Client(host=server.url)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """The prompt the server builds for a chat: the model's template, the assistant turn opened."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


@torch.inference_mode()
def forward(oracle, endpoint: str, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The log-softmax [len(tokens), vocab] of the logits that chose each of ``tokens`` after ``prompt``, from
    one transformers + PEFT forward pass over both."""
    oracle.model.set_adapter(endpoint)
    logits = oracle.model(torch.tensor([prompt + tokens])).logits[0]
    return logits[len(prompt) - 1 : -1].float().log_softmax(dim=-1)


def reference(oracle, endpoint: str, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """The oracle's greedy tokens after ``prompt``, and the log-softmax that chose each of them."""
    tokens = oracle.greedy(endpoint, prompt, NEW_TOKENS)
    return tokens, forward(oracle, endpoint, prompt, tokens)


def check_entries(
    entries: list[dict[str, Any]], tokens: list[int], rows: torch.Tensor, tokenizer, k: int, greedy: bool = True
) -> None:
    """Entries shaped {token, logprob, top_logprobs: [{token, logprob}]} (OpenAI chat, Ollama) against the
    oracle; ``bytes`` too where the client keeps it."""
    assert 1 <= len(entries) <= NEW_TOKENS
    for entry, token, row in zip(entries, tokens, rows, strict=False):
        assert entry["token"] == tokenizer.decode([token])
        assert entry["logprob"] == pytest.approx(row[token].item(), abs=ATOL)
        values, ids = row.topk(k)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(values.tolist(), abs=ATOL)
        assert [t["token"] for t in entry["top_logprobs"]][:1] == [tokenizer.decode(ids[:1])]
        if greedy:
            assert entry["top_logprobs"][0]["token"] == entry["token"], "greedy draws the most likely token"
        if "bytes" in entry:
            assert entry["bytes"] == list(entry["token"].encode())


def test_chat_logprobs_match_transformers(openai_client: openai.OpenAI, oracle, tokenizer) -> None:
    tokens, rows = reference(oracle, "code", chat_prompt(tokenizer, QUESTION))
    kwargs = {"model": "code", "messages": QUESTION, "max_tokens": NEW_TOKENS, "temperature": 0}
    whole = openai_client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=3)
    entries = [e.model_dump() for e in whole.choices[0].logprobs.content]
    assert len(entries) == whole.usage.completion_tokens
    check_entries(entries, tokens, rows, tokenizer, 3)
    stream = openai_client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=3, stream=True)
    streamed = [
        e.model_dump() for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert streamed == entries
    plain = openai_client.chat.completions.create(**kwargs)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == whole.choices[0].message.content


def test_completion_logprobs_match_transformers(openai_client: openai.OpenAI, oracle, tokenizer) -> None:
    prompt = tokenizer.encode("The three primary colours are", add_special_tokens=False)
    tokens, rows = reference(oracle, "summarization", prompt)
    kwargs = {"model": "summarization", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "logprobs": 2}
    whole = openai_client.completions.create(**kwargs).choices[0]
    logprobs = whole.logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t in tokens[: len(logprobs.tokens)]]
    assert "".join(logprobs.tokens) == whole.text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    for i, (value, top) in enumerate(zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True)):
        assert value == pytest.approx(rows[i, tokens[i]].item(), abs=ATOL)
        assert sorted(top.values(), reverse=True) == pytest.approx(rows[i].topk(2).values.tolist(), abs=ATOL)
        assert top[logprobs.tokens[i]] == value, "the drawn token is among the top, with its own value"
    chunks = list(openai_client.completions.create(**kwargs, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs and c.choices[0].logprobs.tokens]
    assert [t for part in streamed for t in part.tokens] == logprobs.tokens
    assert [o for part in streamed for o in part.text_offset] == logprobs.text_offset


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_logprobs_are_raw_and_match_transformers(
    ollama_client: ollama.Client, oracle, tokenizer, stream: bool
) -> None:
    """With Ollama's default repeat_penalty (1.1) the tokens drawn are penalised, the log-probabilities not:
    they equal the forward pass over the tokens the engine drew (``context``)."""
    text = "One, two, three, four,"
    prompt = tokenizer.encode(text, add_special_tokens=False)
    options = {"num_predict": NEW_TOKENS, "temperature": 0}
    kwargs = {"model": "chatbot", "prompt": text, "raw": True, "options": options, "logprobs": True, "top_logprobs": 4}
    if stream:
        chunks = list(ollama_client.generate(**kwargs, stream=True))
        entries = [e.model_dump() for c in chunks for e in c.logprobs or []]
        context = chunks[-1].context
    else:
        response = ollama_client.generate(**kwargs)
        entries, context = [e.model_dump() for e in response.logprobs], response.context
    assert context[: len(prompt)] == prompt
    tokens = context[len(prompt) :]
    assert len(entries) == len(tokens)
    rows = forward(oracle, "chatbot", prompt, tokens)
    check_entries(entries, tokens, rows, tokenizer, 4, greedy=False)
    assert any(row.argmax() != token for row, token in zip(rows, tokens, strict=True)), (
        "the penalty changed a greedy token"
    )


def test_ollama_chat_logprobs(ollama_client: ollama.Client, oracle, tokenizer) -> None:
    tokens, rows = reference(oracle, "chatbot", chat_prompt(tokenizer, QUESTION))
    response = ollama_client.chat(model="chatbot", messages=QUESTION, options=GREEDY, logprobs=True, top_logprobs=1)
    check_entries([e.model_dump() for e in response.logprobs], tokens, rows, tokenizer, 1)
    plain = ollama_client.chat(model="chatbot", messages=QUESTION, options=GREEDY)
    assert plain.logprobs is None


BAD = [
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": -1}, "logprobs"),
    ("/api/generate", {"prompt": "Hi", "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/api/chat", {"messages": QUESTION, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/api/chat", {"messages": QUESTION, "top_logprobs": 3}, "top_logprobs"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD)
def test_bad_logprobs_fields_are_a_400_naming_the_field(
    server: ServerProcess, path: str, body: dict, field: str
) -> None:
    response = httpx.post(server.url + path, json={"model": "base", "stream": False} | body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    if path.startswith("/v1"):
        assert error["param"] == field and field in error["message"]
    else:
        assert field in error
