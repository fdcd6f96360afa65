#!/usr/bin/env bash
# Run 5, last kernel call: sparse capture (engine snapshot rows only) and the prioritised
# two-stream overlap of the split pipeline; determinism, GPU tests, kernel bench, prefill.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S="python3 -m sbrbench.cli"
nvidia-smi --query-gpu=name --format=csv,noheader
echo "+ diag"; python3 scripts/gpu_split_diag.py 2>&1 | tail -14
echo "+ tests"; timeout 150 python3 -m pytest -q -m gpu tests/engine/test_triton_kernels.py -p no:cacheprovider \
  -rf -k "split or sparse or parity" 2>&1 | tail -8
$S bench kernels --T 8192,16384,65536 --sweep-at 65536 --out "$OUT/bench-kernels.json" 2>&1 | tail -40
timeout 120 $S bench prefill --preset a3b-proxy --lengths 16384 --windows 4096 --reps 2 \
  --out "$OUT/bench-prefill.json" 2>&1 | tail -12
ls -la "$OUT"
