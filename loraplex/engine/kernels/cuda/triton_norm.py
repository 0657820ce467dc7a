"""Llama's RMSNorm on CUDA as one Triton kernel, in place of transformers' chain of small ops.

Why: in bfloat16 ``LlamaRMSNorm`` is eight kernels (an upcast, a square, a mean, the epsilon, an rsqrt, a
product, a downcast and the weight's product), and a 64-sequence decode step at the 8B shape runs 65 norms:
in the H200 profile their mean reductions alone took 0.58 ms of the step's 15.8 ms of GPU time
(benchmarks/results/gpu_h200/gpu_check.json; the elementwise kernels are not split by caller there). One
kernel reads each row once and writes it once.

Same arithmetic as transformers: the mean of squares and the scaling in float32, the scaled row rounded to the
input's dtype, then multiplied by the weight and rounded again (torch's half-precision product). The reduction
order and the rsqrt may differ in the last bit, so half-precision results are within one rounding of
transformers' (tests/test_triton_norm.py: float32 to 1e-6, float16 95% or more equal to the bit). Checked
against ``LlamaRMSNorm`` at engine start (``self_check``), like the decode kernel.
"""

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from loraplex.engine.kernels.cpu.norm import KernelRMSNorm
from loraplex.engine.kernels.cuda.triton_decode import tl, triton

# No ``from __future__ import annotations``: Triton reads the constexpr annotations as objects.
if tl is not None:

    @triton.jit
    def _rms_norm(x_ptr, weight_ptr, out_ptr, stride_x, stride_out, width, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        columns = tl.arange(0, BLOCK)
        inside = columns < width
        x = tl.load(x_ptr + row * stride_x + columns, mask=inside, other=0.0).to(tl.float32)
        inverse_rms = tl.rsqrt(tl.sum(x * x, 0) / width + eps)
        scaled = (x * inverse_rms).to(x_ptr.dtype.element_ty)
        weight = tl.load(weight_ptr + columns, mask=inside, other=0.0)
        out = (weight.to(tl.float32) * scaled.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_out + columns, out, mask=inside)


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm(hidden_states)`` with ``weight`` and ``eps``, one program per row."""
    width = hidden_states.shape[-1]
    rows = hidden_states.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, hidden_states.dtype), device=rows.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(width)
        _rms_norm[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), width, eps, BLOCK=block)
    return out.view(*hidden_states.shape[:-1], width)


class TritonRMSNorm(KernelRMSNorm):
    """``LlamaRMSNorm`` through the Triton kernel; shares the original weight."""

    kernel_name = "triton"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def self_check(device: torch.device, dtype: torch.dtype, width: int) -> str | None:
    """The kernel against ``LlamaRMSNorm`` on random rows; None when they agree, else why not."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        reference = LlamaRMSNorm(width, eps=1e-5).to(device=device, dtype=dtype)
        with torch.no_grad():
            reference.weight.normal_(1.0, 0.1, generator=gen)
            x = (torch.randn(5, width, generator=gen, device=device) * 3).to(dtype)
            expected, got = reference(x).float(), TritonRMSNorm(reference)(x).float()
        error = ((got - expected).abs() / expected.abs().clamp_min(1e-3)).max().item()
        if not error < (1e-5 if dtype == torch.float32 else 2e-2):
            return f"differs from LlamaRMSNorm by a relative {error:.3g}"
    except Exception as e:  # any failure to build or run it means: do not use it
        return f"{type(e).__name__}: {e}"
    return None
