"""Issue 7.4, faults inside the engine, on the real app and engine over loopback HTTP (uvicorn in a thread).

A step that raises fails its batch with a 500 (or the stream's error line) and the loop goes on; an adapter
whose files are corrupted or deleted after loading keeps serving from its host copy; a loop that dies turns
``/health`` and ``/ready`` to 503 and ends streams in flight cleanly.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from reliability_server import InProcessServer, config
from test_server_harness import ADAPTERS

POISON = "POISON-PILL"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    adapter = tmp_path_factory.mktemp("adapter") / "chatbot"
    shutil.copytree(ADAPTERS / "chatbot", adapter)
    cfg = config(limits={"max_loras": 1})  # one slot: every switch reloads an adapter from its host copy
    next(e for e in cfg.endpoints if e.name == "chatbot").adapter = str(adapter)
    server = InProcessServer(cfg)
    server.adapter_dir = adapter
    yield server
    server.stop()


def _generate(server: InProcessServer, model: str, prompt: str, stream: bool = False, n: int = 4) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "stream": stream, "options": {"num_predict": n, "temperature": 0}}
    return httpx.post(f"{server.url}/api/generate", json=body, timeout=60)


def test_step_exception_fails_its_request_and_the_loop_goes_on(server: InProcessServer, monkeypatch) -> None:
    engine = server.engine
    execute = engine.runner.execute

    def faulty(inputs):
        if POISON in engine.tokenizer.decode(inputs.input_ids.tolist()):
            raise RuntimeError("injected fault")
        return execute(inputs)

    monkeypatch.setattr(engine.runner, "execute", faulty)
    failed = _generate(server, "chatbot", f"Say {POISON} twice.")
    assert failed.status_code == 500
    assert "generation failed in the engine" in failed.json()["error"] and "injected fault" in failed.json()["error"]
    chat = {"model": "chatbot", "messages": [{"role": "user", "content": POISON}], "max_tokens": 3}
    openai = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60)
    assert openai.status_code == 500 and openai.json()["error"]["type"] == "server_error"
    assert "injected fault" in openai.json()["error"]["message"]

    with httpx.stream("POST", f"{server.url}/v1/completions", json={**chat, "prompt": POISON, "stream": True}) as r:
        assert r.status_code == 500  # the fault hit the first step: still an HTTP status, not a broken stream

    assert _generate(server, "chatbot", "Say hello.").status_code == 200
    assert server.state.async_engine.is_alive and httpx.get(f"{server.url}/health").status_code == 200
    assert server.idle()


def test_adapter_files_changed_after_loading_do_not_matter(server: InProcessServer) -> None:
    before = _generate(server, "chatbot", "Name a colour.").json()["response"]
    (server.adapter_dir / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    (server.adapter_dir / "adapter_config.json").unlink()
    for model in ("code", "chatbot", "summarization", "chatbot"):  # one slot: chatbot is evicted and reloaded
        response = _generate(server, model, "Name a colour.")
        assert response.status_code == 200, response.text
    assert response.json()["response"] == before
    shutil.rmtree(server.adapter_dir)
    assert _generate(server, "code", "x").status_code == 200
    assert _generate(server, "chatbot", "Name a colour.").json()["response"] == before
    assert server.idle()


def test_a_dead_loop_turns_health_and_ready_unhealthy(server: InProcessServer, monkeypatch) -> None:
    """Runs last in this module: it kills the engine loop for good."""
    engine = server.engine
    body = {"model": "base", "prompt": "Count to fifty.", "options": {"num_predict": 200, "temperature": 0}}
    with httpx.stream("POST", f"{server.url}/api/generate", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines))["done"] is False

        def broken() -> None:
            raise RuntimeError("injected scheduler fault")

        monkeypatch.setattr(engine.scheduler, "schedule", broken)  # outside step()'s guard: the loop dies
        rest = [json.loads(line) for line in lines if line]
    assert "the engine loop died" in rest[-1]["error"]  # a clean last line, not a cut connection
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and health.json()["status"] == "dead"
    assert "injected scheduler fault" in health.json()["error"]
    assert httpx.get(f"{server.url}/ready").status_code == 503
    refused = _generate(server, "base", "Hi")
    assert refused.status_code == 503 and "engine loop" in refused.json()["error"]
    assert not Path(server.adapter_dir).exists()
