"""Issue 7.1, fuzzing: the published OpenAPI schema drives schemathesis against the real app and engine.

Fixed seed (``derandomize``), a bounded number of cases per operation, a 30 s deadline per request. Every
answer is under 500, every 4xx body is in its route family's error shape, and afterwards a normal request
answers 200 and the engine holds nothing. Hand-written cases cover the NDJSON and SSE streams.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from reliability_server import InProcessServer, config

MAX_EXAMPLES = 12
DEADLINE_S = 30
USER = {"role": "user", "content": "Write a long answer."}
SERVED = {
    "/",
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/api/tags",
    "/api/ps",
    "/api/pull",
    "/api/show",
    "/api/version",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/models/{model}",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/health",
    "/ready",
    "/metrics",
}


@pytest.fixture(scope="module")
def server() -> Iterator[InProcessServer]:
    server = InProcessServer(config())
    yield server
    server.stop()


def check_error_shape(path: str, response: httpx.Response) -> None:
    """A 4xx body is ``{"error": "..."}`` on /api and ops routes, OpenAI's error object on /v1."""
    assert response.status_code < 500, f"{path}: {response.status_code} {response.text[:500]}"
    if 400 <= response.status_code < 500:
        body = response.json()
        if path.startswith("/v1"):
            error = body["error"]
            assert isinstance(error, dict) and isinstance(error["message"], str), body
            assert set(error) == {"message", "type", "param", "code"}, body
        else:
            assert set(body) == {"error"} and isinstance(body["error"], str), body


def _bound(body: object) -> None:
    """Keep generations short: a fuzz case tests the parser and the limits, not the decoder's speed."""
    if not isinstance(body, dict):
        return
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), int) and body[field] > 4:
            body[field] = 4
    if "max_tokens" not in body and "model" in body:
        body["max_tokens"] = 4
    options = body.get("options")
    if isinstance(options, dict):
        if not isinstance(options.get("num_predict"), int) or options["num_predict"] > 4 or options["num_predict"] < 0:
            options["num_predict"] = 4
    elif "model" in body and ("prompt" in body or "messages" in body):
        body["options"] = {"num_predict": 4}
    for name in ("lora_name", "model", "name"):  # never unload or delete the shipped endpoints mid-run
        if body.get(name) in ("base", "chatbot", "code", "summarization"):
            body[name] = "fuzz-" + body[name]


def test_schema_lists_every_served_route(server: InProcessServer) -> None:
    spec = httpx.get(f"{server.url}/openapi.json", timeout=DEADLINE_S).json()
    assert set(spec["paths"]) == SERVED
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            assert "4XX" in operation["responses"] and "422" not in operation["responses"], (method, path)
            if method in ("post", "delete") and path not in ("/",):
                assert "requestBody" in operation, (method, path)
    ids = [op["operationId"] for methods in spec["paths"].values() for op in methods.values()]
    assert len(ids) == len(set(ids))


def test_fuzz_every_operation(server: InProcessServer) -> None:
    """Schemathesis builds the cases from the published schema; hypothesis runs them with a fixed seed."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} == SERVED
    seen = 0
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case) -> None:
            nonlocal seen
            _bound(case.body)
            if case.path in ("/v1/load_lora_adapter", "/api/create") and isinstance(case.body, dict):
                # Never point the server at arbitrary host directories: a fuzz path is one that does not exist.
                for field in ("lora_path", "adapter", "path"):
                    if field in case.body:
                        case.body[field] = "/nonexistent/fuzz"
                case.body.pop("adapters", None)
                case.body.pop("modelfile", None)
            response = case.call(base_url=server.url, timeout=DEADLINE_S)
            check_error_shape(case.path, httpx.Response(response.status_code, content=response.content))
            seen += 1

        run()
    assert seen >= len(operations)


def test_server_answers_and_is_idle_after_the_fuzz(server: InProcessServer) -> None:
    assert server.ok()
    assert server.idle()


# ---- hand-written stream cases -------------------------------------------------------------------------


def _ndjson_lines(server: InProcessServer, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=DEADLINE_S) as response:
        assert response.status_code == 200, response.read()
        lines = [json.loads(line) for line in response.iter_lines() if line.strip()]
    assert lines and lines[-1]["done"] is True
    assert all(line["done"] is False for line in lines[:-1])
    return lines


def _sse_events(server: InProcessServer, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=DEADLINE_S) as response:
        assert response.status_code == 200, response.read()
        raw = [line for line in response.iter_lines() if line.strip()]
    assert all(line.startswith("data: ") for line in raw), raw
    assert raw[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in raw[:-1]]


@pytest.mark.parametrize(
    "stop", [["\n"], [" the", "e"], ["a", "b", "c", "d"], "\n\n", ["<|im_end|>"], ["x" * 200]], ids=str
)
def test_ndjson_stream_with_stop_lists(server: InProcessServer, stop) -> None:
    body = {"model": "chatbot", "prompt": "Write about the sea.", "options": {"num_predict": 8, "stop": stop}}
    lines = _ndjson_lines(server, "/api/generate", body)
    assert lines[-1]["done_reason"] in ("stop", "length")
    chat = {"model": "code", "messages": [{"role": "user", "content": "the the the"}], "options": body["options"]}
    assert _ndjson_lines(server, "/api/chat", chat)[-1]["done_reason"] in ("stop", "length")


def test_stop_string_straddling_tokens_is_never_leaked(server: InProcessServer) -> None:
    base = {"model": "base", "prompt": "Count: one two three four five", "stream": False}
    text = httpx.post(
        f"{server.url}/api/generate", json={**base, "options": {"num_predict": 12, "temperature": 0}}, timeout=60
    ).json()["response"]
    if len(text) < 4:
        pytest.skip("the model produced too little text to cut")
    stop = text[2:5]  # three characters that likely span a token boundary
    body = {**base, "stream": True, "options": {"num_predict": 12, "temperature": 0, "stop": [stop]}}
    streamed = "".join(line["response"] for line in _ndjson_lines(server, "/api/generate", body))
    assert stop not in streamed and text.startswith(streamed)
    sse = {
        "model": "base",
        "prompt": base["prompt"],
        "max_tokens": 12,
        "temperature": 0,
        "stop": [stop],
        "stream": True,
    }
    chunks = _sse_events(server, "/v1/completions", sse)
    assert stop not in "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def test_sse_streams_end_with_done(server: InProcessServer) -> None:
    chat = {"model": "summarization", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    for extra in ({}, {"stream_options": {"include_usage": True}}, {"stop": ["\n", " "]}, {"n": 1, "seed": 3}):
        events = _sse_events(server, "/v1/chat/completions", {**chat, **extra, "stream": True})
        assert all(e["object"] == "chat.completion.chunk" for e in events)
        if extra.get("stream_options"):
            assert events[-1]["usage"]["completion_tokens"] >= 0
    events = _sse_events(
        server, "/v1/completions", {"model": "base", "prompt": [1, 2, 3], "max_tokens": 3, "stream": True}
    )
    assert all(e["object"] == "text_completion" for e in events)


def test_stream_options_without_stream(server: InProcessServer) -> None:
    body = {"model": "base", "prompt": "Hi", "max_tokens": 2, "stream_options": {"include_usage": True}}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=DEADLINE_S)
    assert response.status_code in (200, 400), response.text
    check_error_shape("/v1/completions", response)
    if response.status_code == 200:
        assert response.json()["object"] == "text_completion"


@pytest.mark.parametrize(
    "path,raw",
    [
        ("/api/generate", b'{"model": "base", "prompt": "Hi", "stream": true'),
        ("/api/chat", b'{"model": "base", "messages": "not a list", "stream": true}'),
        ("/api/generate", b'{"model": "base", "prompt": "Hi", "stream": "yes please"}'),
        ("/api/generate", b"\xff\xfe\x00"),
        ("/api/chat", b"[1, 2, 3]"),
        ("/v1/chat/completions", b'{"model": "base", "messages": [], "stream": true'),
        ("/v1/completions", b'{"model": "base", "prompt": {"a": 1}, "stream": true}'),
        ("/v1/completions", b'{"model": "base", "prompt": "x", "stream": true, "max_tokens": -1}'),
        ("/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}], "stream": true}'),
        ("/v1/completions", b"null"),
        ("/api/generate", b'{"model": "base", "prompt": "Hi", "options": {"stop": [""]}}'),
        ("/v1/completions", b'{"model": "base", "prompt": "Hi", "stop": "", "stream": true}'),
    ],
)
def test_malformed_stream_requests_get_the_api_error_shape(server: InProcessServer, path: str, raw: bytes) -> None:
    response = httpx.post(
        f"{server.url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=DEADLINE_S
    )
    assert 400 <= response.status_code < 500, response.text
    check_error_shape(path, response)


@pytest.mark.parametrize(
    "path,body",
    [
        ("/api/generate", {"model": "chatbot", "prompt": "Tell a long story.", "options": {"num_predict": 64}}),
        (
            "/api/chat",
            {"model": "code", "messages": [{"role": "user", "content": "Long code"}], "options": {"num_predict": 64}},
        ),
        ("/v1/completions", {"model": "base", "prompt": "Long story", "max_tokens": 64, "stream": True}),
        (
            "/v1/chat/completions",
            {
                "model": "summarization",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 64,
                "stream": True,
            },
        ),
    ],
)
def test_client_closes_after_the_first_line(server: InProcessServer, path: str, body: dict) -> None:
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=DEADLINE_S) as response:
        assert response.status_code == 200
        first = next(line for line in response.iter_lines() if line.strip())
        json.loads(first.removeprefix("data: "))
    assert server.idle(), "the abandoned stream still holds engine state"
    assert server.ok()
