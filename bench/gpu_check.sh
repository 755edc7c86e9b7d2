#!/usr/bin/env bash
# The GPU half of issue 4 in one device call (bench/RESULTS.md, "Kernels on a GPU"):
#   1. the compiled Triton path against the float64 truth on the GPU (the interpreter's cases);
#   2. bench/adapter_kernels.py: per path, CUDA-graph time per decoder layer, ratio to the base GEMMs
#      and the share of its bounding rate (copy bandwidth / GEMM rate measured in the same run).
# Needs only torch + triton + pytest + numpy (the device image's python3 has them; the package
# is used from the working tree). Writes everything under $OUT (default bench/out/gpu).
#
#   device run:  bash bench/gpu_check.sh          (timeout_s 600; ~3-5 min on an H200)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TRITON_DEFAULT_FP_FUSION=1
{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } \
    > "$OUT/device.txt" 2>&1
NLORA_TEST_DEVICE=cuda timeout 240 $PY -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/kernels/test_triton_ops.py -k triton_path_against_truth 2>&1 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}
timeout 300 $PY bench/adapter_kernels.py --rounds 7 --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc" | tee "$OUT/rc.txt"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
