"""Health, readiness, Prometheus metrics, and a client that disconnects mid-stream."""

from __future__ import annotations

import time

import httpx
import pytest
from test_server_harness import COUNTING, COUNTING_OPTIONS, PROMPT, ServerProcess, shared_server

METRIC_NAMES = [
    "loraplex_num_requests_waiting",
    "loraplex_num_requests_running",
    "loraplex_kv_cache_usage_perc",
    "loraplex_kv_blocks_used",
    "loraplex_prompt_tokens_total",
    "loraplex_generation_tokens_total",
    "loraplex_preemptions_total",
    "loraplex_prefix_cache_queries_total",
    "loraplex_prefix_cache_hits_total",
    'loraplex_requests_finished_total{reason="length"}',
    "loraplex_lora_requests_info{",
    'loraplex_adapter_resident{adapter="chatbot"} 1.0',
    'loraplex_time_to_first_token_seconds_bucket{endpoint="chatbot"',
    'loraplex_request_latency_seconds_bucket{endpoint="chatbot"',
    'loraplex_time_per_output_token_seconds_bucket{endpoint="chatbot"',
    # what the Gateway API Inference Extension reads, under vLLM's names
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:lora_requests_info{",
]


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server()


def test_health_and_ready(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json() == {"status": "ready"}
    assert httpx.get(f"{server.chatbot_url}/ready").status_code == 200
    assert "Ollama is running" in httpx.get(server.url).text


def test_metrics(server: ServerProcess) -> None:
    body = {"model": "chatbot", "prompt": PROMPT, "stream": False, "options": {"num_predict": 2}}
    before = server.metric("loraplex_generation_tokens_total")
    assert httpx.post(f"{server.url}/api/generate", json=body, timeout=60).status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    for name in METRIC_NAMES:
        assert name in text, name
    assert 'max_lora="4"' in text
    assert server.metric("loraplex_generation_tokens_total") == before + 2
    assert 0 <= server.metric("loraplex_kv_cache_usage_perc") <= 1


def _wait_idle(server: ServerProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.metric("loraplex_num_requests_running") == 0 and server.metric("loraplex_kv_blocks_used") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the engine still holds the request or its KV blocks")


def _aborted(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    prefix = 'loraplex_requests_finished_total{reason="abort"} '
    return next((float(line.split()[1]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/api/chat",
            {
                "model": "chatbot",
                "messages": [{"role": "user", "content": PROMPT}],
                "options": {"num_predict": 400, "temperature": 0},
            },
        ),
        (
            "/v1/completions",
            {"model": "code", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True},
        ),
    ],
)
def test_disconnect_aborts_and_frees_blocks(server: ServerProcess, path: str, body: dict) -> None:
    _wait_idle(server)
    before = _aborted(server)
    with httpx.Client(timeout=60) as client, client.stream("POST", server.url + path, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: dropping an httpx line iterator closes the connection
        first = next(lines)  # one chunk arrived: the request is running
        assert server.metric("loraplex_kv_blocks_used") > 0, first
    _wait_idle(server)  # leaving the with-block closed the connection
    assert _aborted(server) == before + 1


def test_disconnect_while_waiting_for_a_whole_response_aborts(server: ServerProcess) -> None:
    """A non-streaming request is aborted too when its client gives up (here: a 1.5 s read timeout)."""
    _wait_idle(server)
    before = _aborted(server)
    body = COUNTING | {"stream": False, "options": COUNTING_OPTIONS | {"num_predict": 400}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/api/generate", json=body, timeout=1.5)
    _wait_idle(server)
    assert _aborted(server) == before + 1
