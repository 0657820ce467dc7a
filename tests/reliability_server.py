"""The real app from loraplex/server/app.py with a real engine, served by uvicorn in a thread on loopback.

In-process so a test can reach the engine (inject a fault, read the KV pool and slot references) while the
requests still travel over real HTTP. ``config`` starts from the server tests' config (small limits, the
shipped adapters) and takes overrides per section.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from test_server_harness import free_port, write_config

from loraplex.engine.core.config import EngineConfig, load_config
from loraplex.server.app import _Listener, build_asgi
from loraplex.server.state import ServerState


def config(**sections: dict[str, Any]) -> EngineConfig:
    """The harness config with ``section={field: value}`` overrides (server, limits, auth)."""
    with tempfile.TemporaryDirectory() as folder:
        base = load_config(write_config(Path(folder), free_port(), free_port()))
    changes = {name: dataclasses.replace(getattr(base, name), **values) for name, values in sections.items()}
    return dataclasses.replace(base, **changes)


class InProcessServer:
    def __init__(self, config: EngineConfig) -> None:
        self.port = free_port()
        config.server.port = self.port
        for endpoint in config.endpoints:
            endpoint.port = 0  # one listener is enough here
        self.state = ServerState(config)
        self.state.load()
        self.server = _Listener(
            uvicorn.Config(build_asgi(self.state), host="127.0.0.1", port=self.port, lifespan="off", log_config=None)
        )
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine(self):
        return self.state.engine

    def idle(self, timeout: float = 10) -> bool:
        """Wait until nothing runs: no tracked sequence, no KV block, no slot reference, no admission ticket."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            engine = self.engine
            if (
                not engine.tracked
                and not engine.scheduler.running
                and not engine.scheduler.waiting
                and engine.block_manager.num_used_blocks == 0
                and not engine.lora.slots.refs
                and not self.state.admission.per_endpoint
                and not self.state.admission.per_client
                and self.state.async_engine.num_in_flight == 0
            ):
                return True
            time.sleep(0.05)
        return False

    def ok(self) -> bool:
        body = {"model": "base", "prompt": "Hi", "stream": False, "options": {"num_predict": 2, "temperature": 0}}
        return httpx.post(f"{self.url}/api/generate", json=body, timeout=60).status_code == 200

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.state.close()
