"""LoRA adapters in llama.cpp's GGUF format (what an Ollama Modelfile's ``ADAPTER`` line names), read into
PEFT's layout so they are validated and served exactly like an adapter directory.

llama.cpp's ``convert_lora_to_gguf.py`` writes ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha`` and, per projection, ``blk.N.<tensor>.weight.lora_a`` ([r, in]) and ``.lora_b``
([out, r]) in F32, F16, BF16 or Q8_0. Two things are this format's own and undone here by hand: the tensor
names (llama.cpp's, mapped back to the Llama module names) and the rows of the Q and K projections' ``lora_b``,
which the converter permutes the way it permutes the base's Q and K weights (each head's rotary halves
interleaved). Everything else, reading and dequantizing the tensors, is the ``gguf`` package's.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from loraplex.engine.core.errors import AdapterError

# GGUF tensor names of a Llama block -> the module under ``model.layers[i]`` (a GGUF base's too: kernels/cpu)
LLAMA_PROJECTIONS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_NAME = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<tensor>\w+)\.weight\.lora_(?P<ab>[ab])$")


def is_gguf_file(path: Path) -> bool:
    """A GGUF file by its magic bytes, not its name: Ollama keeps its files as ``blobs/sha256-<hex>``."""
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # a folder, or nothing there
        return False


def read_gguf_adapter(name: str, path: Path, heads: tuple[int, int] | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter's PEFT-style config (``r``, ``lora_alpha``) and weights under PEFT's key names.

    ``heads``: the base's (attention heads, key-value heads), which the Q and K permutation depends on.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: cannot read {path} as GGUF: {e}") from e
    kind = (_field(reader, "general.type"), _field(reader, "adapter.type"))
    if kind != ("adapter", "lora"):
        raise AdapterError(
            f"adapter {name!r}: {path.name} is a GGUF file of type {kind[0]!r}/{kind[1]!r}, not a LoRA adapter "
            "(general.type = adapter, adapter.type = lora, as llama.cpp's convert_lora_to_gguf.py writes)"
        )
    weights: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = _NAME.match(tensor.name)
        if match is None or match["tensor"] not in LLAMA_PROJECTIONS:
            raise AdapterError(f"adapter {name!r}: tensor {tensor.name!r} is not a LoRA A/B matrix of a projection")
        try:
            data = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise AdapterError(
                f"adapter {name!r}: {tensor.name} is {tensor.tensor_type.name}; use F32, F16, BF16 or Q8_0"
            ) from e
        data = np.asarray(data, dtype=np.float32).reshape(tensor.data.shape[0], -1)
        if match["ab"] == "b" and match["tensor"] in ("attn_q", "attn_k"):
            if heads is None:
                raise AdapterError(f"adapter {name!r}: the base's head counts are needed to read {tensor.name}")
            data = _unpermute(data, heads[0] if match["tensor"] == "attn_q" else heads[1])
        module = f"model.layers.{match['layer']}.{LLAMA_PROJECTIONS[match['tensor']]}"
        weights[f"base_model.model.{module}.lora_{match['ab'].upper()}.weight"] = torch.from_numpy(data.copy())
    ranks = {t.shape[0] for k, t in weights.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise AdapterError(f"adapter {name!r}: its modules have ranks {sorted(ranks)}; one rank is served")
    rank = ranks.pop()
    alpha = float(_field(reader, "adapter.lora.alpha") or 0)
    # llama.cpp scales by alpha / r, and by 1 when the file gives no alpha: that is alpha = r
    return {"r": rank, "lora_alpha": alpha if alpha > 0 else rank}, weights


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _unpermute(b: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of the converter's row permutation of a Q or K projection (llama.cpp's ``LlamaModel.permute``:
    per head, rows [h, 2, d/2] taken as [h, d/2, 2]). ``b`` is [out_features, r]."""
    rows = b.shape[0]
    return b.reshape(num_heads, rows // num_heads // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)
