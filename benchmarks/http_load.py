"""Online serving under load: one loraplex server against the old one-server-per-endpoint design, over HTTP.

An asyncio client (httpx) sends an open-loop stream of requests, Poisson arrivals at each rate of a sweep,
to two systems in turn, each started here as ``loraplex serve`` subprocesses on free loopback ports:

    loraplex     ONE process serving the four endpoints of the default config (base, chatbot, code,
                 summarization; the default slots 1/3/2/1 and limits), ``model.num_threads = 2``
    old-design   FOUR processes, one per endpoint, each a ``loraplex serve`` whose config holds only that
                 endpoint and that serves one request at a time (``limits.max_num_seqs = 1``, ``slots = 1``;
                 the rest queue in its waiting queue), ``model.num_threads = 1`` each: the 2 cores of this
                 machine shared fairly among 4 pods. The client sends each request to its endpoint's process.

Workload (the same seeded sequence for both systems and every rate): ``--num-requests`` per rate (default
40), each endpoint's count set by its popularity (largest-remainder rounding, seeded order), skewed by
default (chatbot 0.4, code 0.3, summarization 0.15, base 0.15; ``--popularity uniform`` gives 0.25 each);
prompts of 32-256 tokens of the default model's tokenizer cut at random offsets from Python standard-library
source (real text, on every machine), sent as ``/api/generate`` with ``"raw": true``; output lengths 16-64
tokens as ``options.num_predict``, greedy (temperature 0, repeat_penalty 1), streamed so the time to first
token is measured. The API has no way to ignore EOS, so every per-token figure uses the real ``eval_count``
of each response (``ended_early`` counts requests that stopped before ``num_predict``). Inter-arrival gaps
are drawn once at rate 1 and divided by each rate, so every rate replays the same requests in the same order.

Per system, rate and endpoint (and overall): requests completed per second and output tokens per second
(over the wall time from the first arrival to the last completion), time to first token (TTFT), time per
output token after the first (TPOT), and latency p50/p99 (nearest rank; with few requests p99 is the
maximum). Errors never stop the run: they are counted per endpoint by kind (``http 503``, ``timeout``,
...); ``--timeout`` bounds each request on the client. The key target: at the lowest swept rate where the
old design's overall p99 latency passes 10 s, loraplex's p99 stays under a third of it.

    python benchmarks/http_load.py                                    # the full sweep, results in benchmarks/results/
    python benchmarks/http_load.py --rates 0.5,1,2,3 --num-requests 40
    python benchmarks/http_load.py --quick --out /tmp/http_load       # 1 rate, 6 short requests, small KV pools (CI)

writes ``http_load.json``, ``http_load.md`` (the table and the target) and ``http_load.png`` (latency p50 and
p99 against arrival rate, one line per endpoint, one panel per system).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

if str(ROOT / "benchmarks") not in sys.path:  # the sibling script whose workload helpers this one shares
    sys.path.insert(0, str(ROOT / "benchmarks"))
import engine_throughput as et  # noqa: E402

from loraplex.engine.core.config import EngineConfig, load_config  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"
SYSTEMS = ("loraplex", "old-design")
SKEWED = {"chatbot": 0.4, "code": 0.3, "summarization": 0.15, "base": 0.15}
UNIFORM = {"chatbot": 0.25, "code": 0.25, "summarization": 0.25, "base": 0.25}
P99_LIMIT_S = 10.0  # the old design's p99 past which the target is checked
TARGET_RATIO = 1 / 3  # loraplex p99 / old p99 must stay under this there
# Not engine_throughput's module list: this one made the committed results (each module's first 12,000 chars).
SOURCE_MODULES = ("argparse", "collections", "email.message", "http.client", "inspect", "logging", "pathlib")
READY_TIMEOUT_S = 300


# ---- workload --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    num_requests: int = 40  # per rate
    prompt_len: tuple[int, int] = (32, 256)  # tokens, inclusive, uniform
    output_len: tuple[int, int] = (16, 64)  # num_predict, inclusive, uniform
    rates: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # requests per second
    seed: int = 0


FULL = LoadSpec()
QUICK = LoadSpec(num_requests=6, prompt_len=(8, 24), output_len=(4, 8), rates=(2.0,))


@dataclass(frozen=True)
class LoadRequest:
    index: int
    endpoint: str
    prompt: str
    prompt_tokens: int  # as cut; the server's prompt_eval_count may differ by a token or two after decoding
    num_predict: int
    offset: float  # arrival time at rate 1 (seconds); at rate r it arrives at offset / r


def endpoint_counts(popularity: dict[str, float], n: int) -> dict[str, int]:
    """Requests per endpoint in proportion to its popularity, rounded by largest remainder (sums to ``n``)."""
    total = sum(popularity.values())
    exact = {name: n * share / total for name, share in popularity.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: counts[name] - exact[name])
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def make_workload(tokenizer, spec: LoadSpec, popularity: dict[str, float]) -> list[LoadRequest]:
    """``spec.num_requests`` requests, each endpoint's share exactly its popularity (rounded), in a seeded random
    order, with unit-rate exponential gaps."""
    rng = random.Random(spec.seed)
    pool = et.source_token_pool(tokenizer, SOURCE_MODULES)
    endpoints = [name for name, count in endpoint_counts(popularity, spec.num_requests).items() for _ in range(count)]
    rng.shuffle(endpoints)
    requests, offset = [], 0.0
    for i, endpoint in enumerate(endpoints):
        prompt_len, num_predict = rng.randint(*spec.prompt_len), rng.randint(*spec.output_len)
        tokens = rng.choice([t for t in pool if len(t) > prompt_len])
        start = rng.randrange(len(tokens) - prompt_len)
        prompt = tokenizer.decode(tokens[start : start + prompt_len])
        requests.append(LoadRequest(i, endpoint, prompt, prompt_len, num_predict, offset))
        offset += rng.expovariate(1.0)
    return requests


def describe_workload(workload: list[LoadRequest], spec: LoadSpec, popularity: dict[str, float]) -> dict:
    def spread(values: list[int], bounds: tuple[int, int]) -> dict:
        return {"range": list(bounds), "min": min(values), "max": max(values), "total": sum(values)}

    return {
        "num_requests_per_rate": len(workload),
        "seed": spec.seed,
        "popularity": popularity,
        "requests_per_endpoint": dict(Counter(r.endpoint for r in workload)),
        "prompt_tokens": spread([r.prompt_tokens for r in workload], spec.prompt_len),
        "num_predict": spread([r.num_predict for r in workload], spec.output_len),
        "prompt_source": f"Python {platform.python_version()} stdlib source of {', '.join(SOURCE_MODULES)}",
        "arrivals": "Poisson (exponential gaps drawn once at rate 1, divided by each rate)",
        "request": "POST /api/generate, raw, stream, options: num_predict, temperature 0, repeat_penalty 1",
    }


# ---- servers ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_toml(
    port: int, threads: int, endpoints: list[dict], limits: dict, request_timeout: float, roots: list[str]
) -> str:
    """A complete ``loraplex serve`` config; adapter paths are absolute, so the file may live anywhere."""
    lines = ["[model]", 'path = ""', 'dtype = "float32"', f"num_threads = {threads}", "", "[limits]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in limits.items()]  # JSON scalars are TOML's too
    lines += ["", "[server]", 'host = "127.0.0.1"', f"port = {port}", "grace_period = 5"]
    lines += [f"request_timeout = {request_timeout}", "", "[adapters]", f"roots = {json.dumps(roots)}"]
    for endpoint in endpoints:
        lines += ["", "[[endpoints]]"] + [f"{key} = {json.dumps(value)}" for key, value in endpoint.items()]
    return "\n".join(lines) + "\n"


def endpoint_tables(config: EngineConfig, slots: int | None = None) -> list[dict]:
    tables = []
    for e in config.endpoints:
        table: dict = {"name": e.name, "slots": slots or e.slots}
        if e.adapter:
            table["adapter"] = e.adapter
        tables.append(table)
    return tables


@dataclass
class Deployment:
    """What one system runs: a config per process and which endpoints each process serves."""

    name: str
    description: str
    configs: list[str]  # TOML text, one per process
    ports: list[int]
    endpoints: list[list[str]]  # per process
    threads_per_process: int


def loraplex_deployment(config: EngineConfig, threads: int, request_timeout: float) -> Deployment:
    port = free_port()
    # Every rate replays the same prompts: a prefix cache would serve later rates from earlier ones'.
    limits = dict(vars(config.limits), prefix_caching=False)
    toml = config_toml(port, threads, endpoint_tables(config), limits, request_timeout, config.adapters.roots)
    slots = ", ".join(f"{e.name} {e.slots}" for e in config.endpoints)
    return Deployment(
        name="loraplex",
        description=f"one loraplex serve process, all {len(config.endpoints)} endpoints (slots: {slots}), "
        f"max_num_seqs {config.limits.max_num_seqs}, num_threads {threads}",
        configs=[toml],
        ports=[port],
        endpoints=[[e.name for e in config.endpoints]],
        threads_per_process=threads,
    )


def old_deployment(config: EngineConfig, threads: int, request_timeout: float) -> Deployment:
    """One single-endpoint process per endpoint, one request at a time; a KV pool of one max-length sequence."""
    limits = dict(vars(config.limits), max_num_seqs=1, prefix_caching=False)  # as loraplex_deployment
    limits["num_kv_blocks"] = -(-config.limits.max_model_len // config.limits.block_size)
    configs, ports = [], []
    for table in endpoint_tables(config, slots=1):
        ports.append(free_port())
        configs.append(config_toml(ports[-1], threads, [table], limits, request_timeout, config.adapters.roots))
    return Deployment(
        name="old-design",
        description=f"{len(configs)} loraplex serve processes, one per endpoint, each max_num_seqs 1 and slots 1 "
        f"(one request at a time, the rest queue), num_threads {threads} each",
        configs=configs,
        ports=ports,
        endpoints=[[e.name] for e in config.endpoints],
        threads_per_process=threads,
    )


class Servers:
    """The deployment's processes, started at once and waited for; ``stop`` always ends every one of them."""

    def __init__(self, deployment: Deployment, folder: Path) -> None:
        self.deployment = deployment
        self.folder = folder
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def urls(self) -> dict[str, str]:
        """Endpoint name -> base URL of the process serving it."""
        served = zip(self.deployment.ports, self.deployment.endpoints, strict=True)
        return {name: f"http://127.0.0.1:{port}" for port, names in served for name in names}

    def start(self) -> None:
        self.launch()
        deadline = time.monotonic() + READY_TIMEOUT_S
        for process, port, log in zip(self.processes, self.deployment.ports, self.logs, strict=True):
            wait_ready(process, f"http://127.0.0.1:{port}", log, deadline)

    def launch(self) -> None:
        """Start the processes without waiting for them (``start`` waits); once."""
        if self.processes:
            return
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        for i, toml in enumerate(self.deployment.configs):
            path = self.folder / f"{self.deployment.name}-{i}.toml"
            path.write_text(toml)
            self.logs.append(self.folder / f"{self.deployment.name}-{i}.log")
            with self.logs[-1].open("wb") as log:
                command = [sys.executable, "-m", "loraplex.cli", "serve", "--config", str(path)]
                self.processes.append(
                    subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
                )

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_ready(process: subprocess.Popen, url: str, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server {url} exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"server {url} not ready after {READY_TIMEOUT_S} s:\n{log.read_text(errors='replace')}")


# ---- the client ------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    endpoint: str
    num_predict: int
    error: str = ""  # "" = completed
    ttft: float = math.nan  # seconds from send to the first streamed chunk
    latency: float = math.nan  # seconds from send to the final chunk
    eval_count: int = 0
    prompt_eval_count: int = 0
    send_lag: float = 0.0  # how late the client sent it after its scheduled arrival

    @property
    def tpot(self) -> float:
        """Seconds per output token after the first, from the real token count."""
        if self.error or self.eval_count < 2:
            return math.nan
        return (self.latency - self.ttft) / (self.eval_count - 1)


def request_body(r: LoadRequest, seed: int) -> dict:
    options = {"num_predict": r.num_predict, "temperature": 0, "repeat_penalty": 1.0, "seed": seed}
    return {"model": r.endpoint, "prompt": r.prompt, "raw": True, "stream": True, "options": options}


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, outcome: Outcome, sent: float) -> None:
    async with client.stream("POST", f"{url}/api/generate", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            outcome.error = f"http {response.status_code}"
            return
        async for line in response.aiter_lines():
            if not line.strip():
                continue
            chunk = json.loads(line)
            if "error" in chunk:
                outcome.error = "stream error"
                return
            if math.isnan(outcome.ttft):
                outcome.ttft = time.perf_counter() - sent
            if chunk.get("done"):
                outcome.latency = time.perf_counter() - sent
                outcome.eval_count = chunk.get("eval_count", 0)
                outcome.prompt_eval_count = chunk.get("prompt_eval_count", 0)
                return
    outcome.error = "stream ended without done"


async def send(client: httpx.AsyncClient, url: str, r: LoadRequest, seed: int, timeout: float, lag: float) -> Outcome:
    """One request; every failure becomes the outcome's ``error`` (its kind), never an exception."""
    outcome = Outcome(r.endpoint, r.num_predict, send_lag=lag)
    sent = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            await stream_one(client, url, request_body(r, seed), outcome, sent)
    except TimeoutError:
        outcome.error = "timeout"
    except httpx.HTTPError as e:
        outcome.error = type(e).__name__
    except json.JSONDecodeError:
        outcome.error = "bad json"
    return outcome


async def run_rate(
    urls: dict[str, str], workload: list[LoadRequest], rate: float, seed: int, timeout: float, label: str
) -> tuple[list[Outcome], float]:
    """Open loop: each request is sent at its arrival time whatever is still in flight; returns the outcomes in
    request order and the wall time from the first arrival to the last completion."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    bar = tqdm(total=len(workload), desc=label, unit="req", leave=True, dynamic_ncols=True)
    errors = Counter()

    async def tracked(r: LoadRequest, lag: float) -> Outcome:
        outcome = await send(client, urls[r.endpoint], r, seed, timeout, lag)
        errors[outcome.error] += bool(outcome.error)
        bar.set_postfix(errors=sum(errors.values()), refresh=False)
        bar.update()
        return outcome

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for r in workload:
            delay = start + r.offset / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = time.perf_counter() - start - r.offset / rate
            tasks.append(asyncio.create_task(tracked(r, lag)))
        outcomes = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    bar.close()
    return list(outcomes), wall


async def warm_up(urls: dict[str, str], prompt: LoadRequest, seed: int, timeout: float) -> None:
    """One short request per endpoint, not measured: first forward passes and adapter activation."""
    short = [LoadRequest(-1, e, prompt.prompt, prompt.prompt_tokens, 2, 0.0) for e in urls]
    async with httpx.AsyncClient(timeout=timeout) as client:
        outcomes = await asyncio.gather(*(send(client, urls[r.endpoint], r, seed, timeout, 0.0) for r in short))
    failed = [f"{o.endpoint}: {o.error}" for o in outcomes if o.error]
    if failed:
        print(f"warm-up errors (the run goes on): {failed}", flush=True)


# ---- statistics ------------------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict:
    """Mean, p50 and p99 by nearest rank (the maximum when there are fewer than 100 values)."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return {"mean": None, "p50": None, "p99": None}

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 3)

    return {"mean": round(sum(ordered) / len(ordered), 3), "p50": rank(0.50), "p99": rank(0.99)}


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    done = [o for o in outcomes if not o.error]
    tokens = sum(o.eval_count for o in done)
    return {
        "requests": len(outcomes),
        "completed": len(done),
        "errors": dict(Counter(o.error for o in outcomes if o.error)),
        "throughput_rps": round(len(done) / wall, 3) if wall else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
        "ended_early": sum(o.eval_count < o.num_predict for o in done),
        "ttft_s": percentiles([o.ttft for o in done]),
        "tpot_s": percentiles([o.tpot for o in done]),
        "latency_s": percentiles([o.latency for o in done]),
    }


def rate_report(outcomes: list[Outcome], wall: float, rate: float) -> dict:
    endpoints = sorted({o.endpoint for o in outcomes})
    return {
        "rate": rate,
        "wall_s": round(wall, 2),
        "max_send_lag_s": round(max(o.send_lag for o in outcomes), 3),
        "overall": summarize(outcomes, wall),
        "endpoints": {e: summarize([o for o in outcomes if o.endpoint == e], wall) for e in endpoints},
    }


def evaluate_target(systems: dict[str, dict]) -> dict:
    """The lowest swept rate where the old design's p99 passes 10 s, and loraplex's p99 there against it."""
    target = f"at the lowest rate where old-design p99 > {P99_LIMIT_S:g} s, loraplex p99 < 1/3 of it"
    if not set(SYSTEMS) <= set(systems):
        return {"target": target, "rate": None, "met": None, "note": "needs both systems"}
    for old in systems["old-design"]["rates"]:
        old_p99 = old["overall"]["latency_s"]["p99"]
        if old_p99 is not None and old_p99 > P99_LIMIT_S:
            ours = next(r for r in systems["loraplex"]["rates"] if r["rate"] == old["rate"])
            p99 = ours["overall"]["latency_s"]["p99"]
            ratio = round(p99 / old_p99, 3) if p99 is not None else None
            return {
                "target": target,
                "rate": old["rate"],
                "old_design_p99_s": old_p99,
                "loraplex_p99_s": p99,
                "ratio": ratio,
                "met": ratio is not None and ratio < TARGET_RATIO,
            }
    return {"target": target, "rate": None, "met": None, "note": f"old-design p99 stayed <= {P99_LIMIT_S:g} s"}


# ---- reporting -------------------------------------------------------------------------------------------------


def machine_description() -> dict:
    return {
        "cpu_model": et.cpu_model(),
        "logical_cores": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "httpx": httpx.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(systems: dict[str, dict]) -> str:
    lines = [
        "| system | rate req/s | endpoint | done/sent | errors | req/s | out tok/s | TTFT p50 s | TTFT p99 s "
        "| TPOT p50 s | latency p50 s | latency p99 s |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, system in systems.items():
        for report in system["rates"]:
            rows = [*report["endpoints"].items(), ("**overall**", report["overall"])]
            for endpoint, s in rows:
                errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0"
                lines.append(
                    f"| {name} | {report['rate']:g} | {endpoint} | {s['completed']}/{s['requests']} | {errors} "
                    f"| {s['throughput_rps']:.2f} | {s['output_tokens_per_s']:.1f} | {fmt(s['ttft_s']['p50'])} "
                    f"| {fmt(s['ttft_s']['p99'])} | {fmt(s['tpot_s']['p50'])} | {fmt(s['latency_s']['p50'])} "
                    f"| {fmt(s['latency_s']['p99'])} |"
                )
    return "\n".join(lines)


def target_line(target: dict) -> str:
    if target["rate"] is None:
        return f"- {target['target']}: not reached ({target['note']})"
    verdict = "met" if target["met"] else "missed"
    return (
        f"- {target['target']}: at {target['rate']:g} req/s old-design p99 {target['old_design_p99_s']:.2f} s, "
        f"loraplex p99 {fmt(target['loraplex_p99_s'])} s, ratio {target['ratio']} ({verdict})"
    )


def plot(systems: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(systems), figsize=(6.5 * len(systems), 4.8), sharey=True, squeeze=False)
    for ax, (name, system) in zip(axes[0], systems.items(), strict=True):
        rates = [r["rate"] for r in system["rates"]]
        groups = [*system["rates"][0]["endpoints"], "overall"]
        for i, group in enumerate(groups):
            color = "black" if group == "overall" else f"C{i}"
            stats = [r["overall"] if group == "overall" else r["endpoints"].get(group) for r in system["rates"]]
            for q, style in (("p99", "-"), ("p50", "--")):
                values = [s["latency_s"][q] if s and s["latency_s"][q] is not None else math.nan for s in stats]
                label = f"{group} {q}" if q == "p99" else None
                width = 2 if group == "overall" else 1
                ax.plot(rates, values, style, marker="o", color=color, label=label, linewidth=width)
        ax.axhline(P99_LIMIT_S, color="gray", linewidth=0.8, linestyle=":")
        ax.set_yscale("log")
        ax.set_xlabel("arrival rate (requests / s)")
        ax.set_title(f"{name} ({system['processes']} process{'es' if system['processes'] > 1 else ''})")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("latency s (solid p99, dashed p50)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the run ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"tiny run for CI: {QUICK}")
    parser.add_argument("--rates", help="comma-separated arrival rates in requests/s (default 0.25,0.5,1,2)")
    parser.add_argument("--num-requests", type=int, help="requests per rate (default 40)")
    parser.add_argument("--prompt-len", help="MIN,MAX prompt tokens (default 32,256)")
    parser.add_argument("--output-len", help="MIN,MAX num_predict (default 16,64)")
    parser.add_argument("--popularity", choices=("skewed", "uniform"), default="skewed")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--loraplex-threads", type=int, default=2, help="model.num_threads of the loraplex server")
    parser.add_argument("--old-threads", type=int, default=1, help="model.num_threads of each old-design server")
    parser.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, seconds")
    parser.add_argument(
        "--num-kv-blocks",
        type=int,
        help="limits.num_kv_blocks of the loraplex server, max_model_len cut to fit; the old design's servers "
        "hold one sequence of that length (default: the config's; --quick: 32)",
    )
    parser.add_argument(
        "--start-together",
        action="store_true",
        help="start every system's servers at once, so the later ones load during the first one's run (their "
        "start-up then shares the cores with its requests: for smoke runs, not timings; --quick sets it)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON, markdown and plot")
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or set(args.systems) - set(SYSTEMS):
        parser.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    spec = QUICK if args.quick else FULL
    rates = tuple(float(r) for r in args.rates.split(",")) if args.rates else spec.rates
    if any(r <= 0 for r in rates):
        parser.error("--rates: every rate must be positive")
    lengths = {}
    for name in ("prompt_len", "output_len"):
        value = getattr(args, name)
        if value is None:
            lengths[name] = getattr(spec, name)
            continue
        low, _, high = value.partition(",")
        if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
            parser.error(f"--{name.replace('_', '-')}: give MIN,MAX with 1 <= MIN <= MAX, not {value!r}")
        lengths[name] = (int(low), int(high))
    num_requests = args.num_requests or spec.num_requests
    args.spec = LoadSpec(num_requests, lengths["prompt_len"], lengths["output_len"], rates, args.seed)
    if args.quick:  # every server allocates its whole pool as it starts; 6 short requests hold 12 blocks
        args.num_kv_blocks = args.num_kv_blocks or 32
        args.start_together = True
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_system(servers: Servers, workload: list[LoadRequest], args: argparse.Namespace) -> dict:
    """Start the deployment (unless launched already), warm it up, run every rate, and stop it whatever happens."""
    deployment = servers.deployment
    try:
        log(f"{deployment.name}: starting {len(deployment.configs)} server process(es)")
        started = time.perf_counter()
        servers.start()
        log(f"{deployment.name}: ready in {time.perf_counter() - started:.1f} s")
        urls = servers.urls()
        asyncio.run(warm_up(urls, workload[0], args.seed, args.timeout))
        reports = []
        for rate in args.spec.rates:
            label = f"{deployment.name} @ {rate:g} req/s"
            outcomes, wall = asyncio.run(run_rate(urls, workload, rate, args.seed, args.timeout, label))
            reports.append(rate_report(outcomes, wall, rate))
            overall = reports[-1]["overall"]
            log(
                f"{label}: {overall['completed']}/{overall['requests']} done, errors {overall['errors'] or 0}, "
                f"p50 {fmt(overall['latency_s']['p50'])} s, p99 {fmt(overall['latency_s']['p99'])} s"
            )
    finally:
        servers.stop()
    return {
        "description": deployment.description,
        "processes": len(deployment.configs),
        "threads_per_process": deployment.threads_per_process,
        "configs": deployment.configs,
        "rates": reports,
    }


def run_benchmark(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from loraplex.engine.model.loader import resolve_model_dir

    started = time.perf_counter()
    machine = machine_description()
    config = et.with_kv_pool(load_config(), args.num_kv_blocks)
    model_dir, model_name, _ = resolve_model_dir(config.model)
    popularity = SKEWED if args.popularity == "skewed" else UNIFORM
    workload = make_workload(AutoTokenizer.from_pretrained(model_dir), args.spec, popularity)
    log(f"workload: {len(workload)} requests per rate, {dict(Counter(r.endpoint for r in workload))}")
    request_timeout = args.timeout + 60  # the client's timeout is the one that ends a request
    deployments = {
        "loraplex": lambda: loraplex_deployment(config, args.loraplex_threads, request_timeout),
        "old-design": lambda: old_deployment(config, args.old_threads, request_timeout),
    }
    with contextlib.ExitStack() as stack:
        servers = {}
        for name in args.systems:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"http-load-{name}-"))
            servers[name] = Servers(deployments[name](), Path(folder))
            stack.callback(servers[name].stop)
        if args.start_together:  # the later systems load while the first is measured: not for timings
            for system in servers.values():
                system.launch()
        systems = {name: run_system(system, workload, args) for name, system in servers.items()}
    report = {
        "benchmark": "http_load",
        "machine": machine,
        "model": model_name,
        "quick": args.quick,
        "settings": {
            "rates": list(args.spec.rates),
            "num_requests_per_rate": args.spec.num_requests,
            "client_timeout_s": args.timeout,
            "servers_started_together": args.start_together,
            "threads": {"loraplex": args.loraplex_threads, "old-design per process": args.old_threads},
            "threads_note": f"{os.cpu_count()} logical cores: loraplex gets them all in one process; the old design "
            "splits them among its 4 processes",
        },
        "workload": describe_workload(workload, args.spec, popularity),
        "systems": systems,
        "target": evaluate_target(systems),
        "table": markdown_table(systems),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_outputs(report, args.out)
    return report


def write_outputs(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "http_load.json").write_text(json.dumps(report, indent=2) + "\n")
    m, w = report["machine"], report["workload"]
    title = (
        f"{report['model']}, {w['num_requests_per_rate']} requests per rate, popularity {w['popularity']} — "
        f"{m['cpu_model']}, {m['logical_cores']} cores"
    )
    threads = report["settings"]["threads"]
    (out / "http_load.md").write_text(
        f"# HTTP load\n\n{title}\n\nThreads: loraplex {threads['loraplex']} (one process), old design "
        f"{threads['old-design per process']} per process (4 processes). Latency percentiles are over completed "
        f"requests; p99 is by nearest rank.\n\n{report['table']}\n\n{target_line(report['target'])}\n\n"
        f"Full run took {report['wall_seconds']} s. Details: http_load.json.\n"
    )
    plot(report["systems"], out / "http_load.png", title)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:  # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every server
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = run_benchmark(args)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print()
    print(report["table"])
    print(target_line(report["target"]))
    print(f"\nwrote {args.out}/http_load.{{json,md,png}} in {report['wall_seconds']} s")
    return report


if __name__ == "__main__":
    main()
