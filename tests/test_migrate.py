"""``loraplex migrate``: an Ollama models folder (manifests and blobs, as the old pods kept them) or their
Modelfiles become one loraplex config: one base, an endpoint per adapter with its old replica count as slots,
and what loraplex does not apply yet written down, never dropped."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from loraplex import cli
from loraplex.engine.core.config import load_config
from loraplex.engine.model.loader import default_gguf_path

ADAPTER = Path(__file__).resolve().parent / "fixtures" / "random_lora_r2.gguf"


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


@pytest.fixture
def ollama_models(tmp_path: Path) -> Path:
    models = tmp_path / "ollama"
    base = blob(models, link_to=default_gguf_path())
    adapter = blob(models, ADAPTER.read_bytes())
    system = blob(models, b"You are a helpful assistant.")
    params = blob(models, json.dumps({"temperature": 0.7, "stop": ["<|eot_id|>", "\n\nUser:"]}).encode())
    manifest(models, "chatbot", [("model", base), ("adapter", adapter), ("system", system), ("params", params)])
    manifest(models, "code", [("model", base), ("adapter", adapter)])
    manifest(models, "smollm2", [("model", base)])
    return models


def test_an_ollama_models_folder_becomes_one_config(ollama_models: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "deploy" / "loraplex.toml"
    cli.main(
        ["migrate", f"--from-ollama={ollama_models}", "--replicas=chatbot=3", "--replicas=code=2", "--out", str(out)]
    )
    config = load_config(out)
    by_name = {e.name: e for e in config.endpoints}
    assert list(by_name) == ["base", "chatbot", "code"]
    assert by_name["base"].aliases == ["smollm2"] and by_name["base"].adapter == ""
    assert (by_name["chatbot"].slots, by_name["code"].slots, by_name["base"].slots) == (3, 2, 1)
    for name in ("chatbot", "code"):
        assert Path(by_name[name].adapter).resolve().read_bytes() == ADAPTER.read_bytes()
    assert Path(config.model.path).resolve() == default_gguf_path().resolve()
    text = out.read_text()
    assert '# not applied yet by loraplex (chatbot): SYSTEM "You are a helpful assistant."' in text
    assert '# not applied yet by loraplex (chatbot): PARAMETER stop "<|eot_id|>"' in text
    assert '# not applied yet by loraplex (chatbot): PARAMETER stop "\\n\\nUser:"' in text, "one comment line"
    printed = capsys.readouterr().out
    assert "chatbot: 4 Modelfile setting(s) not applied yet" in printed and "loraplex serve --config" in printed


def test_modelfiles_with_their_quoting_become_one_config(tmp_path: Path) -> None:
    shutil.copy(ADAPTER, tmp_path / "chatbot.gguf")
    (tmp_path / "Modelfile.chatbot").write_text(
        f'FROM {default_gguf_path()}\nADAPTER ./chatbot.gguf\nSYSTEM """You answer\nin two lines."""\n'
        'PARAMETER temperature 0.7\nPARAMETER stop "<|eot_id|>"\nMESSAGE user "Hi"\n'
    )
    (tmp_path / "Modelfile.base").write_text(f"# the plain base\nFROM {default_gguf_path()}\n")
    out = tmp_path / "loraplex.toml"
    chatbot, base = tmp_path / "Modelfile.chatbot", tmp_path / "Modelfile.base"
    cli.main(
        [
            "migrate",
            f"--modelfile=chatbot={chatbot}",
            f"--modelfile=llama3={base}",
            "--replicas=chatbot=3",
            "--out",
            str(out),
        ]
    )
    config = load_config(out)
    assert [(e.name, e.slots, e.aliases) for e in config.endpoints] == [("base", 1, ["llama3"]), ("chatbot", 3, [])]
    text = out.read_text()
    assert 'SYSTEM "You answer\\nin two lines."' in text and "MESSAGE user" in text


def refused(modelfiles: list[str], replicas: list[str], out: Path, message: str) -> None:
    argv = ["migrate", *(f"--modelfile={m}" for m in modelfiles), *(f"--replicas={r}" for r in replicas)]
    with pytest.raises(SystemExit, match=message):
        cli.main([*argv, "--out", str(out)])
    assert not out.exists(), "nothing half-written"


def test_models_on_different_bases_or_bad_modelfiles_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "a").write_text(f"FROM {default_gguf_path()}\nADAPTER {ADAPTER}\n")
    (tmp_path / "b").write_text(f"FROM {ADAPTER}\n")
    refused([f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"], [], tmp_path / "x.toml", "do not share one base")
    (tmp_path / "c").write_text("FROM llama3:8b\nADAPTER ./x.gguf\n")
    refused([f"c={tmp_path / 'c'}"], [], tmp_path / "x.toml", "names an Ollama model, not a file")
    (tmp_path / "d").write_text(f"FROM {default_gguf_path()}\nQUANTIZE q4\n")
    refused([f"d={tmp_path / 'd'}"], [], tmp_path / "x.toml", "line 2: QUANTIZE is not a Modelfile instruction")
    refused([f"a={tmp_path / 'a'}"], ["nobody=2"], tmp_path / "x.toml", "--replicas names nobody")


@pytest.mark.slow
def test_the_migrated_config_serves_ollamas_own_files(ollama_models: Path, tmp_path: Path) -> None:
    """The base and the adapter are Ollama's blobs themselves (no .gguf name): the engine reads both."""
    import dataclasses

    from loraplex.engine.core.engine import LLMEngine
    from loraplex.engine.core.sequence import Request, SamplingParams

    out = tmp_path / "loraplex.toml"
    cli.main(["migrate", f"--from-ollama={ollama_models}", "--out", str(out)])
    config = load_config(out)
    limits = dataclasses.replace(config.limits, max_num_seqs=8, num_kv_blocks=64, max_model_len=256)
    engine = LLMEngine(dataclasses.replace(config, limits=limits))
    ids = engine.encode_prompt("The three most useful Python built-ins are")
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    out = engine.generate([Request(name, name, list(ids), params) for name in ("base", "chatbot", "code")])
    tokens = {name: [t for o in outputs for t in o.new_token_ids] for name, outputs in out.items()}
    assert tokens["chatbot"] == tokens["code"] and all(len(t) == 6 for t in tokens.values())
    fixture = engine.lora.read("fixture", ADAPTER)
    served = engine.lora.adapters["chatbot"]
    assert all(torch.equal(served.lora_b[m], fixture.lora_b[m]) for m in fixture.lora_b), "the blob is the adapter"
