"""The GPU check's throughput stage: base, one adapter, three adapters mixed and PEFT at the 8B shape."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import random
import statistics
import time
import traceback
from collections.abc import Callable

import torch

from benchmarks.gpu.common import ADAPTERS, GB, SOURCE_MODULES, Budget, Plan, log, memory_gb, reset_peak, synchronize
from benchmarks.gpu.llama3_8b import (
    load_llama3_tokenizer,
    load_random_llama3,
    make_random_adapters,
    model_bytes,
)
from benchmarks.gpu.oracle import peft_model
from loraplex.engine.core.config import EndpointConfig, EngineConfig, LimitsConfig, ModelConfig
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.sequence import FinishReason, Request, SamplingParams
from loraplex.engine.kernels.cuda import triton_decode

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
        self.wrap(engine.sampler, "sample", "sample_and_sync_ms")
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
