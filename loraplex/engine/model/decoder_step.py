"""One forward pass of a Llama decoder with the CPU kernels: transformers' arithmetic, with fewer calls.

transformers' ``LlamaModel`` runs each layer through a dozen module calls, keyword plumbing and its attention
interface, and each of the seven projections is a kernel call of its own. At a few rows per step on the CPU
that overhead, not the arithmetic, is much of a decode step. Here the layer's q/k/v projections are one
kernel call and gate/up another (``FusedPanels``: each output column the same sum as in its own projection, to
the bit), each adapter's delta is added to its own columns (``MultiLoRALinear.add_delta``), and everything else
calls the same modules and functions transformers' forward calls, in the same order, so the hidden states are
the same bits and the oracle holds unchanged.

Used only where it is exact by construction: every layer a transformers ``LlamaDecoderLayer`` (Llama, SmolLM,
Llama 3.x) whose projections are the CPU kernels' panels (the engine builds it once the kernels are attached);
any other model keeps transformers' forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb

from loraplex.engine.kernels.cpu.linear import FusedPanels
from loraplex.engine.lora.layers import MultiLoRALinear
from loraplex.engine.model.attention import AttentionMetadata, paged_attention_forward


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, MultiLoRALinear) else module


@dataclass
class _Projections:
    """Projections of one input run as one kernel call; each part's adapter delta goes to its own columns."""

    fused: FusedPanels
    parts: list[nn.Module]  # the layer's modules, MultiLoRALinear where adapters attach

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:  # x [1, T, in] -> one [T, out_i] per part
        flat = x.reshape(-1, self.fused.in_features)
        out = self.fused(flat)
        columns = out.split(self.fused.splits, dim=1)
        for part, column in zip(self.parts, columns, strict=True):
            if isinstance(part, MultiLoRALinear):
                part.add_delta(flat, column)
        return columns

    @classmethod
    def build(cls, parts: list[nn.Module]) -> _Projections | None:
        bases = [_base(p) for p in parts]
        return cls(FusedPanels(bases), parts) if FusedPanels.can_fuse(bases) else None


@dataclass
class _Layer:
    layer: LlamaDecoderLayer
    qkv: _Projections
    gate_up: _Projections


class LlamaDecoderStep:
    """Runs ``decoder`` (a transformers ``LlamaModel``) for one flattened step; returns the last hidden states."""

    def __init__(self, decoder: nn.Module, layers: list[_Layer]) -> None:
        self.decoder = decoder
        self.layers = layers

    @classmethod
    def build(cls, decoder: nn.Module) -> LlamaDecoderStep | None:
        """The step for this decoder, or None where it would not be exact (another architecture or kernels)."""
        layers = list(getattr(decoder, "layers", []))
        if not layers or not all(type(layer) is LlamaDecoderLayer for layer in layers):
            return None
        built = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _Projections.build([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up = _Projections.build([mlp.gate_proj, mlp.up_proj])
            if qkv is None or gate_up is None:
                return None
            built.append(_Layer(layer, qkv, gate_up))
        return cls(decoder, built)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        decoder = self.decoder
        hidden = decoder.embed_tokens(input_ids[None])  # [1, T, hidden]
        cos, sin = decoder.rotary_emb(hidden, position_ids=positions[None])
        tokens = hidden.shape[1]
        for parts in self.layers:
            layer, attn, mlp = parts.layer, parts.layer.self_attn, parts.layer.mlp
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            shape = (1, tokens, -1, attn.head_dim)
            q, k, v = (column.view(shape).transpose(1, 2) for column in parts.qkv(hidden))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            attended, _ = paged_attention_forward(attn, q, k, v, None, scaling=attn.scaling, attn_metadata=meta)
            hidden = residual + attn.o_proj(attended.reshape(1, tokens, -1))
            residual = hidden
            hidden = layer.post_attention_layernorm(hidden)
            gate, up = parts.gate_up(hidden)
            hidden = residual + mlp.down_proj((mlp.act_fn(gate) * up)[None])
        return decoder.norm(hidden)[0]
