#!/usr/bin/env bash
# Packs the GDN kernels `sbrbench bench kernels` compares ours with, for the GPU machine
# (Python 3.12, manylinux x86_64, no internet): FlashInfer's GDN prefill, the CuTe DSL that
# compiles its SM90 kernels when they are first called (no nvcc needed), apache-tvm-ffi, and
# fla. Downloads the wheels from PyPI, installs them into build/peers/site, trims them
# (trim_peers.py) and writes two archives, because together they exceed the device tool's
# 64 MiB per call (README.md beside this file):
#   .whl/peers-a.tar.xz  the CuTe DSL compiler library alone (~50 MB)
#   .whl/peers-b.tar.xz  everything else (~21 MB)
# Nothing this makes is committed (build/ and .whl/ are git-ignored). Needs pip and xz.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
FLASHINFER=${FLASHINFER:-0.7.4}
CUTLASS_DSL=${CUTLASS_DSL:-4.8.1}
TVM_FFI=${TVM_FFI:-0.1.15.post2}
FLA=${FLA:-0.5.2}
work=build/peers
target=(--python-version 3.12 --implementation cp --only-binary=:all:
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)
pkgs=("flashinfer-python==$FLASHINFER" "nvidia-cutlass-dsl==$CUTLASS_DSL"
      "nvidia-cutlass-dsl-libs-base==$CUTLASS_DSL" "nvidia-cutlass-dsl-libs-core==$CUTLASS_DSL"
      "nvidia-cutlass-dsl-libs-cu13==$CUTLASS_DSL" "apache-tvm-ffi==$TVM_FFI"
      "flash-linear-attention==$FLA" "fla-core==$FLA")

mkdir -p "$work/dl" .whl
"$PY" -m pip download -q --no-deps "${target[@]}" -d "$work/dl" "${pkgs[@]}"
rm -rf "$work/site"
"$PY" -m pip install -q --no-deps --no-compile --no-index "${target[@]}" --target "$work/site" \
    "$work"/dl/*.whl
"$PY" benchmarks/peers/trim_peers.py "$work/site"

compiler=$(cd "$work/site" && find nvidia_cutlass_dsl -name '_cutlass_ir*.so')
# xz with a dictionary as large as the compiler library: it repeats itself at long range
xzc=(xz -T1 -c --lzma2=preset=9e,dict=192MiB)
tar -C "$work/site" -cf - "$compiler" | "${xzc[@]}" > .whl/peers-a.tar.xz
tar -C "$work/site" --exclude="$compiler" -cf - . | "${xzc[@]}" > .whl/peers-b.tar.xz
ls -l .whl/peers-a.tar.xz .whl/peers-b.tar.xz
