#!/usr/bin/env bash
# The GPU check in one command, under a hard time limit (default 480 s): see benchmarks/gpu/README.md.
#   bash benchmarks/gpu_check.sh                  # on the GPU machine; results in $OUT or benchmarks/results
#   bash benchmarks/gpu_check.sh --device cpu --tiny
# Extra arguments go to benchmarks/gpu_check.py. What the GPU image lacks (the gguf package, the default model's
# GGUF, the Llama 3 tokenizer file) comes from .gpu_assets/, made by benchmarks/gpu/pack_assets.sh.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
ASSETS=${LORAPLEX_GPU_ASSETS:-$PWD/.gpu_assets}
export LORAPLEX_GPU_ASSETS=$ASSETS
if compgen -G "$ASSETS/wheels/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/loraplex-site "$ASSETS"/wheels/*.whl && export PYTHONPATH=/tmp/loraplex-site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -f "$ASSETS/tokenizer/tokenizer.model" ] && [ -z "${LLAMA3_TOKENIZER_MODEL:-}" ]; then
    export LLAMA3_TOKENIZER_MODEL=$ASSETS/tokenizer/tokenizer.model
fi
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null || true
timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT:-480}" \
    "$PYTHON" benchmarks/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "gpu_check: stopped at the ${GPU_CHECK_TIMEOUT:-480} s limit; finished stages are in $OUT_DIR/gpu_check.json"
exit "$status"
