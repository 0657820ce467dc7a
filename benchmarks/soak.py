"""Issue 7.2, soak: mixed requests over every generation endpoint, a share of clients walking away mid-stream.

Each round sends ``--requests`` seeded requests (Ollama and OpenAI, streaming and not, over base and the
shipped adapters) from a thread pool; about 40% of clients disconnect after a random number of chunks or give
up on a short client timeout. Rounds go on until ``--duration`` minutes have passed (the round running at the
deadline finishes; no new one starts) or ``--rounds`` rounds are done, whichever comes first.

Per round and in total: requests sent, completed, aborted by the client (``disconnect``, ``timeout``) and
errors by class (``http 503``, ``stream error`` for an error chunk inside a 200 stream, ``connection
ReadError``, ``timeout ReadTimeout`` for a client that did not plan to give up, ``client ValueError``).
After each round the server must go idle (no running or waiting sequence, every KV block free, no adapter slot
reference, no admission ticket, nothing in flight); the counts behind that check and the process RSS (after
``gc.collect``, the server and its clients share the process) are recorded with a timestamp.

Memory drift = median RSS of the last three rounds minus the RSS after the warm-up round (round 0: allocator
pools, tokenizer and metric caches fill there). Allowed: 64 MiB (``--allowed-drift-mib``). The KV pool and the
adapter slots are preallocated before round 0, so a steady server's RSS moves only with allocator and Python
arena noise (a few MiB in the runs so far); a per-request leak grows with requests served, and over a
30-minute soak (a few thousand requests) 64 MiB is crossed by anything that keeps ~20 KiB per request, the
size of one request's token lists, detokenizer state and HTTP objects.

    python benchmarks/soak.py --duration 30 --requests 30       # the long soak
    python benchmarks/soak.py --rounds 2 --requests 10 --out /tmp/soak.json   # a smoke run

writes ``benchmarks/results/soak.{json,md,png}`` (``--out`` names the JSON; the others sit beside it).
``tests/test_reliability_soak.py`` runs a short version in CI.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.harness import report
from benchmarks.harness.cli import RESULTS, ROOT
from benchmarks.harness.machine import load_average, machine_description
from benchmarks.harness.memory import MB, rss_bytes

MODELS = ("base", "chatbot", "code", "summarization")
ABANDON_SHARE = 0.4
ALLOWED_DRIFT_MIB = 64.0
WARMUP_ROUNDS = 1
LAST_ROUNDS = 3  # the drift compares their median, so one round's transient allocation does not decide it

COMPLETED = "completed"
ABORTS = {"disconnected": "disconnect", "timed out": "timeout"}  # outcome -> abort kind; planned by the client


def rss_mib() -> float:
    return rss_bytes() / MB


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
    """Run one client; returns its outcome: ``completed``, an abort (a key of ``ABORTS``) or an error class."""
    planned_timeout = plan["behaviour"] == "timeout"
    try:
        timeout = plan["timeout"] if planned_timeout else 120
        with httpx.stream("POST", url + plan["path"], json=plan["body"], timeout=timeout) as response:
            if response.status_code != 200:
                return f"http {response.status_code}"
            for i, line in enumerate(response.iter_lines()):
                if line.removeprefix("data: ").startswith('{"error"'):
                    return "stream error"  # the server ended a 200 stream with an error chunk
                if plan["behaviour"] == "disconnect" and i >= plan["after"]:
                    return "disconnected"  # leaving the block closes the connection mid-stream
        return COMPLETED
    except httpx.TimeoutException as e:
        return "timed out" if planned_timeout else f"timeout {type(e).__name__}"
    except httpx.TransportError as e:
        return f"connection {type(e).__name__}"
    except Exception as e:  # anything else the client raised is counted, not allowed to end the round
        return f"client {type(e).__name__}"


def tally(outcomes: Counter[str]) -> dict[str, Any]:
    """Outcomes as sent / completed / aborted by kind / errors by class."""
    aborted = {kind: outcomes[outcome] for outcome, kind in ABORTS.items()}
    errors = {name: n for name, n in sorted(outcomes.items()) if name != COMPLETED and name not in ABORTS}
    return {
        "sent": outcomes.total(),
        "completed": outcomes[COMPLETED],
        "aborted": aborted | {"total": sum(aborted.values())},
        "errors": errors,
        "errors_total": sum(errors.values()),
    }


def resources(server) -> dict[str, int]:
    """What the idle check looks at, as counts: all zero when nothing is left behind."""
    engine, admission = server.engine, server.state.admission
    return {
        "running": len(engine.scheduler.running),
        "waiting": len(engine.scheduler.waiting),
        "tracked": len(engine.tracked),
        "kv_blocks_used": engine.block_manager.num_used_blocks,
        "slot_refs": sum(engine.lora.slots.refs.values()),
        "admission_tickets": sum(admission.per_endpoint.values()) + sum(admission.per_client.values()),
        "in_flight": server.state.async_engine.num_in_flight,
    }


def memory_drift(rounds: list[dict], allowed_mib: float, warmup_rounds: int = WARMUP_ROUNDS) -> dict[str, Any]:
    """RSS of the last rounds (median) minus the RSS after the warm-up, against the allowed bound."""
    rss = [r["rss_mib"] for r in rounds]
    baseline_round = min(warmup_rounds, len(rss)) - 1
    steady = rss[baseline_round + 1 :] or rss[-1:]
    last = steady[-LAST_ROUNDS:]
    drift = statistics.median(last) - rss[baseline_round]
    return {
        "baseline_round": baseline_round,
        "baseline_rss_mib": rss[baseline_round],
        "last_rounds": len(last),
        "last_rss_mib": round(statistics.median(last), 1),
        "drift_mib": round(drift, 1),
        "allowed_drift_mib": allowed_mib,
        "within_bound": drift <= allowed_mib,
        "peak_rss_mib": max(rss),
        "span_after_warmup_mib": round(max(steady) - min(steady), 1),
    }


def soak(
    server,
    rounds: int | None,
    requests: int,
    seed: int = 0,
    workers: int = 6,
    log: Callable[[str], Any] = print,
    duration_s: float | None = None,
    allowed_drift_mib: float = ALLOWED_DRIFT_MIB,
    warmup_rounds: int = WARMUP_ROUNDS,
) -> dict[str, Any]:
    """Run rounds against an ``InProcessServer`` until ``rounds`` are done or ``duration_s`` has passed."""
    if rounds is None and duration_s is None:
        raise ValueError("soak needs a bound: rounds or duration_s")
    rng = random.Random(seed)
    gc.collect()
    rss_at_start = round(rss_mib(), 1)
    start = time.monotonic()
    results: list[dict] = []
    while (rounds is None or len(results) < rounds) and (duration_s is None or time.monotonic() - start < duration_s):
        plans = [_request(rng) for _ in range(requests)]
        round_start = time.monotonic()
        with ThreadPoolExecutor(workers) as pool:
            outcomes = Counter(pool.map(lambda plan: _send(server.url, plan), plans))
        idle = server.idle(timeout=60)
        left = resources(server)
        gc.collect()
        now = time.monotonic()
        entry = {
            "round": len(results),
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "elapsed_min": round((now - start) / 60, 3),
            "seconds": round(now - round_start, 2),
            "idle": idle,
            "resources": left,
            "rss_mib": round(rss_mib(), 1),
            "outcomes": dict(sorted(outcomes.items())),
            **tally(outcomes),
        }
        results.append(entry)
        log(
            f"round {entry['round']} at {entry['elapsed_min']:.2f} min: {entry['sent']} sent, "
            f"{entry['completed']} completed, {entry['aborted']['total']} aborted, {entry['errors_total']} errors"
            f"{' ' + str(entry['errors']) if entry['errors'] else ''}, "
            f"{'idle' if idle else f'NOT IDLE {left}'}, RSS {entry['rss_mib']} MiB"
        )
    outcomes = sum((Counter(r["outcomes"]) for r in results), Counter())
    final = resources(server)
    memory = {"rss_at_start_mib": rss_at_start} | memory_drift(results, allowed_drift_mib, warmup_rounds)
    return {
        "rounds": results,
        "elapsed_min": round((time.monotonic() - start) / 60, 2),
        "stopped_by": "rounds" if rounds is not None and len(results) >= rounds else "duration",
        "totals": tally(outcomes) | {"outcomes": dict(sorted(outcomes.items()))},
        "leaks": {
            "rounds_not_idle": [r["round"] for r in results if not r["idle"]],
            "final": final,
            "zero": all(r["idle"] for r in results) and not any(final.values()),
        },
        "memory": memory,
        "rss_drift_mib": memory["drift_mib"],
        "rss_span_mib": memory["span_after_warmup_mib"],
    }


def passed(data: dict) -> bool:
    """Zero leaks, drift within bound, no error of any class, and the server still answers afterwards."""
    return (
        data["leaks"]["zero"]
        and data["memory"]["within_bound"]
        and data["totals"]["errors_total"] == 0
        and data.get("ok_after", True)
    )


def plot(data: dict, path: Path) -> None:
    """RSS over elapsed minutes with the allowed-drift band; below it, each round's outcomes."""
    plt = report.pyplot()
    rounds, memory = data["rounds"], data["memory"]
    minutes = [r["elapsed_min"] for r in rounds]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=(2, 1))
    baseline, allowed = memory["baseline_rss_mib"], memory["allowed_drift_mib"]
    top.axhspan(baseline, baseline + allowed, color="tab:green", alpha=0.12, label=f"allowed drift (+{allowed:g} MiB)")
    top.axhline(baseline, color="tab:green", lw=1, ls="--", label=f"after warm-up round ({baseline} MiB)")
    top.plot(minutes, [r["rss_mib"] for r in rounds], "o-", ms=3, color="tab:blue", label="RSS after round (gc)")
    note = f"at the start (model loaded, before round 0): {memory['rss_at_start_mib']} MiB"
    top.text(0.01, 0.97, note, transform=top.transAxes, va="top", fontsize=8)
    bad = [r for r in rounds if not r["idle"]]
    if bad:
        top.plot([r["elapsed_min"] for r in bad], [r["rss_mib"] for r in bad], "x", color="red", ms=9, label="not idle")
    top.set_ylabel("resident memory (MiB)")
    top.set_title(
        f"soak: {data['totals']['sent']} requests in {data['elapsed_min']:.1f} min, "
        f"drift {memory['drift_mib']:+.1f} MiB (allowed {allowed:g}), "
        f"leaks: {'none' if data['leaks']['zero'] else 'YES'}"
    )
    top.legend(loc="best", fontsize=8)
    top.grid(alpha=0.3)
    widths = [-r["seconds"] / 60 for r in rounds]  # each bar spans its round, ending at its RSS sample
    completed = [r["completed"] for r in rounds]
    aborted = [r["aborted"]["total"] for r in rounds]
    errors = [r["errors_total"] for r in rounds]
    bottom.bar(minutes, completed, widths, align="edge", color="tab:blue", label="completed")
    bottom.bar(minutes, aborted, widths, align="edge", bottom=completed, color="tab:orange", label="aborted by client")
    stacked = [c + a for c, a in zip(completed, aborted, strict=True)]
    bottom.bar(minutes, errors, widths, align="edge", bottom=stacked, color="red", label="errors")
    bottom.set_xlabel("elapsed (minutes)")
    bottom.set_ylabel("requests per round")
    bottom.legend(loc="best", fontsize=8)
    report.save(fig, path)


def markdown(data: dict) -> str:
    totals, memory, leaks, settings = data["totals"], data["memory"], data["leaks"], data["settings"]
    aborted = totals["aborted"]
    errors = ", ".join(f"{name}: {n}" for name, n in totals["errors"].items()) or "none"
    final = ", ".join(f"{name} {n}" for name, n in leaks["final"].items())
    plot_name = Path(settings["out"]).with_suffix(".png").name
    return f"""# Soak: {"PASS" if data["passed"] else "FAIL"}

`python benchmarks/soak.py {settings["command"]}` on {data["machine"]["date"]}: {data["machine"]["logical_cores"]} CPUs,
load average {data["machine"]["load_average_at_start"]} at start and {data["machine"]["load_average_at_end"]}
at the end, {settings["threads"]} torch threads, {settings["workers"]} client threads. {len(data["rounds"])}
rounds of {settings["requests"]} requests in {data["elapsed_min"]:.1f} min, stopped by {data["stopped_by"]}.

| requests | count |
| --- | ---: |
| sent | {totals["sent"]} |
| completed | {totals["completed"]} |
| aborted by the client: disconnect mid-stream | {aborted["disconnect"]} |
| aborted by the client: timeout | {aborted["timeout"]} |
| errors | {totals["errors_total"]} ({errors}) |

Leaks (target: zero): rounds whose idle check failed: {leaks["rounds_not_idle"] or "none"}; at the end: {final}.
The server answered a request after the soak: {data["ok_after"]}.

Memory (RSS after `gc.collect`; server and clients share the process): {memory["rss_at_start_mib"]} MiB at the
start, {memory["baseline_rss_mib"]} MiB after warm-up round {memory["baseline_round"]}, {memory["last_rss_mib"]} MiB
at the end (median of the last {memory["last_rounds"]} rounds): drift {memory["drift_mib"]:+.1f} MiB, allowed
{memory["allowed_drift_mib"]:g} MiB. Peak {memory["peak_rss_mib"]} MiB, span after warm-up
{memory["span_after_warmup_mib"]} MiB. Plot: `{plot_name}`.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, help="minutes; rounds go on until then (default: no time bound)")
    parser.add_argument("--rounds", type=int, help="at most this many rounds (default 10 without --duration)")
    parser.add_argument("--requests", type=int, default=30, help="requests per round")
    parser.add_argument("--workers", type=int, default=6, help="client threads")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the engine (model.num_threads)")
    parser.add_argument("--allowed-drift-mib", type=float, default=ALLOWED_DRIFT_MIB)
    parser.add_argument("--warmup-rounds", type=int, default=WARMUP_ROUNDS, help="the drift's baseline is after these")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json", help="the JSON; .md and .png beside it")
    args = parser.parse_args()
    if args.rounds is None and args.duration is None:
        args.rounds = 10
    sys.path.insert(0, str(ROOT / "tests"))
    from reliability_server import InProcessServer, config

    machine = machine_description(args.threads)
    server = InProcessServer(config(model={"num_threads": args.threads}))
    try:
        duration_s = args.duration * 60 if args.duration is not None else None
        bounds = (args.allowed_drift_mib, args.warmup_rounds)
        data = soak(server, args.rounds, args.requests, args.seed, args.workers, print, duration_s, *bounds)
        data["ok_after"] = server.ok()
    finally:
        server.stop()
    machine["load_average_at_end"] = load_average()
    data["machine"] = machine
    data["settings"] = vars(args) | {"out": str(args.out), "command": " ".join(sys.argv[1:])}
    data["passed"] = passed(data)
    report.write(args.out.parent, args.out.stem, data, markdown(data), lambda path: plot(data, path))
    if not data["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
