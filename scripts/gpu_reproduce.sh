#!/usr/bin/env bash
# Issue 9 on the GPU machine: the headline reproduction, one part per device call. Writes JSON + log to $OUT.
#   bash scripts/gpu_reproduce.sh [part]   part: all | deep1 | deep2 | checks | benches
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S="python3 -m sbrbench.cli"
part=${1:-all}
M="--preset a3b-proxy --device cuda --dtype bfloat16 --no-progress"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run() { echo "+ $*"; "$@" 2>&1 | tail -25; }
# Each part fits one 10-minute device call on an H200 (measured 2026-11-26: deep-resume ~3.5 min
# per policy, round-robin ~40 s per policy, parity ~20 s per policy, calibrate ~50 s).
D="--snapshot-slots 16 --set depth=24000 --set pressure=128 --set cycles=6"
if [ "$part" = all ] || [ "$part" = deep1 ]; then
  for pol in forecast tail-pin; do
    run $S run deep-resume $M $D --policy $pol --out "$OUT/deep-resume-$pol.json"
  done
fi
if [ "$part" = all ] || [ "$part" = deep2 ]; then
  run $S run deep-resume $M $D --policy adaptive --out "$OUT/deep-resume-adaptive.json"
  for pol in forecast tail-pin adaptive; do
    run $S run round-robin $M --snapshot-slots 16 --policy $pol --set convs=8 --set rounds=10 \
      --out "$OUT/round-robin-$pol.json"
  done
fi
if [ "$part" = all ] || [ "$part" = checks ]; then
  for r in 2 3; do
    for pol in forecast adaptive; do
      run $S run round-robin $M --snapshot-slots 16 --policy $pol --set convs=8 --set rounds=10 \
        --label rep$r --out "$OUT/round-robin-$pol-rep$r.json"
    done
  done
  for pol in forecast tail-pin adaptive; do
    run $S run parity $M --policy $pol --out "$OUT/parity-$pol.json"
  done
  for pol in forecast tail-pin; do
    run $S run parity $M --policy $pol --set convs=3 --set turns=8 --label long \
      --out "$OUT/parity-long-$pol.json"
  done
fi
if [ "$part" = all ] || [ "$part" = benches ]; then
  run python3 -m pytest -q -m gpu tests/engine/test_runtime_gpu.py tests/engine/test_triton_kernels.py \
    -p no:cacheprovider
  run $S calibrate --preset a3b-proxy --device cuda --dtype bfloat16 --out "$OUT/costmodel.json"
  run $S bench prefill --preset a3b-proxy --windows 2048,4096 --reps 2 --out "$OUT/bench-prefill.json"
fi
# Back here: sbrbench calibrate --refit results/h200/costmodel.json --out results/costmodel-h200.json
ls -la "$OUT"
