"""Triton kernels of the GDN layer (CUDA): chunked gated delta rule on the absolute grid, the
single-token recurrent step, causal conv1d and gated RMSNorm, with reference.py's contracts.

Imported lazily by engine.kernels.ops, on CUDA only. The chunked rule runs as two launches:

1. `_prep_kernel`, parallel over (chunk, head): l2norm of q and k, cumulative log decay, the
   UT transform X = (I + L)^-1 of the chunk (blockwise: four 16x16 forward substitutions, then
   block merges), W = X (beta K e^gc), U = X (beta V) and the causal intra-chunk scores
   Aqk = tril(Q K^T Gamma). Nothing here depends on the state.
2. `_seq_kernel`, one program per (value head, block of V columns), sequential over chunks:
   Vn = U - W S, O = (Q e^gc) S + Aqk Vn, S <- e^gc_last S + (K e^(gc_last - gc))^T Vn. The state
   stays in registers (fp32); the state at every chunk boundary is stored when `capture` is on,
   so grid snapshots cost no extra pass, and the output is written in the same pass.

Exactness: a chunk's numbers are a fixed-shape, fixed-order function of (state in, the chunk's
rows): launch shapes never depend on T, lo or hi (no autotuning), there are no atomics or split
reductions, state columns are independent (the V split does not change any sum), and rows outside
[lo, hi) are never read (masked loads give exact zeros), so resuming from a captured grid state is
bitwise equal to running through, and valid rows do not depend on what padding rows held.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.config import CHUNK

# Triton's CPU interpreter (TRITON_INTERPRET=1, used by the CPU tests) mis-multiplies bf16 dot
# operands; there the bf16 dots run as fp32 dots of bf16-rounded operands (the same products).
_EMU_BF16 = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels fill (tests replace this to poison them with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


class GdnConfig(NamedTuple):
    """Launch shape of the chunked rule (fixed per head shape; the bench sweeps it)."""

    bv: int = 32  # V columns per sequential program
    warps: int = 4  # warps of the sequential program
    stages: int = 2  # software-pipelining depth of its loads
    solve_warps: int = 4
    wy_warps: int = 4
    tf32: bool = False  # per-chunk operands (q, k, W, U, X, Aqk) stored fp32 (tf32 dots), or bf16
    state_tf32: bool | None = None  # state-pass dots in tf32 (None: as `tf32`), else bf16


DEFAULT_CONFIG = GdnConfig()


def config_for(kd: int, vd: int) -> GdnConfig:
    """The production launch shape for head dims (kd, vd)."""
    return DEFAULT_CONFIG._replace(bv=min(DEFAULT_CONFIG.bv, vd))


class GridStates(Mapping[int, torch.Tensor]):
    """{grid row r: state at r} over one buffer [n, H, K, V]; row of entry i is first + C * i.

    A Mapping (not a dict) so that a 64k-row call does not build a thousand views up front."""

    def __init__(self, buffer: torch.Tensor, first: int) -> None:
        self.buffer = buffer
        self.first = first

    def _index(self, row: int) -> int | None:
        if not isinstance(row, int):
            return None
        off = row - self.first
        if off < 0 or off % CHUNK or off // CHUNK >= self.buffer.shape[0]:
            return None
        return off // CHUNK

    def __getitem__(self, row: int) -> torch.Tensor:
        i = self._index(row)
        if i is None:
            raise KeyError(row)
        return self.buffer[i]

    def __contains__(self, row: object) -> bool:
        return self._index(row) is not None  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.first + CHUNK * self.buffer.shape[0], CHUNK))

    def __len__(self) -> int:
        return int(self.buffer.shape[0])


# ---------------------------------------------------------------------------------------------
# chunked gated delta rule: per-chunk preparation (parallel over chunks x heads)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bdot(a, b, acc, EMU: tl.constexpr):
    # bf16 operands, fp32 accumulation
    if EMU:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc,
                      input_precision="ieee")
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _tile(base, n_rows, n_cols, s_row, r0, c0, BR: tl.constexpr, BC: tl.constexpr):
    # block pointer to the [BR, BC] tile at (r0, c0) of a row-major [n_rows, n_cols] view
    return tl.make_block_ptr(base, (n_rows, n_cols), (s_row, 1), (r0, c0), (BR, BC), (1, 0))


@triton.jit
def _pick16(vec, o_c, first, o_s):
    # vec[first:first + 16] of a [C] vector, exactly (one non-zero term per sum)
    sel = o_c[None, :] == (first + o_s)[:, None]
    return tl.sum(tl.where(sel, vec[None, :], 0.0), 1)


@triton.jit
def _gate(a, ri, rj, bi, gi, gj, o_s, DIAG: tl.constexpr):
    # block of L from raw key products a = k_i . k_j: beta_i (a / |k_i| |k_j|) exp(gc_i - gc_j),
    # strictly lower on the diagonal
    a = a * ri[:, None] * rj[None, :]
    if DIAG:
        low = o_s[:, None] > o_s[None, :]
        return tl.where(low, a * tl.exp(tl.where(low, gi[:, None] - gj[None, :], 0.0)), 0.0) \
            * bi[:, None]
    else:
        return a * tl.exp(gi[:, None] - gj[None, :]) * bi[:, None]


@triton.jit
def _inv_unit_lower(lm, o_s):
    # (I + lm)^-1 for a strictly lower [16, 16] lm. Row r of N = X - I is -l_r (I + N): rows
    # < r of N are final and l_r is zero from column r on.
    n = -lm
    for r in range(2, 16):
        a = tl.sum(tl.where(o_s[:, None] == r, -lm, 0.0), 0)
        a = a + tl.sum(a[:, None] * n, 0)
        n = tl.where(o_s[:, None] == r, a[None, :], n)
    return n + (o_s[:, None] == o_s[None, :]).to(tl.float32)


@triton.jit
def _rdot(a, b, acc, TF32: tl.constexpr):
    # product of raw (bf16 or fp32) input tiles
    if TF32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_raw(bp):
    # rows past the view's end (the window's padding rows) read as exact zeros
    return tl.load(bp, boundary_check=(0,), padding_option="zero")


@triton.jit(do_not_specialize=["lo", "hi", "c0", "t"])
def _solve_kernel(k, g, beta, gcb, glast, xmat,
                  sk_t, sk_h, sg_t, sg_h, sb_t, sb_h, lo, hi, c0, t,
                  HV: tl.constexpr, GRP: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                  TF32: tl.constexpr):
    # X = (I + L)^-1 of one chunk of one value head, L = strict_tril(beta_i k_i.k_j Gamma_ij)
    # (k normalised), in 16x16 blocks: the four diagonal blocks by forward substitution, the
    # six below by X_ij = -X_ii sum_{j<=m<i} L_im X_mj. Also gc (cumulative log decay) and
    # exp(gc_last). Raw key tiles go to the tensor cores; the norms scale the products.
    i_c = tl.program_id(0) + c0
    i_h = tl.program_id(1)
    r0 = i_c * 64
    o_c = tl.arange(0, 64)
    o_s = tl.arange(0, 16)
    rows = r0 + o_c
    ok = (rows >= lo) & (rows < hi)
    kb = k + (i_h // GRP) * sk_h

    gv = tl.load(g + rows * sg_t + i_h * sg_h, mask=ok, other=0.0).to(tl.float32)
    gcv = tl.cumsum(gv, 0)
    tl.store(gcb + rows * HV + i_h, gcv)
    tl.store(glast + i_c * HV + i_h, tl.exp(tl.sum(tl.where(o_c == 63, gcv, 0.0), 0)))
    bfull = tl.load(beta + rows * sb_t + i_h * sb_h, mask=ok, other=0.0).to(tl.float32)

    a00 = tl.zeros([16, 16], dtype=tl.float32)
    a11 = tl.zeros([16, 16], dtype=tl.float32)
    a22 = tl.zeros([16, 16], dtype=tl.float32)
    a33 = tl.zeros([16, 16], dtype=tl.float32)
    a10 = tl.zeros([16, 16], dtype=tl.float32)
    a20 = tl.zeros([16, 16], dtype=tl.float32)
    a21 = tl.zeros([16, 16], dtype=tl.float32)
    a30 = tl.zeros([16, 16], dtype=tl.float32)
    a31 = tl.zeros([16, 16], dtype=tl.float32)
    a32 = tl.zeros([16, 16], dtype=tl.float32)
    for j in tl.range(0, K // BK, num_stages=2):
        k0 = _load_raw(_tile(kb, hi, K, sk_t, r0, j * BK, 16, BK))
        k1 = _load_raw(_tile(kb, hi, K, sk_t, r0 + 16, j * BK, 16, BK))
        k2 = _load_raw(_tile(kb, hi, K, sk_t, r0 + 32, j * BK, 16, BK))
        k3 = _load_raw(_tile(kb, hi, K, sk_t, r0 + 48, j * BK, 16, BK))
        a00 = _rdot(k0, tl.trans(k0), a00, TF32)
        a11 = _rdot(k1, tl.trans(k1), a11, TF32)
        a22 = _rdot(k2, tl.trans(k2), a22, TF32)
        a33 = _rdot(k3, tl.trans(k3), a33, TF32)
        a10 = _rdot(k1, tl.trans(k0), a10, TF32)
        a20 = _rdot(k2, tl.trans(k0), a20, TF32)
        a21 = _rdot(k2, tl.trans(k1), a21, TF32)
        a30 = _rdot(k3, tl.trans(k0), a30, TF32)
        a31 = _rdot(k3, tl.trans(k1), a31, TF32)
        a32 = _rdot(k3, tl.trans(k2), a32, TF32)

    # 1/|k| from the diagonals of the raw products (as reference.l2norm: rsqrt(sum k^2 + eps))
    eye = o_s[:, None] == o_s[None, :]
    r0_ = tl.rsqrt(tl.sum(tl.where(eye, a00, 0.0), 1) + 1e-6)
    r1_ = tl.rsqrt(tl.sum(tl.where(eye, a11, 0.0), 1) + 1e-6)
    r2_ = tl.rsqrt(tl.sum(tl.where(eye, a22, 0.0), 1) + 1e-6)
    r3_ = tl.rsqrt(tl.sum(tl.where(eye, a33, 0.0), 1) + 1e-6)
    c0_ = tl.rsqrt(tl.sum(tl.where(eye, a00, 0.0), 0) + 1e-6)
    c1_ = tl.rsqrt(tl.sum(tl.where(eye, a11, 0.0), 0) + 1e-6)
    c2_ = tl.rsqrt(tl.sum(tl.where(eye, a22, 0.0), 0) + 1e-6)
    g0 = _pick16(gcv, o_c, 0, o_s)
    g1 = _pick16(gcv, o_c, 16, o_s)
    g2 = _pick16(gcv, o_c, 32, o_s)
    g3 = _pick16(gcv, o_c, 48, o_s)
    b0 = _pick16(bfull, o_c, 0, o_s)
    b1 = _pick16(bfull, o_c, 16, o_s)
    b2 = _pick16(bfull, o_c, 32, o_s)
    b3 = _pick16(bfull, o_c, 48, o_s)
    l10 = _gate(a10, r1_, c0_, b1, g1, g0, o_s, False)
    l20 = _gate(a20, r2_, c0_, b2, g2, g0, o_s, False)
    l21 = _gate(a21, r2_, c1_, b2, g2, g1, o_s, False)
    l30 = _gate(a30, r3_, c0_, b3, g3, g0, o_s, False)
    l31 = _gate(a31, r3_, c1_, b3, g3, g1, o_s, False)
    l32 = _gate(a32, r3_, c2_, b3, g3, g2, o_s, False)
    x00 = _inv_unit_lower(_gate(a00, r0_, c0_, b0, g0, g0, o_s, True), o_s)
    x11 = _inv_unit_lower(_gate(a11, r1_, c1_, b1, g1, g1, o_s, True), o_s)
    x22 = _inv_unit_lower(_gate(a22, r2_, c2_, b2, g2, g2, o_s, True), o_s)
    c3_ = tl.rsqrt(tl.sum(tl.where(eye, a33, 0.0), 0) + 1e-6)
    x33 = _inv_unit_lower(_gate(a33, r3_, c3_, b3, g3, g3, o_s, True), o_s)
    x10 = -_mm(x11, _mm(l10, x00))
    x21 = -_mm(x22, _mm(l21, x11))
    x32 = -_mm(x33, _mm(l32, x22))
    x20 = -_mm(x22, _mm(l20, x00) + _mm(l21, x10))
    x31 = -_mm(x33, _mm(l31, x11) + _mm(l32, x21))
    x30 = -_mm(x33, _mm(l30, x00) + _mm(l31, x10) + _mm(l32, x20))

    xdt = xmat.dtype.element_ty
    xb = xmat + i_h * 64
    zero = tl.zeros([16, 16], dtype=xdt)
    tl.store(_tile(xb, t, 64, HV * 64, r0, 0, 16, 16), x00.to(xdt))
    tl.store(_tile(xb, t, 64, HV * 64, r0, 16, 16, 16), zero)
    tl.store(_tile(xb, t, 64, HV * 64, r0, 32, 16, 16), zero)
    tl.store(_tile(xb, t, 64, HV * 64, r0, 48, 16, 16), zero)
    tl.store(_tile(xb, t, 64, HV * 64, r0 + 16, 0, 16, 16), x10.to(xdt))
    tl.store(_tile(xb, t, 64, HV * 64, r0 + 16, 16, 16, 16), x11.to(xdt))
    tl.store(_tile(xb, t, 64, HV * 64, r0 + 16, 32, 16, 16), zero)
    tl.store(_tile(xb, t, 64, HV * 64, r0 + 16, 48, 16, 16), zero)
    tl.store(_tile(xb, t, 64, HV * 64, r0 + 32, 0, 16, 16), x20.to(xdt))
    tl.store(_tile(xb, t, 64, HV * 64, r0 + 32, 16, 16, 16), x21.to(xdt))
    tl.store(_tile(xb, t, 64, HV * 64, r0 + 32, 32, 16, 16), x22.to(xdt))
    tl.store(_tile(xb, t, 64, HV * 64, r0 + 32, 48, 16, 16), zero)
    tl.store(_tile(xb, t, 64, HV * 64, r0 + 48, 0, 16, 16), x30.to(xdt))
    tl.store(_tile(xb, t, 64, HV * 64, r0 + 48, 16, 16, 16), x31.to(xdt))
    tl.store(_tile(xb, t, 64, HV * 64, r0 + 48, 32, 16, 16), x32.to(xdt))
    tl.store(_tile(xb, t, 64, HV * 64, r0 + 48, 48, 16, 16), x33.to(xdt))


@triton.jit
def _sumsq_rows(base, hi, s_t, r0, K: tl.constexpr, BK: tl.constexpr):
    # 1 / ||row|| of [64, K] rows, streamed in BK slices (as reference.l2norm, up to order)
    ss = tl.zeros([64], dtype=tl.float32)
    for j in tl.range(0, K // BK, num_stages=1):
        x = _load_raw(_tile(base, hi, K, s_t, r0, j * BK, 64, BK)).to(tl.float32)
        ss += tl.sum(x * x, 1)
    return tl.rsqrt(ss + 1e-6)


@triton.jit(do_not_specialize=["lo", "hi", "c0", "t"])
def _wy_kernel(q, k, v, beta, gcb, xmat, qd, kdt, w, u, aqk,
               sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sb_t, sb_h, lo, hi, c0, t, scale,
               HV: tl.constexpr, GRP: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               BK: tl.constexpr, TF32: tl.constexpr):
    # One chunk of one value head: W = X (beta k e^gc), U = X (beta v), the state pass's
    # decayed q (from the chunk start) and k (to the chunk end, stored transposed), and the
    # causal intra-chunk scores Aqk = tril(q k^T Gamma). Raw input tiles go to the tensor
    # cores; norms, gates and beta scale X's columns or the products. K, V stream in BK slices.
    i_c = tl.program_id(0) + c0
    i_h = tl.program_id(1)
    r0 = i_c * 64
    o_c = tl.arange(0, 64)
    rows = r0 + o_c
    ok = (rows >= lo) & (rows < hi)
    mdt = w.dtype.element_ty
    qb = q + (i_h // GRP) * sq_h
    kb = k + (i_h // GRP) * sk_h
    vb = v + i_h * sv_h

    gcv = tl.load(gcb + rows * HV + i_h)
    g_last = tl.sum(tl.where(o_c == 63, gcv, 0.0), 0)
    bv = tl.load(beta + rows * sb_t + i_h * sb_h, mask=ok, other=0.0).to(tl.float32)
    rk = _sumsq_rows(kb, hi, sk_t, r0, K, BK)
    rq = _sumsq_rows(qb, hi, sq_t, r0, K, BK) * scale
    x_bp = _tile(xmat + i_h * 64, t, 64, HV * 64, r0, 0, 64, 64)
    xw = (tl.load(x_bp).to(tl.float32) * (rk * bv * tl.exp(gcv))[None, :]).to(mdt)
    f_k = rk * tl.exp(g_last - gcv)
    f_q = rq * tl.exp(gcv)
    kt_base = kdt + (i_c * HV + i_h) * (K * 64)
    a_qk = tl.zeros([64, 64], dtype=tl.float32)
    for j in tl.range(0, K // BK, num_stages=1):
        kc = _load_raw(_tile(kb, hi, K, sk_t, r0, j * BK, 64, BK))
        qc = _load_raw(_tile(qb, hi, K, sq_t, r0, j * BK, 64, BK))
        a_qk = _rdot(qc, tl.trans(kc), a_qk, TF32)
        tl.store(_tile(w + i_h * K, t, K, HV * K, r0, j * BK, 64, BK),
                 _rdot(xw, kc.to(mdt), None, TF32).to(mdt))
        tl.store(_tile(kt_base, K, 64, 64, j * BK, 0, BK, 64),
                 tl.trans(kc.to(tl.float32) * f_k[:, None]).to(mdt))
        tl.store(_tile(qd + i_h * K, t, K, HV * K, r0, j * BK, 64, BK),
                 (qc.to(tl.float32) * f_q[:, None]).to(mdt))
    low = o_c[:, None] >= o_c[None, :]
    sc = a_qk * rq[:, None] * rk[None, :]
    sc = tl.where(low, sc * tl.exp(tl.where(low, gcv[:, None] - gcv[None, :], 0.0)), 0.0)
    tl.store(_tile(aqk + i_h * 64, t, 64, HV * 64, r0, 0, 64, 64), sc.to(mdt))
    xu = (tl.load(x_bp).to(tl.float32) * bv[None, :]).to(mdt)
    for j in tl.range(0, V // BK, num_stages=1):
        vc = _load_raw(_tile(vb, hi, V, sv_t, r0, j * BK, 64, BK))
        tl.store(_tile(u + i_h * V, t, V, HV * V, r0, j * BK, 64, BK),
                 _rdot(xu, vc.to(mdt), None, TF32).to(mdt))


# ---------------------------------------------------------------------------------------------
# chunked gated delta rule: the state pass (sequential over chunks, output fused)
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["lo", "hi", "c0", "c1"])
def _seq_kernel(qd, kdt, glast, w, u, aqk, s0, out, states, s_out,
                lo, hi, c0, c1, t,
                HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                C: tl.constexpr, CAPTURE: tl.constexpr, TF32: tl.constexpr,
                STAGES: tl.constexpr, EMU: tl.constexpr):
    # One value head, BV columns of the state (columns are independent), all chunks in order.
    i_v = tl.program_id(0)
    i_h = tl.program_id(1)
    v0 = i_v * BV
    hkv = i_h * (K * V)
    s = tl.load(_tile(s0 + hkv, K, V, V, 0, v0, K, BV))
    for c in tl.range(c0, c1, num_stages=STAGES):
        r0 = c * C
        decay = tl.load(glast + c * HV + i_h)
        wt = tl.load(_tile(w + i_h * K, t, K, HV * K, r0, 0, C, K))
        qt = tl.load(_tile(qd + i_h * K, t, K, HV * K, r0, 0, C, K))
        at = tl.load(_tile(aqk + i_h * C, t, C, HV * C, r0, 0, C, C))
        kt = tl.load(_tile(kdt + (c * HV + i_h) * (K * C), K, C, C, 0, 0, K, C))
        ut = tl.load(_tile(u + i_h * V, t, V, HV * V, r0, v0, C, BV)).to(tl.float32)
        if TF32:
            vn = ut - tl.dot(wt.to(tl.float32), s, input_precision="tf32")
            o = tl.dot(qt.to(tl.float32), s, input_precision="tf32")
            o = tl.dot(at.to(tl.float32), vn, acc=o, input_precision="tf32")
            s = tl.dot(kt.to(tl.float32), vn, acc=s * decay, input_precision="tf32")
        else:
            sb = s.to(tl.bfloat16)
            vn = ut - _bdot(wt, sb, None, EMU)
            vb = vn.to(tl.bfloat16)
            o = _bdot(qt, sb, None, EMU)
            o = _bdot(at, vb, o, EMU)
            s = _bdot(kt, vb, s * decay, EMU)
        # padding rows of a partial chunk come out as exact zeros (their q and Aqk rows are 0)
        tl.store(_tile(out + i_h * V, t, V, HV * V, r0, v0, C, BV), o)
        if CAPTURE:
            if r0 + C <= hi:
                sp = states + (c - c0).to(tl.int64) * (HV * K * V) + hkv
                tl.store(_tile(sp, K, V, V, 0, v0, K, BV), s)
    tl.store(_tile(s_out + hkv, K, V, V, 0, v0, K, BV), s)


def _rows2d(x: torch.Tensor) -> torch.Tensor:
    """A [T, H, D] tensor whose last dim is contiguous (a view when it already is)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def gdn_chunk_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                  beta: torch.Tensor, state: torch.Tensor, lo: int, hi: int, capture: bool,
                  cfg: GdnConfig) -> tuple[torch.Tensor, torch.Tensor, GridStates]:
    """chunk_gated_delta_rule with an explicit launch shape. q, k may have fewer heads than v
    (grouped: value head h reads q/k head h // (HV // H)), as views with any row stride."""
    t, hq, kd = q.shape
    hv, vd = v.shape[1], v.shape[2]
    if t % CHUNK or lo % CHUNK or not 0 <= lo < hi <= t:
        raise ValueError(f"bad window: T={t} lo={lo} hi={hi} (chunk {CHUNK})")
    if hv % hq or k.shape != q.shape or g.shape != (t, hv) or beta.shape != (t, hv):
        raise ValueError("shape mismatch among q, k, v, g, beta")
    for d in (kd, vd):
        if d < 16 or d & (d - 1):
            raise ValueError(f"head dims must be powers of two >= 16, got K={kd} V={vd}")
    bv = min(cfg.bv, vd)
    q, k, v = _rows2d(q), _rows2d(k), _rows2d(v)
    state = state.float().contiguous()
    dev = q.device
    c0, c1 = lo // CHUNK, -(-hi // CHUNK)
    nc = c1 - c0
    mid = torch.float32 if cfg.tf32 else torch.bfloat16
    gcb = _empty(t, hv, dtype=torch.float32, device=dev)
    glast = _empty(t // CHUNK, hv, dtype=torch.float32, device=dev)
    xmat = _empty(t, hv, CHUNK, dtype=mid, device=dev)
    qd = _empty(t, hv, kd, dtype=mid, device=dev)
    kdt = _empty(t // CHUNK, hv, kd, CHUNK, dtype=mid, device=dev)
    w = _empty(t, hv, kd, dtype=mid, device=dev)
    u = _empty(t, hv, vd, dtype=mid, device=dev)
    aqk = _empty(t, hv, CHUNK, dtype=mid, device=dev)
    out = _empty(t, hv, vd, dtype=torch.float32, device=dev)
    if c0:
        out[:c0 * CHUNK].zero_()
    if c1 * CHUNK < t:
        out[c1 * CHUNK:].zero_()
    s_out = _empty(hv, kd, vd, dtype=torch.float32, device=dev)
    n_states = (hi // CHUNK - c0) if capture else 0
    states = _empty(max(n_states, 0), hv, kd, vd, dtype=torch.float32, device=dev)
    grp, bk = hv // hq, min(64, kd, vd)
    _solve_kernel[(nc, hv)](
        k, g, beta, gcb, glast, xmat,
        k.stride(0), k.stride(1), g.stride(0), g.stride(1), beta.stride(0), beta.stride(1),
        lo, hi, c0, t, HV=hv, GRP=grp, K=kd, BK=bk, TF32=cfg.tf32 or _EMU_BF16,
        num_warps=cfg.solve_warps)
    _wy_kernel[(nc, hv)](
        q, k, v, beta, gcb, xmat, qd, kdt, w, u, aqk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        beta.stride(0), beta.stride(1), lo, hi, c0, t, kd ** -0.5,
        HV=hv, GRP=grp, K=kd, V=vd, BK=bk, TF32=cfg.tf32 or _EMU_BF16,
        num_warps=cfg.wy_warps)
    _seq_kernel[(vd // bv, hv)](
        qd, kdt, glast, w, u, aqk, state, out, states if capture else s_out, s_out,
        lo, hi, c0, c1, t,
        HV=hv, K=kd, V=vd, BV=bv, C=CHUNK, CAPTURE=bool(capture),
        TF32=cfg.tf32 if cfg.state_tf32 is None else cfg.state_tf32,
        STAGES=cfg.stages, EMU=_EMU_BF16, num_warps=cfg.warps)
    return out, s_out, GridStates(states, lo + CHUNK)


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, state: torch.Tensor, lo: int, hi: int,
                           capture: bool = True,
                           ) -> tuple[torch.Tensor, torch.Tensor, Mapping[int, torch.Tensor]]:
    """reference.chunk_gated_delta_rule on the GPU (see the module docstring)."""
    return gdn_chunk_fwd(q, k, v, g, beta, state, lo, hi, capture,
                         config_for(q.shape[-1], v.shape[-1]))


# ---------------------------------------------------------------------------------------------
# decode step
# ---------------------------------------------------------------------------------------------


@triton.jit
def _step_kernel(q, k, v, g, beta, s_in, o, s_out, sq_h, sk_h, sv_h, scale,
                 GRP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    i_v = tl.program_id(0)
    i_h = tl.program_id(1)
    i_qk = i_h // GRP
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    qv = tl.load(q + i_qk * sq_h + o_k).to(tl.float32)
    kv = tl.load(k + i_qk * sk_h + o_k).to(tl.float32)
    qv = qv * tl.rsqrt(tl.sum(qv * qv, 0) + 1e-6) * scale
    kv = kv * tl.rsqrt(tl.sum(kv * kv, 0) + 1e-6)
    vv = tl.load(v + i_h * sv_h + o_v).to(tl.float32)
    gh = tl.load(g + i_h).to(tl.float32)
    bh = tl.load(beta + i_h).to(tl.float32)
    off = i_h * (K * V) + o_k[:, None] * V + o_v[None, :]
    s = tl.load(s_in + off) * tl.exp(gh)
    mem = tl.sum(s * kv[:, None], 0)
    s = s + kv[:, None] * ((vv - mem) * bh)[None, :]
    tl.store(o + i_h * V + o_v, tl.sum(s * qv[:, None], 0))
    tl.store(s_out + off, s)


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                   beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.recurrent_step: q, k [H, K] (H may divide HV), v [HV, V], g, beta [HV],
    state [HV, K, V] fp32 -> (o [HV, V] fp32, new state)."""
    hq, kd = q.shape
    hv, vd = v.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    g, beta = g.contiguous(), beta.contiguous()
    state = state.float().contiguous()
    o = _empty(hv, vd, dtype=torch.float32, device=q.device)
    s = _empty(*state.shape, dtype=torch.float32, device=q.device)
    bv = min(32, vd)
    _step_kernel[(vd // bv, hv)](q, k, v, g, beta, state, o, s, q.stride(0), k.stride(0),
                                 v.stride(0), kd ** -0.5, GRP=hv // hq, K=kd, V=vd, BV=bv,
                                 num_warps=4)
    return o, s


# ---------------------------------------------------------------------------------------------
# causal conv1d (+ SiLU) with a carried state
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["t"])
def _conv_kernel(x, wt, st, out, t, sx_t, sw_d, ss_t, D: tl.constexpr, W: tl.constexpr,
                 BT: tl.constexpr, BD: tl.constexpr):
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = o_d < D
    mt = o_t < t
    xdt = out.dtype.element_ty
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        src = o_t + (j - (W - 1))
        in_x = (src >= 0) & mt
        in_s = (src < 0) & mt
        xv = tl.load(x + src[:, None] * sx_t + o_d[None, :], mask=in_x[:, None] & md[None, :],
                     other=0.0)
        sv = tl.load(st + (src + (W - 1))[:, None] * ss_t + o_d[None, :],
                     mask=in_s[:, None] & md[None, :], other=0.0).to(xdt)
        e = tl.where(in_x[:, None], xv.to(xdt), sv).to(tl.float32)
        wj = tl.load(wt + o_d * sw_d + j, mask=md, other=0.0).to(tl.float32)
        if j == 0:
            acc = e * wj[None, :]
        else:
            acc = acc + e * wj[None, :]
    y = acc * tl.sigmoid(acc)
    tl.store(out + o_t[:, None] * D + o_d[None, :], y.to(xdt), mask=mt[:, None] & md[None, :])


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """reference.causal_conv1d: x [T, D], weight [D, W], state [W-1, D] -> silu(conv) [T, D]."""
    t, d = x.shape
    wk = weight.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    state = state if state.stride(-1) == 1 else state.contiguous()
    out = _empty(t, d, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    bt, bd = 16, 256
    _conv_kernel[(triton.cdiv(t, bt), triton.cdiv(d, bd))](
        x, weight, state, out, t, x.stride(0), weight.stride(0),
        state.stride(0) if state.shape[0] else d, D=d, W=wk, BT=bt, BD=bd, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# gated RMSNorm
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n"])
def _gnorm_kernel(x, z, wt, out, n, sx, sz, eps, D: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, D)
    m = rows < n
    xdt = out.dtype.element_ty
    xv = tl.load(x + rows[:, None] * sx + o_d[None, :], mask=m[:, None], other=0.0)
    xv = xv.to(tl.float32)
    r = tl.rsqrt(tl.sum(xv * xv, 1) / D + eps)
    xn = (xv * r[:, None]).to(xdt).to(tl.float32)
    wv = tl.load(wt + o_d).to(tl.float32)
    y = (wv[None, :] * xn).to(wt.dtype.element_ty).to(tl.float32)
    zv = tl.load(z + rows[:, None] * sz + o_d[None, :], mask=m[:, None], other=0.0)
    zv = zv.to(tl.float32)
    y = y * (zv * tl.sigmoid(zv))
    tl.store(out + rows[:, None] * D + o_d[None, :], y.to(xdt), mask=m[:, None])


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """reference.gated_rms_norm: RMSNorm(x) * w * silu(gate) over the last dim."""
    d = x.shape[-1]
    if d & (d - 1):
        from engine.kernels import reference  # noqa: PLC0415

        return reference.gated_rms_norm(x, gate, weight, eps)
    x2 = x.reshape(-1, d)
    z2 = gate.reshape(-1, d)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    z2 = z2 if z2.stride(-1) == 1 else z2.contiguous()
    n = x2.shape[0]
    out = _empty(n, d, dtype=x.dtype, device=x.device)
    if n:
        br = max(1, min(64, 4096 // d))
        _gnorm_kernel[(triton.cdiv(n, br),)](x2, z2, weight.contiguous(), out, n, x2.stride(0),
                                             z2.stride(0), float(eps), D=d, BR=br, num_warps=4)
    return out.view(x.shape)
