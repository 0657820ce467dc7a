"""Device kernels, and the one narrow interface the engine reaches them through.

``cpu/``: C++ kernels compiled on first start (float32 matmuls over packed or GGUF-block weights, RMSNorm, paged
decode attention, batched LoRA), with their Python faces. ``cuda/``: Triton kernels (paged decode attention,
RMSNorm). The engine calls ``prepare_weights`` once the LoRA layers are on, then ``attach_decode`` once its runner
exists; nothing else in ``core/`` imports from here. Modules here may import ``core.config``, ``lora``'s GGUF
name map and torch, never ``core``'s engine or scheduler.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from loraplex.engine.core.config import ModelConfig

log = logging.getLogger(__name__)


def prepare_weights(model: nn.Module, config: ModelConfig, cache: Path, gguf_path: Path | None) -> bool:
    """Put the model's weights and norms in the form this device's kernels read; True when the CPU kernels are
    loaded (the caller then routes decode attention and LoRA through them, in ``attach_decode``)."""
    from loraplex.engine.kernels.cpu import extension
    from loraplex.engine.kernels.cpu.linear import pack_for_cpu, uses_packed_weights
    from loraplex.engine.kernels.cpu.norm import swap_rms_norms

    kernels = extension.wanted(config) and extension.load(cache)
    if uses_packed_weights(config):
        # after LoRA attaches (its base layers get packed too), before any forward: the projections and LM head in
        # the kernels' layouts (or oneDNN's), a GGUF base's from the file's own blocks where they reproduce the
        # weights exactly (cpu/gguf_weights.py)
        q4 = q8 = None
        if kernels and config.gguf_weights and gguf_path is not None:
            from loraplex.engine.kernels.cpu.gguf_weights import read_gguf_weights

            q4, q8 = read_gguf_weights(gguf_path, model)
        pack_for_cpu(model, panels=kernels, q4=q4, q8_embeddings=q8)
    if kernels:
        swap_rms_norms(model)
    return kernels


def attach_decode(runner, lora, model: nn.Module, config: ModelConfig, cpu_kernels: bool, head_dim: int) -> None:
    """Route the runner's decode attention (and on CUDA the norms) through this device's kernels: the CPU
    kernels when loaded, else on CUDA the Triton kernels, each after a check against torch on this device; a kernel
    that fails its check is left out with a warning (torch's ops serve instead)."""
    if cpu_kernels:
        runner.paged_decode = torch.ops.loraplex.paged_decode_attention
        lora.batch.decode_kernel = True
        return
    from loraplex.engine.kernels.cuda import triton_decode

    if not (config.triton_kernels and triton_decode.available(runner.device, head_dim)):
        return
    from loraplex.engine.kernels.cpu.norm import swap_rms_norms
    from loraplex.engine.kernels.cuda import triton_norm

    dtype = getattr(torch, config.dtype)
    text_config = model.config.get_text_config()
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    failed = triton_decode.self_check(runner.device, dtype, heads, kv_heads, head_dim)
    if failed is None:
        runner.paged_decode = triton_decode.paged_decode_attention
    else:
        log.warning("the Triton paged decode kernel failed its check (%s); decodes use SDPA", failed)
    failed = triton_norm.self_check(runner.device, dtype, text_config.hidden_size)
    if failed is None:
        swap_rms_norms(model, triton_norm.TritonRMSNorm)
    else:
        log.warning("the Triton RMSNorm kernel failed its check (%s); norms use torch's ops", failed)


def build(config: ModelConfig, cache: Path) -> bool | None:
    """Compile this device's kernels now instead of on the first start: the CPU ones when the model would use
    them (True once loaded, False if they cannot be built); None where there is nothing to build ahead (Triton
    compiles its kernels on first use)."""
    from loraplex.engine.kernels.cpu import extension

    return extension.load(cache) if extension.wanted(config) else None
