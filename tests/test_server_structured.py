"""Structured output through the real clients (``ollama``, ``openai``, LangChain's ``ChatOllama`` and
``ChatOpenAI``) against a real server process: every answer parses and validates, streamed or not; a guide
that cannot compile is a 400 that names the problem, and the server serves everyone else meanwhile."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field
from test_server_harness import ServerProcess, shared_server

ENDPOINTS = ["base", "chatbot", "code", "summarization"]


class City(BaseModel):
    """A city and its country."""

    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population_millions: int = Field(ge=0, le=100)


QUESTION = "Describe Paris as JSON: its name, its country and its population in millions."
SCHEMA = City.model_json_schema()


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_langchain_structured_output_returns_a_valid_instance(server: ServerProcess, endpoint: str) -> None:
    """``with_structured_output(Model)``: ChatOllama sends ``format`` with the schema, ChatOpenAI a strict
    ``response_format`` json_schema; both parse the answer into the model."""
    chat_ollama = ChatOllama(base_url=server.url, model=endpoint, temperature=0, num_predict=96)
    chat_openai = ChatOpenAI(base_url=f"{server.url}/v1", api_key="x", model=endpoint, temperature=0, max_tokens=96)
    for chat in (chat_ollama, chat_openai):
        city = chat.with_structured_output(City).invoke(QUESTION)
        assert isinstance(city, City), f"{type(chat).__name__} on {endpoint}: {city!r}"


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_format_json_schema_and_json(server: ServerProcess, stream: bool) -> None:
    client = ollama.Client(host=server.url)
    messages = [{"role": "user", "content": QUESTION}]
    options = {"temperature": 0, "num_predict": 96}
    for fmt in (SCHEMA, "json"):
        if stream:
            parts = client.chat(model="chatbot", messages=messages, format=fmt, options=options, stream=True)
            text = "".join(part.message.content for part in parts)
        else:
            text = client.chat(model="chatbot", messages=messages, format=fmt, options=options).message.content
        answer = json.loads(text)
        if fmt == "json":
            assert isinstance(answer, dict)
        else:
            City.model_validate(answer)
    generated = client.generate(model="code", prompt=QUESTION, format=SCHEMA, options=options, stream=stream)
    text = "".join(part.response for part in generated) if stream else generated.response
    City.model_validate_json(text)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_response_format_and_vllm_fields(server: ServerProcess, stream: bool) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": QUESTION}]
    schema_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    cases = [
        ({"response_format": schema_format}, lambda text: City.model_validate_json(text)),
        ({"response_format": {"type": "json_object"}}, lambda text: isinstance(json.loads(text), dict)),
        ({"extra_body": {"guided_choice": ["yes", "no"]}}, lambda text: text in ("yes", "no")),
        ({"extra_body": {"structured_outputs": {"regex": r"[A-Z][a-z]{2,8}"}}}, lambda text: text.istitle()),
        ({"extra_body": {"guided_json": SCHEMA}}, lambda text: City.model_validate_json(text)),
    ]
    for fields, check in cases:
        kwargs = dict(model="summarization", messages=messages, temperature=0, max_tokens=96, stream=stream) | fields
        answer = client.chat.completions.create(**kwargs)
        text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices) if stream else None
        text = text if stream else answer.choices[0].message.content
        assert check(text), (fields, text)
    completion = client.completions.create(
        model="base", prompt="The answer is", max_tokens=4, temperature=0, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert completion.choices[0].text in ("yes", "no")


def test_sampled_json_is_still_valid(server: ServerProcess) -> None:
    """Constrained rows that sample (temperature 1, top-p) draw only tokens the grammar allows."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    schema_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    answer = client.chat.completions.create(
        model="chatbot",
        messages=[{"role": "user", "content": QUESTION}],
        response_format=schema_format,
        temperature=1.0,
        top_p=0.95,
        max_tokens=128,
        n=3,
        seed=7,
    )
    finished = [choice for choice in answer.choices if choice.finish_reason == "stop"]
    assert finished, "no sampled answer closed its JSON within max_tokens"
    for choice in finished:
        City.model_validate_json(choice.message.content)


BAD = [
    (
        "/api/chat",
        {"format": {"type": "object", "properties": {"a": {"type": "strin"}}}},
        ("format: the JSON schema cannot be compiled", '"strin"'),
    ),
    ("/api/chat", {"format": "yaml"}, ("format",)),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, ("response_format.type",)),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, ("response_format.json_schema",)),
    ("/v1/chat/completions", {"guided_regex": "a(b"}, ("guided_regex: the regular expression", "parenthesis")),
    ("/v1/chat/completions", {"guided_choice": []}, ("guided_choice",)),
    ("/v1/chat/completions", {"guided_choice": ["a"], "guided_regex": "a"}, ("only one",)),
    ("/v1/chat/completions", {"structured_outputs": {"yaml": 1}}, ("structured_outputs.yaml",)),
]


def test_bad_guides_are_400s_while_others_are_served(server: ServerProcess) -> None:
    messages = [{"role": "user", "content": "Count to twenty."}]
    client = ollama.Client(host=server.url)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.chat, model="code", messages=messages, options={"num_predict": 48, "seed": 1})
        for path, fields, says in BAD:
            body = {"model": "chatbot", "messages": [{"role": "user", "content": "hi"}], "stream": False} | fields
            response = httpx.post(server.url + path, json=body, timeout=60)
            assert response.status_code == 400, (fields, response.text)
            message = str(response.json())
            for words in says:
                assert words in message, (fields, message)
        assert running.result(timeout=120).done
    assert server.metric("loraplex_kv_blocks_used") == 0
