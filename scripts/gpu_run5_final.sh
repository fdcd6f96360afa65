#!/usr/bin/env bash
# Run 5, last call: the GPU test suite under the split default, then a 20-round round-robin
# (past the first 2048-row window) with forecast and adaptive.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S="python3 -m sbrbench.cli"
M="--preset a3b-proxy --device cuda --dtype bfloat16 --no-progress"
nvidia-smi --query-gpu=name --format=csv,noheader
echo "+ gpu tests"; timeout 200 python3 -m pytest -q -m gpu tests/engine -p no:cacheprovider -rf 2>&1 | tail -15
for pol in forecast adaptive; do
  echo "+ round-robin $pol"
  timeout 160 $S run round-robin $M --snapshot-slots 16 --policy $pol --set convs=8 --set rounds=20 \
    --label r20 --out "$OUT/round-robin-r20-$pol.json" 2>&1 | tail -12
done
ls -la "$OUT"
