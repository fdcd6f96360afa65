#!/usr/bin/env bash
# The next session's device calls for issue 6: check what landed after run 5 without a GPU
# (glue kernels, grouped q/k, fewer copies, shared kernel helpers, grp_share, --graphs), then
# measure. One part per call (each ~5 minutes on an H200); carry .whl (fla-core).
#   bash scripts/gpu_next.sh check | kernels
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S="python3 -m sbrbench.cli"
part=${1:-check}
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$part" = check ]; then
  echo "+ GPU tests (must pass before any number counts)"
  timeout 240 python3 -m pytest -q -m gpu tests/engine tests/sbrbench -p no:cacheprovider -rf \
    --ignore tests/engine/test_server.py 2>&1 | tail -12
  echo "+ determinism of every buffer"; python3 scripts/gpu_split_diag.py 2>&1 | tail -14
  for glue in 0 1; do  # torch glue (the baseline) and the Triton glue kernels, same call
    SBR_GLUE_KERNELS=$glue timeout 150 $S bench prefill --preset a3b-proxy --lengths 16384 \
      --windows 4096 --reps 2 --out "$OUT/bench-prefill-glue$glue.json" 2>&1 | tail -22
  done
fi
if [ "$part" = kernels ]; then
  timeout 500 $S bench kernels --T 8192,16384,65536 --sweep-at 65536 --graphs --profile-at 16384 \
    --out "$OUT/bench-kernels.json" 2>&1 | tail -40
fi
ls -la "$OUT"
