#!/usr/bin/env bash
# Issue 9 on the GPU machine: the headline reproduction, in one call. Writes JSON + log to $OUT.
#   bash scripts/gpu_reproduce.sh [part]   part: all | scenarios | benches
set -uo pipefail
OUT=${OUT:-/tmp/sbr-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
S="python3 -m sbrbench.cli"
part=${1:-all}
M="--preset a3b-proxy --device cuda --dtype bfloat16 --no-progress"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run() { echo "+ $*"; "$@" 2>&1 | tail -25; }
if [ "$part" = all ] || [ "$part" = scenarios ]; then
  for pol in forecast tail-pin adaptive; do
    run $S run deep-resume $M --snapshot-slots 16 --policy $pol --set depth=24000 --set pressure=64 \
      --set cycles=5 --out "$OUT/deep-resume-$pol.json"
  done
  for pol in forecast tail-pin adaptive; do
    run $S run round-robin $M --snapshot-slots 16 --policy $pol --set convs=8 --set rounds=10 \
      --out "$OUT/round-robin-$pol.json"
  done
fi
if [ "$part" = all ] || [ "$part" = benches ]; then
  run python3 -m pytest -q -m gpu tests/engine -p no:cacheprovider
  for pol in forecast tail-pin adaptive; do
    run $S run parity $M --policy $pol --out "$OUT/parity-$pol.json"
  done
  run $S calibrate --preset a3b-proxy --device cuda --dtype bfloat16 --out "$OUT/costmodel.json"
fi
ls -la "$OUT"
