"""Whole Modelfiles (issue 24 item 2): SYSTEM, MESSAGE, PARAMETER and TEMPLATE become a model's defaults, made
with the real ``ollama`` client's ``create`` and kept across a restart.

The real app and engine serve on loopback (uvicorn in a thread, tests/reliability_server.py), so the test can
read each engine ``Request`` the routes submit: its prompt token ids are compared with the chat template (or
TEMPLATE) written out by hand, and its ``SamplingParams`` with the Modelfile's parameters and the request's own
options. The restart is a second server on the same state folder, started from ``loraplex serve``'s own argument
handling with a ``--modelfile``.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from reliability_server import InProcessServer, config
from test_server_harness import ADAPTERS, free_port, write_config
from test_server_logprobs import chat_prompt

from loraplex.cli import configure
from loraplex.engine.core.sequence import Request

SYSTEM = "You are Chatbot v2. Answer in one short sentence."
PARAMETERS = {
    "temperature": 0.3,
    "top_p": 0.8,
    "repeat_penalty": 1.3,
    "seed": 42,
    "stop": ["\n\n", "User:"],
    "num_predict": 12,
    "num_ctx": 100_000,  # above max_model_len (512): clamped, with a warning
}
TEMPLATE = "{{ if .System }}<sys>{{ .System }}</sys>\n{{ end }}<user>{{ .Prompt }}</user>\n{{ .Response }}<end>\n"
MESSAGE_MODELFILE = f'''FROM chatbot-v2
TEMPLATE """{TEMPLATE}"""
MESSAGE user What is 2 + 2?
MESSAGE assistant 4.
PARAMETER num_predict 5
'''


class Recorder:
    """Every engine Request the routes submit, in order; the engine still runs each one."""

    def __init__(self, server: InProcessServer) -> None:
        self.requests: list[Request] = []
        async_engine = server.state.async_engine
        generate = async_engine.generate

        def recording(request: Request) -> Any:
            self.requests.append(request)
            return generate(request)

        async_engine.generate = recording

    def last(self) -> Request:
        return self.requests[-1]


def _config(folder: Path) -> Any:
    return config(
        server={"state_dir": str(folder / "state")},
        adapters={"roots": [str(folder / "roots")], "runtime_loading": True},
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("modelfile")
    shutil.copytree(ADAPTERS / "chatbot", folder / "roots" / "chatbot-v2")
    return folder


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(_config(folder))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def recorder(server: InProcessServer) -> Recorder:
    return Recorder(server)


@pytest.fixture(scope="module")
def client(server: InProcessServer) -> ollama.Client:
    return ollama.Client(host=server.url)


def _create_chatbot_v2(client: ollama.Client) -> list[str]:
    statuses = client.create(
        model="chatbot-v2",
        from_="base",
        adapters={"adapter.safetensors": "chatbot-v2"},
        system=SYSTEM,
        parameters=PARAMETERS,
        stream=True,
    )
    return [s.status for s in statuses]


def test_create_chat_show_copy(
    client: ollama.Client, server: InProcessServer, recorder: Recorder, tokenizer: Any, folder: Path
) -> None:
    statuses = _create_chatbot_v2(client)
    assert statuses[-1] == "success"
    assert any("num_ctx 100000" in s and "clamped to 512" in s for s in statuses), statuses

    user = [{"role": "user", "content": "Hi there"}]
    answer = client.chat(model="chatbot-v2", messages=user, options={"top_k": 3, "num_predict": 6})
    request = recorder.last()
    assert request.endpoint == "chatbot-v2"
    assert request.prompt_token_ids == chat_prompt(tokenizer, [{"role": "system", "content": SYSTEM}, *user])
    assert answer.prompt_eval_count == len(request.prompt_token_ids)
    params = request.params
    assert (params.temperature, params.top_p, params.repetition_penalty, params.seed) == (0.3, 0.8, 1.3, 42)
    assert params.stop == ["\n\n", "User:"]
    assert params.top_k == 3 and params.max_tokens == 6, "the request's options win, field by field"
    assert params.repeat_last_n == 64 and params.min_p == 0.0, "Ollama's defaults for what neither sets"

    own_system = [{"role": "system", "content": "Be terse."}, *user]
    client.chat(model="chatbot-v2:latest", messages=own_system, options={"num_predict": 1})
    assert recorder.last().prompt_token_ids == chat_prompt(tokenizer, own_system), "the request's system wins"
    assert recorder.last().params.max_tokens == 1

    generated = client.generate(model="chatbot-v2", prompt="Hi there")
    expected = chat_prompt(tokenizer, [{"role": "system", "content": SYSTEM}, *user])
    assert recorder.last().prompt_token_ids == expected
    assert generated.context[: generated.prompt_eval_count] == expected
    assert recorder.last().params.max_tokens <= 12 and recorder.last().params.temperature == 0.3

    body = {"model": "chatbot-v2", "messages": user, "top_p": 0.5}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).status_code == 200
    openai = recorder.last()
    assert openai.prompt_token_ids == expected
    assert (openai.params.temperature, openai.params.top_p, openai.params.max_tokens) == (0.3, 0.5, 12)
    assert openai.params.seed == 42 and openai.params.stop == ["\n\n", "User:"]

    shown = client.show("chatbot-v2")
    assert f'SYSTEM """{SYSTEM}"""' in shown.modelfile and "ADAPTER " in shown.modelfile
    assert 'PARAMETER stop "\\n\\n"' in shown.modelfile and "PARAMETER num_ctx 512" in shown.modelfile
    lines = {tuple(line.split(maxsplit=1)) for line in shown.parameters.splitlines()}
    assert {("temperature", "0.3"), ("seed", "42"), ("stop", '"User:"'), ("num_ctx", "512")} <= lines
    assert shown.template == tokenizer.chat_template, "no TEMPLATE: the model's own chat template"
    raw = httpx.post(f"{server.url}/api/show", json={"model": "chatbot-v2"}).json()
    assert raw["system"] == SYSTEM and raw["adapter"]["name"] == "chatbot-v2"

    assert client.copy("chatbot-v2", "chatbot-v3").status == "success"
    client.chat(model="chatbot-v3", messages=user, options={"num_predict": 2})
    assert recorder.last().endpoint == "chatbot-v2", "a copy shares the source's adapter"
    assert recorder.last().prompt_token_ids == expected and recorder.last().params.temperature == 0.3
    names = {m.model for m in client.list().models}
    assert {"chatbot-v2:latest", "chatbot-v3:latest"} <= names
    assert "chatbot-v3" in {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    with pytest.raises(ollama.ResponseError) as used:
        client.delete("chatbot-v2")
    assert used.value.status_code == 400 and "chatbot-v3" in used.value.error
    assert client.delete("chatbot-v3").status == "success"
    assert "chatbot-v3:latest" not in {m.model for m in client.list().models}
    assert client.show("chatbot-v2").modelfile == shown.modelfile, "deleting the copy leaves the source"
    saved = sorted(p.name for p in (folder / "state" / "models").iterdir())
    assert saved == ["chatbot-v2.json"]


def test_template_and_messages_from_a_modelfile(
    client: ollama.Client, server: InProcessServer, recorder: Recorder, tokenizer: Any
) -> None:
    """FROM another model inherits its adapter, system and parameters; TEMPLATE renders each turn as Ollama
    renders a template without .Messages, MESSAGEs first."""
    body = {"model": "templated", "modelfile": MESSAGE_MODELFILE, "stream": False}
    assert httpx.post(f"{server.url}/api/create", json=body, timeout=60).json() == {"status": "success"}
    client.chat(model="templated", messages=[{"role": "user", "content": "And 3 + 3?"}])
    request = recorder.last()
    turn_one = f"<sys>{SYSTEM}</sys>\n<user>What is 2 + 2?</user>\n4.<end>\n"
    turn_two = "<user>And 3 + 3?</user>\n"
    assert request.endpoint == "chatbot-v2"
    assert request.prompt_token_ids == tokenizer.encode(turn_one + turn_two, add_special_tokens=False)
    assert request.params.max_tokens == 5 and request.params.temperature == 0.3, "inherited, then overridden"
    client.generate(model="templated", prompt="And 3 + 3?")
    assert recorder.last().prompt_token_ids == request.prompt_token_ids
    shown = client.show("templated")
    assert shown.template == TEMPLATE and "MESSAGE assistant" in shown.modelfile
    assert httpx.post(f"{server.url}/api/show", json={"model": "templated"}).json()["messages"][1] == {
        "role": "assistant",
        "content": "4.",
    }


BAD = [
    ({"modelfile": "FROM base\nADAPTER chatbot-v2\nFOO bar\n"}, ["line 3", "FOO"]),
    ({"modelfile": "FROM base\nPARAMETER temperature hot\n"}, ["line 2", "temperature", "a number"]),
    ({"modelfile": "FROM base\n\nPARAMETER top_k 0.5\n"}, ["line 3", "top_k", "an integer"]),
    ({"modelfile": "FROM base\nPARAMETER warmth 1\n"}, ["line 2", "unknown parameter 'warmth'"]),
    ({"modelfile": "FROM base\nMESSAGE robot beep\n"}, ["line 2", "MESSAGE", "robot"]),
    ({"modelfile": 'FROM base\nTEMPLATE """{{ range .Messages }}{{ end }}"""\n'}, ["line 2", "range .Messages"]),
    ({"from": "base", "parameters": {"temperature": "hot"}}, ["parameters.temperature", "a number"]),
    ({"from": "base", "parameters": {"seed": 1.5}}, ["parameters.seed", "an integer"]),
    ({"from": "base", "parameters": {"stop": [3]}}, ["parameters.stop", "string"]),
    ({"from": "base", "parameters": {"temperature": -1}}, ["temperature", "-1"]),
    ({"from": "base", "messages": [{"role": "tool", "content": "x"}]}, ["messages[0]", "tool"]),
    ({"from": "base", "template": "{{ .Prompt }}{{ if .Prompt }}!{{ end }}"}, ["template", "if .Prompt"]),
    ({"modelfile": "FROM base\nADAPTER chatbot-v2\n", "system": "x"}, ["modelfile", "system"]),
    ({"modelfile": "FROM chatbot-v2\nADAPTER chatbot-v2\n"}, ["FROM chatbot-v2", "stacked"]),
    ({"from": "base", "adapters": {"a": "missing-adapter"}}, ["missing-adapter"]),
]


@pytest.mark.parametrize(("fields", "words"), BAD)
def test_bad_input_is_a_400_naming_the_line_or_field(
    server: InProcessServer, folder: Path, fields: dict, words: list[str]
) -> None:
    body = {"model": "broken", "stream": False, **fields}
    response = httpx.post(f"{server.url}/api/create", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert all(w in error for w in words), error
    openai = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "broken", "messages": []})
    assert openai.status_code == 404, "nothing half-created: no model"
    assert not (folder / "state" / "models" / "broken.json").exists()


def test_the_client_sees_a_wrong_typed_parameter_as_a_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as raised:
        client.create(model="broken", from_="base", parameters={"num_predict": "many"})
    assert raised.value.status_code == 400 and "parameters.num_predict" in raised.value.error


def test_a_failed_write_leaves_nothing_served(client: ollama.Client, server: InProcessServer, folder: Path) -> None:
    models = folder / "state" / "models"
    models.mkdir(parents=True, exist_ok=True)
    moved = folder / "state" / "models-aside"
    models.rename(moved)
    models.write_text("a file where the models folder should be")
    try:
        with pytest.raises(ollama.ResponseError) as raised:
            client.create(model="unsaved", from_="base", adapters={"a": "chatbot-v2"}, system="x")
        assert raised.value.status_code == 500 and "cannot write" in raised.value.error
    finally:
        models.unlink()
        moved.rename(models)
    assert "unsaved:latest" not in {m.model for m in client.list().models}
    assert "unsaved" not in server.engine.lora.adapters and "unsaved" not in server.engine.endpoint_adapters


def test_models_survive_a_restart_and_serve_modelfile_at_start(
    server: InProcessServer, folder: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The created models come back from the state folder; ``serve --modelfile`` gives an endpoint its
    Modelfile's adapter and defaults."""
    user = [{"role": "user", "content": "Hi there"}]
    greedy = {"temperature": 0, "num_predict": 6}
    before = ollama.Client(host=server.url).chat(model="chatbot-v2", messages=user, options=greedy)
    server.stop()
    modelfile = folder / "mario" / "Modelfile"
    modelfile.parent.mkdir()
    modelfile.write_text(f'FROM base\nADAPTER {ADAPTERS / "code"}\nSYSTEM "You are Mario."\nPARAMETER top_k 5\n')
    monkeypatch.setenv("LORAPLEX_SERVER_STATE_DIR", str(folder / "state"))
    toml = write_config(folder, free_port(), free_port())
    args = argparse.Namespace(config=str(toml), model=None, adapter=[], modelfile=[f"mario={modelfile}"])
    restarted = InProcessServer(configure(args))
    try:
        recorder = Recorder(restarted)
        client = ollama.Client(host=restarted.url)
        shown = client.show("chatbot-v2")
        assert f'SYSTEM """{SYSTEM}"""' in shown.modelfile and "PARAMETER seed 42" in shown.modelfile
        assert "templated:latest" in {m.model for m in client.list().models}
        after = client.chat(model="chatbot-v2", messages=user, options=greedy)
        system = [{"role": "system", "content": SYSTEM}]
        assert recorder.last().prompt_token_ids == chat_prompt(tokenizer, [*system, *user])
        assert after.message.content == before.message.content, "the same adapter and defaults, the same tokens"

        client.chat(model="mario", messages=user, options={"num_predict": 1})
        mario = recorder.last()
        assert mario.endpoint == "mario" and mario.params.top_k == 5
        mario_system = [{"role": "system", "content": "You are Mario."}]
        assert mario.prompt_token_ids == chat_prompt(tokenizer, [*mario_system, *user])
        assert client.show("mario").modelinfo["adapter.path"] == str(ADAPTERS / "code")
    finally:
        restarted.stop()
