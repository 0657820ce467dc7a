"""Bad input gets the right status and error shape, and a message that says what to fix; never a 500."""

from __future__ import annotations

import httpx
import openai
import pytest
from test_server_harness import PROMPT, ServerProcess, shared_server

from loraplex.engine.core.errors import (
    AdapterError,
    EngineDeadError,
    QueueFullError,
    RequestError,
    UnknownEndpointError,
)
from loraplex.server.errors import error_body, to_api_error

USER = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server()


OLLAMA_CASES = [
    ("/api/generate", {"model": "nope", "prompt": "x"}, 404, "not served here"),
    ("/api/chat", {"model": "gpt-4", "messages": USER}, 404, "use one of: base, chatbot"),
    ("/api/generate", {"model": "base", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/api/generate", {"model": "base", "prompt": "x", "images": ["iVBORw0KGgo="]}, 400, "images"),
    ("/api/chat", {"model": "base", "messages": [USER[0] | {"images": ["iVBORw0KGgo="]}]}, 400, "images"),
    ("/api/chat", {"model": "base", "messages": USER, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/api/generate", {"model": "base", "prompt": "x", "format": "yaml"}, 400, "format"),
    ("/api/chat", {"model": "base", "messages": USER, "format": {"type": "objekt"}}, 400, "format: the JSON schema"),
    ("/api/generate", {"prompt": ""}, 400, "model"),
    ("/api/chat", {"model": "nope", "messages": []}, 404, "not served here"),
    ("/api/generate", {"model": "base", "prompt": "x", "options": {"temperature": -1}}, 400, "temperature"),
    ("/api/generate", {"model": "base", "prompt": "x", "options": {"top_p": 2}}, 400, "top_p"),
    ("/api/generate", {"model": "base", "prompt": "x", "options": {"temperature": "hot"}}, 400, "temperature"),
    ("/api/chat", {"model": "base", "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/api/generate", {"prompt": "x"}, 400, "model"),
    ("/api/generate", {"model": "base", "prompt": "x", "template": "{{ range .Messages }}"}, 400, "template"),
    ("/api/embed", {"model": "base", "input": ""}, 400, "empty"),
    ("/api/embed", {"model": "nope", "input": "x"}, 404, "not served here"),
]


@pytest.mark.parametrize(("path", "body", "status", "words"), OLLAMA_CASES)
def test_ollama_errors(server: ServerProcess, path: str, body: dict, status: int, words: str) -> None:
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, str) and words in error


def test_bad_json_on_both_apis(server: ServerProcess) -> None:
    ollama_style = httpx.post(f"{server.url}/api/chat", content=b'{"model": ')
    assert ollama_style.status_code == 400 and "not valid JSON" in ollama_style.json()["error"]
    openai_style = httpx.post(f"{server.url}/v1/chat/completions", content=b"[1, 2")
    error = openai_style.json()["error"]
    assert openai_style.status_code == 400 and "not valid JSON" in error["message"]
    assert error["type"] == "invalid_request_error"
    not_object = httpx.post(f"{server.url}/api/generate", json=["model", "base"])
    assert not_object.status_code == 400 and "JSON object" in not_object.json()["error"]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (UnknownEndpointError("model 'x' is not served here"), 404),
        (RequestError("top_p = 2 is invalid; use a value in (0, 1]"), 400),
        (AdapterError("adapter 'a': r = 0"), 400),
        (QueueFullError("the waiting queue is full"), 503),
        (EngineDeadError("the engine loop has stopped"), 503),
    ],
)
def test_engine_errors_map_to_statuses(error: Exception, status: int) -> None:
    """The mapping itself, for the errors a healthy test server cannot be made to raise (full queue, dead loop)."""
    api_error = to_api_error(error)
    assert api_error.status == status and api_error.message == str(error)
    assert ("Retry-After" in api_error.headers) == isinstance(error, QueueFullError)
    assert error_body(api_error, "/api/chat") == {"error": str(error)}
    assert error_body(api_error, "/v1/completions")["error"]["message"] == str(error)


def _openai_error(server: ServerProcess, **kwargs: object) -> openai.APIStatusError:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**({"model": "base", "messages": USER, "max_tokens": 2} | kwargs))
    return caught.value


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "words"),
    [
        ({"model": "nope"}, 404, "model", "not served here"),
        ({"n": 17}, 400, "n", "n = 17"),
        ({"temperature": -1}, 400, "temperature", "temperature"),
        ({"temperature": 3}, 400, "temperature", "temperature"),
        ({"messages": []}, 400, "messages", "messages is empty"),
        ({"functions": [{"name": "f"}]}, 400, "functions", "replaced by tools"),
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, 400, "tools[0]", "tools[0].function.name"),
        ({"response_format": {"type": "xml"}}, 400, "response_format.type", "response_format.type = 'xml'"),
        ({"max_tokens": 0}, 400, "max_tokens", "max_tokens = 0"),
        ({"max_completion_tokens": -3}, 400, "max_tokens", "max_tokens = -3"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            400,
            "messages[0].content",
            "non-text",
        ),
    ],
)
def test_openai_errors(server: ServerProcess, kwargs: dict, status: int, param: str | None, words: str) -> None:
    error = _openai_error(server, **kwargs)
    assert error.status_code == status
    body = error.body
    assert set(body) == {"message", "type", "param", "code"}
    assert words in body["message"] and body["param"] == param


def test_openai_completion_errors(server: ServerProcess) -> None:
    for body, words in [
        ({"model": "base", "prompt": ""}, "prompt is empty"),
        ({"model": "base", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "base", "prompt": "x", "n": 0}, "n = 0"),
        ({"model": "base", "prompt": ["a", ""]}, "prompt[1] is empty"),
    ]:
        response = httpx.post(f"{server.url}/v1/completions", json=body)
        assert response.status_code == 400 and words in response.json()["error"]["message"]


def test_unknown_route_and_server_still_serves(server: ServerProcess) -> None:
    missing = httpx.post(f"{server.url}/api/push", json={"model": "base"})
    assert missing.status_code == 404 and "POST /api/push is not a loraplex route" in missing.json()["error"]
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["type"] == "invalid_request_error"
    ok = httpx.post(
        f"{server.url}/api/generate",
        json={"model": "base", "prompt": PROMPT, "stream": False, "options": {"num_predict": 1}},
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["done"]
