"""The GPU check's op stages: the batched LoRA op and the decode attention call at the 8B shapes."""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from benchmarks.gpu.common import ADAPTERS, Budget, Plan, log, relative_error, time_op
from loraplex.engine.kernels.cuda import triton_decode
from loraplex.engine.kernels.cuda.triton_norm import TritonRMSNorm
from loraplex.engine.lora.ops import column_mask, lora_grouped, lora_masked_dense, lora_reference

# ---- stage: lora_op ----------------------------------------------------------------------------------------------


def lora_gathered(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [S, r, in]
    lora_b: torch.Tensor,  # [S, out, r]
    token_lora_indices: torch.Tensor,  # [T]
) -> torch.Tensor:  # [T, out]
    """BGMV in plain torch: gather each token's A and B, two batched mat-vecs (candidate, not served)."""
    shrunk = torch.bmm(lora_a[token_lora_indices], x[:, :, None])  # [T, r, 1]
    return torch.bmm(lora_b[token_lora_indices], shrunk)[:, :, 0]


def reference_fp32(x, lora_a, lora_b, indices) -> torch.Tensor:
    """``lora_reference``'s loop in float32, one slot at a time (checked against the literal loop on small inputs)."""
    x, y = x.float(), torch.zeros(x.shape[0], lora_b.shape[1], device=x.device)
    for slot in range(1, lora_a.shape[0]):
        rows = (indices == slot).float()[:, None]
        y += rows * ((x @ lora_a[slot].float().T) @ lora_b[slot].float().T)
    return y


def stage_lora_op(plan: Plan, device: torch.device, dtype: torch.dtype, budget: Budget, args) -> dict:
    rank, num_slots = 16, len(ADAPTERS)
    gen = torch.Generator(device=device).manual_seed(0)
    cases = []
    popularity = {
        "mixed_base_and_3": lambda t: torch.arange(t) % (num_slots + 1),
        "one_adapter": lambda t: torch.ones(t),
    }
    for module, (fan_in, fan_out) in plan.shape.projection_shapes.items():
        weight = torch.randn(fan_out, fan_in, generator=gen, device=device, dtype=dtype) / fan_in**0.5
        lora_a = torch.randn(num_slots + 1, rank, fan_in, generator=gen, device=device, dtype=dtype) / fan_in**0.5
        lora_b = torch.randn(num_slots + 1, fan_out, rank, generator=gen, device=device, dtype=dtype) * 0.02
        lora_a[0].zero_()
        lora_b[0].zero_()
        a_packed = lora_a[1:].reshape(-1, fan_in).contiguous()
        b_packed_t = lora_b[1:].transpose(1, 2).reshape(-1, fan_out).contiguous()
        for tokens in plan.lora_tokens:
            x = torch.randn(tokens, fan_in, generator=gen, device=device, dtype=dtype)
            for pop_name, pop in popularity.items():
                indices = pop(tokens).long().to(device)
                present = sorted(set(indices.tolist()) - {0})
                mask = column_mask(indices, num_slots, rank, dtype)
                ref = reference_fp32(x, lora_a, lora_b, indices)
                impls = {
                    "masked_dense": partial(lora_masked_dense, x, a_packed, b_packed_t, mask),
                    "grouped": partial(lora_grouped, x, lora_a, lora_b, indices, present),
                    "gathered": partial(lora_gathered, x, lora_a, lora_b, indices),
                }
                row = {"module": module, "shape": [fan_in, fan_out], "tokens": tokens, "popularity": pop_name}
                row["base_matmul_ms"] = round(time_op(partial(torch.matmul, x, weight.T), device, *plan.timing), 4)
                for name, fn in impls.items():
                    row[f"{name}_rel_err"] = relative_error(fn(), ref)
                    row[f"{name}_ms"] = round(time_op(fn, device, *plan.timing), 4)
                    row[f"{name}_overhead"] = round(row[f"{name}_ms"] / row["base_matmul_ms"], 4)
                if tokens <= 128:
                    loop = lora_reference(x.float(), lora_a.float(), lora_b.float(), indices)
                    row["fp32_reference_vs_loop_rel_err"] = relative_error(ref, loop)
                cases.append(row)
        if budget.left < 0:
            log(f"lora_op: over budget after {module}; the remaining modules are skipped")
            break
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    worst = {name: max(c[f"{name}_rel_err"] for c in cases) for name in ("masked_dense", "grouped", "gathered")}
    per_step = {}
    for tokens in plan.lora_tokens:
        mixed = [c for c in cases if c["tokens"] == tokens and c["popularity"] == "mixed_base_and_3"]
        per_step[str(tokens)] = {
            f"{name}_ms_all_layers": round(sum(c[f"{name}_ms"] for c in mixed) * plan.shape.num_layers, 3)
            for name in ("base_matmul", "masked_dense", "grouped", "gathered")
        }
    fastest = {}
    for tokens, sums in per_step.items():
        fastest[tokens] = min(("masked_dense", "grouped", "gathered"), key=lambda n: sums[f"{n}_ms_all_layers"])
    return {
        "rank": rank,
        "adapters": num_slots,
        "relative_error_tolerance": tolerance,
        "worst_relative_error": worst,
        "passed": all(v <= tolerance for v in worst.values()),
        "per_step_estimate": per_step,
        "per_step_note": "sum over the seven projections of one layer, times the layer count (no attention, norms)",
        "fastest_by_tokens": fastest,
        "cases": cases,
    }


# ---- stage: attention --------------------------------------------------------------------------------------------


def stage_attention(plan: Plan, device: torch.device, dtype: torch.dtype, budget: Budget, args) -> dict:
    """The decode attention call as engine/model/attention.py makes it, and the alternatives, at the model's shapes."""
    shape, batch, context, block_size = plan.shape, plan.attention_batch, plan.attention_context, 16
    heads, kv_heads, head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq + 1
    gen = torch.Generator(device=device).manual_seed(0)
    cache_k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen, device=device, dtype=dtype)
    cache_v = torch.randn_like(cache_k)
    tables = torch.randperm(num_blocks - 1, generator=gen, device=device)[: batch * blocks_per_seq] + 1
    tables = tables.view(batch, blocks_per_seq)
    lengths = torch.randint(context // 2, context + 1, (batch,), generator=gen, device=device)
    mask = (torch.arange(blocks_per_seq * block_size, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    q = torch.randn(batch, heads, 1, head_dim, generator=gen, device=device, dtype=dtype)

    def gather() -> tuple[torch.Tensor, torch.Tensor]:
        kv_shape = (batch, blocks_per_seq * block_size, kv_heads, head_dim)
        return cache_k[tables].view(kv_shape).transpose(1, 2), cache_v[tables].view(kv_shape).transpose(1, 2)

    k, v = gather()
    ref = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True
    )  # [B, H, 1, D]

    def gqa_mask() -> torch.Tensor:  # what loraplex/engine/model/attention.py calls today
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def gqa_as_rows() -> torch.Tensor:  # one query per sequence: the group's heads become query rows
        rows = q.view(batch, kv_heads, heads // kv_heads, head_dim)
        return F.scaled_dot_product_attention(rows, k, v, attn_mask=mask).view(batch, heads, 1, head_dim)

    result: dict = {
        "batch": batch,
        "context_max": context,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "gather_ms": round(time_op(gather, device, *plan.timing), 4),
        "kv_bytes_per_layer_mb": round(2 * int(lengths.sum()) * kv_heads * head_dim * dtype.itemsize / 1e6, 2),
    }
    variants: dict[str, dict] = {}
    backends: list[tuple[str, object]] = [("default", None)]
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        backends += [
            (b.name.lower(), b)
            for b in (
                SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.CUDNN_ATTENTION,
                SDPBackend.MATH,
            )
        ]
    for label, fn in (("gqa_mask", gqa_mask), ("gqa_as_rows", gqa_as_rows)):
        for backend_name, backend in backends:
            key = f"{label}/{backend_name}"
            try:
                ctx = contextlib.nullcontext()
                if backend is not None:
                    from torch.nn.attention import sdpa_kernel

                    ctx = sdpa_kernel([backend])
                with ctx:
                    out = fn()
                    variants[key] = {
                        "ms": round(time_op(fn, device, *plan.timing), 4),
                        "rel_err": relative_error(out, ref),
                    }
            except RuntimeError as e:
                variants[key] = {"error": str(e).splitlines()[0][:200]}
    # The engine's CUDA kernel, reading the cache in place; on the CPU in float32 when Triton's interpreter is on
    # (the tests), so this code is run before a GPU run depends on it.
    interpreted = device.type == "cpu" and dtype == torch.float32 and triton_decode.INTERPRETED
    run_triton = triton_decode.available(device, head_dim) or interpreted
    if run_triton:
        flat_q, out = q.view(batch, heads, head_dim), torch.empty(batch, heads, head_dim, device=device, dtype=dtype)

        def paged_triton() -> torch.Tensor:
            triton_decode.paged_decode_attention(flat_q, cache_k, cache_v, tables, lengths, head_dim**-0.5, out)
            return out.view(batch, heads, 1, head_dim)

        try:
            got = paged_triton()
            variants["paged_triton"] = {
                "ms": round(time_op(paged_triton, device, *plan.timing), 4),
                "rel_err": relative_error(got, ref),
            }
        except Exception as e:  # the SDPA variants still tell their story
            variants["paged_triton"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    result["variants"] = variants
    if run_triton:
        # RMSNorm on one decode step's rows: transformers' ops against the engine's Triton kernel
        norm = LlamaRMSNorm(shape.hidden_size).to(device=device, dtype=dtype)
        rows = torch.randn(batch, shape.hidden_size, generator=gen, device=device, dtype=dtype)
        fused = TritonRMSNorm(norm)
        try:
            result["rms_norm"] = {
                "rows": batch,
                "torch_ms": round(time_op(lambda: norm(rows), device, *plan.timing), 4),
                "triton_ms": round(time_op(lambda: fused(rows), device, *plan.timing), 4),
                "rel_err": relative_error(fused(rows), norm(rows)),
            }
        except Exception as e:  # the attention numbers still stand
            result["rms_norm"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    working = {k: v["ms"] for k, v in variants.items() if "ms" in v and v["rel_err"] < 2e-2}
    result["fastest"] = min(working, key=working.get) if working else None
    result["note"] = (
        "per layer and decode step: gather_ms copies the sequences' blocks out of the paged cache; the SDPA "
        "variants then read that copy. paged_triton (engine/kernels/cuda/triton_decode.py, the engine's "
        "default on CUDA) reads "
        "the cache in place, so its time is the whole cost, with no gather on top."
    )
    return result
