"""The CUDA RMSNorm kernel (engine/kernels/cuda/triton_norm.py), run on the CPU by Triton's interpreter, against
transformers' ``LlamaRMSNorm``. Inside the engine it is checked in tests/test_triton_decode.py."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from loraplex.engine.kernels.cuda import triton_norm

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def llama_norm(width: int, dtype: torch.dtype, seed: int) -> LlamaRMSNorm:
    torch.manual_seed(seed)
    norm = LlamaRMSNorm(width, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    return norm


@pytest.mark.parametrize("width", [576, 100, 4096])
@pytest.mark.parametrize("rows", [1, 7])
def test_float32_equals_llama_rms_norm(width: int, rows: int) -> None:
    norm = llama_norm(width, torch.float32, width + rows)
    x = torch.randn(2, rows, width) * 4
    got = triton_norm.TritonRMSNorm(norm)(x)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, norm(x), rtol=1e-6, atol=1e-6)


def test_half_precision_rounds_where_transformers_does() -> None:
    """The scaled row is rounded to the input's dtype before the weight's product, as in transformers: results
    are within one rounding of ``LlamaRMSNorm``'s, and almost all equal to the bit."""
    norm = llama_norm(576, torch.float16, 3)
    x = (torch.randn(9, 576) * 4).half()
    got, expected = triton_norm.TritonRMSNorm(norm)(x), norm(x)
    assert got.dtype == expected.dtype == torch.float16
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    assert (got == expected).float().mean() > 0.95


def test_strided_rows_and_an_empty_batch() -> None:
    norm = llama_norm(100, torch.float32, 5)
    wide = torch.randn(6, 300)
    strided = wide[:, ::3]  # each row's elements 3 apart: the kernel gets a contiguous copy
    torch.testing.assert_close(triton_norm.TritonRMSNorm(norm)(strided), norm(strided), rtol=1e-6, atol=1e-6)
    assert triton_norm.TritonRMSNorm(norm)(torch.empty(0, 100)).shape == (0, 100)


def test_self_check_passes_the_kernel_and_catches_a_wrong_one(monkeypatch) -> None:
    assert triton_norm.self_check(torch.device("cpu"), torch.float32, 576) is None
    monkeypatch.setattr(triton_norm, "rms_norm", lambda x, weight, eps: x)
    assert "differs from LlamaRMSNorm" in triton_norm.self_check(torch.device("cpu"), torch.float32, 576)
