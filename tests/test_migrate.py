"""``loraplex migrate``: an Ollama models folder (manifests and blobs, as the old pods kept them) or their
Modelfiles become one loraplex config: one base, an endpoint per model with its old replica count as slots, and
beside the config each endpoint's Modelfile, which the server reads as the endpoint's defaults. The oracle is
the server's own Modelfile reader: the migrated Modelfile reads as its source does, less the lines loraplex
does not apply, which stay as comments and are named in the command's warnings."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import ollama
import pytest
import torch

from loraplex import cli
from loraplex.engine.core.config import EngineConfig, load_config
from loraplex.engine.model.loader import default_gguf_path
from loraplex.server.modelfile import ModelSpec, parse_modelfile

ADAPTER = Path(__file__).resolve().parent / "fixtures" / "random_lora_r2.gguf"
SYSTEM = "You are Chatbot. Answer in one short sentence."
TEMPLATE = "{{ if .System }}<sys>{{ .System }}</sys>\n{{ end }}<user>{{ .Prompt }}</user>\n{{ .Response }}<end>\n"
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]


def blob(models: Path, data: bytes | None = None, link_to: Path | None = None) -> str:
    """Store a blob as Ollama does (``blobs/sha256-<hex>``); the base is linked, not copied (it is large)."""
    digest = "sha256:" + hashlib.sha256(data if data is not None else str(link_to).encode()).hexdigest()
    path = models / "blobs" / digest.replace(":", "-")
    path.parent.mkdir(parents=True, exist_ok=True)
    if link_to is not None:
        path.symlink_to(link_to)
    else:
        path.write_bytes(data)
    return digest


def manifest(models: Path, name: str, layers: list[tuple[str, str]]) -> None:
    path = models / "manifests" / "registry.ollama.ai" / "library" / name / "latest"
    path.parent.mkdir(parents=True, exist_ok=True)
    media = "application/vnd.ollama.image."
    path.write_text(json.dumps({"layers": [{"mediaType": media + kind, "digest": d} for kind, d in layers]}))


def text(models: Path, value: Any) -> str:
    return blob(models, (value if isinstance(value, str) else json.dumps(value)).encode())


@pytest.fixture
def ollama_models(tmp_path: Path) -> Path:
    """Four pods: chatbot (adapter and every kind of setting, one option loraplex ignores), code (adapter, a
    system prompt a Modelfile cannot quote, a template outside loraplex's subset, a parameter of the wrong type),
    helper (the base with a system prompt) and smollm2 (the plain base)."""
    models = tmp_path / "ollama"
    base, adapter = blob(models, link_to=default_gguf_path()), blob(models, ADAPTER.read_bytes())
    params = {"temperature": 0.7, "num_ctx": 8192, "stop": ["<end>", "\n\nUser:"], "mirostat": 2}
    chatbot = [("system", text(models, SYSTEM)), ("template", text(models, TEMPLATE)), ("params", text(models, params))]
    chatbot += [("messages", text(models, MESSAGES)), ("license", text(models, "MIT"))]
    manifest(models, "chatbot", [("model", base), ("adapter", adapter), *chatbot])
    code_template = "{{ range .Messages }}{{ .Content }}{{ end }}"
    code = [("system", text(models, 'Say:\n"""\nthen stop.')), ("template", text(models, code_template))]
    code.append(("params", text(models, {"temperature": 0.2, "top_k": "many"})))
    manifest(models, "code", [("model", base), ("adapter", adapter), *code])
    manifest(models, "helper", [("model", base), ("system", text(models, "You are Helper."))])
    manifest(models, "smollm2", [("model", base)])
    return models


def read(config: EngineConfig, name: str) -> ModelSpec:
    """The endpoint's Modelfile as the server reads it; it lies beside the config."""
    endpoint = next(e for e in config.endpoints if e.name == name)
    return parse_modelfile(Path(endpoint.modelfile).read_text())


def test_an_ollama_models_folder_becomes_one_config_and_its_modelfiles(
    ollama_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "deploy" / "loraplex.toml"
    argv = ["migrate", f"--from-ollama={ollama_models}", "--replicas=chatbot=3", "--replicas=code=2", "--out", str(out)]
    cli.main(argv)
    config = load_config(out)
    by_name = {e.name: e for e in config.endpoints}
    assert list(by_name) == ["base", "chatbot", "code", "helper"]
    assert by_name["base"].aliases == ["smollm2"] and by_name["base"].adapter == by_name["base"].modelfile == ""
    assert by_name["helper"].adapter == "", "a base model with settings is an endpoint on the base"
    assert [by_name[n].slots for n in ("base", "chatbot", "code", "helper")] == [1, 3, 2, 1]
    for name in ("chatbot", "code"):
        assert Path(by_name[name].adapter).read_bytes() == ADAPTER.read_bytes()
    for name in ("chatbot", "code", "helper"):
        assert Path(by_name[name].modelfile) == out.parent / f"{name}.Modelfile", "beside the config"
        assert f'modelfile = "{name}.Modelfile"' in out.read_text(), "a relative path"
    assert Path(config.model.path).resolve() == default_gguf_path().resolve()

    chatbot = read(config, "chatbot")
    assert (chatbot.system, chatbot.template) == (SYSTEM, TEMPLATE)
    assert (chatbot.messages, chatbot.license) == (MESSAGES, ["MIT"])
    assert chatbot.parameters == {"temperature": 0.7, "num_ctx": 8192, "stop": ["<end>", "\n\nUser:"]}
    assert chatbot.adapter == by_name["chatbot"].adapter and chatbot.base == config.model.path
    assert chatbot.warnings == [], "mirostat is left out, as a comment"
    code = read(config, "code")
    assert (code.system, code.template, code.parameters) == (None, None, {"temperature": 0.2})
    assert "# TEMPLATE" in Path(by_name["code"].modelfile).read_text()
    assert read(config, "helper") == ModelSpec(base=config.model.path, system="You are Helper.")

    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 5, printed
    assert "chatbot: the params layer: left out" in warnings[0] and "PARAMETER mirostat is not applied" in warnings[0]
    assert "chatbot: the params layer: PARAMETER num_ctx 8192 is above limits.max_model_len = 2048" in warnings[1]
    assert "code: the system layer: left out" in warnings[2] and 'its text holds """ where a Modelfile' in warnings[2]
    assert "code: the template layer: left out" in warnings[3] and "range .Messages" in warnings[3]
    assert "code: the params layer: left out" in warnings[4] and "top_k: 'many' is not an integer" in warnings[4]
    assert "loraplex serve --config" in printed


def test_modelfiles_become_one_config_whose_modelfiles_read_as_theirs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pods = tmp_path / "pods"
    pods.mkdir()
    shutil.copy(ADAPTER, pods / "chatbot.gguf")
    source = (
        f'FROM {default_gguf_path()}\nADAPTER ./chatbot.gguf\nTEMPLATE """{TEMPLATE}"""\n'
        'SYSTEM """You answer\nin two lines."""\nPARAMETER temperature 0.7\nPARAMETER stop "<|eot_id|>"\n'
        'PARAMETER stop "\\n\\nUser:"\nPARAMETER num_gpu 1\nMESSAGE user "Hi"\nMESSAGE assistant Hello there.\n'
    )
    (pods / "Modelfile.chatbot").write_text(source)
    (pods / "Modelfile.mario").write_text(f"FROM {default_gguf_path()}\nSYSTEM You are Mario.\nPARAMETER top_p 2\n")
    (pods / "Modelfile.base").write_text(f"# the plain base\nFROM {default_gguf_path()}\n")
    out = tmp_path / "loraplex.toml"
    modelfiles = [f"--modelfile={name}={pods / f'Modelfile.{name}'}" for name in ("chatbot", "mario")]
    cli.main(
        [
            "migrate",
            *modelfiles,
            f"--modelfile=llama3={pods / 'Modelfile.base'}",
            "--replicas=chatbot=3",
            "--out",
            str(out),
        ]
    )
    config = load_config(out)
    assert [(e.name, e.slots, e.aliases) for e in config.endpoints] == [
        ("base", 1, ["llama3"]),
        ("chatbot", 3, []),
        ("mario", 1, []),
    ]
    original = parse_modelfile(source)
    migrated = read(config, "chatbot")
    assert migrated.system == "You answer\nin two lines." and migrated.parameters["stop"] == ["<|eot_id|>", "\n\nUser:"]
    assert dataclasses.replace(migrated, base=None, adapter=None) == dataclasses.replace(
        original, base=None, adapter=None, warnings=[]
    ), "the same defaults, less num_gpu (which the server ignores)"
    assert migrated.adapter == str((pods / "chatbot.gguf").resolve())
    assert read(config, "mario") == ModelSpec(base=config.model.path, system="You are Mario.")
    printed = capsys.readouterr().out
    assert "chatbot: Modelfile.chatbot line 12: left out" in printed and "PARAMETER num_gpu" in printed
    assert "mario: Modelfile.mario line 3: left out" in printed and "top_p = 2.0 is invalid" in printed


def refused(modelfiles: list[str], replicas: list[str], out: Path, message: str) -> None:
    argv = ["migrate", *(f"--modelfile={m}" for m in modelfiles), *(f"--replicas={r}" for r in replicas)]
    with pytest.raises(SystemExit, match=message):
        cli.main([*argv, "--out", str(out)])
    assert not out.exists(), "nothing half-written"


def test_models_on_different_bases_or_bad_modelfiles_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "a").write_text(f"FROM {default_gguf_path()}\nADAPTER {ADAPTER}\nSYSTEM Hi.\n")
    (tmp_path / "b").write_text(f"FROM {ADAPTER}\n")
    refused([f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"], [], tmp_path / "x.toml", "do not share one base")
    (tmp_path / "c").write_text("FROM llama3:8b\nADAPTER ./x.gguf\n")
    refused([f"c={tmp_path / 'c'}"], [], tmp_path / "x.toml", "names an Ollama model, not a file")
    (tmp_path / "d").write_text(f"FROM {default_gguf_path()}\nQUANTIZE q4\n")
    refused([f"d={tmp_path / 'd'}"], [], tmp_path / "x.toml", "line 2: QUANTIZE is not a Modelfile instruction")
    refused([f"a={tmp_path / 'a'}"], ["nobody=2"], tmp_path / "x.toml", "--replicas names nobody")
    (tmp_path / "a.Modelfile").write_text((tmp_path / "a").read_text())
    refused([f"a={tmp_path / 'a.Modelfile'}"], [], tmp_path / "x.toml", "would overwrite an input Modelfile")
    assert (tmp_path / "a.Modelfile").read_text() == (tmp_path / "a").read_text(), "the input is untouched"


@pytest.mark.slow
def test_a_server_on_the_migrated_config_applies_each_pods_settings(
    ollama_models: Path, tmp_path: Path, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The real app on the migrated config: its base and adapters are Ollama's blobs themselves (no .gguf name),
    and each endpoint's prompt is built with its old pod's system prompt, messages and template."""
    from reliability_server import InProcessServer
    from test_server_logprobs import chat_prompt

    out = tmp_path / "loraplex.toml"
    cli.main(["migrate", f"--from-ollama={ollama_models}", "--out", str(out)])
    config = load_config(out)
    small = {"max_num_seqs": 8, "num_kv_blocks": 64, "max_model_len": 512}
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, dtype="float32", num_threads=1),
        limits=dataclasses.replace(config.limits, **small),
        server=dataclasses.replace(config.server, state_dir=str(tmp_path / "state")),
    )
    server = InProcessServer(config)
    assert "num_ctx 8192 is above" in caplog.text, "the server read the Modelfile (and clamped num_ctx)"
    assert "says FROM" not in caplog.text, "FROM names the base file the server holds"
    try:
        client = ollama.Client(host=server.url)
        user = [{"role": "user", "content": "Hi"}]
        # chatbot: TEMPLATE over SYSTEM, the MESSAGEs as a finished turn, then the request's turn
        rendered = f"<sys>{SYSTEM}</sys>\n<user>What is 2 + 2?</user>\n4.<end>\n<user>Hi</user>\n"
        expected = tokenizer.encode(rendered, add_special_tokens=False)
        answer = client.chat(model="chatbot", messages=user, options={"num_predict": 2})
        assert answer.prompt_eval_count == len(expected)
        generated = client.generate(model="chatbot", prompt="Hi", options={"num_predict": 2})
        assert generated.context[: generated.prompt_eval_count] == expected
        # helper: its SYSTEM through the model's own chat template; smollm2: the plain base, no defaults
        answer = client.chat(model="helper", messages=user, options={"num_predict": 2})
        assert answer.prompt_eval_count == len(
            chat_prompt(tokenizer, [{"role": "system", "content": "You are Helper."}, *user])
        )
        answer = client.chat(model="smollm2", messages=user, options={"num_predict": 2})
        assert answer.prompt_eval_count == len(chat_prompt(tokenizer, user))
        shown = client.show("chatbot")
        assert shown.template == TEMPLATE and f'SYSTEM """{SYSTEM}"""' in shown.modelfile

        fixture = server.engine.lora.read("fixture", ADAPTER)
        served = server.engine.lora.adapters["chatbot"]
        assert all(torch.equal(served.lora_b[m], fixture.lora_b[m]) for m in fixture.lora_b), "the blob is the adapter"
    finally:
        server.stop()
