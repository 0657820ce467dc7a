#!/usr/bin/env bash
# Run here (CPU machine, venv active) before the GPU session: puts in .gpu_assets/ (git-ignored through
# .git/info/exclude) what the GPU image lacks. The default model's GGUF (98 MB) is over one call's 64 MiB, so it
# travels in two parts, one per call, on the same warm machine (see README.md):
#   .gpu_assets/gguf_a/   first part + tokenizer/   -> carry in call 1
#   .gpu_assets/gguf_b/   second part, wheels/ (gguf, the server's stack) -> carry in call 2 (runs gpu_check.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
A=.gpu_assets
grep -qxF "/$A/" .git/info/exclude 2>/dev/null || echo "/$A/" >>.git/info/exclude
rm -rf "$A" && mkdir -p "$A/gguf_a" "$A/gguf_b" "$A/wheels" "$A/tokenizer"
GGUF=$(python -c 'from loraplex.engine.model.loader import default_gguf_path; print(default_gguf_path())')
TOKENIZER=$(python -c 'from benchmarks.gpu.llama3_8b import llama3_tokenizer_file; print(llama3_tokenizer_file())')
NAME=$(basename "$GGUF")
split -n 2 -d -a 2 "$GGUF" "$A/$NAME.part-"
mv "$A/$NAME.part-00" "$A/gguf_a/" && mv "$A/$NAME.part-01" "$A/gguf_b/"
[ -z "$(ls "$A"/*.part-* 2>/dev/null)" ] || { echo "the GGUF split into more than two parts" >&2; exit 1; }
sha256sum "$GGUF" | cut -d' ' -f1 >"$A/gguf_b/$NAME.sha256"
cp "$TOKENIZER" "$A/tokenizer/tokenizer.model"
# gguf for the default model; the server's stack for the serve stage (the GPU image has none of it), at the
# versions installed here
PINS=$(python -c 'import importlib.metadata as m
names = ["gguf", "fastapi", "starlette", "uvicorn", "pydantic", "pydantic-core", "annotated-types",
         "typing-inspection", "annotated-doc", "typing-extensions"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))')
# shellcheck disable=SC2086  # one argument per pin
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$A/wheels" $PINS
du -sh "$A"/*
