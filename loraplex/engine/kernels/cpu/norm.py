"""Llama's RMSNorm through the ``loraplex::rms_norm`` CPU kernel (float32 on the CPU, with the kernels loaded).

transformers' ``LlamaRMSNorm`` is six torch ops per call and a decode step of the default model makes 61
calls; at a few rows each op's dispatch and thread wake-up cost more than its arithmetic (about 15 ms of a
48-sequence step, 5 ms of a two-sequence step, in a one-off torch-profiler pass). Only that exact class is swapped:
other architectures' norms differ (Gemma's scales by ``1 + weight``) and keep their own code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm


class KernelRMSNorm(nn.Module):
    """``LlamaRMSNorm`` computed in one pass per row; shares the original weight."""

    def __init__(self, norm: LlamaRMSNorm) -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.loraplex.rms_norm(hidden_states.contiguous(), self.weight, self.variance_epsilon)

    kernel_name = "loraplex"

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, kernel={self.kernel_name}"


def swap_rms_norms(model: nn.Module, replacement: Callable[[LlamaRMSNorm], nn.Module] = KernelRMSNorm) -> int:
    """Replace every ``LlamaRMSNorm`` in ``model`` with ``replacement(norm)`` (this CPU kernel's module, or the
    Triton one of kernels/cuda/triton_norm.py on CUDA); returns how many were swapped."""
    found = [(name, module) for name, module in model.named_modules() if type(module) is LlamaRMSNorm]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement(module))
    return len(found)
