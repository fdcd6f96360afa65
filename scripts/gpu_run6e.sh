#!/usr/bin/env bash
# Session 6, last call: the final code (split2 with the interleaved solve, cuDNN pieces, fused
# glue): runtime GPU tests, GPU parity forecast vs tail-pin, prefill at 4k-32k.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S="python3 -m sbrbench.cli"
M="--preset a3b-proxy --device cuda --dtype bfloat16 --no-progress"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest -q -m gpu tests/engine/test_runtime_gpu.py tests/engine/test_triton_kernels.py -k "runtime or pieces or parity or warm" -p no:cacheprovider -rf 2>&1 | tail -3
for pol in forecast tail-pin; do
  timeout 120 $S run parity $M --policy $pol --label final2 --out "$OUT/parity-final2-$pol.json" 2>&1 | tail -1
done
timeout 330 $S bench prefill --preset a3b-proxy --lengths 4096,8192,16384,32768 --windows 2048,4096 \
  --reps 2 --out "$OUT/bench-prefill-final2.json" 2>&1 | grep "prefill E\|attention\|MFU\|family" | tail -24
ls "$OUT"
