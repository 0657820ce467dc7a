"""Adapters loaded and unloaded at run time, through a real ``loraplex serve`` on loopback.

One server process for the module, with small slots (max_loras = 2, max_lora_rank = 16) and ``[adapters]
roots`` pointing at a temporary folder where the tests write random adapters with ``make_adapter``. The
oracle for an adapter loaded at run time is the same files loaded a second time under another name: the
greedy tokens must be equal, and differ from the base.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from adapters.make_random import SHAPES, make_adapter
from loraplex.engine.core.config import AdaptersConfig, EngineConfig
from loraplex.server.app import create_app
from loraplex.server.state import ServerState
from tests.test_server_harness import ADAPTERS, REPO, ServerProcess, free_port

PROMPT = "Once upon a time, in a small village by the sea,"
MAX_LORA_RANK = 16


def _write_config(folder: Path, port: int, roots: Path) -> Path:
    path = folder / "adapters_test.toml"
    path.write_text(f"""
[model]
path = ""
dtype = "float32"
num_threads = 1

[limits]
max_num_seqs = 16
max_num_batched_tokens = 256
num_kv_blocks = 256
max_model_len = 512
max_loras = 2
max_lora_rank = {MAX_LORA_RANK}
max_waiting = 32

[server]
host = "127.0.0.1"
port = {port}
grace_period = 5
state_dir = "{folder / "state"}"

[[endpoints]]
name = "base"
slots = 1

[[endpoints]]
name = "summarization"
adapter = "{ADAPTERS / "summarization"}"
slots = 1

[adapters]
runtime_loading = true
roots = ["{roots}"]
""")
    return path


@pytest.fixture(scope="module")
def roots() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="loraplex-adapter-roots-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def server(roots: Path) -> Iterator[ServerProcess]:
    folder = tempfile.TemporaryDirectory(prefix="loraplex-adapters-test-")
    port = free_port()
    config = _write_config(Path(folder.name), port, roots)
    log_path = Path(folder.name) / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "loraplex.cli", "serve", "--config", str(config)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
    proc = ServerProcess(process, port, 0, log_path, folder)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _adapter(roots: Path, name: str, seed: int, r: int = 4, **kwargs: object) -> Path:
    targets = ["q_proj", "v_proj"]
    make_adapter(roots / name, r=r, lora_alpha=2 * r, targets=targets, use_rslora=False, seed=seed, std=0.05, **kwargs)
    return roots / name


def _complete(url: str, model: str, max_tokens: int = 8) -> list[str]:
    """Greedy completion; the text pieces of the stream (so token boundaries count too)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    pieces = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces += [c["text"] for c in json.loads(line[6:])["choices"]]
    return pieces


def _load(url: str, name: str, path: str | Path) -> httpx.Response:
    return httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=60)


def _unload(url: str, name: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


def _model_ids(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}


def _tag_names(url: str) -> set[str]:
    return {m["name"] for m in httpx.get(f"{url}/api/tags").json()["models"]}


def test_load_generate_unload_with_vllm_routes(server: ServerProcess, roots: Path) -> None:
    url = server.url
    path = _adapter(roots, "alpha", seed=1)
    twin = roots / "alpha-copy"
    shutil.copytree(path, twin)
    assert _load(url, "alpha", "alpha").text == "Success: LoRA adapter 'alpha' added successfully."
    assert _load(url, "alpha-twin", twin).status_code == 200  # absolute path inside the root
    assert {"alpha", "alpha-twin"} <= _model_ids(url)
    assert {"alpha:latest", "alpha-twin:latest"} <= _tag_names(url)

    got = _complete(url, "alpha")
    assert got == _complete(url, "alpha-twin"), "the same adapter under two names must give the same tokens"
    assert got != _complete(url, "base"), "the adapter must change the output"
    assert got == _complete(f"{url}/alpha", "whatever"), "the /<name>/ path prefix reaches the new endpoint"
    shown = httpx.post(f"{url}/api/show", json={"model": "alpha"}).json()
    assert shown["adapter"]["rank"] == 4 and "ADAPTER " in shown["modelfile"]
    assert any(m["name"] == "alpha:latest" for m in httpx.get(f"{url}/api/ps").json()["models"]), "resident"

    duplicate = _load(url, "alpha", "alpha")
    assert duplicate.status_code == 400 and "already served" in duplicate.json()["error"]["message"]
    assert _unload(url, "alpha").status_code == 200
    gone = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 2})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert "alpha" not in _model_ids(url) and "alpha:latest" not in _tag_names(url)
    assert httpx.post(f"{url}/api/show", json={"model": "alpha"}).status_code == 404
    missing = _unload(url, "alpha")
    assert missing.status_code == 404 and "not loaded" in missing.json()["error"]["message"]
    assert _unload(url, "base").status_code == 400
    assert _complete(url, "alpha-twin") == got, "the twin keeps serving"
    assert _load(url, "alpha", "alpha").status_code == 200, "a name can be loaded again after unloading"
    assert _unload(url, "alpha").status_code == 200 and _unload(url, "alpha-twin").status_code == 200


def test_unload_a_configured_endpoint(server: ServerProcess) -> None:
    url = server.url
    assert _unload(url, "summarization").status_code == 200
    assert "summarization" not in _model_ids(url)
    body = {"model": "summarization", "prompt": "hi", "stream": False}
    assert httpx.post(f"{url}/api/generate", json=body).status_code == 404


def test_ollama_create_and_delete(server: ServerProcess, roots: Path) -> None:
    url = server.url
    _adapter(roots, "beta", seed=2)
    modelfile = "# a comment\nFROM base\nADAPTER beta\n"
    created = httpx.post(f"{url}/api/create", json={"model": "beta", "modelfile": modelfile}, timeout=60)
    assert created.status_code == 200
    assert [json.loads(line)["status"] for line in created.text.splitlines()][-1] == "success"
    assert "beta:latest" in _tag_names(url) and "beta" in _model_ids(url)
    chat = {"model": "beta:latest", "messages": [{"role": "user", "content": "Hi"}], "stream": False}
    chat["options"] = {"num_predict": 4, "temperature": 0}
    assert httpx.post(f"{url}/api/chat", json=chat, timeout=120).json()["done"] is True
    assert httpx.post(f"{url}/api/show", json={"model": "beta"}).json()["adapter"]["name"] == "beta"

    json_form = {"model": "beta-json", "from": "base", "adapters": {"adapter": "beta"}, "stream": False}
    assert httpx.post(f"{url}/api/create", json=json_form, timeout=60).json() == {"status": "success"}
    assert _complete(url, "beta-json") == _complete(url, "beta")

    refusals = {
        "unknown instruction": {"model": "x", "modelfile": "FROM base\nADAPTER beta\nPARAMATER temperature 0\n"},
        "FROM an adapter": {"model": "x", "modelfile": "FROM beta\nADAPTER beta\n"},
        "two adapters": {"model": "x", "from": "base", "adapters": {"a": "beta", "b": "beta"}},
        "blob digest": {"model": "x", "from": "base", "adapters": {"a.safetensors": "sha256:abc"}},
        "reserved name": {"model": "api", "modelfile": "FROM base\nADAPTER beta\n"},
        "slash": {"model": "me/x", "modelfile": "FROM base\nADAPTER beta\n"},
    }
    for what, body in refusals.items():
        response = httpx.post(f"{url}/api/create", json=body)
        assert response.status_code == 400, what
        assert isinstance(response.json()["error"], str), what
    blob = httpx.post(f"{url}/api/create", json=refusals["blob digest"]).json()["error"]
    assert "adapter blobs" in blob and "sha256" in blob

    assert httpx.request("DELETE", f"{url}/api/delete", json={"model": "beta:latest"}).status_code == 200
    assert httpx.request("DELETE", f"{url}/api/delete", json={"model": "beta-json"}).status_code == 200
    assert "beta:latest" not in _tag_names(url) and "beta-json:latest" not in _tag_names(url)
    again = httpx.request("DELETE", f"{url}/api/delete", json={"model": "beta"})
    assert again.status_code == 404 and isinstance(again.json()["error"], str)


def test_paths_outside_the_roots_are_refused(server: ServerProcess, roots: Path) -> None:
    url = server.url
    outside = Path(tempfile.mkdtemp(prefix="loraplex-outside-"))
    try:
        _adapter(outside, "evil", seed=3)
        (roots / "link").symlink_to(outside / "evil")
        for path in ("../" + outside.name + "/evil", str(outside / "evil"), "/etc", "link", "nope"):
            response = _load(url, "evil", path)
            assert response.status_code == 400, path
            assert response.json()["error"]["type"] == "invalid_request_error", path
        assert "outside the allowed roots" in _load(url, "evil", "link").json()["error"]["message"]
        create = {"model": "evil", "modelfile": "FROM base\nADAPTER /etc\n"}
        assert "outside the allowed roots" in httpx.post(f"{url}/api/create", json=create).json()["error"]
    finally:
        shutil.rmtree(outside, ignore_errors=True)
    assert "evil" not in _model_ids(url)


def test_bad_adapters_are_refused_by_name(server: ServerProcess, roots: Path) -> None:
    url = server.url
    corrupt = _adapter(roots, "corrupt", seed=4)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    _adapter(roots, "too-big", seed=5, r=2 * MAX_LORA_RANK)
    dora = _adapter(roots, "dora", seed=6)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    unknown = _adapter(roots, "unknown-target", seed=7)
    (unknown / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["q_proj", "lm_head"]}))
    other_base = {k: (v[0] * 2, v[1]) for k, v in SHAPES.items()}
    _adapter(roots, "other-base", seed=8, shapes=other_base)
    expected = {
        "corrupt": "adapter_model.safetensors",
        "too-big": f"r = {2 * MAX_LORA_RANK} > max_lora_rank {MAX_LORA_RANK}",
        "dora": "use_dora",
        "unknown-target": "lm_head",
        "other-base": "has shape",
    }
    for name, words in expected.items():
        response = _load(url, name, name)
        assert response.status_code == 400, (name, response.text)
        assert words in response.json()["error"]["message"], (name, response.text)
    assert not set(expected) & _model_ids(url)
    assert len(_complete(url, "base", max_tokens=2)) >= 1, "the server keeps serving"


def test_in_flight_stream_finishes_while_its_adapter_is_unloaded(server: ServerProcess, roots: Path) -> None:
    url = server.url
    _adapter(roots, "gamma", seed=9)
    assert _load(url, "gamma", "gamma").status_code == 200
    body = {"model": "gamma", "prompt": PROMPT, "max_tokens": 64, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
                break
        assert _unload(url, "gamma").status_code == 200, "unloading does not wait for the stream"
        late = httpx.post(f"{url}/v1/completions", json={"model": "gamma", "prompt": PROMPT, "max_tokens": 2})
        assert late.status_code == 404
        events += [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][6:])["usage"]
    finish = [c["finish_reason"] for e in events[:-2] for c in json.loads(e[6:])["choices"]]
    assert finish[-1] in ("length", "stop") and usage["completion_tokens"] >= 1
    assert "gamma:latest" not in {m["name"] for m in httpx.get(f"{url}/api/ps").json()["models"]}, "slot freed"


def test_more_adapters_than_slots_answer_concurrently(server: ServerProcess, roots: Path) -> None:
    url = server.url
    names = [f"many{i}" for i in range(6)]
    for i, name in enumerate(names):
        _adapter(roots, name, seed=20 + i, r=(2, 4, 8)[i % 3])
        assert _load(url, name, name).status_code == 200
    alone = {name: _complete(url, name) for name in [*names, "base"]}
    assert len({tuple(v) for v in alone.values()}) > 1
    with ThreadPoolExecutor(len(alone)) as pool:
        together = dict(zip(alone, pool.map(lambda n: _complete(url, n), alone), strict=True))
    assert together == alone
    for name in names:
        assert _unload(url, name).status_code == 200


def test_runtime_loading_off_is_refused() -> None:
    """The switch is checked before anything else, so an app without a loaded engine shows it."""
    state = ServerState(EngineConfig(adapters=AdaptersConfig(runtime_loading=False)))
    client = TestClient(create_app(state))
    requests = [
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "x"}),
        ("/v1/unload_lora_adapter", {"lora_name": "x"}),
        ("/api/create", {"model": "x", "modelfile": "FROM base\nADAPTER x"}),
        ("/api/delete", {"model": "x"}),
        ("/api/copy", {"source": "base", "destination": "x"}),
    ]
    for path, body in requests:
        response = client.post(path, json=body)
        assert response.status_code == 403, path
        error = response.json()["error"]
        message = error["message"] if path.startswith("/v1") else error
        assert "turned off" in message and "runtime_loading = false" in message, path


def test_a_gguf_lora_file_loads_through_both_apis(server: ServerProcess, roots: Path) -> None:
    """An Ollama user's adapter as it is: a GGUF file from llama.cpp's converter (tests/test_gguf_adapter.py
    checks its weights and tokens against PEFT)."""
    url = server.url
    shutil.copy(Path(__file__).parent / "fixtures" / "random_lora_r2.gguf", roots / "from-ollama.gguf")
    created = httpx.post(
        f"{url}/api/create", json={"model": "gg", "modelfile": "FROM base\nADAPTER from-ollama.gguf\n"}, timeout=60
    )
    assert created.status_code == 200 and created.text.splitlines()[-1] == '{"status":"success"}', created.text
    assert _load(url, "gg-vllm", "from-ollama.gguf").status_code == 200
    assert httpx.post(f"{url}/api/show", json={"model": "gg"}).json()["adapter"]["rank"] == 2
    got = _complete(url, "gg")
    assert got == _complete(url, "gg-vllm") and got != _complete(url, "base")
    assert httpx.request("DELETE", f"{url}/api/delete", json={"model": "gg"}).status_code == 200
    assert _unload(url, "gg-vllm").status_code == 200
