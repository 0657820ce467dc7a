"""Issue 7.2, soak: mixed requests over every generation endpoint, a share of clients walking away mid-stream.

Each round sends ``--requests`` seeded requests (Ollama and OpenAI, streaming and not, over base and the
shipped adapters) from a thread pool; about 40% of clients disconnect after a random number of chunks or give
up on a short client timeout. After each round the server must go idle (no running sequence, every KV block
free, no adapter slot reference, no admission ticket) and the process RSS is recorded (after ``gc.collect``).

    python benchmarks/soak.py --rounds 20 --requests 40

writes ``benchmarks/results/soak.json``. ``tests/test_reliability_soak.py`` runs a short version in CI.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("base", "chatbot", "code", "summarization")
ABANDON_SHARE = 0.4


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _request(rng: random.Random) -> dict:
    """One request plan: route, body, and how the client behaves."""
    model = rng.choice(MODELS)
    stream = rng.random() < 0.7
    n = rng.randint(2, 24)
    kind = rng.choice(("generate", "chat", "completions", "chat_completions"))
    text = rng.choice(("Tell me a story.", "Write a loop in Python.", "Summarize: the cat sat.", "Hi"))
    if kind == "generate":
        path, body = "/api/generate", {"model": model, "prompt": text, "stream": stream, "options": {"num_predict": n}}
    elif kind == "chat":
        messages = [{"role": "user", "content": text}]
        path, body = (
            "/api/chat",
            {"model": model, "messages": messages, "stream": stream, "options": {"num_predict": n}},
        )
    elif kind == "completions":
        path, body = "/v1/completions", {"model": model, "prompt": text, "max_tokens": n, "stream": stream}
    else:
        messages = [{"role": "user", "content": text}]
        path, body = "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": n, "stream": stream}
        if stream and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    behaviour = "complete"
    if rng.random() < ABANDON_SHARE:
        behaviour = "disconnect" if stream and rng.random() < 0.6 else "timeout"
    return {
        "path": path,
        "body": body,
        "behaviour": behaviour,
        "after": rng.randint(0, 4),
        "timeout": rng.uniform(0.01, 0.3),
    }


def _send(url: str, plan: dict) -> str:
    """Run one client; returns what happened (completed, disconnected, timed out, or an HTTP error)."""
    timeout = plan["timeout"] if plan["behaviour"] == "timeout" else 120
    try:
        with httpx.stream("POST", url + plan["path"], json=plan["body"], timeout=timeout) as response:
            if response.status_code >= 500:
                return f"http {response.status_code}"
            for i, _line in enumerate(response.iter_lines()):
                if plan["behaviour"] == "disconnect" and i >= plan["after"]:
                    return "disconnected"  # leaving the block closes the connection mid-stream
        return "completed" if response.status_code == 200 else f"http {response.status_code}"
    except httpx.TimeoutException:
        return "timed out"


def soak(server, rounds: int, requests: int, seed: int = 0, workers: int = 6, log=print) -> dict:
    """Run the rounds against an ``InProcessServer``; returns per-round outcomes, idleness and RSS (MiB)."""
    rng = random.Random(seed)
    results = []
    for round_ in range(rounds):
        plans = [_request(rng) for _ in range(requests)]
        start = time.monotonic()
        with ThreadPoolExecutor(workers) as pool:
            outcomes = list(pool.map(lambda plan: _send(server.url, plan), plans))
        idle = server.idle(timeout=60)
        gc.collect()
        entry = {
            "round": round_,
            "seconds": round(time.monotonic() - start, 2),
            "idle": idle,
            "rss_mib": round(rss_mib(), 1),
            "outcomes": {name: outcomes.count(name) for name in sorted(set(outcomes))},
        }
        results.append(entry)
        log(json.dumps(entry))
    steady = [r["rss_mib"] for r in results[1:]] or [results[0]["rss_mib"]]  # round 0 warms caches up
    return {
        "rounds": results,
        "rss_drift_mib": round(steady[-1] - steady[0], 1),
        "rss_span_mib": round(max(steady) - min(steady), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from reliability_server import InProcessServer, config

    server = InProcessServer(config())
    try:
        report = soak(server, args.rounds, args.requests, args.seed, args.workers)
        report["ok_after"] = server.ok()
    finally:
        server.stop()
    report["settings"] = vars(args) | {"out": str(args.out)}
    print(f"RSS drift {report['rss_drift_mib']} MiB, span {report['rss_span_mib']} MiB over rounds 1..")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not all(r["idle"] for r in report["rounds"]) or not report["ok_after"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
