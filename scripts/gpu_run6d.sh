#!/usr/bin/env bash
# Session 6, final measurements with the run-6 defaults (split2 GDN kernels, cuDNN key pieces,
# fused glue).  part "bench": GPU tests, kernels, prefill.  part "checks": parity, calibrate.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S="python3 -m sbrbench.cli"
M="--preset a3b-proxy --device cuda --dtype bfloat16 --no-progress"
part=${1:-bench}
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$part" = bench ]; then
  timeout 200 python3 -m pytest -q -m gpu tests/engine/test_triton_kernels.py \
    tests/engine/test_runtime_gpu.py -p no:cacheprovider -rf 2>&1 | tail -5
  timeout 260 $S bench kernels --T 8192,16384,65536 --sweep-at 65536 --graphs --profile-at 16384 \
    --out "$OUT/bench-kernels-run6.json" 2>&1 | grep -v "^  " | tail -16
  timeout 130 $S bench prefill --preset a3b-proxy --lengths 16384 --windows 4096 --reps 3 \
    --out "$OUT/bench-prefill-run6.json" 2>&1 | grep -v "other:" | tail -12
fi
if [ "$part" = checks ]; then
  for pol in forecast tail-pin; do
    timeout 120 $S run parity $M --policy $pol --label run6 --out "$OUT/parity-run6-$pol.json" 2>&1 | tail -4
  done
  timeout 200 $S calibrate $M --out "$OUT/costmodel-run6.json" 2>&1 | tail -8
  timeout 130 $S bench prefill --preset a3b-proxy --lengths 16384 --windows 4096 --reps 3 \
    --out "$OUT/bench-prefill-run6-2.json" 2>&1 | grep "attention\|prefill E" | tail -12
fi
ls -la "$OUT"
