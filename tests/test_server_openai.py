"""The OpenAI API through the real ``openai`` client and raw SSE, against a real server process."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from test_server_harness import PROMPT, ServerProcess, shared_server

MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["base", "chatbot", "code", "summarization"]
    assert client.models.retrieve("llama3").id == "base"


def test_chat_completion(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="chatbot", messages=MESSAGES, max_tokens=4, temperature=0)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == "chatbot"
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 4
    assert response.usage.total_tokens == response.usage.prompt_tokens + 4


def test_usage_reports_prompt_tokens_served_from_the_prefix_cache(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tally these: " + " ".join(f"item {i}" for i in range(60))}]
    first = client.chat.completions.create(model="code", messages=messages, max_tokens=2, temperature=0)
    again = client.chat.completions.create(model="code", messages=messages, max_tokens=2, temperature=0)
    other = client.chat.completions.create(model="summarization", messages=messages, max_tokens=2, temperature=0)
    # other tests' chats on the shared server may have cached the chat template's opening block
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in (first, again, other)]
    assert cached[1] == (again.usage.prompt_tokens - 1) // 16 * 16  # all but the block of the last token
    assert cached[0] <= 16 and cached[2] <= 16  # new text; another adapter's K/V differ
    assert again.choices[0].message.content == first.choices[0].message.content


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="base", messages=MESSAGES, max_completion_tokens=4, temperature=0)
    stream = client.chat.completions.create(
        model="base",
        messages=MESSAGES,
        max_completion_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_sse_ends_with_done(server: ServerProcess) -> None:
    body = {"model": "base", "messages": MESSAGES, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert "usage" not in json.loads(events[-2][6:])  # only with stream_options.include_usage


def test_completions(client: openai.OpenAI) -> None:
    response = client.completions.create(model="summarization", prompt="Once upon a time", max_tokens=4, temperature=0)
    assert response.object == "text_completion" and response.choices[0].text
    assert response.usage.prompt_tokens == 4 and response.usage.completion_tokens == 4
    chunks = list(
        client.completions.create(
            model="summarization", prompt="Once upon a time", max_tokens=4, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == response.choices[0].text


def test_stop_and_seed(client: openai.OpenAI) -> None:
    greedy = client.completions.create(model="base", prompt="One, two, three,", max_tokens=8, temperature=0)
    text = greedy.choices[0].text
    stop = text.strip().split()[1]
    cut = client.completions.create(model="base", prompt="One, two, three,", max_tokens=8, temperature=0, stop=stop)
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    kwargs = {"model": "chatbot", "messages": MESSAGES, "max_tokens": 5, "temperature": 1.0, "seed": 11}
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == first


def test_null_fields_mean_the_defaults(server: ServerProcess) -> None:
    """Fields the OpenAI spec marks nullable accept null as "use the default", on both routes."""
    names = "n stream stream_options temperature top_p stop seed presence_penalty frequency_penalty logit_bias user"
    nulls = dict.fromkeys([*names.split(), "max_tokens"])
    chat = {"model": "chatbot", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 3}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=chat | nulls)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1 and response.json()["usage"]["completion_tokens"] <= 3
    completion = {"model": "code", "prompt": "def add(a, b):"} | nulls | {"echo": None, "best_of": None}
    response = httpx.post(f"{server.url}/v1/completions", json=completion)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 16, "null max_tokens is the legacy default, 16"
    missing = httpx.post(f"{server.url}/v1/completions", json={"model": None, "prompt": "x"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
