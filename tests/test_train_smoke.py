"""The adapter training script stays working: a few steps on a tiny random Llama, never the real adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from adapters import data, train
from adapters.make_random import SPECS
from loraplex.engine.lora.config import load_adapter

HIDDEN, INTERMEDIATE, KV_HEADS, HEAD_DIM = 64, 128, 2, 16


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def stdlib_sample() -> list[tuple[str, Path]]:
    """A few stdlib files, enough for every domain without parsing the whole library."""
    files = data.stdlib_files()
    return [f for f in files if f[0] in {"json", "textwrap", "shlex", "fnmatch", "colorsys", "bisect"}]


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        vocab_size=vocab_size,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config)


def module_shapes(model: LlamaForCausalLM) -> dict[str, tuple[int, int]]:
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if name.endswith("_proj") and isinstance(module, torch.nn.Linear)
    }


@pytest.mark.parametrize("name", list(SPECS))
def test_few_steps_train_save_and_load(
    name: str, tokenizer: PreTrainedTokenizerBase, stdlib_sample: list[tuple[str, Path]], tmp_path: Path
) -> None:
    examples, _ = data.build(name, seed=0, files=stdlib_sample)
    assert examples, f"no {name} examples from {[f[0] for f in stdlib_sample]}"
    model = tiny_llama(len(tokenizer))
    shapes = module_shapes(model)
    config = train.TrainConfig(steps=4, batch_size=2, lr=1e-2, warmup=1, max_len=256)
    # Repeat one batch so "the loss went down" is a property of the optimiser, not of the data order.
    peft_model, losses = train.train(model, tokenizer, name, examples[:2] * 4, config)
    assert losses[-1] < losses[0], losses

    out = tmp_path / name
    train.save_adapter(peft_model, name, out, card="# card\n")
    adapter = load_adapter(name, out, shapes, max_lora_rank=64)
    spec = SPECS[name]
    assert adapter.rank == spec["r"]
    assert adapter.target_modules == tuple(spec["targets"])
    weights = load_file(out / "adapter_model.safetensors")
    assert all(w.dtype == torch.float16 for w in weights.values())
    # PEFT initialises lora_B to zero: any non-zero B means the optimiser moved the weights that were saved.
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] == spec["use_rslora"]


def test_chat_examples_mask_the_prompt(
    tokenizer: PreTrainedTokenizerBase, stdlib_sample: list[tuple[str, Path]]
) -> None:
    example = data.build("summarization", seed=0, files=stdlib_sample)[0][0]
    ids, labels = train.encode(example, tokenizer, max_len=512)
    trained = [t for t in labels if t != train.IGNORE]
    assert tokenizer.decode(trained) == example.response + tokenizer.eos_token
    assert labels[: len(ids) - len(trained)] == [train.IGNORE] * (len(ids) - len(trained))


def test_data_prep_is_deterministic_and_held_out_modules_are_never_trained(
    stdlib_sample: list[tuple[str, Path]],
) -> None:
    for domain in ("code", "chatbot", "summarization"):
        first, second = data.build(domain, seed=3, files=stdlib_sample), data.build(domain, seed=3, files=stdlib_sample)
        assert first == second
        train_modules = {e.module for e in first[0]}
        held_modules = {e.module for e in first[1]}
        assert not train_modules & held_modules
    assert data.build("code", seed=3, files=stdlib_sample) != data.build("code", seed=4, files=stdlib_sample)
    assert data.is_held_out("json", 0) == data.is_held_out("json", 0)
    held = [m for m in (f"module{i}" for i in range(1000)) if data.is_held_out(m, 0)]
    assert 50 < len(held) < 150  # about one module in ten
