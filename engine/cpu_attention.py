"""The CPU decode-attention kernel: built once from ``engine/csrc``, then loaded as ``torch.ops.loraplex``.

Why a hand-written kernel: decode attention reads each sequence's K/V through its block table. torch's SDPA
needs that context as one dense tensor, so the Python path copies every sequence's blocks out of the cache and
pads them to the longest in its group; on the 2-core CPU this project is measured on, the copy plus the padded
read took about a quarter of a 48-sequence decode step. No maintained library ships a paged decode attention
for torch's CPU build, so ``engine/csrc/paged_decode_attention.cpp`` reads the rows in place (30 lines of
loops, compiled with the host's vector instructions).

It is compiled with torch's C++ extension builder (g++ and ninja) on first use, into the loraplex cache folder
under a name keyed by the CPU's instruction-set flags and the torch version, so a cache copied to another
machine is never run on a CPU it was not built for. If it cannot be built, the engine says why and keeps the
SDPA path; ``model.cpu_attention_kernel = false`` chooses that path outright.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch

from engine.config import ModelConfig

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_decode_attention.cpp"
_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet in this process


def wanted(config: ModelConfig) -> bool:
    """The kernel serves a float32 model on the CPU (the cache it reads is in the model's dtype)."""
    return config.cpu_attention_kernel and config.device == "cpu" and config.dtype == "float32"


def _cpu_key() -> str:
    """The instruction-set flags of this CPU plus the torch version, hashed: part of the build folder's name."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha256(f"{flags}|{torch.__version__}".encode()).hexdigest()[:16]


def load(cache_root: Path) -> bool:
    """Build (first time only) and load the kernel; True when ``torch.ops.loraplex.paged_decode_attention`` works."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _build_and_load(cache_root)
        return _loaded


def _build_and_load(cache_root: Path) -> bool:
    from torch.utils import cpp_extension

    try:  # the ninja wheel puts its binary next to the interpreter's scripts, which may not be on PATH
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    if shutil.which("ninja") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        log.warning("CPU attention kernel not built (needs ninja and a C++ compiler); decode attention uses SDPA")
        return False
    build_dir = cache_root / "kernels" / f"paged_decode_{_cpu_key()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("loading the CPU attention kernel (compiled on first use, about 20 s) from %s", build_dir)
    try:
        cpp_extension.load(
            name="loraplex_paged_decode",
            sources=[str(SOURCE)],
            # -ffast-math: the dot products and the softmax's exp vectorise (lane-wise partial sums; the order
            # of a float32 sum differs from SDPA's in the last bits, as any two attention kernels do).
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # a missing header, a compiler error: serve anyway, on the slower path
        log.warning("CPU attention kernel could not be built (%s); decode attention uses SDPA", e)
        return False
    return hasattr(torch.ops.loraplex, "paged_decode_attention")
