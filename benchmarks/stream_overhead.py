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
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.harness import cli, report
from benchmarks.harness.engine import engine_config, median_decode_step, with_limits
from benchmarks.harness.machine import machine_description, source_revision
from benchmarks.harness.servers import Servers, loraplex_deployment
from loraplex.engine.core.engine import LLMEngine

ENDPOINT = "chatbot"
# code, sent raw: greedy decoding runs on for the tokens asked (a chat prompt may end at once)
PROMPT = 'import argparse\n\n\ndef build_parser() -> argparse.ArgumentParser:\n    """The tool\'s command line."""\n'


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
    config, threads = engine_config(args)
    # as the server's deployment: the same prompt every round must be computed again, not reused
    config = with_limits(config, prefix_caching=False)
    rows = []
    with tempfile.TemporaryDirectory() as folder, concurrent.futures.ThreadPoolExecutor(1) as starter:
        servers = Servers(loraplex_deployment(config, threads, 600.0, Path(folder)), Path(folder))
        started = starter.submit(servers.start)  # the server loads in its process while this one loads
        try:
            engine = LLMEngine(config)
            prompt_ids = engine.encode_prompt(PROMPT)
            started.result()
            url = servers.urls()[ENDPOINT]
            server_seconds(url, 4)  # warm-up: first-request costs are not per-token costs
            median_decode_step(engine, "warm-up", ENDPOINT, prompt_ids, 4)
            for round_index in range(args.rounds):
                server_step, client_gap, count = server_seconds(url, args.tokens)
                step = median_decode_step(engine, f"round-{round_index}", ENDPOINT, prompt_ids, args.tokens)
                rows.append(
                    {
                        "engine_ms": round(step * 1e3, 1),
                        "server_step_ms": round(server_step * 1e3, 1),
                        "client_gap_ms": round(client_gap * 1e3, 1),
                        "tokens": count,
                    }
                )
                cli.log(f"round {round_index + 1} of {args.rounds}: {rows[-1]}")
        finally:
            concurrent.futures.wait([started])  # every process it starts, started before they are stopped
            servers.stop()
    keys = ("engine_ms", "server_step_ms", "client_gap_ms")
    medians = {key: statistics.median(r[key] for r in rows) for key in keys}
    summary = {
        **medians,
        "server_step_over_engine": round(medians["server_step_ms"] / medians["engine_ms"], 3),
        "client_gap_over_engine": round(medians["client_gap_ms"] / medians["engine_ms"], 3),
    }
    cells = [[i + 1, *(r[k] for k in keys)] for i, r in enumerate(rows)] + [["**median**", *medians.values()]]
    return {
        "benchmark": "stream_overhead",
        "machine": machine_description(threads),
        "source": source_revision(),
        "settings": {
            "endpoint": ENDPOINT,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "threads": threads,
            "num_kv_blocks": config.limits.num_kv_blocks,
        },
        "rows": rows,
        "summary": summary,
        "table": report.table(["round", "engine ms/step", "server ms/token", "client gap ms"], cells, "rrrr"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser(__doc__, "2 rounds of 6 tokens, KV pools of 32 blocks", ("threads", "num_kv_blocks"), 2)
    parser.add_argument("--tokens", type=int, help="greedy tokens per request (default 40)")
    parser.add_argument("--rounds", type=int, help="rounds, one request each to the server and the engine (6)")
    return cli.parse(parser, argv, {"tokens": 40, "rounds": 6}, {"tokens": 6, "rounds": 2, "num_kv_blocks": 32})


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data = run(args)
    s = data["summary"]
    line = f"server ÷ engine: {s['server_step_over_engine']} (steps), {s['client_gap_over_engine']} (client gaps)"
    report.write(args.out, "stream_overhead", data, f"# Streaming overhead, one request\n\n{data['table']}\n\n{line}\n")
    return data


if __name__ == "__main__":
    main()
