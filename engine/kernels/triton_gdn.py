"""Triton kernels of the GDN layer (CUDA): chunked gated delta rule on the absolute grid, the
single-token recurrent step, causal conv1d and gated RMSNorm, with reference.py's contracts.

Imported lazily by engine.kernels.ops, on CUDA only. One file over 500 lines on purpose: the
four chunk kernels share their jit helpers (tiles, gates, the unit-lower inverse) and one launch
contract, and reading them side by side is how their exactness is checked.

The chunked rule (gdn_chunk_fwd) is four launches, fla's structure on our contract:
1. `_solve_kernel`, parallel over (chunk, value head): X = (I + L)^-1 in 16x16 blocks (forward
   substitution on the diagonal blocks, block merges below; one warp per chunk so that its row
   steps reduce inside the warp). Raw bf16 k tiles feed the tensor cores (exact products, fp32
   sums); the norms and gates scale the results.
2. `_prep_kernel`, parallel: the row factors f_k, e^gc_last, and W = X diag(f_w) k,
   U = X diag(beta) v (bf16).
3. `_state_kernel`, one program per (value head, BV state columns), sequential over chunks, two
   dots per chunk: Vn = U - W S, S <- e^gc_last S + k^T (f_k Vn). It stores each chunk's entry
   state (bf16) and Vn for the output, and the fp32 state at every grid row (or at the rows
   asked for) when capturing, so grid snapshots cost no extra pass.
4. `_out_kernel`, parallel: O = f_q (q S_c) + Aqk Vn, with the causal scores Aqk and f_q formed
   from q, k and g here rather than stored by step 2 and read back.

Exactness: a chunk's numbers are a fixed-shape, fixed-order function of (state in, the chunk's
rows): launch shapes never depend on T, lo or hi (no autotuning), there are no atomics or split
reductions, state columns are independent (the V split changes no sum), and rows outside
[lo, hi) are never read (block pointers end at `hi` and zero-fill; chunks start at `lo`), so
resuming from a captured grid state is bitwise equal to running through, and valid rows do not
depend on what padding rows hold. Later rows meet earlier ones only through exact zeros of the
triangular factors, so a row's output does not depend on the valid rows after it either.

Precision: X, W, U, Aqk, the entry states and Vn are rounded to bf16 for the products, as fla
does; the carried state, the row factors and every sum stay fp32, and the raw bf16 inputs enter
the products unrounded. Relative L2 error against the fp32 reference: ~3e-3. The output is
stored in v's dtype (the gated norm that reads it rounds to that dtype first anyway).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Mapping
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


class GdnLaunch(NamedTuple):
    """Launch shape of the chunked rule's state pass: the one sequential kernel, so the one
    whose shape decides the time on a given GPU and the one worth tuning for another. Fixed
    per head shape, never derived from the window, so every window of a run computes the same
    way (exact parity is promised between runs with the same launch). The fields spread the
    work: bv splits the state's columns, which are independent; warps and stages schedule the
    same dots. The parallel kernels' shapes are fixed by the 64-row chunk and the head dims."""

    bv: int = 32  # state columns per program: HV * V / bv programs fill the GPU (H200: 132
    # SMs; 32 value heads x 128 / 32 = 128 programs); smaller gives more programs, larger
    # fewer loads of W and k per column
    warps: int = 4  # warps per program
    stages: int = 3  # software-pipelining depth of its per-chunk loads (shared memory: lower
    # it on GPUs with less than sm_90's 228 KB per SM)

    def describe(self) -> str:
        return f"bv={self.bv},warps={self.warps},stages={self.stages}"


def launch_for(kd: int, vd: int) -> GdnLaunch:
    """The engine's launch shape for head dims (kd, vd)."""
    base = GdnLaunch()
    return base._replace(bv=min(base.bv, vd))


# Triton 3.x on sm_90 miscompiles some kernels with several tl.dot at small block sizes
# (illegal shared-memory reads or silent corruption; helion PR #1905 reports block sizes
# 16/32). Head dims >= 64 only; smaller heads (toy models) use the torch reference.
_SAFE_DOT = 64


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
# chunked gated delta rule: the state-independent half (parallel over chunks x heads)
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
    # small merges of the UT transform: tf32 keeps X close to the exact inverse
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
def _inv4_unit_lower(l0, l1, l2, l3, o_s):
    # (I + l)^-1 of four strictly lower [16, 16] blocks. Row r of N = X - I is -l_r (I + N):
    # rows < r of N are final and l_r is zero from column r on. One loop for the four blocks:
    # four independent dependency chains per row step for the scheduler to interleave.
    n0 = -l0
    n1 = -l1
    n2 = -l2
    n3 = -l3
    for r in range(2, 16):
        sel = o_s[:, None] == r
        a0 = tl.sum(tl.where(sel, -l0, 0.0), 0)
        a1 = tl.sum(tl.where(sel, -l1, 0.0), 0)
        a2 = tl.sum(tl.where(sel, -l2, 0.0), 0)
        a3 = tl.sum(tl.where(sel, -l3, 0.0), 0)
        a0 = a0 + tl.sum(a0[:, None] * n0, 0)
        a1 = a1 + tl.sum(a1[:, None] * n1, 0)
        a2 = a2 + tl.sum(a2[:, None] * n2, 0)
        a3 = a3 + tl.sum(a3[:, None] * n3, 0)
        n0 = tl.where(sel, a0[None, :], n0)
        n1 = tl.where(sel, a1[None, :], n1)
        n2 = tl.where(sel, a2[None, :], n2)
        n3 = tl.where(sel, a3[None, :], n3)
    eye = (o_s[:, None] == o_s[None, :]).to(tl.float32)
    return n0 + eye, n1 + eye, n2 + eye, n3 + eye


@triton.jit
def _rdot(a, b, acc, EMU: tl.constexpr):
    # product of raw (bf16 or fp32) input tiles: exact on the tensor cores (bf16 operands,
    # fp32 sums); in the interpreter an fp32 dot (exact there too)
    if EMU:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_raw(bp):
    # rows past the view's end (the window's padding rows) read as exact zeros
    return tl.load(bp, boundary_check=(0,), padding_option="zero")


@triton.jit
def _chunk_gates(g, beta, glast, rows, ok, o_c, i_c, i_h, sg_t, sg_h, sb_t, sb_h,
                 HV: tl.constexpr):
    # one chunk's cumulative log decay gc, its last value (e^gc_last stored to glast) and beta;
    # rows outside [lo, hi) (ok false) read as g = beta = 0
    gv = tl.load(g + rows * sg_t + i_h * sg_h, mask=ok, other=0.0).to(tl.float32)
    gcv = tl.cumsum(gv, 0)
    g_last = tl.sum(tl.where(o_c == 63, gcv, 0.0), 0)
    tl.store(glast + i_c * HV + i_h, tl.exp(g_last))
    bfull = tl.load(beta + rows * sb_t + i_h * sb_h, mask=ok, other=0.0).to(tl.float32)
    return gcv, g_last, bfull


@triton.jit
def _causal_scores(a_qk, rq, rk, gcv, o_c):
    # Aqk = tril(q_i.k_j / |q_i| |k_j| Gamma_ij) from the raw products a_qk
    low = o_c[:, None] >= o_c[None, :]
    sc = a_qk * rq[:, None] * rk[None, :]
    return tl.where(low, sc * tl.exp(tl.where(low, gcv[:, None] - gcv[None, :], 0.0)), 0.0)


@triton.jit(do_not_specialize=["lo", "hi", "c0", "t"])
def _solve_kernel(k, g, beta, xmat, sk_t, sk_h, sg_t, sg_h, sb_t, sb_h, lo, hi, c0, t,
                  HV: tl.constexpr, GRP: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                  EMU: tl.constexpr):
    # X = (I + L)^-1 of one chunk of one value head, L = strict_tril(beta_i k_i.k_j Gamma_ij)
    # (k normalised), in 16x16 blocks: the four diagonal blocks by forward substitution, the
    # six below by X_ij = -X_ii sum_{j<=m<i} L_im X_mj. Raw key tiles go to the tensor cores
    # (exact products); the norms scale the products. Meant for one warp: the row steps of the
    # substitution then reduce inside the warp, and many chunks share an SM.
    i_c = tl.program_id(0) + c0
    i_h = tl.program_id(1)
    r0 = i_c * 64
    o_c = tl.arange(0, 64)
    o_s = tl.arange(0, 16)
    rows = r0 + o_c
    ok = (rows >= lo) & (rows < hi)
    kb = k + (i_h // GRP) * sk_h

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
        a00 = _rdot(k0, tl.trans(k0), a00, EMU)
        a11 = _rdot(k1, tl.trans(k1), a11, EMU)
        a22 = _rdot(k2, tl.trans(k2), a22, EMU)
        a33 = _rdot(k3, tl.trans(k3), a33, EMU)
        a10 = _rdot(k1, tl.trans(k0), a10, EMU)
        a20 = _rdot(k2, tl.trans(k0), a20, EMU)
        a21 = _rdot(k2, tl.trans(k1), a21, EMU)
        a30 = _rdot(k3, tl.trans(k0), a30, EMU)
        a31 = _rdot(k3, tl.trans(k1), a31, EMU)
        a32 = _rdot(k3, tl.trans(k2), a32, EMU)

    # 1/|k| from the diagonals of the raw products (as reference.l2norm: rsqrt(sum k^2 + eps))
    eye = o_s[:, None] == o_s[None, :]
    r0_ = tl.rsqrt(tl.sum(tl.where(eye, a00, 0.0), 1) + 1e-6)
    r1_ = tl.rsqrt(tl.sum(tl.where(eye, a11, 0.0), 1) + 1e-6)
    r2_ = tl.rsqrt(tl.sum(tl.where(eye, a22, 0.0), 1) + 1e-6)
    r3_ = tl.rsqrt(tl.sum(tl.where(eye, a33, 0.0), 1) + 1e-6)
    c0_ = tl.rsqrt(tl.sum(tl.where(eye, a00, 0.0), 0) + 1e-6)
    c1_ = tl.rsqrt(tl.sum(tl.where(eye, a11, 0.0), 0) + 1e-6)
    c2_ = tl.rsqrt(tl.sum(tl.where(eye, a22, 0.0), 0) + 1e-6)
    c3_ = tl.rsqrt(tl.sum(tl.where(eye, a33, 0.0), 0) + 1e-6)
    gv = tl.load(g + rows * sg_t + i_h * sg_h, mask=ok, other=0.0).to(tl.float32)
    gcv = tl.cumsum(gv, 0)
    bfull = tl.load(beta + rows * sb_t + i_h * sb_h, mask=ok, other=0.0).to(tl.float32)
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
    x00, x11, x22, x33 = _inv4_unit_lower(
        _gate(a00, r0_, c0_, b0, g0, g0, o_s, True),
        _gate(a11, r1_, c1_, b1, g1, g1, o_s, True),
        _gate(a22, r2_, c2_, b2, g2, g2, o_s, True),
        _gate(a33, r3_, c3_, b3, g3, g3, o_s, True), o_s)
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


@triton.jit(do_not_specialize=["lo", "hi", "c0", "t"])
def _prep_kernel(k, v, g, beta, xmat, fk, glast, w, u, sk_t, sk_h, sv_t, sv_h, sg_t, sg_h,
                 sb_t, sb_h, lo, hi, c0, t, HV: tl.constexpr, GRP: tl.constexpr,
                 K: tl.constexpr, V: tl.constexpr, BD: tl.constexpr, EMU: tl.constexpr):
    # The state pass's inputs for one chunk of one value head: the factor f_k =
    # e^(gc_last - gc) |k|^-1, e^gc_last, then W = X diag(f_w) k and U = X diag(beta) v with
    # f_w = beta e^gc |k|^-1 (the decayed, normalised keys and the beta-scaled values through
    # the UT transform), bf16 operands, stored in w/u's dtype. One load of the k tile.
    i_c = tl.program_id(0) + c0
    i_h = tl.program_id(1)
    r0 = i_c * 64
    o_c = tl.arange(0, 64)
    rows = r0 + o_c
    ok = (rows >= lo) & (rows < hi)
    kt = _load_raw(_tile(k + (i_h // GRP) * sk_h, hi, K, sk_t, r0, 0, 64, K))
    kf = kt.to(tl.float32)
    rk = tl.rsqrt(tl.sum(kf * kf, 1) + 1e-6)
    gcv, g_last, bfull = _chunk_gates(g, beta, glast, rows, ok, o_c, i_c, i_h, sg_t, sg_h,
                                      sb_t, sb_h, HV)
    tl.store(fk + rows * HV + i_h, rk * tl.exp(g_last - gcv))
    f_w = rk * bfull * tl.exp(gcv)
    x = tl.load(_tile(xmat + i_h * 64, t, 64, HV * 64, r0, 0, 64, 64))
    wt = _bdot(x, kf * f_w[:, None], None, EMU)
    tl.store(_tile(w + i_h * K, t, K, HV * K, r0, 0, 64, K), wt.to(w.dtype.element_ty))
    vb = v + i_h * sv_h
    for j in tl.static_range(V // BD):
        vt = _load_raw(_tile(vb, hi, V, sv_t, r0, j * BD, 64, BD)).to(tl.float32)
        ut = _bdot(x, vt * bfull[:, None], None, EMU)
        tl.store(_tile(u + i_h * V, t, V, HV * V, r0, j * BD, 64, BD), ut.to(u.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# chunked gated delta rule: the state pass (sequential over chunks) and the output
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["lo", "hi", "c0", "c1", "cs", "t"])
def _state_kernel(k, w, u, fk, glast, s0, hbuf, vnbuf, states, s_out, cap_idx, sk_t, sk_h,
                  lo, hi, c0, c1, cs, t,
                  HV: tl.constexpr, GRP: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BV: tl.constexpr, CAPTURE: tl.constexpr, STAGES: tl.constexpr,
                  EMU: tl.constexpr):
    # One value head, BV state columns, chunk after chunk, two dots on the state's path:
    #   h[c] = S (entry state, for the output kernel);  Vn = U - W S;  S <- e^gc_last S +
    #   k^T (f_k Vn). Vn is stored for the output kernel; the state after chunk c goes to
    #   states[c - cs] with CAPTURE 1 (every chunk that ends by hi), or to states[cap_idx[c - cs]]
    #   where that is >= 0 with CAPTURE 2 (requested rows only); s_out gets the last one.
    # The state stays in registers in fp32.
    i_v = tl.program_id(0)
    i_h = tl.program_id(1)
    v0 = i_v * BV
    hkv = i_h * (K * V)
    kb = k + (i_h // GRP) * sk_h
    o_c = tl.arange(0, 64)
    s = tl.load(_tile(s0 + hkv, K, V, V, 0, v0, K, BV))
    for c in tl.range(c0, c1, num_stages=STAGES):
        r0 = c * 64
        hp = hbuf + (c - cs).to(tl.int64) * (HV * K * V) + hkv
        tl.store(_tile(hp, K, V, V, 0, v0, K, BV), s.to(hbuf.dtype.element_ty))
        f_k = tl.load(fk + (r0 + o_c) * HV + i_h)
        decay = tl.load(glast + c * HV + i_h)
        wt = tl.load(_tile(w + i_h * K, t, K, HV * K, r0, 0, 64, K))
        ut = tl.load(_tile(u + i_h * V, t, V, HV * V, r0, v0, 64, BV)).to(tl.float32)
        ktt = tl.trans(_load_raw(_tile(kb, hi, K, sk_t, r0, 0, 64, K)))
        vn = ut - _bdot(wt, s, None, EMU)
        tl.store(_tile(vnbuf + i_h * V, t, V, HV * V, r0, v0, 64, BV),
                 vn.to(vnbuf.dtype.element_ty))
        s = _bdot(ktt, f_k[:, None] * vn, s * decay, EMU)
        if CAPTURE == 1:
            if r0 + 64 <= hi:
                sp = states + (c - cs).to(tl.int64) * (HV * K * V) + hkv
                tl.store(_tile(sp, K, V, V, 0, v0, K, BV), s)
        if CAPTURE == 2:
            ci = tl.load(cap_idx + (c - cs))
            if ci >= 0:
                sp = states + ci.to(tl.int64) * (HV * K * V) + hkv
                tl.store(_tile(sp, K, V, V, 0, v0, K, BV), s)
    tl.store(_tile(s_out + hkv, K, V, V, 0, v0, K, BV), s)


@triton.jit(do_not_specialize=["lo", "hi", "c0", "cs", "t"])
def _out_kernel(q, k, g, hbuf, vnbuf, out, sq_t, sq_h, sk_t, sk_h, sg_t, sg_h,
                lo, hi, c0, cs, t, scale,
                HV: tl.constexpr, GRP: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BV: tl.constexpr, EMU: tl.constexpr):
    # O = f_q (q h[c]) + Aqk Vn for one chunk of one value head (parallel over chunks), with
    # the causal scores Aqk = tril(q_i.k_j / |q_i| |k_j| Gamma_ij) and f_q = e^gc |q|^-1 / sqrt(K)
    # formed here from q, k and g. Padding rows come out as exact zeros: their q rows are zero.
    i_c = tl.program_id(0) + c0
    i_h = tl.program_id(1)
    r0 = i_c * 64
    o_c = tl.arange(0, 64)
    rows = r0 + o_c
    i_qk = i_h // GRP
    qt = _load_raw(_tile(q + i_qk * sq_h, hi, K, sq_t, r0, 0, 64, K))
    kt = _load_raw(_tile(k + i_qk * sk_h, hi, K, sk_t, r0, 0, 64, K))
    a_qk = _rdot(qt, tl.trans(kt), None, EMU)
    qf = qt.to(tl.float32)
    kf = kt.to(tl.float32)
    rq = tl.rsqrt(tl.sum(qf * qf, 1) + 1e-6) * scale
    rk = tl.rsqrt(tl.sum(kf * kf, 1) + 1e-6)
    ok = (rows >= lo) & (rows < hi)
    gv = tl.load(g + rows * sg_t + i_h * sg_h, mask=ok, other=0.0).to(tl.float32)
    gcv = tl.cumsum(gv, 0)
    f_q = rq * tl.exp(gcv)
    at = _causal_scores(a_qk, rq, rk, gcv, o_c).to(vnbuf.dtype.element_ty)
    hp = hbuf + (i_c - cs).to(tl.int64) * (HV * K * V) + i_h * (K * V)
    for j in tl.static_range(V // BV):
        ht = tl.load(_tile(hp, K, V, V, 0, j * BV, K, BV))
        vt = tl.load(_tile(vnbuf + i_h * V, t, V, HV * V, r0, j * BV, 64, BV))
        o = f_q[:, None] * _bdot(qt, ht, None, EMU)
        o = _bdot(at, vt, o, EMU)
        tl.store(_tile(out + i_h * V, t, V, HV * V, r0, j * BV, 64, BV),
                 o.to(out.dtype.element_ty))


def _rows2d(x: torch.Tensor) -> torch.Tensor:
    """A [T, H, D] tensor whose last dim is contiguous (a view when it already is)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
           beta: torch.Tensor, lo: int, hi: int, launch: GdnLaunch) -> None:
    t, hq, kd = q.shape
    hv, vd = v.shape[1], v.shape[2]
    if t % CHUNK or lo % CHUNK or not 0 <= lo < hi <= t:
        raise ValueError(f"bad window: T={t} lo={lo} hi={hi} (chunk {CHUNK})")
    if hv % hq or k.shape != q.shape or g.shape != (t, hv) or beta.shape != (t, hv):
        raise ValueError("shape mismatch among q, k, v, g, beta")
    for d in (kd, vd):
        if d < 16 or d & (d - 1):
            raise ValueError(f"head dims must be powers of two >= 16, got K={kd} V={vd}")
    if launch.bv < 16 or vd % launch.bv:
        raise ValueError(f"launch bv={launch.bv} must be >= 16 and divide V={vd}")


def gdn_chunk_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                  beta: torch.Tensor, state: torch.Tensor, lo: int, hi: int,
                  capture: bool | Collection[int], launch: GdnLaunch,
                  ) -> tuple[torch.Tensor, torch.Tensor, Mapping[int, torch.Tensor]]:
    """chunk_gated_delta_rule with an explicit launch shape. q, k may have fewer heads than v
    (grouped: value head h reads q/k head h // (HV // H)), as views with any row stride.
    `capture`: True for the state at every grid row in (lo, hi], or the rows wanted (those on
    the grid and in range are returned, and only those are stored). The output is in v's
    dtype, zero outside [lo, hi)."""
    _check(q, k, v, g, beta, lo, hi, launch)
    rows: list[int] | None = None  # the requested grid rows (sparse capture)
    if not isinstance(capture, bool):
        rows = sorted({int(r) for r in capture
                       if lo < r <= hi // CHUNK * CHUNK and r % CHUNK == 0})
        if not rows:
            o, s_hi, _ = gdn_chunk_fwd(q, k, v, g, beta, state, lo, hi, False, launch)
            return o, s_hi, {}
        capture = True
    t, hq, kd = q.shape
    hv, vd = v.shape[1], v.shape[2]
    grp = hv // hq
    q, k, v = _rows2d(q), _rows2d(k), _rows2d(v)
    state = state.float().contiguous()
    dev = q.device
    c0, c1 = lo // CHUNK, -(-hi // CHUNK)
    out = _empty(t, hv, vd, dtype=v.dtype, device=dev)
    if c0:
        out[:c0 * CHUNK].zero_()
    if c1 * CHUNK < t:
        out[c1 * CHUNK:].zero_()
    s_out = _empty(hv, kd, vd, dtype=torch.float32, device=dev)
    n_states = len(rows) if rows is not None else (hi // CHUNK - c0) if capture else 0
    states = _empty(max(n_states, 0), hv, kd, vd, dtype=torch.float32, device=dev)
    cap_idx = None
    if rows is not None:  # chunk -> index into states, -1 for chunks not requested
        idx = [-1] * (c1 - c0)
        for i, r in enumerate(rows):
            idx[r // CHUNK - 1 - c0] = i
        cap_idx = torch.tensor(idx, dtype=torch.int32).to(dev, non_blocking=True)
    # the bf16 operands of the products (see the module docstring, Precision)
    mid = torch.bfloat16
    fk = _empty(t, hv, dtype=torch.float32, device=dev)
    glast = _empty(t // CHUNK, hv, dtype=torch.float32, device=dev)
    xmat = _empty(t, hv, CHUNK, dtype=mid, device=dev)
    w = _empty(t, hv, kd, dtype=mid, device=dev)
    u = _empty(t, hv, vd, dtype=mid, device=dev)
    vn = _empty(t, hv, vd, dtype=mid, device=dev)
    hbuf = _empty(c1 - c0, hv, kd, vd, dtype=mid, device=dev)

    _solve_kernel[(c1 - c0, hv)](
        k, g, beta, xmat, k.stride(0), k.stride(1), g.stride(0), g.stride(1),
        beta.stride(0), beta.stride(1), lo, hi, c0, t,
        HV=hv, GRP=grp, K=kd, BK=min(32, kd), EMU=_EMU_BF16, num_warps=1)
    _prep_kernel[(c1 - c0, hv)](
        k, v, g, beta, xmat, fk, glast, w, u, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), lo, hi, c0, t,
        HV=hv, GRP=grp, K=kd, V=vd, BD=min(64, vd), EMU=_EMU_BF16, num_warps=4)
    bv = min(launch.bv, vd)
    _state_kernel[(vd // bv, hv)](
        k, w, u, fk, glast, state, hbuf, vn, states if capture else s_out, s_out,
        cap_idx if cap_idx is not None else s_out, k.stride(0), k.stride(1),
        lo, hi, c0, c1, c0, t,
        HV=hv, GRP=grp, K=kd, V=vd, BV=bv,
        CAPTURE=0 if not capture else (1 if cap_idx is None else 2),
        STAGES=launch.stages, EMU=_EMU_BF16, num_warps=launch.warps)
    _out_kernel[(c1 - c0, hv)](
        q, k, g, hbuf, vn, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        g.stride(0), g.stride(1), lo, hi, c0, c0, t, kd ** -0.5,
        HV=hv, GRP=grp, K=kd, V=vd, BV=min(64, vd), EMU=_EMU_BF16, num_warps=4)
    if rows is not None:
        return out, s_out, {r: states[i] for i, r in enumerate(rows)}
    return out, s_out, GridStates(states, lo + CHUNK)


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, state: torch.Tensor, lo: int, hi: int,
                           capture: bool | Collection[int] = True,
                           launch: GdnLaunch | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, Mapping[int, torch.Tensor]]:
    """reference.chunk_gated_delta_rule on the GPU (see the module docstring), with the
    engine's launch shape unless one is given; head dims under 64 (toy models) take the torch
    reference (see _SAFE_DOT)."""
    kd, vd = q.shape[-1], v.shape[-1]
    if min(kd, vd) < _SAFE_DOT:
        from engine.kernels import reference  # noqa: PLC0415

        hv = v.shape[1]
        if q.shape[1] != hv:
            q = q.repeat_interleave(hv // q.shape[1], dim=1)
            k = k.repeat_interleave(hv // k.shape[1], dim=1)
        return reference.chunk_gated_delta_rule(q, k, v, g, beta, state, lo, hi, capture)
    return gdn_chunk_fwd(q, k, v, g, beta, state, lo, hi, capture, launch or launch_for(kd, vd))


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


@triton.jit
def _conv_taps(x, wt, st, o_t, o_d, col, mt, md, lo, sx_t, sw_d, ss_t, xdt: tl.constexpr,
               W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """silu(sum_j x[t + j - (W-1)] w[:, j]) for rows o_t, channels o_d (read at columns col of
    x's rows); input rows before lo come from the conv state (its W-1 rows end at lo)."""
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        src = o_t + (j - (W - 1))
        in_x = (src >= lo) & mt
        in_s = (src < lo) & (src >= lo - (W - 1)) & mt
        xv = tl.load(x + src[:, None].to(tl.int64) * sx_t + col[None, :],
                     mask=in_x[:, None] & md[None, :], other=0.0)
        sv = tl.load(st + (src - lo + (W - 1))[:, None] * ss_t + o_d[None, :],
                     mask=in_s[:, None] & md[None, :], other=0.0).to(xdt)
        e = tl.where(in_x[:, None], xv.to(xdt), sv).to(tl.float32)
        wj = tl.load(wt + o_d * sw_d + j, mask=md, other=0.0).to(tl.float32)
        if j == 0:
            acc = e * wj[None, :]
        else:
            acc = acc + e * wj[None, :]
    return acc * tl.sigmoid(acc)


@triton.jit(do_not_specialize=["t"])
def _conv_kernel(x, wt, st, out, t, sx_t, sw_d, ss_t, D: tl.constexpr, W: tl.constexpr,
                 BT: tl.constexpr, BD: tl.constexpr):
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = o_d < D
    mt = o_t < t
    xdt = out.dtype.element_ty
    y = _conv_taps(x, wt, st, o_t, o_d, o_d, mt, md, 0, sx_t, sw_d, ss_t, xdt, W, BT, BD)
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


@triton.jit(do_not_specialize=["t", "lo"])
def _conv_map_kernel(x, wt, st, out, t, lo, sx_t, sw_d, ss_t, D: tl.constexpr, W: tl.constexpr,
                     BT: tl.constexpr, BD: tl.constexpr, KD: tl.constexpr, DK: tl.constexpr,
                     G: tl.constexpr, RV: tl.constexpr):
    # _conv_kernel reading the projection's interleaved layout directly (reference.conv_window):
    # channel c of [q | k | v] sits at column col(c) of x's row; input rows before lo come from
    # the conv state (the W-1 rows before lo) or are zero.
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = o_d < D
    mt = o_t < t
    c2 = o_d - KD
    c3 = o_d - 2 * KD
    col = tl.where(o_d < KD, (o_d // DK) * G + o_d % DK,
                   tl.where(o_d < 2 * KD, (c2 // DK) * G + DK + c2 % DK,
                            (c3 // RV) * G + 2 * DK + c3 % RV))
    xdt = out.dtype.element_ty
    y = _conv_taps(x, wt, st, o_t, o_d, col, mt, md, lo, sx_t, sw_d, ss_t, xdt, W, BT, BD)
    tl.store(out + o_t[:, None].to(tl.int64) * D + o_d[None, :], y.to(xdt),
             mask=mt[:, None] & md[None, :])


def conv_window(qkvz: torch.Tensor, layout: tuple[int, int, int], weight: torch.Tensor,
                state: torch.Tensor, lo: int) -> torch.Tensor:
    """reference.conv_window: the window's conv straight from the projection (no [q|k|v]
    copy). qkvz [T, HK, 2K + 2RV] with contiguous rows' last dim."""
    hk, kd, rv = layout
    t = qkvz.shape[0]
    d = weight.shape[0]
    gw = qkvz.shape[-1]
    if qkvz.stride(-1) != 1 or qkvz.stride(-2) != gw or d != hk * (2 * kd + rv):
        from engine.kernels import reference  # noqa: PLC0415

        return reference.conv_window(qkvz, layout, weight, state, lo)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    state = state if state.stride(-1) == 1 else state.contiguous()
    out = _empty(t, d, dtype=qkvz.dtype, device=qkvz.device)
    if t == 0:
        return out
    bt, bd = 16, 256
    _conv_map_kernel[(triton.cdiv(t, bt), triton.cdiv(d, bd))](
        qkvz, weight, state, out, t, lo, qkvz.stride(0), weight.stride(0),
        state.stride(0) if state.shape[0] else d, D=d, W=weight.shape[1], BT=bt, BD=bd,
        KD=hk * kd, DK=kd, G=gw, RV=rv, num_warps=4)
    return out


@triton.jit(do_not_specialize=["t"])
def _gates_kernel(ba, a_log, dt_bias, g, beta, t, s_t, HK: tl.constexpr, R: tl.constexpr,
                  BT: tl.constexpr):
    # g = -e^A_log softplus(a + dt_bias) (torch's softplus: x above 20), beta = sigmoid(b)
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    o_h = tl.arange(0, HK * R)
    m = (o_t < t)[:, None]
    base = ba + o_t[:, None].to(tl.int64) * s_t + (o_h // R)[None, :] * (2 * R) \
        + (o_h % R)[None, :]
    bv = tl.load(base, mask=m, other=0.0).to(tl.float32)
    av = tl.load(base + R, mask=m, other=0.0).to(tl.float32)
    xs = av + tl.load(dt_bias + o_h).to(tl.float32)[None, :]
    sp = tl.where(xs > 20.0, xs, tl.log(1.0 + tl.exp(tl.minimum(xs, 20.0))))
    gv = -tl.exp(tl.load(a_log + o_h).to(tl.float32))[None, :] * sp
    dst = o_t[:, None] * (HK * R) + o_h[None, :]
    tl.store(g + dst, gv, mask=m)
    tl.store(beta + dst, tl.sigmoid(bv).to(beta.dtype.element_ty), mask=m)


def gdn_gates(ba: torch.Tensor, a_log: torch.Tensor,
              dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.gdn_gates in one kernel (g fp32, beta in ba's dtype, [T, HV])."""
    t, hk, r2 = ba.shape
    r = r2 // 2
    if ba.stride(-1) != 1 or ba.stride(-2) != r2 or (hk * r) & (hk * r - 1):
        from engine.kernels import reference  # noqa: PLC0415

        return reference.gdn_gates(ba, a_log, dt_bias)
    g = _empty(t, hk * r, dtype=torch.float32, device=ba.device)
    beta = _empty(t, hk * r, dtype=ba.dtype, device=ba.device)
    if t:
        bt = 32
        _gates_kernel[(triton.cdiv(t, bt),)](ba, a_log, dt_bias, g, beta, t, ba.stride(0),
                                             HK=hk, R=r, BT=bt, num_warps=4)
    return g, beta


# ---------------------------------------------------------------------------------------------
# gated RMSNorm
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n"])
def _gnorm_kernel(x, z, wt, out, n, sx, sz0, sz1, sz2, eps, D: tl.constexpr, BR: tl.constexpr,
                  A: tl.constexpr, R: tl.constexpr):
    # gate row i = (i0 * A + i1) * R + i2 sits at i0 sz0 + i1 sz1 + i2 sz2
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, D)
    m = rows < n
    zoff = (rows // (A * R)).to(tl.int64) * sz0 + ((rows // R) % A) * sz1 + (rows % R) * sz2
    xdt = out.dtype.element_ty
    # x (fp32 from the chunk kernel, or already in the output dtype) rounded to the output
    # dtype first, as reference.gated_rms_norm does
    xv = tl.load(x + rows[:, None] * sx + o_d[None, :], mask=m[:, None], other=0.0)
    xv = xv.to(xdt).to(tl.float32)
    r = tl.rsqrt(tl.sum(xv * xv, 1) / D + eps)
    xn = (xv * r[:, None]).to(xdt).to(tl.float32)
    wv = tl.load(wt + o_d).to(tl.float32)
    y = (wv[None, :] * xn).to(wt.dtype.element_ty).to(tl.float32)
    zv = tl.load(z + zoff[:, None] + o_d[None, :], mask=m[:, None], other=0.0)
    zv = zv.to(tl.float32)
    y = y * (zv * tl.sigmoid(zv))
    tl.store(out + rows[:, None] * D + o_d[None, :], y.to(xdt), mask=m[:, None])


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """reference.gated_rms_norm: RMSNorm(x) * w * silu(gate) over the last dim, in gate's
    dtype (x may be fp32: it is rounded in the kernel, no separate cast)."""
    d = x.shape[-1]
    if d & (d - 1):
        from engine.kernels import reference  # noqa: PLC0415

        return reference.gated_rms_norm(x, gate, weight, eps)
    x2 = x.reshape(-1, d)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    # the gate's rows in place when it is [N, A, R, D] with a contiguous last dim (z as a view
    # of the projection), else as [N, D] rows (copied if they are not evenly strided)
    if gate.dim() == 4 and gate.stride(-1) == 1:
        z3 = gate
    else:
        z2 = gate.reshape(-1, d)
        z3 = (z2 if z2.stride(-1) == 1 else z2.contiguous())[:, None, None, :]
    if z3.shape[0] * z3.shape[1] * z3.shape[2] != x2.shape[0]:
        raise ValueError("gated_rms_norm: gate and x have different row counts")
    n = x2.shape[0]
    out = _empty(n, d, dtype=gate.dtype, device=x.device)
    if n:
        br = max(1, min(64, 4096 // d))
        _gnorm_kernel[(triton.cdiv(n, br),)](
            x2, z3, weight.contiguous(), out, n, x2.stride(0), z3.stride(0), z3.stride(1),
            z3.stride(2), float(eps), D=d, BR=br, A=z3.shape[1], R=z3.shape[2], num_warps=4)
    return out.view(x.shape)
