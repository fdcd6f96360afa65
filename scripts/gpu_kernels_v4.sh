#!/usr/bin/env bash
# Issue 6, kernel run 5 (split pipeline) on the GPU machine, one part per device call.
#   bash scripts/gpu_kernels_v4.sh [part]   part: kernels | prefill
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
S="python3 -m sbrbench.cli"
part=${1:-kernels}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run() { echo "+ $*"; "$@" 2>&1 | tail -${TAIL:-40}; }
if [ "$part" = kernels ] || [ "$part" = all ]; then
  TAIL=30 run python3 scripts/gpu_split_diag.py
  TAIL=30 run timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu tests/engine/test_triton_kernels.py \
    -p no:cacheprovider -rf ${TEST_K:+-k "$TEST_K"}
  # run 5 used scripts/gpu_kernel_profile.py here (results/h200/kernel-profile-T16384.json);
  # its per-kernel timing is now `bench kernels --profile-at`
  SBR_GDN_CONFIG=split run $S bench kernels --T ${TS:-4096,8192,16384,65536} \
    --sweep-at ${SWEEP:-16384} --profile-at 16384 \
    --out "$OUT/bench-kernels.json"
fi
if [ "$part" = prefill ] || [ "$part" = all ]; then
  for c in exact-tf32 split; do
    SBR_GDN_CONFIG=$c run timeout ${PREFILL_TIMEOUT:-150} $S bench prefill --preset a3b-proxy \
      --lengths ${PREFILL_LENGTHS:-16384} --windows ${PREFILL_WINDOWS:-4096} --reps 2 \
      --out "$OUT/bench-prefill-$c.json"
  done
fi
if [ "$part" = parity ] || [ "$part" = all ]; then
  M="--preset a3b-proxy --device cuda --dtype bfloat16 --no-progress"
  for pol in forecast tail-pin; do
    SBR_GDN_CONFIG=split run timeout 100 $S run parity $M --policy $pol --label split \
      --out "$OUT/parity-split-$pol.json"
  done
fi
ls -la "$OUT"
