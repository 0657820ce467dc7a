"""SIGTERM with a stream in flight: new requests get 503, the stream completes, the process exits 0."""

from __future__ import annotations

import json
import signal
import time

import httpx
from test_server_harness import COUNTING, COUNTING_OPTIONS, start_server


def test_sigterm_drains_then_exits_zero() -> None:
    server = start_server(grace_period=60)
    try:
        body = COUNTING | {"options": COUNTING_OPTIONS | {"num_predict": 100}}  # seconds of tokens, on any CPU
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{server.url}/api/generate", json=body) as r:
            lines = r.iter_lines()
            first = json.loads(next(lines))
            assert first["done"] is False
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert httpx.get(f"{server.url}/ready").status_code == 503
            refused = httpx.post(f"{server.url}/api/generate", json=body)
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
            rest = [json.loads(line) for line in lines if line]
        assert rest[-1]["done"] is True and rest[-1]["eval_count"] == 1 + len(rest)
        assert server.process.wait(timeout=30) == 0
        assert "listening on" in server.log() and "stopped" in server.log()
    finally:
        server.stop()
