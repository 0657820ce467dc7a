"""The engine's CPU kernels: built once from ``kernels/cpu/csrc``, then loaded as ``torch.ops.loraplex``.

Why hand-written kernels (float32 on the CPU only; CUDA and other dtypes keep the torch ops):

- ``paged_decode_attention``: decode attention reads each sequence's K/V through its block table. torch's
  SDPA needs that context as one dense tensor, so the portable path copies every sequence's blocks out of the
  cache and pads them to the longest in its group; on the 2-core CPU this project is measured on, the copy
  plus the padded read took about a quarter of a 48-sequence decode step. No maintained library ships a
  paged decode attention for torch's CPU build; the kernel reads the rows where they lie.
- ``lora_decode_delta``: the portable multi-LoRA op for decode rows is three torch calls per projection
  (shrink over every resident adapter, mask, expand), 210 per step on the default model; on the CPU their
  call overhead dominates at a few rows, and the other adapters' columns are wasted work at many. The
  kernel runs each row through its own adapter, to that adapter's rank, in one call; from 8 rows with an
  adapter it takes them adapter by adapter, so each adapter's weights are read once per call rather than once
  per row.
- ``panel_linear`` (with ``pack_linear_weight``) and ``row_major_linear``: the decoder's projections and the
  LM head (kernels/cpu/linear.py). A decode step multiplies every weight by a few rows; oneDNN's packed path
  and MKL read the weights there at about half the memory's bandwidth, and the weights are most of a small
  batch's step. oneDNN's packed layout is opaque, so no kernel of ours can read it: the projections are
  packed in the kernel's own layout instead, with oneDNN's packing as the fallback when the kernels are off.
  ``panel_linear_q4`` reads projections kept in a GGUF file's 4-bit blocks (kernels/cpu/gguf_weights.py) and gives
  ``panel_linear``'s results to the bit from a fifth of the bytes; ``row_major_linear_q8`` does the same for
  an LM head tied to embeddings kept in 8-bit blocks.
- ``rms_norm``: Llama's RMSNorm in one pass per row instead of six torch ops (kernels/cpu/norm.py).

All are plain loops (compiled with the host's vector instructions) with torch ops as their references in the
tests. They are compiled with torch's C++ extension builder (g++ and ninja) on first use, into the
loraplex cache folder under a name keyed by the CPU's instruction-set flags, the torch version and the sources,
so a cache copied to another machine is never run on a CPU it was not built for. If they cannot be built, the engine
says why and keeps the torch ops; ``model.cpu_kernels = false`` chooses those outright.
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

from loraplex.engine.core.config import ModelConfig

log = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).with_name("csrc") / name
    for name in (
        "paged_decode_attention.cpp",
        "lora_decode.cpp",
        "panel_linear.cpp",
        "row_major_linear.cpp",
        "rms_norm.cpp",
        "parallel.cpp",
    )
]
HEADERS = [Path(__file__).with_name("csrc") / name for name in ("vec8.h", "parallel.h")]
OPS = (
    "paged_decode_attention",
    "lora_decode_delta",
    "pack_linear_weight",
    "panel_linear",
    "panel_linear_q4",
    "row_major_linear",
    "row_major_linear_q8",
    "rms_norm",
    "set_dynamic_split",
)
_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet in this process


def wanted(config: ModelConfig) -> bool:
    """The kernels serve a float32 model on the CPU (the cache and adapters they read are in its dtype)."""
    return config.cpu_kernels and config.device == "cpu" and config.dtype == "float32"


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


def _sources_key() -> str:
    """A hash of the sources and headers, and of where they are: each version, and each checkout or install,
    builds in a folder of its own. torch's builder rebuilds in place when the sources change or sit at another
    path (its ninja file names them by path), and the linker then rewrites the library under any process that
    has it loaded (another checkout's tests, a server still running), which crashes it; nor would the builder
    see an edited header. The folder's name sees all three."""
    files = (*SOURCES, *HEADERS)
    return hashlib.sha256(b"".join(str(p).encode() + p.read_bytes() for p in files)).hexdigest()[:16]


def load(cache_root: Path) -> bool:
    """Build (first time only) and load the kernels; True when ``torch.ops.loraplex`` has them."""
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
        log.warning("CPU kernels not built (they need ninja and a C++ compiler); using the slower torch ops")
        return False
    build_dir = cache_root / "kernels" / f"cpu_{_cpu_key()}_{_sources_key()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("loading the CPU kernels (compiled on first use, about 45 s on 2 cores) from %s", build_dir)
    try:
        cpp_extension.load(
            name="loraplex_cpu_kernels",
            sources=[str(p) for p in SOURCES],
            # -ffast-math: the dot products and the softmax's exp vectorise (lane-wise partial sums; the order
            # of a float32 sum differs from torch's in the last bits, as any two kernels' orders do).
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # a missing header, a compiler error: serve anyway, on the slower path
        log.warning("CPU kernels could not be built (%s); using the slower torch ops", e)
        return False
    return all(hasattr(torch.ops.loraplex, op) for op in OPS)
