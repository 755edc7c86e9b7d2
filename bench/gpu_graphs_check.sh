#!/usr/bin/env bash
# Issue 18 on a GPU in one short device call (~5 min): decode CUDA graphs correct and fast.
#   0. smoke: the engine on CUDA (decode steps replaying graphs) against transformers, 2 layers;
#   1. decode_kernels: the fixed-grid decode adapter path compiled, against the float64 truth;
#   2. decode_step: our step per loop iteration (graphs, and --enforce-eager) vs the lean
#      plain-torch CUDA-graphed step of the same shape, B = 64 and 256, graph replay share;
#   3. engine_64 / engine_256: bench/engine.py base (bf16) against HF generate.
# Writes under $OUT (default bench/out/gpu-graphs), at most 8 files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu-graphs}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TRITON_DEFAULT_FP_FUSION=1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "$name rc=${PIPESTATUS[0]}" | tee -a "$OUT/rc.txt"
}

step smoke 90 $PY bench/gpu_engine_check.py --layers 2 --requests 3 --new-tokens 4 --long-prompt 40 \
    --dtype float32 --out "$OUT/smoke.json"
step decode_kernels 45 env NLORA_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/kernels/test_decode_path.py -k decode_path_against_truth
step decode_step 150 $PY bench/decode_step.py --device cuda --batch 64 256 --steps 50 --out "$OUT/decode_step.json"
for n in 64 256; do
    step engine_$n 60 $PY bench/engine.py --device cuda --model bench/models/smollm2-135m --load-format dummy \
        --dtype bfloat16 --mix none --peer-mixes none --vllm-mixes --num-requests $n --out "$OUT/engine_$n.json"
done
! grep -qv "rc=0" "$OUT/rc.txt"
