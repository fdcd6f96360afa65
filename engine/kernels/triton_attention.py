"""Window-invariant causal attention (CUDA): a query row's output is the same bits whatever the
window it is computed in, with reference.window_attention's contract.

A flash-attention call walks the keys in blocks placed relative to the call and splits the work
by its shape, so a position attended in a 64-row window and in a 128-row window is summed in
different orders (measured on an H200: docs/KERNELS.md). Here the key blocks sit at absolute
positions 0, BN, 2 BN, ...; a row at position p folds blocks 0..p // BN into its online softmax
in that order, and a block that lies wholly after p leaves the row untouched (a select, not an
update by exp(-inf) = 0, which could flip a zero's sign). The tile (BM x BN), the warps and the
stages are constants of the dtype and head size, never of the window, and rows never interact:
the products of a row are the same fixed-order tensor-core sums in any call. With the batch-
invariant linear (triton_gemm) and the row-local glue, this is what windows sized to the work
need. Imported lazily, on CUDA only (the CPU tests run it in Triton's interpreter).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# In Triton's CPU interpreter (the CPU tests) bf16 dots run as fp32 dots of the bf16 operands.
_EMU = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernel fills (tests replace this to poison them with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


class AttnTile(NamedTuple):
    """The fixed launch: query rows and keys per block, warps, pipeline stages. A row's sums
    depend on bn and the head size only; bm, warps and stages set how rows share a program."""

    bm: int
    bn: int
    warps: int
    stages: int


def tile_for(head_dim: int, dtype: torch.dtype) -> AttnTile:
    """The launch of a head size and dtype (shared memory bounds the tile at D = 256)."""
    if dtype == torch.float32:
        return AttnTile(32, 32, 4, 1)
    if head_dim > 128:
        return AttnTile(64, 32, 8, 2)
    return AttnTile(64, 64, 4, 2)


@triton.jit(do_not_specialize=["t", "e0"])
def _attn_kernel(q, k, v, out, t, e0, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
                 scale_log2, GROUP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, STAGES: tl.constexpr, IEEE: tl.constexpr,
                 EMU: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    rows = pid_m * BM + tl.arange(0, BM)
    valid = rows < t
    pos = e0 + rows  # absolute positions of the queries (bottom-right causal)
    od = tl.arange(0, D)
    qv = tl.load(q + rows[:, None].to(tl.int64) * sq_t + h * sq_h + od[None, :],
                 mask=valid[:, None], other=0.0)
    if EMU:
        qv = qv.to(tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    last = tl.minimum(e0 + pid_m * BM + BM - 1, e0 + t - 1)  # the block's deepest query
    for n0 in tl.range(0, last + 1, BN, num_stages=STAGES):
        cols = n0 + tl.arange(0, BN)
        kv_ok = cols <= last
        kb = tl.load(k + cols[:, None].to(tl.int64) * sk_t + kvh * sk_h + od[None, :],
                     mask=kv_ok[:, None], other=0.0)
        vb = tl.load(v + cols[:, None].to(tl.int64) * sv_t + kvh * sv_h + od[None, :],
                     mask=kv_ok[:, None], other=0.0)
        if EMU:
            s = tl.dot(qv, tl.trans(kb.to(tl.float32)), input_precision="ieee")
        elif IEEE:
            s = tl.dot(qv, tl.trans(kb), input_precision="ieee")
        else:
            s = tl.dot(qv, tl.trans(kb))
        s = s * scale_log2
        seen = cols[None, :] <= pos[:, None]
        s = tl.where(seen, s, float("-inf"))
        active = n0 <= pos  # the row has a key in this block
        m_new = tl.where(active, tl.maximum(m_i, tl.max(s, 1)), m_i)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        p = tl.where(seen, p, 0.0)
        if EMU:
            pv = tl.dot(p.to(vb.dtype).to(tl.float32), vb.to(tl.float32),
                        input_precision="ieee")
        elif IEEE:
            pv = tl.dot(p, vb, input_precision="ieee")
        else:
            pv = tl.dot(p.to(vb.dtype), vb)
        acc = tl.where(active[:, None], acc * alpha[:, None] + pv, acc)
        l_i = tl.where(active, l_i * alpha + tl.sum(p, 1), l_i)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(out + rows[:, None].to(tl.int64) * so_t + h * so_h + od[None, :],
             o.to(out.dtype.element_ty), mask=valid[:, None])


def window_attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """reference.window_attention: q [T, H, D] at the last T of S positions attends keys/vals
    [S, Hkv, D] up to its own position (bottom-right causal, GQA); [T, H, D] in q's dtype.
    Every row's bits depend on its position, its query and the keys before it only."""
    t, hq, d = q.shape
    s, hkv, dk = keys.shape
    if dk != d or vals.shape != keys.shape or s < t or hq % hkv:
        raise ValueError(f"window_attention: q {tuple(q.shape)}, keys {tuple(keys.shape)}, "
                         f"vals {tuple(vals.shape)} do not match (S >= T, H a multiple of Hkv)")
    if d & (d - 1) or d < 16:
        raise ValueError(f"window_attention: head size {d} is not a power of two >= 16")
    if keys.dtype != q.dtype or vals.dtype != q.dtype:
        raise ValueError("window_attention: q, keys and vals must share a dtype")
    q, keys, vals = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, keys, vals))
    tile = tile_for(d, q.dtype)
    out = _empty(t, hq, d, dtype=q.dtype, device=q.device)
    if t:
        sc = (d ** -0.5 if scale is None else scale) * _LOG2E
        grid = (triton.cdiv(t, tile.bm), hq)
        _attn_kernel[grid](q, keys, vals, out, t, s - t, q.stride(0), q.stride(1),
                           keys.stride(0), keys.stride(1), vals.stride(0), vals.stride(1),
                           out.stride(0), out.stride(1), sc, GROUP=hq // hkv, D=d, BM=tile.bm,
                           BN=tile.bn, STAGES=tile.stages, IEEE=q.dtype == torch.float32,
                           EMU=_EMU, num_warps=tile.warps)
    return out


def flops(t: int, s: int, hq: int, d: int) -> float:
    """Matmul FLOPs of a causal window of t queries over s keys: 4 D per (query, visible key)
    pair and head."""
    return 4.0 * d * hq * (t * (s - t) + t * (t + 1) / 2)
