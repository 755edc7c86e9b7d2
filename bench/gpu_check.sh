#!/usr/bin/env bash
# Every GPU check in one device call (bench/RESULTS.md "On a GPU"), each step under its own time
# limit, results written under $OUT as they come (at most 8 files come back from the device):
#   0. smoke (~30 s): the engine on CUDA, 2 layers, 3 requests, against transformers;
#   1. kernels, attention_kernels: the Triton ops compiled on the GPU against the float64 truth
#      (the interpreter's cases: the composed adapter path; paged decode and prefill attention);
#   2. engine_check: the native engine on CUDA against transformers, step by step, on a random
#      model of the default's shape (base, tied and LoRA requests mixed; fp32 TF32 off <= 1e-4 and
#      top token equal where decided; bf16 <= 2e-2);
#   3. adapter_kernels: per path, CUDA-graph time per decoder layer vs the base GEMMs, share of bound;
#   4. engine_bench: bench/engine.py on CUDA (bf16; base, tied64, lora8) against HF generate (64
#      requests), engine_256: base against HF generate at 256 requests;
#   5. decode_step: our decode step per loop iteration (CUDA graphs, and --enforce-eager) against a
#      lean plain-torch CUDA-graphed step of the same shape at B = 64 and 256, graph replay share.
# Needs only torch + triton + transformers + peft + pytest + numpy (the device image has them);
# the package is used from the working tree. Writes under $OUT (default bench/out/gpu).
#
#   device run:  bash bench/gpu_check.sh          (timeout_s 600; steps capped at 550 s in all, ~5 min typical)
#   then, on the still-warm machine, if device time is left:
#                bash bench/gpu_check.sh extra    (the llama-8b dummy end to end, issue 20 at scale; <= 370 s)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
RC="$OUT/rc.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TRITON_DEFAULT_FP_FUSION=1
{ nvidia-smi; $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())"; } >> "$LOG" 2>&1

step() {  # step NAME SECONDS COMMAND...: run, log, record the exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "$name rc=${PIPESTATUS[0]}" | tee -a "$RC"
}

if [ "${1:-}" = extra ]; then  # a second call: own log and rc files (at most 8 files come back per call)
    LOG="$OUT/extra_log.txt"
    RC="$OUT/extra_rc.txt"
    # issue 19 end to end: tied64 and lora8 against our base at the llama-8b shape (no peers)
    step engine_8b 150 $PY bench/engine.py --device cuda --model bench/models/llama-8b \
        --tokenizer bench/models/smollm2-135m --load-format dummy --dtype bfloat16 --mix none tied64 lora8 \
        --peer-mixes --vllm-mixes --out "$OUT/engine_8b.json"
    # issue 20: the shared 1,024-token prefix where prefill costs compute (llama-8b shape, random weights)
    step prefix_8b 120 $PY bench/prefix_fairness.py --only prefix --device cuda --model bench/models/llama-8b \
        --tokenizer bench/models/smollm2-135m --load-format dummy --dtype bfloat16 --tenants 64 --burst 128 \
        --poisson-requests 128 --budget 2048 --max-num-seqs 64 --out "$OUT/prefix_8b.json"
    # issue 20: slot-level fairness (recent-usage preemption) against fcfs, default shape
    step fairness 100 $PY bench/prefix_fairness.py --only fairness --device cuda --model bench/models/smollm2-135m \
        --load-format dummy --dtype bfloat16 --max-num-seqs 16 --duration 10 --backlog 10 --out "$OUT/fairness.json"
    ! grep -qv "rc=0" "$RC"
    exit
fi

step smoke 60 $PY bench/gpu_engine_check.py --layers 2 --requests 3 --new-tokens 2 --long-prompt 40 \
    --dtype float32 --out "$OUT/smoke.json"
grep -q "smoke rc=0" "$RC" || { echo "smoke test failed: stopping" | tee -a "$LOG"; exit 1; }
step kernels 80 env NLORA_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/kernels/test_triton_ops.py -k triton_path_against_truth
step attention_kernels 60 env NLORA_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/kernels/test_paged_attention.py tests/kernels/test_attention_cuda_path.py
step engine_check 90 $PY bench/gpu_engine_check.py --out "$OUT/engine_check.json"
step adapter_kernels 60 $PY bench/adapter_kernels.py --rounds 5 --out "$OUT/adapter_kernels.json"
step engine_bench 90 $PY bench/engine.py --device cuda --model bench/models/smollm2-135m --load-format dummy \
    --dtype bfloat16 --mix none tied64 lora8 --peer-mixes none --vllm-mixes --out "$OUT/engine.json"
step engine_256 50 $PY bench/engine.py --device cuda --model bench/models/smollm2-135m --load-format dummy \
    --dtype bfloat16 --mix none --peer-mixes none --vllm-mixes --num-requests 256 --out "$OUT/engine_256.json"
step decode_step 60 $PY bench/decode_step.py --device cuda --batch 64 256 --steps 100 --out "$OUT/decode_step.json"
! grep -qv "rc=0" "$RC"
