"""Adapter loading: what the engine refuses, it refuses by name, field and value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.engine.core.errors import AdapterError
from loraplex.engine.lora.config import load_adapter
from tests.conftest import ADAPTERS

SHAPES = {
    f"model.layers.{i}.self_attn.{p}": (576, 576 if p in ("q_proj", "o_proj") else 192)
    for i in range(30)
    for p in ("q_proj", "k_proj", "v_proj", "o_proj")
}
SHAPES |= {f"model.layers.{i}.mlp.{p}": (576, 1536) for i in range(30) for p in ("gate_proj", "up_proj")}
SHAPES |= {f"model.layers.{i}.mlp.down_proj": (1536, 576) for i in range(30)}


@pytest.fixture
def adapter_copy(tmp_path: Path) -> Path:
    target = tmp_path / "summ"
    shutil.copytree(ADAPTERS["summarization"], target)
    return target


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_shipped_adapters_load_with_their_ranks_targets_and_scaling() -> None:
    chatbot = load_adapter("chatbot", ADAPTERS["chatbot"], SHAPES, 64)
    assert (chatbot.rank, chatbot.scaling, chatbot.target_modules) == (
        16,
        2.0,
        ("q_proj", "k_proj", "v_proj", "o_proj"),
    )
    summ = load_adapter("summarization", ADAPTERS["summarization"], SHAPES, 64)
    assert summ.scaling == 8 / 4**0.5  # rsLoRA: alpha / sqrt(r)
    code = load_adapter("code", ADAPTERS["code"], SHAPES, 64)
    assert len(code.target_modules) == 7


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "fc9"]}, "target_modules"),
        ({"r": 128}, "r = 128 > max_lora_rank 64"),
        ({"bias": "all"}, "bias"),
        ({"peft_type": "IA3"}, "peft_type"),
    ],
)
def test_config_refusals_name_adapter_field_and_value(adapter_copy: Path, change: dict, expected: str) -> None:
    edit_config(adapter_copy, **change)
    with pytest.raises(AdapterError, match="adapter 'summ'") as info:
        load_adapter("summ", adapter_copy, SHAPES, 64)
    assert expected in str(info.value)


def test_shape_mismatch_is_refused(adapter_copy: Path) -> None:
    weights = load_file(adapter_copy / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("lora_A.weight"))
    weights[key] = torch.zeros(4, 512)
    save_file(weights, adapter_copy / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"shape \(4, 512\), the base needs \(4, 576\)"):
        load_adapter("summ", adapter_copy, SHAPES, 64)


def test_module_the_base_lacks_is_refused(adapter_copy: Path) -> None:
    weights = load_file(adapter_copy / "adapter_model.safetensors")
    weights["base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 576)
    save_file(weights, adapter_copy / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"layers\.99"):
        load_adapter("summ", adapter_copy, SHAPES, 64)


def test_pickle_weights_are_never_loaded(adapter_copy: Path) -> None:
    (adapter_copy / "adapter_model.safetensors").unlink()
    (adapter_copy / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter("summ", adapter_copy, SHAPES, 64)


def test_corrupt_weights_and_missing_config_are_refused(adapter_copy: Path, tmp_path: Path) -> None:
    (adapter_copy / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="cannot read"):
        load_adapter("summ", adapter_copy, SHAPES, 64)
    with pytest.raises(AdapterError, match=r"adapter_config\.json not found"):
        load_adapter("empty", tmp_path, SHAPES, 64)
