#!/usr/bin/env bash
# Scenario reruns with the run-6 CUDA defaults (split2 GDN, cuDNN key pieces, fused glue), the
# adaptive default and branch admission on. One part per device call (each < 10 min on an H200).
#   bash scripts/gpu_run7.sh deep [policies, comma-separated] | rr | checks | swap
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S="python3 -m sbrbench.cli"
part=${1:?part: deep | rr | checks}
M="--preset a3b-proxy --device cuda --dtype bfloat16 --no-progress"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run() { echo "+ $*"; "$@" 2>&1 | tail -20; }
D="--snapshot-slots 16 --set depth=24000 --set pressure=128 --set cycles=6"
RR="--snapshot-slots 16 --set convs=8 --set rounds=20"
if [ "$part" = deep ]; then
  for pol in $(echo "${2:-forecast,tail-pin,adaptive}" | tr , " "); do
    run $S run deep-resume $M $D --policy $pol --label run7 --out "$OUT/deep-resume-run7-$pol.json"
  done
fi
if [ "$part" = rr ]; then
  for pol in forecast adaptive tail-pin; do
    run $S run round-robin $M $RR --policy $pol --label run7 --out "$OUT/round-robin-run7-$pol.json"
  done
fi
if [ "$part" = checks ]; then
  for pol in forecast adaptive; do
    run $S run round-robin $M $RR --policy $pol --label run7-rep2 \
      --out "$OUT/round-robin-run7-$pol-rep2.json"
  done
  for pol in forecast adaptive; do
    run $S run parity $M --policy $pol --label run7 --out "$OUT/parity-run7-$pol.json"
  done
fi
if [ "$part" = swap ]; then  # the adaptive swap option (off by default) against forecast
  SW="--policy adaptive --adaptive-opt swap=true"
  run $S run parity $M --policy forecast --label run7-swap --out "$OUT/parity-run7s-forecast.json"
  run $S run parity $M $SW --label run7-swap --out "$OUT/parity-run7s-adaptive-swap.json"
  run $S run round-robin $M $RR --policy forecast --label run7-swap \
    --out "$OUT/round-robin-run7s-forecast.json"
  run $S run round-robin $M $RR $SW --label run7-swap \
    --out "$OUT/round-robin-run7s-adaptive-swap.json"
fi
ls -la "$OUT"
