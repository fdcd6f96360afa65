#!/usr/bin/env bash
# The simulator's cost-model fits: `sbrbench calibrate` times the real engine at controlled
# (restore, cached, prompt) points and fits ttft = a*rows + b*pairs + c + restore (per
# position, or per aligned exec window when that fits better).
#
#   bash benchmarks/costmodel.sh [OUT] [gpu|cpu ...]    (default: both)
#
# OUT defaults to ./sbr-results/costmodel. Time: a few minutes each (gpu: a3b-proxy, bf16, on
# one GPU; cpu: tiny, float32, five timings per point, on one thread: run it on an idle machine,
# other load shows up in the fit).
#
#   costmodel-gpu.json       the a3b-proxy fit on this GPU
#   costmodel-cpu-tiny.json  the tiny-preset fit on this CPU
#
# Regenerates the packaged defaults sbrbench/data/costmodel-h200.json (from an H200) and
# sbrbench/data/costmodel-cpu-tiny.json. They are not replaced by this recipe: copying a new fit
# there changes every simulated TTFT, so it is a deliberate commit; to use a fit without
# changing the default, pass it with `sbrbench sim|sweep --costmodel PATH`.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=$(out_dir "${1:-sbr-results/costmodel}")
shift $(($# > 0 ? 1 : 0))
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(gpu cpu)

for part in "${parts[@]}"; do
  case $part in
    gpu)
      gpu_setup
      sbrbench calibrate --preset a3b-proxy --device cuda --dtype bfloat16 \
        --out "$OUT/costmodel-gpu.json"
      ;;
    cpu)
      sbrbench calibrate --preset tiny --device cpu --reps 5 --out "$OUT/costmodel-cpu-tiny.json"
      ;;
    *) echo "unknown part '$part' (gpu, cpu)" >&2; exit 2 ;;
  esac
done
ls -l "$OUT"
