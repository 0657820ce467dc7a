"""Issue 7.2, a short soak on the real app and engine: see benchmarks/soak.py for the longer one.

Four seeded rounds of 12 mixed requests (Ollama and OpenAI, streaming and not, base and every shipped
adapter), about 40% of clients disconnecting mid-stream or timing out. After every round: no running
sequence, every KV block free, no adapter slot reference, no admission ticket, no 5xx. Resident memory
after rounds 1..3 (round 0 warms up allocator pools and caches) may drift by at most RSS_DRIFT_MIB: the KV
pool and adapter slots are preallocated, so growth of that order would mean a leak of per-request state
(the 64 MiB bound leaves room for the allocator's and Python's arena noise, measured at a few MiB).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_server import InProcessServer, config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from soak import soak

RSS_DRIFT_MIB = 64
ROUNDS, REQUESTS = 4, 12


@pytest.fixture(scope="module")
def server() -> Iterator[InProcessServer]:
    server = InProcessServer(config())
    yield server
    server.stop()


def test_soak_with_disconnects_and_timeouts_leaves_nothing_behind(server: InProcessServer) -> None:
    report = soak(server, ROUNDS, REQUESTS, seed=7, workers=4, log=lambda line: print(line))
    for entry in report["rounds"]:
        assert entry["idle"], entry
        assert not any(name.startswith("http 5") for name in entry["outcomes"]), entry
    assert report["leaks"]["zero"], report["leaks"]
    assert not any(name.startswith(("connection", "client")) for name in report["totals"]["errors"]), report["totals"]
    outcomes = {name for entry in report["rounds"] for name in entry["outcomes"]}
    assert {"completed", "disconnected"} <= outcomes, outcomes  # the seed exercises both paths
    steady = [entry["rss_mib"] for entry in report["rounds"][1:]]
    print(f"RSS after rounds 1..{ROUNDS - 1}: {steady} MiB; drift from round 0 {report['rss_drift_mib']} MiB")
    assert max(steady) - min(steady) <= RSS_DRIFT_MIB, steady
    assert server.ok() and server.idle()
