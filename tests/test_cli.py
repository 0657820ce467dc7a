"""The ``loraplex`` command line: ``--version``, the settings ``serve --help`` lists, and ``--model`` /
``--adapter`` turned into the configuration the server starts from (served end to end in tests/test_wheel.py)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from conftest import ADAPTERS

from loraplex import cli
from loraplex.engine.core.config import LimitsConfig, ModelConfig, ServerConfig
from loraplex.engine.core.errors import ConfigError
from loraplex.engine.model.loader import default_gguf_path


def args(**given) -> argparse.Namespace:
    return argparse.Namespace(**({"config": None, "model": None, "adapter": []} | given))


def test_version_and_serve_help_list_every_setting_with_its_environment_name(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip().startswith("loraplex ")
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    for section, cls in (("model", ModelConfig), ("limits", LimitsConfig), ("server", ServerConfig)):
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name} = " in text and f"LORAPLEX_{section}_{f.name}".upper() in text
    assert "--model" in text and "--adapter NAME=PATH" in text


def test_adapters_add_endpoints_or_replace_one_of_the_same_name() -> None:
    config = cli.configure(args(adapter=[f"extra={ADAPTERS['code']}", f"chatbot={ADAPTERS['summarization']}"]))
    by_name = {e.name: e for e in config.endpoints}
    assert list(by_name) == ["base", "code", "summarization", "extra", "chatbot"]
    assert by_name["extra"].adapter == str(ADAPTERS["code"]) and by_name["extra"].slots == 1
    assert by_name["chatbot"].adapter == str(ADAPTERS["summarization"])


def test_a_model_alone_serves_its_base_and_the_adapters_given() -> None:
    gguf = default_gguf_path()
    config = cli.configure(args(model=str(gguf), adapter=[f"mine={ADAPTERS['code']}"]))
    assert config.model.path == str(gguf.resolve())
    assert [(e.name, e.adapter) for e in config.endpoints] == [("base", ""), ("mine", str(ADAPTERS["code"]))]
    assert config.endpoints[0].aliases == [gguf.stem]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"adapter": ["no-equals-sign"]}, "write NAME=PATH"),
        ({"adapter": ["x=/nonexistent/adapter"]}, "is not a PEFT adapter folder or a GGUF LoRA file"),
        ({"model": "/nonexistent/model.gguf"}, "no such file"),
    ],
)
def test_bad_flags_say_what_to_fix(given: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cli.configure(args(**given))
