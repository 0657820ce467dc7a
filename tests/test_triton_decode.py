"""The CUDA paged decode kernel (loraplex/engine/kernels/cuda/triton_decode.py), run on the CPU by Triton's interpreter.

Against SDPA over each sequence's gathered context (the same reference as the CPU kernel's), in float32 and
float16, and inside the engine, eager and through the decode-graph forward, against the default engine's
greedy tokens (which test_oracle.py holds to transformers + PEFT). Speed is measured on a GPU by
benchmarks/gpu_check.py.
"""

from __future__ import annotations

import pytest
import torch
from paged_cases import scattered_case, sdpa_reference

from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.sequence import Request, SamplingParams
from loraplex.engine.kernels.cpu.norm import swap_rms_norms
from loraplex.engine.kernels.cuda import triton_decode
from loraplex.engine.kernels.cuda.triton_norm import TritonRMSNorm


@pytest.fixture
def interpreted(triton_interpreter):
    """The kernel as Triton's interpreter runs it, on CPU tensors."""
    return triton_decode.paged_decode_attention


def case(heads, kv_heads, dim, block_size, max_len, dtype, seed):
    torch.manual_seed(seed)
    lengths = [1, max_len, 2, block_size, block_size + 1, min(65, max_len), max_len // 2]
    return scattered_case(heads, kv_heads, dim, block_size, lengths, dtype, num_blocks=96)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size", "max_len"),
    [(9, 3, 64, 16, 130), (32, 8, 128, 16, 70), (8, 8, 32, 8, 100), (4, 1, 16, 4, 67)],
)
def test_kernel_matches_sdpa_in_float32(interpreted, heads, kv_heads, dim, block_size, max_len) -> None:
    cache, q, tables, lens = case(heads, kv_heads, dim, block_size, max_len, torch.float32, heads + dim)
    out = torch.full_like(q, float("nan"))
    scale = dim**-0.5
    interpreted(q, cache.key_cache[0], cache.value_cache[0], tables, lens, scale, out)
    torch.testing.assert_close(out.double(), sdpa_reference(q, cache, tables, lens, scale), rtol=1e-5, atol=1e-5)


def test_kernel_in_half_precision_is_within_rounding(interpreted) -> None:
    """The half-precision branch (the GPU's): products in the cache's dtype, probabilities rounded to it before
    the product with V, as in FlashAttention, so within rounding of the exact result, not equal to it. Run in
    float16: the interpreter stores bfloat16 as raw 16-bit integers and cannot multiply it, so bfloat16 itself
    is checked on the GPU (``self_check`` at engine start, and benchmarks/gpu_check.py's oracle stage)."""
    cache, q, tables, lens = case(32, 8, 128, 16, 150, torch.float16, 7)
    out = torch.zeros_like(q)
    interpreted(q, cache.key_cache[0], cache.value_cache[0], tables, lens, 128**-0.5, out)
    exact = sdpa_reference(q, cache, tables, lens, 128**-0.5)
    torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=1e-2)
    assert (out.double() - exact).abs().mean() < 2e-3


def test_kernel_reads_only_its_own_heads_rows_and_context(interpreted) -> None:
    """Writes exactly ``out``'s rows; K/V past a sequence's length (here NaN) never reach it."""
    cache, q, tables, lens = case(9, 3, 64, 16, 40, torch.float32, 3)
    for b, n in enumerate(lens.tolist()):  # poison every cached token past each sequence's context
        for pos in range(n, tables.shape[1] * 16):
            block = int(tables[b, pos // 16])
            if block not in tables[:b].flatten().tolist() + tables[b + 1 :].flatten().tolist():
                cache.key_cache[0][block, pos % 16] = float("nan")
                cache.value_cache[0][block, pos % 16] = float("nan")
    out = torch.full((len(lens) + 1, 9, 64), -7.0)
    interpreted(q, cache.key_cache[0], cache.value_cache[0], tables, lens, 0.125, out[:-1])
    assert torch.isfinite(out).all()
    assert (out[-1] == -7.0).all(), "the row after the batch is untouched"


def test_availability_needs_cuda_and_a_power_of_two_head() -> None:
    assert not triton_decode.available(torch.device("cpu"), 64)
    assert not triton_decode.available(torch.device("cuda"), 96)
    assert not triton_decode.available(torch.device("cuda"), 8)
    assert triton_decode.available(torch.device("cuda"), 128) == (triton_decode.triton is not None)


# Triton's interpreter runs each kernel call in Python: a few decode steps already cover every path.
NEW_TOKENS = 3


@pytest.mark.slow
def test_engine_tokens_through_the_kernel_equal_the_default_engines(interpreted, make_engine) -> None:
    """The kernel in the engine's decode path, eagerly and in the decode-graph forward (uncaptured on the CPU),
    with every RMSNorm through the Triton one too (engine/kernels/cuda/triton_norm.py), as the engine runs on CUDA:
    greedy tokens of a mixed-adapter batch equal the default engine's, token for token."""
    requests = [
        Request(f"r{i}", endpoint, prompt, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
        for i, (endpoint, prompt) in enumerate(
            [("base", [1, 2, 3]), ("chatbot", list(range(40, 75))), ("code", [9] * 20), ("summarization", [5, 6])]
        )
    ]

    def tokens(engine: LLMEngine) -> dict[str, list[int]]:
        out = engine.generate(requests)
        return {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in out.items()}

    calls = []

    def counted(*args) -> None:
        calls.append(args[0].shape[0])
        interpreted(*args)

    expected = tokens(make_engine(max_num_seqs=8))
    eager = make_engine({"cpu_kernels": False}, max_num_seqs=8)
    eager.runner.paged_decode = counted
    assert swap_rms_norms(eager.model, TritonRMSNorm) == 2 * eager.model.config.num_hidden_layers + 1
    assert tokens(eager) == expected
    layers = eager.model.config.num_hidden_layers
    steps = NEW_TOKENS - 1
    assert len(calls) >= steps * layers and max(calls) == 4, "every decode step of the batch went through the kernel"
    calls.clear()
    graphed = make_engine({"cpu_kernels": False}, max_num_seqs=8)
    graphed.runner.paged_decode = counted
    swap_rms_norms(graphed.model, TritonRMSNorm)
    graphed.runner.use_decode_graphs(8, 256, capture=False)
    assert tokens(graphed) == expected
    assert graphed.runner.graphs.replays >= steps and len(calls) >= steps * layers


def test_self_check_passes_the_kernel_and_catches_a_wrong_one(interpreted, monkeypatch) -> None:
    assert triton_decode.self_check(torch.device("cpu"), torch.float32, 9, 3, 64) is None
    monkeypatch.setattr(triton_decode, "paged_decode_attention", lambda q, k, v, t, n, s, out: out.zero_())
    assert "differs from SDPA" in triton_decode.self_check(torch.device("cpu"), torch.float32, 9, 3, 64)

    def broken(*args) -> None:
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(triton_decode, "paged_decode_attention", broken)
    assert (
        triton_decode.self_check(torch.device("cpu"), torch.float32, 9, 3, 64) == "RuntimeError: no kernel for this GPU"
    )
