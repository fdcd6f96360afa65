"""Batch-invariant GEMM (CUDA): y = x W^T whose every row is the same bits whatever the number
of rows M of the call, with reference.linear's contract.

cuBLAS picks its kernel, tile and split-K from the problem shape, so a row computed in a
64-row window and in a 2048-row window (or as one decode row) is summed in different orders.
Here the tile (BM x BN), the K step (BK), the warps and the pipelining are constants, there is
no split-K and no atomics: each output element is the same fixed-order sum of BK-wide tensor-
core products in any call, and M only sets the number of row tiles. Rows never interact (rows
past M are masked to zero and never stored). So windows can be sized to the work while parity
across window sizes stays bitwise. Imported lazily by engine.kernels.ops, on CUDA only.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# In Triton's CPU interpreter (the CPU tests) bf16 dots run as fp32 dots of the bf16 operands.
_EMU = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernel fills (tests replace this to poison them with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


class GemmTile(NamedTuple):
    """The fixed launch of one input dtype: the tile and K step decide each element's
    summation order, so they never depend on M (nor on anything but the dtype)."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int


# bf16/fp16: 128 x 128 tiles with 64-wide K steps, the usual Hopper tensor-core shape (eight
# warps, three stages of shared memory). fp32 runs exact fp32 products (as torch does without
# TF32) in smaller K steps, so that the operands fit in shared memory.
TILES = {torch.bfloat16: GemmTile(128, 128, 64, 8, 3), torch.float16: GemmTile(128, 128, 64, 8, 3),
         torch.float32: GemmTile(64, 64, 32, 4, 2)}
_GROUP_M = 8  # row tiles per group in the launch order (L2 reuse of W; changes no sum)


@triton.jit(do_not_specialize=["m"])
def _linear_kernel(x, w, out, m, sx, sw, so, N: tl.constexpr, K: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                   STAGES: tl.constexpr, IEEE: tl.constexpr, EMU: tl.constexpr):
    pid = tl.program_id(0)
    n_m = tl.cdiv(m, BM)
    n_n = tl.cdiv(N, BN)
    # grouped launch order: GROUP row tiles sweep the column tiles together
    in_group = GROUP * n_n
    first = (pid // in_group) * GROUP
    size = tl.minimum(n_m - first, GROUP)
    pid_m = first + (pid % in_group) % size
    pid_n = (pid % in_group) // size
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mm = rm < m
    mn = rn < N
    xp = x + rm[:, None].to(tl.int64) * sx + rk[None, :]
    wp = w + rn[:, None].to(tl.int64) * sw + rk[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        mk = (k0 + rk) < K
        a = tl.load(xp + k0, mask=mm[:, None] & mk[None, :], other=0.0)
        b = tl.load(wp + k0, mask=mn[:, None] & mk[None, :], other=0.0)
        if EMU:
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc,
                         input_precision="ieee")
        elif IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    op = out + rm[:, None].to(tl.int64) * so + rn[None, :]
    tl.store(op, acc.to(out.dtype.element_ty), mask=mm[:, None] & mn[None, :])


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """reference.linear: x [..., K] times weight [N, K] transposed -> [..., N] in x's dtype,
    fp32 sums; every row bitwise independent of the call's other rows and of their number."""
    k = x.shape[-1]
    n = weight.shape[0]
    if weight.shape[1] != k or weight.dtype != x.dtype:
        raise ValueError(f"linear: x [..., {k}] {x.dtype} and weight {tuple(weight.shape)} "
                         f"{weight.dtype} do not match")
    tile = TILES.get(x.dtype)
    if tile is None:
        raise ValueError(f"linear: no tile for {x.dtype}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    m = x2.shape[0]
    out = _empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        grid = (triton.cdiv(m, tile.bm) * triton.cdiv(n, tile.bn),)
        _linear_kernel[grid](x2, w, out, m, x2.stride(0), w.stride(0), out.stride(0), N=n, K=k,
                             BM=tile.bm, BN=tile.bn, BK=tile.bk, GROUP=_GROUP_M,
                             STAGES=tile.stages, IEEE=x.dtype == torch.float32, EMU=_EMU,
                             num_warps=tile.warps)
    return out.view(*x.shape[:-1], n)
