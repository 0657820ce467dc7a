"""Server processes for the HTTP benchmarks: ``loraplex serve`` or any other command, started, waited for until
ready, and always stopped (SIGTERM to the process group it started, then SIGKILL)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.harness.cli import ROOT

READY_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerSpec:
    """One process to start: its command, where it listens and which GET answers 200 once it is ready."""

    name: str
    command: list[str]
    port: int
    ready_path: str = "/ready"
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    cwd: Path = ROOT

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ServerProcess:
    """A running ``ServerSpec``, its output in ``log``."""

    def __init__(self, spec: ServerSpec, log: Path) -> None:
        self.spec, self.log = spec, log
        self.process: subprocess.Popen | None = None

    def launch(self) -> None:
        if self.process is not None:
            return
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **self.spec.env)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.spec.command,
                cwd=self.spec.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stop() reaches the workers it spawns too
            )

    def wait_ready(self, deadline: float) -> None:
        assert self.process is not None, "launch() first"
        url = self.spec.url
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.spec.name} ({url}) exited with {self.process.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + self.spec.ready_path, timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.spec.name} ({url}) not ready in time:\n{self.tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Deployment:
    """What one system runs: its processes and which endpoints (model names) each one serves."""

    name: str
    description: str
    servers: list[ServerSpec]
    endpoints: list[list[str]]  # per process
    threads_per_process: int
    configs: list[str] = field(default_factory=list)  # the config text of each process, for the record


class Servers:
    """A deployment's processes, started at once and waited for; ``stop`` always ends every one of them."""

    def __init__(self, deployment: Deployment, folder: Path) -> None:
        self.deployment = deployment
        self.processes = [ServerProcess(s, folder / f"{s.name}.log") for s in deployment.servers]

    def urls(self) -> dict[str, str]:
        """Endpoint name -> base URL of the process serving it."""
        served = zip(self.deployment.servers, self.deployment.endpoints, strict=True)
        return {name: spec.url for spec, names in served for name in names}

    def launch(self) -> None:
        """Start the processes without waiting for them (``start`` waits); once."""
        for process in self.processes:
            process.launch()

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        self.launch()
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.wait_ready(deadline)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- loraplex serve ------------------------------------------------------------------------------------------


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


def endpoint_tables(config: object, slots: int | None = None) -> list[dict]:
    """The config's endpoints as TOML tables (``slots`` overrides every endpoint's)."""
    tables = []
    for e in config.endpoints:
        table: dict = {"name": e.name, "slots": slots or e.slots}
        if e.adapter:
            table["adapter"] = e.adapter
        tables.append(table)
    return tables


def loraplex_server(name: str, port: int, toml: str, folder: Path) -> ServerSpec:
    """``loraplex serve`` of the config ``toml`` (written into ``folder``), which listens on ``port``."""
    path = folder / f"{name}.toml"
    path.write_text(toml)
    return ServerSpec(name, [sys.executable, "-m", "loraplex.cli", "serve", "--config", str(path)], port)


def loraplex_deployment(
    config: object, threads: int, request_timeout: float, folder: Path, limits: dict | None = None
) -> Deployment:
    """One ``loraplex serve`` with every endpoint of ``config``; prefix caching off (workloads are replayed, and
    a cache would serve a replay from the run before), ``limits`` overriding the config's."""
    port = free_port()
    limits = dict(vars(config.limits), prefix_caching=False, **(limits or {}))
    toml = config_toml(port, threads, endpoint_tables(config), limits, request_timeout, config.adapters.roots)
    slots = ", ".join(f"{e.name} {e.slots}" for e in config.endpoints)
    return Deployment(
        name="loraplex",
        description=f"one loraplex serve process, all {len(config.endpoints)} endpoints (slots: {slots}), "
        f"max_num_seqs {limits['max_num_seqs']}, num_threads {threads}",
        servers=[loraplex_server("loraplex-0", port, toml, folder)],
        endpoints=[[e.name for e in config.endpoints]],
        threads_per_process=threads,
        configs=[toml],
    )
