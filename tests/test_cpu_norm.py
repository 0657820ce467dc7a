"""engine/kernels/cpu/norm.py: the RMSNorm kernel against transformers' ``LlamaRMSNorm``, and the swap in a model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from loraplex.engine.kernels.cpu import extension as cpu_kernels
from loraplex.engine.kernels.cpu.norm import KernelRMSNorm, swap_rms_norms


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> None:
    assert cpu_kernels.load(tmp_path_factory.mktemp("cache")), "the CPU kernels did not build"


@pytest.mark.parametrize("shape", [(1, 576), (48, 576), (2, 300, 576), (5, 37), (0, 64)])
def test_kernel_rms_norm_equals_llama_rms_norm(kernels, shape: tuple[int, ...]) -> None:
    torch.manual_seed(shape[-1] + shape[0])
    norm = LlamaRMSNorm(shape[-1], eps=1e-5)
    norm.weight.data.uniform_(0.5, 2.0)
    x = torch.randn(shape) * 3
    out = KernelRMSNorm(norm)(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, norm(x), rtol=1e-5, atol=1e-5)


def test_kernel_rms_norm_row_does_not_depend_on_its_batch_companions(kernels) -> None:
    norm = KernelRMSNorm(LlamaRMSNorm(576))
    x = torch.randn(600, 576)  # enough rows for several threads
    together = norm(x)
    for rows in (1, 3, 48):
        assert torch.equal(norm(x[:rows]), together[:rows])
    assert torch.equal(norm(x[500:501]), together[500:501])


def test_kernel_rms_norm_refuses_a_mismatched_weight(kernels) -> None:
    with pytest.raises(RuntimeError, match="as long as x's last dimension"):
        torch.ops.loraplex.rms_norm(torch.randn(2, 64), torch.ones(32), 1e-6)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.loraplex.rms_norm(torch.randn(2, 64, dtype=torch.float64), torch.ones(64), 1e-6)


def test_swap_rms_norms_keeps_logits(kernels) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    for module in model.modules():
        if isinstance(module, LlamaRMSNorm):
            module.weight.data.uniform_(0.5, 2.0)
    ids = torch.randint(0, 300, (2, 9))
    with torch.inference_mode():
        expected = model(ids).logits
    assert swap_rms_norms(model) == 2 * 2 + 1  # two per layer and the final norm
    assert not any(type(m) is LlamaRMSNorm for m in model.modules())
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
