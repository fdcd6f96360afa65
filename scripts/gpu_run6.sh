#!/usr/bin/env bash
# Session 6 device calls (issue 6): split2 GDN kernels, cuDNN key-piece attention.
#   bash scripts/gpu_run6.sh check    GPU tests, then prefill flash+split vs cudnn+split2
#   bash scripts/gpu_run6.sh kernels  bench kernels with split2 as the production config
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S="python3 -m sbrbench.cli"
part=${1:-check}
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$part" = check ]; then
  echo "+ GPU tests"
  timeout 220 python3 -m pytest -q -x -m gpu tests/engine/test_triton_kernels.py \
    tests/engine/test_runtime_gpu.py tests/engine/test_model.py -p no:cacheprovider -rf 2>&1 | tail -8
  SBR_ATTN=flash SBR_GDN_CONFIG=split timeout 150 $S bench prefill --preset a3b-proxy \
    --lengths 16384 --windows 4096 --reps 2 --out "$OUT/bench-prefill-flash-split.json" 2>&1 | tail -34
  SBR_ATTN=cudnn SBR_GDN_CONFIG=split2 timeout 150 $S bench prefill --preset a3b-proxy \
    --lengths 16384 --windows 4096 --reps 2 --out "$OUT/bench-prefill-cudnn-split2.json" 2>&1 | tail -34
fi
if [ "$part" = kernels ]; then
  SBR_GDN_CONFIG=split2 timeout 500 $S bench kernels --T 8192,16384,65536 --sweep-at 16384 \
    --graphs --profile-at 16384 --out "$OUT/bench-kernels-split2.json" 2>&1 | tail -40
fi
ls -la "$OUT"
