"""A real ``loraplex serve`` process on loopback for the server tests, started once per test session.

Every server test module asks for ``shared_server()``; the first call starts the process (random free ports,
a small-limits copy of the default config, adapter paths absolute) and waits for ``/ready``; it is stopped
with SIGTERM when the session ends. ``start_server`` gives a test a private process (the SIGTERM test).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = REPO / "loraplex" / "adapters"
READY_TIMEOUT_S = 180
PROMPT = "Explain in two sentences what a LoRA adapter is."
# A request that runs as long as its num_predict allows, on any machine: a raw counting prompt on the base (no
# chat template, so no end-of-turn) with no repeat penalty to push the model off the count. A chat answer
# ends at its end-of-turn, which a fast CPU reaches in about a second.
COUNTING = {"model": "base", "prompt": "1, 2,", "raw": True}
COUNTING_OPTIONS = {"temperature": 0, "repeat_penalty": 1.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(folder: Path, main_port: int, chatbot_port: int, grace_period: float = 60) -> Path:
    """The default endpoints with small limits; the chatbot endpoint also gets a listener of its own."""
    path = folder / "server_test.toml"
    path.write_text(f"""
[model]
path = ""
dtype = "float32"
num_threads = 1

[limits]
max_num_seqs = 16
max_num_batched_tokens = 256
block_size = 16
num_kv_blocks = 256
max_model_len = 512
max_loras = 4
max_lora_rank = 64
max_waiting = 32

[server]
host = "127.0.0.1"
port = {main_port}
grace_period = {grace_period}
state_dir = "{folder / "state"}"

[[endpoints]]
name = "base"
slots = 1
aliases = ["llama3", "smollm2"]

[[endpoints]]
name = "chatbot"
adapter = "{ADAPTERS / "chatbot"}"
slots = 3
port = {chatbot_port}

[[endpoints]]
name = "code"
adapter = "{ADAPTERS / "code"}"
slots = 2

[[endpoints]]
name = "summarization"
adapter = "{ADAPTERS / "summarization"}"
slots = 1
""")
    return path


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    chatbot_port: int
    log_path: Path
    folder: tempfile.TemporaryDirectory = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def chatbot_url(self) -> str:
        return f"http://127.0.0.1:{self.chatbot_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {READY_TIMEOUT_S} s:\n{self.log()}")

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.folder.cleanup()
        return self.process.returncode

    def metric(self, name: str) -> float:
        """The value of an unlabelled sample in /metrics."""
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)


def start_server(grace_period: float = 60) -> ServerProcess:
    folder = tempfile.TemporaryDirectory(prefix="loraplex-server-test-")
    port, chatbot_port = free_port(), free_port()
    config = write_config(Path(folder.name), port, chatbot_port, grace_period)
    log_path = Path(folder.name) / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "loraplex.cli", "serve", "--config", str(config)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = ServerProcess(process, port, chatbot_port, log_path, folder)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


_shared: ServerProcess | None = None


def shared_server() -> ServerProcess:
    """One server for the whole session: loading the model is the slowest part of the suite."""
    global _shared
    if _shared is None or _shared.process.poll() is not None:
        _shared = start_server()
        atexit.register(_shared.stop)
    return _shared
