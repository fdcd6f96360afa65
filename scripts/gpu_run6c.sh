#!/usr/bin/env bash
# Session 6, call 6: GPU tests of the fused glue (conv from the projection, gates, add+norm,
# norm+rope, strided gate) and the cuDNN pieces; host-time diagnosis; prefill.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S="python3 -m sbrbench.cli"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 220 python3 -m pytest -q -m gpu tests/engine/test_triton_kernels.py \
  tests/engine/test_runtime_gpu.py -p no:cacheprovider -rf 2>&1 | tail -8
timeout 120 python3 scripts/gpu_host_diag.py split split2 2>&1 | grep -v "^$" | head -60
SBR_GDN_CONFIG=split timeout 150 $S bench prefill --preset a3b-proxy --lengths 16384 \
  --windows 4096 --reps 3 --out "$OUT/bench-prefill-fused.json" 2>&1 | grep -v "other:" | tail -14
