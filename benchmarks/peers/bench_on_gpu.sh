#!/usr/bin/env bash
# The kernel comparison on the GPU machine, from the repository root:
#   bash benchmarks/peers/bench_on_gpu.sh [tests|kernels|resume|all]
# unpacks the carried peers (unpack.sh), then: `tests` runs the GPU tests of the kernels;
# `kernels` runs `sbrbench bench kernels` (ours, fla, FlashInfer at T = 4k..64k, with CUDA-
# graph replays); `resume` runs `sbrbench bench resume` (a warm resume of the a3b-proxy at depth
# 24k against its GPU floor); `all` runs the three in turn. TS=4096,8192 (say) limits the
# kernel bench to those T: the peers compile their kernels on first use (FlashInfer's CuTe DSL
# for each new shape it specialises on), so if one call would pass the device tool's
# 10-minute limit, split the T list over calls (the bench rewrites its file after each T, so a
# call cut short keeps what it measured). Results go to $OUT when it is set (the device
# tool's output folder), else to results/h200/.
set -uo pipefail
step=${1:-all}
source benchmarks/peers/unpack.sh
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
dest=${OUT:-results/h200}
mkdir -p "$dest"
if [ "$step" = tests ] || [ "$step" = all ]; then
  python3 -m pytest -p no:cacheprovider -m gpu -rf tests/engine/kernels tests/engine/model \
      tests/sbrbench/test_bench.py 2>&1 | tail -25
fi
if [ "$step" = kernels ] || [ "$step" = all ]; then
  ts=${TS:-4096,8192,16384,32768,65536}
  python3 -m sbrbench.cli bench kernels --T "$ts" --graphs --torch-max-t 8192 \
      --out "$dest/bench-kernels-peers.json"
fi
if [ "$step" = resume ] || [ "$step" = all ]; then
  python3 -m sbrbench.cli bench resume --preset a3b-proxy --depth 24576 --new 27 --reps 3 \
      --out "$dest/bench-resume.json"
fi
