"""The GPU check's env stage: torch, CUDA and the GPU, and the copy bandwidth (the decode floor's denominator)."""

from __future__ import annotations

import platform

import torch
import transformers

from benchmarks.gpu.common import GB, Budget, Plan, time_op

# ---- stage: env -------------------------------------------------------------------------------------------------


def stage_env(plan: Plan, device: torch.device, dtype: torch.dtype, budget: Budget) -> dict:
    import peft

    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "multiprocessors": props.multi_processor_count,
            "gpu_memory_gb": round(props.total_memory / GB, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    src = torch.randn(plan.copy_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_op(lambda: dst.copy_(src), device, warmup=3, repeat=10)
    info["copy_bytes"] = plan.copy_bytes
    info["copy_ms"] = round(ms, 4)
    info["copy_bandwidth_gb_s"] = round(2 * plan.copy_bytes / (ms / 1e3) / GB, 1)  # bytes read + bytes written
    info["copy_bandwidth_note"] = "device-to-device copy_, (bytes read + bytes written) / median time"
    return info
