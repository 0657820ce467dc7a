"""The base's weights kept in the GGUF file's own blocks, for the CPU kernels: projections, tied embeddings.

The default model ships as a Q4_1 GGUF file: every projection weight is stored as blocks of 32 four-bit codes
with one float16 scale and one float16 minimum, ``w = scale * code + minimum``. transformers dequantizes it to
float32 (32 bits a weight) and the engine computes on that; the blocks say the same in 6 bits a weight once
packed here (codes, plus the scale and minimum in float32 per 32). ``loraplex::panel_linear_q4``
(csrc/panel_linear.cpp) rebuilds each 256-deep slice of a panel in float32 in L1 and runs the float32
panel kernel over it, so its outputs equal the float32 panels' to the bit: the oracle and every greedy token
are unchanged, while the weights take a fifth of the memory and a decode step reads a fifth of the bytes.

``scale * code`` is exact in float32 (an 11-bit half times a 4-bit integer), so the one rounding of the sum is
the same whether computed as gguf's numpy does or as a fused multiply-add. Q4_0 (``scale * (code - 8)``) is
the same form with ``minimum = -8 * scale``, also exact. Nothing is taken on trust: each projection is used in
this form only when its blocks, dequantized, equal the float32 weight the model loaded, value for value (the
rows of q and k are found by matching, since transformers undoes llama.cpp's rotary permutation of them).
Other GGUF types, and any projection that does not match, stay float32 panels.

The token embeddings, when the LM head is tied to them and the file holds them as Q8_0 (``w = scale * code``,
32 signed 8-bit codes a float16 scale, exact in float32 likewise), are kept the same way: the embedding looks
up and rebuilds its rows, and ``loraplex::row_major_linear_q8`` gives the LM head's float32 logits to the bit.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loraplex.engine.lora.gguf_adapter import LLAMA_PROJECTIONS

log = logging.getLogger(__name__)

BLOCK = 32  # weights per GGUF block (Q4_0, Q4_1, Q8_0)
PANEL = 16  # output columns per panel of the CPU kernel
_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@dataclass
class Q4Panels:
    """One projection for ``panel_linear_q4``: ``codes`` [panels, in/2, 16] uint8 (byte (p, j, c) holds column
    16p + c's codes for k = 2j in its low nibble and 2j + 1 in its high one), ``scales`` and ``minimums``
    [panels, in/32, 16] float32. Columns past ``out_features`` are zero."""

    codes: torch.Tensor
    scales: torch.Tensor
    minimums: torch.Tensor
    out_features: int
    in_features: int


def _half_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte ``offset`` of every block [..., bytes], as float32 (exact)."""
    return blocks[..., offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _unpack_blocks(raw: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0 / Q4_1 tensor's rows of blocks -> codes [N, K] uint8, scales and minimums [N, K/32] float32."""
    rows = raw.shape[0]
    size = 18 if kind == "Q4_0" else 20
    blocks = raw.reshape(rows, -1, size)
    scales = _half_at(blocks, 0)
    if kind == "Q4_0":
        minimums = np.float32(-8) * scales
        packed = blocks[..., 2:18]
    else:
        minimums = _half_at(blocks, 2)
        packed = blocks[..., 4:20]
    # the first 16 weights of a block are the low nibbles of its 16 bytes, the next 16 the high ones
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)
    return codes, scales, minimums


def _dequantize(codes: np.ndarray, scales: np.ndarray, minimums: np.ndarray) -> np.ndarray:
    rows, depth = codes.shape
    grouped = codes.reshape(rows, depth // BLOCK, BLOCK).astype(np.float32)
    return (scales[..., None] * grouped + minimums[..., None]).reshape(rows, depth)


def _row_order(values: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """Indices such that ``values[order] == weight`` row for row, or None when some row has no equal."""
    if values.shape != weight.shape:
        return None
    if np.array_equal(values, weight):
        return np.arange(len(weight))
    index = {row.tobytes(): i for i, row in enumerate(values)}
    order = [index.get(row.tobytes()) for row in weight]
    if any(i is None for i in order):
        return None
    return np.asarray(order)


def to_panels(codes: np.ndarray, scales: np.ndarray, minimums: np.ndarray) -> Q4Panels:
    """Codes [N, K] uint8 (0..15), scales and minimums [N, K/32] float32 -> the kernel's panels."""
    out_features, in_features = codes.shape
    panels = -(-out_features // PANEL)
    pad = panels * PANEL - out_features

    def by_panel(a: np.ndarray) -> np.ndarray:  # [N, X] -> [panels, X, 16], zero columns past N
        a = np.pad(a, ((0, pad), (0, 0)))
        return np.ascontiguousarray(a.reshape(panels, PANEL, -1).transpose(0, 2, 1))

    by_k = by_panel(codes)
    packed = by_k[:, 0::2, :] | (by_k[:, 1::2, :] << 4)
    return Q4Panels(
        codes=torch.from_numpy(np.ascontiguousarray(packed)),
        scales=torch.from_numpy(by_panel(scales)),
        minimums=torch.from_numpy(by_panel(minimums)),
        out_features=out_features,
        in_features=in_features,
    )


@dataclass
class Q8Rows:
    """A tied embedding / LM head weight in Q8_0 blocks: ``codes`` [rows, features] int8, ``scales``
    [rows, features/32] float32."""

    codes: torch.Tensor
    scales: torch.Tensor

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 rows (all, or those indexed by ``rows``): ``scale * code``, exact."""
        codes = self.codes if rows is None else self.codes[rows]
        scales = self.scales if rows is None else self.scales[rows]
        grouped = codes.unflatten(-1, (-1, BLOCK)).float() * scales.unsqueeze(-1)
        return grouped.flatten(-2)


def unpack_q8_blocks(raw: np.ndarray) -> Q8Rows:
    """A Q8_0 tensor's rows of blocks (a float16 scale, then 32 int8 codes) -> ``Q8Rows``."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 34)
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, -1)
    return Q8Rows(codes=torch.from_numpy(codes), scales=torch.from_numpy(_half_at(blocks, 0)))


def read_gguf_weights(gguf_path: Path, model: nn.Module) -> tuple[dict[nn.Module, Q4Panels], Q8Rows | None]:
    """What of ``model`` (loaded from ``gguf_path``) can stay in the file's blocks: projections, embeddings."""
    stat = gguf_path.stat()
    tensors = _gguf_tensors(str(gguf_path), stat.st_size, stat.st_mtime_ns)
    return read_q4_projections(tensors, model), read_q8_tied_embeddings(tensors, model)


@functools.lru_cache(maxsize=2)
def _gguf_tensors(path: str, size: int, mtime_ns: int) -> list:
    """A GGUF file's tensors, their data read-only views of the mapped file. Kept per process, keyed by the file's
    size and time too: reading the header parses the whole vocabulary (about 5 s of an engine's 7 s start for the
    default model), and tests and benchmarks build many engines on one file."""
    from gguf import GGUFReader

    return GGUFReader(path).tensors


def read_q8_tied_embeddings(tensors: list, model: nn.Module) -> Q8Rows | None:
    """The token embeddings as Q8_0 blocks, when the LM head is tied to them and the blocks reproduce them
    exactly; else None (they stay float32). ``tensors``: a ``GGUFReader``'s."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight = embeddings.weight.detach()
    if head is None or getattr(head, "weight", None) is not embeddings.weight:
        return None
    tensor = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if tensor is None or tensor.tensor_type.name != "Q8_0" or weight.dtype != torch.float32:
        return None
    rows = unpack_q8_blocks(np.asarray(tensor.data))
    if rows.codes.shape != weight.shape or not torch.equal(rows.dequantize(), weight):
        log.info("GGUF token embeddings kept in float32: their Q8_0 blocks are not equal to the loaded weight")
        return None
    log.info("token embeddings and the tied LM head kept in the GGUF file's 8-bit blocks")
    return rows


def read_q4_projections(tensors: list, model: nn.Module) -> dict[nn.Module, Q4Panels]:
    """Each Llama projection whose GGUF blocks reproduce its loaded float32 weight exactly -> its 4-bit panels.

    Keyed by the ``nn.Linear`` module itself, so the panels find it again after LoRA layers wrap it.
    ``tensors``: a ``GGUFReader``'s.
    """
    layers = model.get_decoder().layers
    found: dict[nn.Module, Q4Panels] = {}
    skipped: dict[str, int] = {}
    for tensor in tensors:
        match = _NAME.fullmatch(tensor.name)
        if match is None or match.group(2) not in LLAMA_PROJECTIONS:
            continue
        kind = tensor.tensor_type.name
        linear = layers[int(match.group(1))].get_submodule(LLAMA_PROJECTIONS[match.group(2)])
        linear = getattr(linear, "base_layer", linear)  # under a multi-LoRA layer
        weight = linear.weight.detach()
        why = None
        if kind not in ("Q4_0", "Q4_1"):
            why = kind
        elif weight.dtype != torch.float32 or weight.device.type != "cpu":
            why = f"{weight.dtype} on {weight.device}"
        else:
            codes, scales, minimums = _unpack_blocks(np.asarray(tensor.data), kind)
            order = _row_order(_dequantize(codes, scales, minimums), weight.numpy())
            if order is None:
                why = f"{kind} blocks not equal to the loaded weight"
        if why is not None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        found[linear] = to_panels(codes[order], scales[order], minimums[order])
    if skipped:
        log.info("GGUF projections kept in float32: %s", ", ".join(f"{n} {why}" for why, n in skipped.items()))
    log.info("%d projections kept in the GGUF file's 4-bit blocks", len(found))
    return found
