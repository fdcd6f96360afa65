#!/usr/bin/env bash
# Session 6, call 5: engine prefill with cuDNN pieces, split vs split2 (per-rep times), and the
# split2 launch-shape sweep at 16k.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S="python3 -m sbrbench.cli"
nvidia-smi --query-gpu=name --format=csv,noheader
for cfg in split split2; do
  SBR_GDN_CONFIG=$cfg timeout 150 $S bench prefill --preset a3b-proxy --lengths 16384 \
    --windows 4096 --reps 3 --out "$OUT/bench-prefill-cudnn-$cfg.json" 2>&1 | grep -v "other:" | tail -16
done
SBR_GDN_CONFIG=split2 timeout 200 $S bench kernels --T 16384 --sweep-at 16384 \
  --out "$OUT/bench-kernels-sweep16k.json" 2>&1 | grep "sbrbench\|fla" | tail -40
