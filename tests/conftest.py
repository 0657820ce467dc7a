"""Shared fixtures: the real default model, the shipped adapters, and the transformers + PEFT oracle."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs thousands of short steps on a machine of its own, where OpenMP threads that spin between
# parallel regions are much faster than the passive waiting the engine chooses for shared machines
# (loraplex/engine/__init__.py, benchmarks/contention.py): 78 s against 133 s for two of its files. Set before
# torch loads; servers the tests start inherit it. The contention benchmark's variants set their own.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
# Triton's interpreter runs the CUDA kernels (engine/kernels/cuda/triton_decode.py) on CPU tensors. Triton reads
# this when it is imported, so it is set before anything here imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loraplex.engine.core.config import EngineConfig, load_config
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.model.loader import resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = {name: ROOT / "loraplex" / "adapters" / name for name in ("chatbot", "code", "summarization")}


@pytest.fixture(scope="session")
def triton_interpreter() -> None:
    """The CUDA kernels' tests need Triton, imported in interpreter mode (set above)."""
    from loraplex.engine.kernels.cuda import triton_decode

    assert triton_decode.INTERPRETED, "triton (a test dependency) must be importable, in interpreter mode"


@pytest.fixture(scope="session")
def default_config() -> EngineConfig:
    return load_config()


@pytest.fixture(scope="session")
def model_dir(default_config: EngineConfig) -> Path:
    """The safetensors copy of SmolLM2-135M-Instruct (converted from the GGUF on first use)."""
    return resolve_model_dir(default_config.model)[0]


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The default model's tokenizer, for tests that check token ids and texts against the server's."""
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def make_engine(default_config: EngineConfig) -> Callable[..., LLMEngine]:
    """Build an engine on a fresh copy of the real model, with some limits (and ``model`` settings) overridden."""

    def make(model: dict | None = None, **limits: int) -> LLMEngine:
        config = dataclasses.replace(
            default_config,
            model=dataclasses.replace(default_config.model, **(model or {})),
            limits=dataclasses.replace(default_config.limits, **limits),
        )
        return LLMEngine(config)

    return make


@pytest.fixture(scope="session")
def engine(make_engine: Callable[..., LLMEngine]) -> LLMEngine:
    """One shared engine with the default limits; tests must leave it with nothing running."""
    return make_engine()


class Oracle:
    """transformers + PEFT, one request at a time: the reference every engine output must equal."""

    def __init__(self, model_dir: Path) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        names = list(ADAPTERS)
        self.model = PeftModel.from_pretrained(base, str(ADAPTERS[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(str(ADAPTERS[name]), adapter_name=name)
        self.model.eval()
        self.cache: dict[tuple[str, tuple[int, ...], int], list[int]] = {}

    @torch.inference_mode()
    def greedy(self, endpoint: str, prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (endpoint, tuple(prompt), max_new_tokens)
        if key not in self.cache:
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
            self.cache[key] = self.generate(endpoint, prompt, **kwargs)
        return self.cache[key]

    @torch.inference_mode()
    def generate(self, endpoint: str, prompt: list[int], **kwargs) -> list[int]:
        """transformers' ``generate`` with the endpoint's adapter (none for the base): the new tokens."""
        ids = torch.tensor([prompt])
        if endpoint == "base":
            with self.model.disable_adapter():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=2, **kwargs)
        else:
            self.model.set_adapter(endpoint)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=2, **kwargs)
        return out[0, len(prompt) :].tolist()

    @torch.inference_mode()
    def margin(self, endpoint: str, tokens: list[int]) -> float:
        """Top-1 minus top-2 logit after ``tokens``: how close to a tie the next greedy choice is."""
        ids = torch.tensor([tokens])
        if endpoint == "base":
            with self.model.disable_adapter():
                logits = self.model(ids).logits[0, -1]
        else:
            self.model.set_adapter(endpoint)
            logits = self.model(ids).logits[0, -1]
        top = logits.topk(2).values
        return float(top[0] - top[1])


@pytest.fixture(scope="session")
def oracle(model_dir: Path) -> Oracle:
    return Oracle(model_dir)
