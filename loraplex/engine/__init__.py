"""The engine: one base model serves the base and every adapter, one continuous-batching step at a time.

- ``core/``: the request lifecycle (``engine.py``'s step: schedule, run the model, sample, postprocess),
  the scheduler, KV block manager, sequences, configuration, errors, detokenizer.
- ``model/``: one forward step over the paged KV cache (runner, attention, KV cache, sampler, loader,
  CUDA-graph replay).
- ``lora/``: adapters read from disk, the device slots they occupy, the batched multi-LoRA layers and ops.
- ``kernels/``: one device's kernels (``cpu/`` C++, ``cuda/`` Triton), reached only through
  ``kernels.prepare_weights`` and ``kernels.attach_decode``.

Nothing here imports ``loraplex.server``.

OpenMP reads its wait policy once, when torch loads it, so it is set here, before any engine module imports
torch (a program that imports torch first keeps OpenMP's default; a policy set in the environment wins). By
default an OpenMP thread spins for a while after each parallel region; when another process shares the cores,
the spinning takes the time the thread doing the step needed (benchmarks/contention.py).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
