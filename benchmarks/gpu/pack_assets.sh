#!/usr/bin/env bash
# Run here (CPU machine, venv active) before the GPU session: puts in .gpu_assets/ (git-ignored through
# .git/info/exclude) what the GPU image lacks. The default model's GGUF (98 MB) is over one call's 64 MiB, so it
# travels in two parts, one per call, on the same warm machine (see README.md):
#   .gpu_assets/gguf_a/   first part + tokenizer/   -> carry in call 1
#   .gpu_assets/gguf_b/   second part, wheels/      -> carry in call 2 (the one that runs gpu_check.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
A=.gpu_assets
grep -qxF "/$A/" .git/info/exclude 2>/dev/null || echo "/$A/" >>.git/info/exclude
rm -rf "$A" && mkdir -p "$A/gguf_a" "$A/gguf_b" "$A/wheels" "$A/tokenizer"
GGUF=$(python -c 'from engine.loader import default_gguf_path; print(default_gguf_path())')
TOKENIZER=$(python -c 'from benchmarks.gpu.llama3_8b import llama3_tokenizer_file; print(llama3_tokenizer_file())')
NAME=$(basename "$GGUF")
split -n 2 -d -a 2 "$GGUF" "$A/$NAME.part-"
mv "$A/$NAME.part-00" "$A/gguf_a/" && mv "$A/$NAME.part-01" "$A/gguf_b/"
[ -z "$(ls "$A"/*.part-* 2>/dev/null)" ] || { echo "the GGUF split into more than two parts" >&2; exit 1; }
sha256sum "$GGUF" | cut -d' ' -f1 >"$A/gguf_b/$NAME.sha256"
cp "$TOKENIZER" "$A/tokenizer/tokenizer.model"
GGUF_VERSION=$(python -c 'import importlib.metadata as m; print(m.version("gguf"))')
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$A/wheels" "gguf==$GGUF_VERSION"
du -sh "$A"/*
