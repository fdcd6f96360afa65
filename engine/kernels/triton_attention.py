"""Window-invariant causal attention (CUDA): a query row's output is the same bits whatever the
window it is computed in, with reference.window_attention's contract.

A flash-attention call walks the keys in blocks placed relative to the call and splits the work
by its shape, so a position attended in a 64-row window and in a 128-row window is summed in
different orders (measured on an H200: docs/KERNELS.md). Here the key blocks sit at absolute
positions 0, BN, 2 BN, ...; a row at position p folds blocks 0..p // BN into its online softmax
in that order, and a block that lies wholly after p leaves the row untouched (a select, not an
update by exp(-inf) = 0, which could flip a zero's sign). The keys are also cut into splits at
absolute multiples of SPLIT_KEYS, computed in parallel and merged in split order, so a short
window over a long context still fills the GPU without a cut that follows the window. The tile
(BM x BN), the warps and the stages are constants of the dtype and head size, never of the
window, and rows never interact: the products of a row are the same fixed-order tensor-core
sums in any call. With the batch-invariant linear (triton_gemm) and the row-local glue, this
is what windows sized to the work need. Imported where used, on CUDA (the CPU tests run it in
Triton's interpreter).
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


# Keys per split: the keys are cut at absolute multiples of SPLIT_KEYS, each split's partial
# softmax is computed by its own programs (parallel work for short windows over long contexts)
# and the partials are merged in split order. The cut points are absolute, so a row meets the
# same splits in every window; a constant of the module, never of the call.
SPLIT_KEYS = 2048
# Rows per launch at most: bounds the fp32 partials (splits x rows x heads x D) of long windows
# over long contexts; rows never interact, so the grouping changes no bit.
_MAX_PARTIAL_BYTES = 256 * 2**20


@triton.jit(do_not_specialize=["t", "e0"])
def _attn_partial_kernel(q, k, v, acc_out, ml_out, t, e0, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
                         scale_log2, H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
                         STAGES: tl.constexpr, IEEE: tl.constexpr, EMU: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.program_id(2)
    kvh = h // GROUP
    rows = pid_m * BM + tl.arange(0, BM)
    valid = rows < t
    pos = e0 + rows  # absolute positions of the queries (bottom-right causal)
    last = tl.minimum(e0 + pid_m * BM + BM - 1, e0 + t - 1)  # the block's deepest query
    lo = c * SPLIT
    if lo <= last:
        od = tl.arange(0, D)
        qv = tl.load(q + rows[:, None].to(tl.int64) * sq_t + h * sq_h + od[None, :],
                     mask=valid[:, None], other=0.0)
        if EMU:
            qv = qv.to(tl.float32)
        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, D], dtype=tl.float32)
        hi = tl.minimum(lo + SPLIT, last + 1)
        for n0 in tl.range(lo, hi, BN, num_stages=STAGES):
            cols = n0 + tl.arange(0, BN)
            kv_ok = cols < hi
            kb = tl.load(k + cols[:, None].to(tl.int64) * sk_t + kvh * sk_h + od[None, :],
                         mask=kv_ok[:, None], other=0.0)
            vb = tl.load(v + cols[:, None].to(tl.int64) * sv_t + kvh * sv_h + od[None, :],
                         mask=kv_ok[:, None], other=0.0)
            if EMU:
                sc = tl.dot(qv, tl.trans(kb.to(tl.float32)), input_precision="ieee")
            elif IEEE:
                sc = tl.dot(qv, tl.trans(kb), input_precision="ieee")
            else:
                sc = tl.dot(qv, tl.trans(kb))
            sc = sc * scale_log2
            seen = cols[None, :] <= pos[:, None]
            sc = tl.where(seen, sc, float("-inf"))
            active = n0 <= pos  # the row has a key in this block
            m_new = tl.where(active, tl.maximum(m_i, tl.max(sc, 1)), m_i)
            alpha = tl.exp2(m_i - m_new)
            p = tl.where(seen, tl.exp2(sc - m_new[:, None]), 0.0)
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
        base = (c * t + rows).to(tl.int64) * H + h
        tl.store(acc_out + base[:, None] * D + od[None, :], acc, mask=valid[:, None])
        tl.store(ml_out + base * 2, m_i, mask=valid)
        tl.store(ml_out + base * 2 + 1, l_i, mask=valid)


@triton.jit(do_not_specialize=["t", "e0", "n_split"])
def _attn_merge_kernel(acc_in, ml_in, out, t, e0, n_split, so_t, so_h, H: tl.constexpr,
                       D: tl.constexpr, BR: tl.constexpr, SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid * BR + tl.arange(0, BR)
    valid = rows < t
    pos = e0 + rows
    od = tl.arange(0, D)
    m_i = tl.full([BR], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BR], dtype=tl.float32)
    acc = tl.zeros([BR, D], dtype=tl.float32)
    for c in range(0, n_split):
        active = valid & (c * SPLIT <= pos)  # the row has keys in split c
        base = (c * t + rows).to(tl.int64) * H + h
        m_c = tl.load(ml_in + base * 2, mask=active, other=float("-inf"))
        l_c = tl.load(ml_in + base * 2 + 1, mask=active, other=0.0)
        a_c = tl.load(acc_in + base[:, None] * D + od[None, :], mask=active[:, None], other=0.0)
        m_new = tl.where(active, tl.maximum(m_i, m_c), m_i)
        wa = tl.exp2(m_i - m_new)
        wc = tl.exp2(m_c - m_new)
        acc = tl.where(active[:, None], acc * wa[:, None] + a_c * wc[:, None], acc)
        l_i = tl.where(active, l_i * wa + l_c * wc, l_i)
        m_i = m_new
    o = acc / tl.where(valid, l_i, 1.0)[:, None]
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
    if not t:
        return out
    sc = (d ** -0.5 if scale is None else scale) * _LOG2E
    n_split = triton.cdiv(s, SPLIT_KEYS)
    per_row = n_split * hq * (d + 2) * 4
    step = max(tile.bm, _MAX_PARTIAL_BYTES // per_row // tile.bm * tile.bm)
    e0 = s - t
    for a in range(0, t, step):  # row groups: q[a:b] over keys [0, e0 + b)
        b = min(t, a + step)
        rt, re0, ns = b - a, e0 + a, triton.cdiv(e0 + b, SPLIT_KEYS)
        part = _empty(ns, rt, hq, d, dtype=torch.float32, device=q.device)
        ml = _empty(ns, rt, hq, 2, dtype=torch.float32, device=q.device)
        qa = q[a:b]
        _attn_partial_kernel[(triton.cdiv(rt, tile.bm), hq, ns)](
            qa, keys, vals, part, ml, rt, re0, qa.stride(0), qa.stride(1), keys.stride(0),
            keys.stride(1), vals.stride(0), vals.stride(1), sc, H=hq, GROUP=hq // hkv, D=d,
            BM=tile.bm, BN=tile.bn, SPLIT=SPLIT_KEYS, STAGES=tile.stages,
            IEEE=q.dtype == torch.float32, EMU=_EMU, num_warps=tile.warps)
        oa = out[a:b]
        br = 16 if d >= 256 else 32
        _attn_merge_kernel[(triton.cdiv(rt, br), hq)](
            part, ml, oa, rt, re0, ns, oa.stride(0), oa.stride(1), H=hq, D=d, BR=br,
            SPLIT=SPLIT_KEYS, num_warps=4)
    return out
