#!/usr/bin/env bash
# The first device call of the next session (issue 6): check what landed after run 5 without a
# GPU (glue kernels, grouped q/k, fewer copies, shared kernel helpers, --graphs), then measure.
# ~6-8 minutes on an H200. Carry .whl (fla-core) for the kernel comparison.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S="python3 -m sbrbench.cli"
nvidia-smi --query-gpu=name --format=csv,noheader
echo "+ GPU tests (must pass before any number counts)"
timeout 240 python3 -m pytest -q -m gpu tests/engine tests/sbrbench -p no:cacheprovider -rf \
  --ignore tests/engine/test_server.py 2>&1 | tail -12
echo "+ determinism of every buffer"; python3 scripts/gpu_split_diag.py 2>&1 | tail -12
for glue in 0 1; do  # baseline (torch glue, as in run 5) and the glue kernels, same call
  SBR_GLUE_KERNELS=$glue timeout 150 $S bench prefill --preset a3b-proxy --lengths 16384 \
    --windows 4096 --reps 2 --out "$OUT/bench-prefill-glue$glue.json" 2>&1 | tail -22
done
timeout 200 $S bench kernels --T 8192,16384,65536 --graphs --out "$OUT/bench-kernels.json" \
  2>&1 | tail -16
ls -la "$OUT"
