"""The package as a user installs it: a wheel built from this checkout, installed into a fresh virtual
environment outside the checkout, serves the default model and all four endpoints with the adapters it ships.

The new environment gets the wheel alone; its dependencies (torch, transformers, ...) are this environment's,
reached through a ``.pth`` line, so the test installs nothing from the network. A ``.pth`` line adds a folder to
the path without running the ``.pth`` files inside it, so the checkout's editable install stays out of sight.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from pathlib import Path

import httpx
import pytest
from test_server_harness import PROMPT, ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
ENDPOINTS = ("base", "chatbot", "code", "summarization")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with only the loraplex wheel installed; returns its bin folder."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work), str(REPO)],
        check=True,
    )
    (wheel,) = work.glob("loraplex-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)], check=True
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_the_wheel_holds_the_package_under_its_own_name_with_its_adapters(installed: Path) -> None:
    script = (
        "import loraplex, loraplex.engine, loraplex.server, pathlib; "
        "root = pathlib.Path(loraplex.__file__).parent; "
        "print(root); print(sorted(p.name for p in (root / 'adapters').iterdir()))"
    )
    out = subprocess.run(
        [str(installed / "python"), "-c", script], check=True, capture_output=True, text=True, cwd=tempfile.gettempdir()
    ).stdout.splitlines()
    assert Path(out[0]).is_relative_to(installed.parent), "loraplex is imported from the wheel, not the checkout"
    assert out[1] == str(["chatbot", "code", "summarization"])
    csrc = Path(out[0]) / "engine" / "kernels" / "cpu" / "csrc"
    shipped = sorted(p.name for p in (REPO / "loraplex" / "engine" / "kernels" / "cpu" / "csrc").iterdir())
    assert sorted(p.name for p in csrc.iterdir()) == shipped, "the CPU kernels' sources, to compile from the wheel"
    site = Path(out[0]).parent
    assert not (site / "engine").exists() and not (site / "server").exists(), "no generic top-level names"
    version = subprocess.run([str(installed / "loraplex"), "--version"], check=True, capture_output=True, text=True)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert version.stdout.strip() == f"loraplex {project['version']}", "the installed distribution's version"


@pytest.mark.slow
def test_loraplex_serve_from_the_wheel_answers_every_endpoint(installed: Path, tmp_path: Path) -> None:
    port = free_port()
    extra = REPO / "loraplex" / "adapters" / "code"  # any PEFT folder: --adapter serves it as one more endpoint
    log_path = tmp_path / "server.log"
    # torch ops, not the CPU kernels: built from the wheel's own copy of the sources they would compile again
    # (~1 min); the test above checks those sources are in the wheel
    env = dict(os.environ, HF_HUB_OFFLINE="1", LORAPLEX_MODEL_NUM_THREADS="1", LORAPLEX_MODEL_CPU_KERNELS="false")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(installed / "loraplex"), "serve", "--port", str(port), "--adapter", f"extra={extra}"],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = ServerProcess(process, port, port, log_path, tempfile.TemporaryDirectory())
    try:
        server.wait_ready()
        served = {m["name"].removesuffix(":latest") for m in httpx.get(f"{server.url}/api/tags").json()["models"]}
        assert served == {*ENDPOINTS, "extra"}
        answers = {}
        for model in (*ENDPOINTS, "extra"):
            body = {"model": model, "prompt": PROMPT, "stream": False, "options": {"num_predict": 8, "temperature": 0}}
            reply = httpx.post(f"{server.url}/api/generate", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            answers[model] = reply.json()["response"]
        assert all(answers.values()), answers
        assert answers["extra"] == answers["code"], "the same adapter behind another name answers the same"
        assert len({answers[m] for m in ENDPOINTS}) > 1, "the adapters change the output"
    finally:
        assert server.stop() == 0, server.log()
