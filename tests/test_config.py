"""Configuration: the shipped default, env overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.engine.core.config import load_config
from loraplex.engine.core.errors import ConfigError


def test_default_config_has_the_four_endpoints_with_the_old_replica_counts() -> None:
    config = load_config()
    assert {e.name: e.slots for e in config.endpoints} == {"base": 1, "chatbot": 3, "code": 2, "summarization": 1}
    assert config.endpoint("llama3").name == "base"
    assert all(Path(e.adapter).is_dir() for e in config.endpoints if e.adapter)


def test_env_overrides_a_scalar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_LIMITS_MAX_NUM_SEQS", "12")
    monkeypatch.setenv("LORAPLEX_MODEL_DTYPE", "bfloat16")
    config = load_config()
    assert config.limits.max_num_seqs == 12 and config.model.dtype == "bfloat16"


@pytest.mark.parametrize(("value", "expected"), [("false", False), ("0", False), ("True", True), ("1", True)])
def test_env_overrides_a_boolean(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("LORAPLEX_MODEL_PACKED_WEIGHTS", value)
    assert load_config().model.packed_weights is expected


def test_env_turns_prefix_caching_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config().limits.prefix_caching is True
    monkeypatch.setenv("LORAPLEX_LIMITS_PREFIX_CACHING", "false")
    assert load_config().limits.prefix_caching is False


def test_env_boolean_that_is_not_one_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_MODEL_PACKED_WEIGHTS", "maybe")
    with pytest.raises(ConfigError, match="LORAPLEX_MODEL_PACKED_WEIGHTS"):
        load_config()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[model]\ndtype = 'float8'\n", "model.dtype"),
        ("[model]\nquantization = 'gptq'\n", "model.quantization"),
        ("[model]\npacked_weights = 'yes'\n", "model.packed_weights"),
        ("[limits]\nprefix_caching = 1\n", "limits.prefix_caching"),
        ("[limits]\nmax_num_seqs = true\n", "limits.max_num_seqs"),
        ("[limits]\nmax_num_seqs = 0\n", "limits.max_num_seqs"),
        ("[limits]\nmax_model_len = 99999\n", "max_model_len"),
        ("[limits]\nmax_num_seqs = 2\n[[endpoints]]\nname='a'\nslots=3\n", "max_num_seqs"),
        ("[[endpoints]]\nname='a'\n[[endpoints]]\nname='a'\n", "used twice"),
        ("[modle]\n", "unknown section"),
        ("[limits]\nmax_seqs = 3\n", "unknown key"),
        ("[model\n", "cannot read config"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_adapter_paths_are_confined_to_the_roots(tmp_path: Path) -> None:
    from loraplex.engine.core.config import AdaptersConfig
    from loraplex.engine.core.errors import AdapterError

    root = tmp_path / "root"
    (root / "good").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    adapters = AdaptersConfig(roots=[str(root)])
    assert adapters.allowed_path("good") == (root / "good").resolve()
    assert adapters.allowed_path(str(root / "good")) == (root / "good").resolve()
    for bad in ("../outside", str(tmp_path / "outside"), "link", "good/../../outside", "/etc"):
        with pytest.raises(AdapterError, match="outside the allowed roots"):
            adapters.allowed_path(bad)
    with pytest.raises(AdapterError, match="not a PEFT adapter directory or a GGUF LoRA file"):
        adapters.allowed_path("missing")
    with pytest.raises(AdapterError, match="turned off"):
        AdaptersConfig(runtime_loading=False, roots=[str(root)]).allowed_path("good")
