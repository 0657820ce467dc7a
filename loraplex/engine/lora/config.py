"""Reading a LoRA adapter (a PEFT directory, or llama.cpp's GGUF file) and checking it against the base model,
in one place.

Everything the engine refuses is refused here, with the adapter, the field and the value in the message,
so a bad adapter fails when it is registered and never inside a forward pass.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from loraplex.engine.core.errors import AdapterError
from loraplex.engine.lora.gguf_adapter import is_gguf_file, read_gguf_adapter

# The projections a Llama-family decoder layer has, by PEFT's short names.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.*\.(?P<target>\w+_proj))\.lora_(?P<ab>[AB])(?:\.\w+)?\.weight$"
)


@dataclass
class LoRAAdapter:
    """One adapter's weights in PEFT's layout, validated, ready to be written into a slot."""

    name: str
    path: Path
    rank: int
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    target_modules: tuple[str, ...]  # short names, e.g. ("q_proj", "v_proj")
    lora_a: dict[str, torch.Tensor]  # module name -> [r, in_features]
    lora_b: dict[str, torch.Tensor]  # module name -> [out_features, r], unscaled

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.lora_a.values(), *self.lora_b.values()))


def _refuse(name: str, field: str, value: object, hint: str) -> AdapterError:
    return AdapterError(f"adapter {name!r}: {field} = {value!r} is not supported; {hint}")


def _read_config(name: str, path: Path) -> dict:
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterError(f"adapter {name!r}: {config_path} not found; give a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: cannot read {config_path}: {e}") from e
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {config_path} is not a JSON object")
    return config


def _check_config(name: str, config: dict, max_lora_rank: int) -> tuple[int, float]:
    """Refuse what the engine cannot serve; return (rank, scaling)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise _refuse(name, "peft_type", config.get("peft_type"), "only LORA adapters are served")
    if config.get("use_dora"):
        raise _refuse(name, "use_dora", True, "DoRA adapters cannot be batched unmerged; merge or retrain as LoRA")
    if config.get("modules_to_save"):
        raise _refuse(
            name, "modules_to_save", config["modules_to_save"], "fully trained modules would replace the shared base"
        )
    if config.get("bias", "none") != "none":
        raise _refuse(name, "bias", config["bias"], "train with bias='none'")
    for field in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        if config.get(field):
            raise _refuse(name, field, config[field], "use one rank and alpha for every module")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"adapter {name!r}: r = {rank!r}; a positive integer rank is required")
    if rank > max_lora_rank:
        raise AdapterError(f"adapter {name!r}: r = {rank} > max_lora_rank {max_lora_rank}; raise limits.max_lora_rank")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise AdapterError(f"adapter {name!r}: lora_alpha = {alpha!r}; a positive number is required")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(LORA_TARGETS))
        if unknown:
            raise _refuse(name, "target_modules", unknown, f"the base has only {', '.join(LORA_TARGETS)}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def _read_weights(name: str, path: Path) -> dict[str, torch.Tensor]:
    weights_path = path / "adapter_model.safetensors"
    if not weights_path.is_file():
        if (path / "adapter_model.bin").exists():
            raise AdapterError(
                f"adapter {name!r}: adapter_model.bin is a pickle file and is never loaded; "
                "save the adapter as safetensors (save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterError(f"adapter {name!r}: {weights_path} not found")
    try:
        # Read into memory, not load_file's mmap: a file truncated or rewritten after loading would otherwise
        # crash the process (SIGBUS) the next time the adapter is copied into a slot.
        return load(weights_path.read_bytes())
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: cannot read {weights_path}: {e}") from e


def load_adapter(
    name: str,
    path: str | Path,
    module_shapes: dict[str, tuple[int, int]],
    max_lora_rank: int,
    heads: tuple[int, int] | None = None,
) -> LoRAAdapter:
    """Read and validate a PEFT adapter directory or a GGUF LoRA file.

    Args:
        module_shapes: base module name (``model.layers.0.self_attn.q_proj``) -> (in_features, out_features).
        heads: the base's (attention heads, key-value heads); a GGUF adapter's Q and K rows need them.
    Raises:
        AdapterError: naming the adapter, the field and the value.
    """
    path = Path(path)
    if is_gguf_file(path):
        config, weights = read_gguf_adapter(name, path, heads)
    else:
        config, weights = _read_config(name, path), _read_weights(name, path)
    rank, scaling = _check_config(name, config, max_lora_rank)
    lora_a: dict[str, torch.Tensor] = {}
    lora_b: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"adapter {name!r}: weight {key!r} is not a LoRA A/B matrix of a projection")
        module, ab = match["module"], match["ab"]
        if module not in module_shapes:
            raise _refuse(name, "target module", module, "the base model has no such projection")
        in_features, out_features = module_shapes[module]
        expected = (rank, in_features) if ab == "A" else (out_features, rank)
        if tuple(tensor.shape) != expected:
            raise AdapterError(
                f"adapter {name!r}: {key} has shape {tuple(tensor.shape)}, the base needs {expected}; "
                "was it trained on another base model?"
            )
        (lora_a if ab == "A" else lora_b)[module] = tensor
    if not lora_a:
        raise AdapterError(f"adapter {name!r}: no LoRA weights found in {path}")
    if set(lora_a) != set(lora_b):
        raise AdapterError(f"adapter {name!r}: lora_A and lora_B cover different modules")
    targets = tuple(t for t in LORA_TARGETS if any(m.endswith("." + t) for m in lora_a))
    return LoRAAdapter(name, path, rank, scaling, targets, lora_a, lora_b)
