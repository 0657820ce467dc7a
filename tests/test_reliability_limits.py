"""Issue 7.5 and 7.6, limits on what a caller controls and API keys, on the real app over loopback HTTP.

One server with small limits (128-token context, 2 s deadline, 64 KiB bodies, 64 embedding tokens, 2 requests
per client), API keys from an environment variable and an admin key from a file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import httpx
import ollama
import openai
import pytest
from reliability_server import InProcessServer, config
from test_server_harness import COUNTING, COUNTING_OPTIONS

from loraplex.engine.core.config import AuthConfig
from loraplex.server.auth import KeyChecker

KEY, ADMIN_KEY = "sk-test-user-key", "sk-test-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    admin_file = tmp_path_factory.mktemp("keys") / "admin_keys"
    admin_file.write_text(f"# admins\n{ADMIN_KEY}\n")
    os.environ["LORAPLEX_TEST_API_KEYS"] = f"other-key, {KEY}"
    server_limits = {"request_timeout": 2.0, "max_body_bytes": 65536, "max_embed_tokens": 64}
    auth = {"api_keys_env": "LORAPLEX_TEST_API_KEYS", "admin_keys_env": "", "admin_keys_file": str(admin_file)}
    server_limits |= {"max_requests_per_client": 2}
    server = InProcessServer(config(server=server_limits, limits={"max_model_len": 128}, auth=auth))
    yield server
    server.stop()
    del os.environ["LORAPLEX_TEST_API_KEYS"]


def _post(server: InProcessServer, path: str, body: dict | bytes, headers: dict | None = None) -> httpx.Response:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(f"{server.url}{path}", headers=AUTH | (headers or {}), timeout=60, **kwargs)


# ---- 7.6 access control ---------------------------------------------------------------------------------


def test_requests_without_a_valid_key_get_401_in_each_api_shape(server: InProcessServer) -> None:
    missing = httpx.post(f"{server.url}/api/generate", json={"model": "base", "prompt": "Hi"})
    assert missing.status_code == 401 and "Bearer" in missing.json()["error"]
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
    for path in ("/health", "/ready", "/metrics"):  # public by default (auth.public_paths)
        assert httpx.get(f"{server.url}{path}").status_code == 200


def test_the_openai_and_ollama_clients_authenticate(server: InProcessServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert "chatbot" in [m.id for m in client.models.list()]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    models = ollama.Client(host=server.url, headers=AUTH).list()
    assert "chatbot:latest" in [m.model for m in models.models]
    with pytest.raises(ollama.ResponseError) as error:
        ollama.Client(host=server.url).list()
    assert error.value.status_code == 401


def test_adapter_management_needs_the_admin_key(server: InProcessServer) -> None:
    body = {"model": "does-not-exist"}
    user = _post(server, "/api/delete", body)
    assert user.status_code == 403 and "admin key" in user.json()["error"]
    assert httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 401
    admin = _post(server, "/api/delete", body, {"Authorization": f"Bearer {ADMIN_KEY}"})
    assert admin.status_code not in (401, 403)  # past auth: the route itself answers (no such model)
    assert _post(server, "/api/show", {"model": "base"}, {"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200


def test_admin_routes_off_and_keys_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    os.environ["LORAPLEX_TEST_ADMIN"] = ADMIN_KEY
    try:
        with caplog.at_level(logging.DEBUG):
            off = KeyChecker(AuthConfig(admin_keys_env="LORAPLEX_TEST_ADMIN", admin_routes="off"))
            refusal = off.check("/api/create", f"Bearer {ADMIN_KEY}")
            assert refusal is not None and refusal.status == 403
            assert off.check("/api/generate", None) is None  # no API keys: the other routes stay open
            strict = KeyChecker(AuthConfig(admin_keys_env="", api_keys_env="", admin_routes="admin"))
            assert strict.check("/v1/load_lora_adapter", None).status == 401  # no admin key exists: refused
        assert ADMIN_KEY not in caplog.text and "1 admin key(s)" in caplog.text
    finally:
        del os.environ["LORAPLEX_TEST_ADMIN"]


# ---- 7.5 limits ------------------------------------------------------------------------------------------


def test_body_size_is_bounded_with_or_without_content_length(server: InProcessServer) -> None:
    big = json.dumps({"model": "base", "prompt": "x" * 70000}).encode()
    response = _post(server, "/v1/completions", big)
    assert response.status_code == 413 and "max_body_bytes" in response.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:
        yield from (big[i : i + 8192] for i in range(0, len(big), 8192))

    chunked = httpx.post(f"{server.url}/api/generate", content=chunks(), headers=AUTH, timeout=60)
    assert chunked.status_code == 413 and "max_body_bytes" in chunked.json()["error"]


def test_prompt_stop_list_and_output_length_are_bounded(server: InProcessServer) -> None:
    long_prompt = _post(server, "/v1/completions", {"model": "base", "prompt": [1] * 600, "max_tokens": 1})
    assert long_prompt.status_code == 400 and "context holds 128" in long_prompt.json()["error"]["message"]
    many = _post(server, "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 1, "stop": ["a"] * 17})
    assert many.status_code == 400 and many.json()["error"]["param"] == "stop"
    opts = {"num_predict": 1, "stop": ["x" * 257]}
    long_stop = _post(server, "/api/generate", {"model": "base", "prompt": "Hi", "stream": False, "options": opts})
    assert long_stop.status_code == 400 and "256 characters" in long_stop.json()["error"]
    huge = {"model": "base", "prompt": [1] * 125, "max_tokens": 10**9, "temperature": 0}
    clamped = _post(server, "/v1/completions", huge)  # 128-token context: room for 3
    assert clamped.status_code == 200 and clamped.json()["usage"]["completion_tokens"] <= 3


def test_embed_total_tokens_are_bounded(server: InProcessServer) -> None:
    inputs = ["one two three four five six seven eight nine ten eleven twelve thirteen fourteen"] * 6
    response = _post(server, "/api/embed", {"model": "base", "input": inputs})
    assert response.status_code == 400 and "at most 64 tokens" in response.json()["error"]
    assert _post(server, "/api/embed", {"model": "base", "input": inputs[:1]}).status_code == 200


def test_requests_per_client_are_bounded(server: InProcessServer) -> None:
    body = {"model": "chatbot", "prompt": "Count to a hundred.", "options": {"num_predict": 400}}
    url = f"{server.url}/api/generate"
    with (
        httpx.Client(headers=AUTH, timeout=30) as a,
        httpx.Client(headers=AUTH, timeout=30) as b,
        a.stream("POST", url, json=body),
        b.stream("POST", url, json=body),
    ):
        third = _post(server, "/api/generate", body)
        assert third.status_code == 429 and third.headers["Retry-After"] == "1"
    assert server.idle()


def test_the_deadline_ends_a_request_in_both_forms(server: InProcessServer) -> None:
    # The counting request runs until its context is full (test_server_harness.COUNTING), so only the deadline
    # can end it. Its prompt is short, so the 128-token context leaves 123 tokens: about 3 s at 25 ms a token,
    # the fastest CPU these tests have met, where a 4 s deadline was outrun; hence 2 s.
    body = COUNTING | {"options": COUNTING_OPTIONS | {"num_predict": 500}}
    with httpx.stream("POST", f"{server.url}/api/generate", json=body, headers=AUTH, timeout=60) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[0]["done"] is False and "request_timeout (2 s)" in lines[-1]["error"]
    response = _post(server, "/api/generate", body | {"stream": False})
    assert response.status_code == 504 and "request_timeout" in response.json()["error"]
    assert server.idle() and server.state.engine.stats.requests_finished.get("abort", 0) >= 2


def test_the_server_still_answers(server: InProcessServer) -> None:
    body = {"model": "base", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}
    assert _post(server, "/api/generate", body).status_code == 200
