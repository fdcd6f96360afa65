#!/usr/bin/env bash
# The kernel comparison on one GPU: the chunked GDN kernel (every 64-token grid state
# captured) against fla and the torch reference at Qwen3-Next shapes, and the engine's prefill
# at a3b-proxy shapes (MFU of the 989 TFLOP/s dense bf16 peak).
#
#   bash benchmarks/kernels.sh [OUT]
#
# OUT defaults to ./sbr-results/kernels. Time on one H200: ~4 min.
# fla must be importable for its rows (on a machine without a package index, carry its wheels
# in .whl/, see lib.sh); without it the kernels are timed against the torch reference only.
# Run the GPU tests first (python -m pytest -m gpu tests/engine): a timing of a kernel that
# fails its tests is not a result.
#
#   bench-kernels.json  T = 8k/16k/64k, eager and CUDA-graph replay, per-kernel device times at
#                       16k (the `speedups` block holds fla / ours)
#   bench-prefill.json  prefill of 4k-32k tokens in exec windows of 2048 and 4096 rows, two
#                       repetitions each, and a per-family profile of one window
#   bench-prefill-attention.json  the same at 4k and 24k tokens (window 2048, one repetition):
#                       the attention rows of windows of 64-2048 rows over 24k keys (flash,
#                       cuDNN pieces, the window-invariant kernel)
#
# Regenerates results/h200/bench-kernels.json, bench-prefill.json and
# bench-prefill-attention.json.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=$(out_dir "${1:-sbr-results/kernels}")
gpu_setup

sbrbench bench kernels --T 8192,16384,65536 --graphs --profile-at 16384 \
  --out "$OUT/bench-kernels.json"
sbrbench bench prefill --preset a3b-proxy --lengths 4096,8192,16384,32768 --windows 2048,4096 \
  --reps 2 --out "$OUT/bench-prefill.json"
sbrbench bench prefill --preset a3b-proxy --lengths 4096,24576 --windows 2048 --reps 1 \
  --out "$OUT/bench-prefill-attention.json"
ls -l "$OUT"
