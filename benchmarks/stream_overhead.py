"""What the HTTP server adds to the time per output token of one streamed request.

At light load a request's latency is about its own decode time, so any cost the server adds per token (the
event loop thread sharing the cores and the interpreter lock with the engine loop, JSON, HTTP chunks) goes
straight into the HTTP benchmark's p99. This measures it: one ``loraplex serve`` process (the default
config, ``--threads`` torch threads) and one engine in this process, used in turn for ``--rounds`` rounds,
one request each per round, with the same prompt and ``--tokens`` greedy tokens. The other one is idle
meanwhile, so machine drift hits both alike. Per round it records:

- engine: the median decode step of the in-process engine;
- server step: the server's own ``eval_duration / (eval_count - 1)`` (the engine inside the server);
- client gap: the median time between streamed chunks as the client receives them.

    python benchmarks/stream_overhead.py              # results in benchmarks/results/
    python benchmarks/stream_overhead.py --quick --out /tmp/stream_overhead
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):  # run as a script from anywhere; http_load's helpers
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import httpx  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from engine_throughput import cpu_model, source_revision, with_kv_pool  # noqa: E402
from http_load import Servers, loraplex_deployment  # noqa: E402

from loraplex.engine.core.config import load_config  # noqa: E402
from loraplex.engine.core.engine import LLMEngine  # noqa: E402
from loraplex.engine.core.sequence import Request, SamplingParams  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"
ENDPOINT = "chatbot"
# code, sent raw: greedy decoding runs on for the tokens asked (a chat prompt may end at once)
PROMPT = 'import argparse\n\n\ndef build_parser() -> argparse.ArgumentParser:\n    """The tool\'s command line."""\n'


def engine_step_seconds(engine: LLMEngine, prompt_ids: list[int], tokens: int, tag: str) -> float:
    """Median decode step of one request alone in the in-process engine."""
    engine.add_request(Request(tag, ENDPOINT, prompt_ids, SamplingParams(max_tokens=tokens, ignore_eos=True)))
    engine.step()  # prefill and first token
    steps = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    return statistics.median(steps)


def server_seconds(url: str, tokens: int) -> tuple[float, float, int]:
    """(server's eval_duration per token, median gap between chunks at the client, tokens) of one stream."""
    body = {
        "model": ENDPOINT,
        "prompt": PROMPT,
        "raw": True,
        "options": {"num_predict": tokens, "temperature": 0, "repeat_penalty": 1},
    }
    arrivals, last = [], {}
    with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line:
                arrivals.append(time.perf_counter())
                last = json.loads(line)
    if last.get("eval_count") != tokens:
        raise RuntimeError(f"the server stopped after {last.get('eval_count')} of {tokens} tokens: {last}")
    gaps = [b - a for a, b in itertools.pairwise(arrivals[1:-1])]  # decode tokens only, not the final chunk
    # the first token comes out of the prefill (prompt_eval_duration): eval_duration spans the other steps
    return last["eval_duration"] / 1e9 / (last["eval_count"] - 1), statistics.median(gaps), last["eval_count"]


def run(args: argparse.Namespace) -> dict:
    transformers.logging.set_verbosity_error()
    config = load_config()
    # as the server's deployment: the same prompt every round must be computed again, not reused
    config = dataclasses.replace(config, limits=dataclasses.replace(config.limits, prefix_caching=False))
    config = with_kv_pool(config, args.num_kv_blocks)  # the server's too
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder, concurrent.futures.ThreadPoolExecutor(1) as starter:
        servers = Servers(loraplex_deployment(config, args.threads, request_timeout=600.0), Path(folder))
        started = starter.submit(servers.start)  # the server loads in its process while this one loads
        try:
            engine = LLMEngine(config)
            prompt_ids = engine.encode_prompt(PROMPT)
            started.result()
            url = servers.urls()[ENDPOINT]
            server_seconds(url, 4)  # warm-up: first-request costs are not per-token costs
            engine_step_seconds(engine, prompt_ids, 4, "warm-up")
            for round_index in range(args.rounds):
                server_step, client_gap, count = server_seconds(url, args.tokens)
                step = engine_step_seconds(engine, prompt_ids, args.tokens, f"round-{round_index}")
                rows.append(
                    {
                        "engine_ms": round(step * 1e3, 1),
                        "server_step_ms": round(server_step * 1e3, 1),
                        "client_gap_ms": round(client_gap * 1e3, 1),
                        "tokens": count,
                    }
                )
                print(f"round {round_index + 1} of {args.rounds}: {rows[-1]}", flush=True)
        finally:
            concurrent.futures.wait([started])  # every process it starts, started before they are stopped
            servers.stop()
    medians = {key: statistics.median(r[key] for r in rows) for key in ("engine_ms", "server_step_ms", "client_gap_ms")}
    summary = {
        **medians,
        "server_step_over_engine": round(medians["server_step_ms"] / medians["engine_ms"], 3),
        "client_gap_over_engine": round(medians["client_gap_ms"] / medians["engine_ms"], 3),
    }
    table = "\n".join(
        [
            "| round | engine ms/step | server ms/token | client gap ms |",
            "| ---: | ---: | ---: | ---: |",
            *(
                f"| {i + 1} | {r['engine_ms']} | {r['server_step_ms']} | {r['client_gap_ms']} |"
                for i, r in enumerate(rows)
            ),
            f"| **median** | {medians['engine_ms']} | {medians['server_step_ms']} | {medians['client_gap_ms']} |",
        ]
    )
    return {
        "benchmark": "stream_overhead",
        "machine": {"cpu_model": cpu_model(), "logical_cores": os.cpu_count(), "torch": torch.__version__},
        "source": source_revision(),
        "settings": {
            "endpoint": ENDPOINT,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "threads": args.threads,
            "num_kv_blocks": config.limits.num_kv_blocks,
        },
        "rows": rows,
        "summary": summary,
        "table": table,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 6 tokens, KV pools of 32 blocks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--num-kv-blocks", type=int, help="limits.num_kv_blocks of the engine and the server (default: the config's)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.rounds = 6, 2
        args.num_kv_blocks = args.num_kv_blocks or 32
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    s = report["summary"]
    lines = [
        f"server ÷ engine: {s['server_step_over_engine']} (steps), {s['client_gap_over_engine']} (client gaps)",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stream_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    text = f"# Streaming overhead, one request\n\n{report['table']}\n\n" + "\n".join(lines) + "\n"
    (args.out / "stream_overhead.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
