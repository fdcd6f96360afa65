"""Triton kernels for the per-layer glue around the GEMMs (CUDA): zero-centred RMSNorm and the
SwiGLU product, the fused residual add + norm and q/k norm + RoPE, and the log-sum-exp merge
of attention pieces, with reference.py's contracts. Each replaces several torch elementwise
launches and their fp32 round trips through memory, which in eager windows cost about a third
of an a3b-proxy window's device time.

Both are row-local with a fixed reduction order, so every output row is a deterministic
function of its own input row (warm == cold and the parity scenario stay bitwise). Imported
lazily by engine.kernels.ops, on CUDA only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels fill (tests replace this to poison them with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


@triton.jit(do_not_specialize=["n"])
def _rmsnorm_kernel(x, wt, out, n, sx, eps, D: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, D)
    m = rows < n
    xv = tl.load(x + rows[:, None].to(tl.int64) * sx + o_d[None, :], mask=m[:, None],
                 other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(xv * xv, 1) / D + eps)
    wv = 1.0 + tl.load(wt + o_d).to(tl.float32)
    y = (xv * r[:, None]) * wv[None, :]
    tl.store(out + rows[:, None].to(tl.int64) * D + o_d[None, :], y.to(out.dtype.element_ty),
             mask=m[:, None])


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """(base view, row count, row stride) when x's rows (all dims but the last) are evenly
    strided with a contiguous last dim, else None."""
    d = x.shape[-1]
    if x.stride(-1) != 1 or x.numel() == 0:
        return None
    if x.dim() == 1:
        return x, 1, d
    step = x.stride(-2)
    for i in range(x.dim() - 2, 0, -1):  # each outer dim must continue the row stride
        if x.stride(i - 1) != x.stride(i) * x.shape[i]:
            return None
    return x, x.numel() // d, step


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """reference.rms_norm: x_hat * (1 + w) over the last dim, fp32 inside, x's dtype out."""
    from engine.kernels import reference  # noqa: PLC0415

    d = x.shape[-1]
    rows = _rows(x)
    if d & (d - 1) or d > 8192 or rows is None:
        return reference.rms_norm(x, weight, eps)
    base, n, sx = rows
    out = _empty(*x.shape, dtype=x.dtype, device=x.device)
    br = max(1, min(64, 4096 // d))
    _rmsnorm_kernel[(triton.cdiv(n, br),)](base, weight.contiguous(), out, n, sx, float(eps),
                                           D=d, BR=br, num_warps=4 if d <= 2048 else 8)
    return out


@triton.jit(do_not_specialize=["n"])
def _add_rmsnorm_kernel(x, y, s_out, out, wt, n, eps, D: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, D)
    m = rows < n
    off = rows[:, None].to(tl.int64) * D + o_d[None, :]
    dt = s_out.dtype.element_ty
    xv = tl.load(x + off, mask=m[:, None], other=0.0).to(tl.float32)
    yv = tl.load(y + off, mask=m[:, None], other=0.0).to(tl.float32)
    sv = (xv + yv).to(dt)
    tl.store(s_out + off, sv, mask=m[:, None])
    sf = sv.to(tl.float32)
    r = tl.rsqrt(tl.sum(sf * sf, 1) / D + eps)
    wv = 1.0 + tl.load(wt + o_d).to(tl.float32)
    tl.store(out + off, ((sf * r[:, None]) * wv[None, :]).to(dt), mask=m[:, None])


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.add_rms_norm in one pass: (x + y rounded to x's dtype, its RMSNorm)."""
    from engine.kernels import reference  # noqa: PLC0415

    d = x.shape[-1]
    if (x.shape != y.shape or x.dtype != y.dtype or not (x.is_contiguous() and y.is_contiguous())
            or d & (d - 1) or d > 8192):
        return reference.add_rms_norm(x, y, weight, eps)
    n = x.numel() // d
    s = _empty(*x.shape, dtype=x.dtype, device=x.device)
    out = _empty(*x.shape, dtype=x.dtype, device=x.device)
    if n:
        br = max(1, min(64, 4096 // d))
        _add_rmsnorm_kernel[(triton.cdiv(n, br),)](x, y, s, out, weight.contiguous(), n,
                                                   float(eps), D=d, BR=br,
                                                   num_warps=4 if d <= 2048 else 8)
    return s, out


@triton.jit(do_not_specialize=["n"])
def _norm_rope_kernel(x, wt, cs, sn, out, n, sx_t, sx_h, eps, H: tl.constexpr,
                      D: tl.constexpr, ROT: tl.constexpr, BR: tl.constexpr):
    # rows = (t, h) pairs; x rows strided (t, h), out contiguous [n, D]
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    m = rows < n
    o_d = tl.arange(0, D)
    t = rows // H
    base = x + t.to(tl.int64) * sx_t + (rows % H) * sx_h
    half: tl.constexpr = ROT // 2
    part = tl.where(o_d < half, o_d + half, tl.where(o_d < ROT, o_d - half, o_d))
    dt = out.dtype.element_ty
    xv = tl.load(base[:, None] + o_d[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    xp = tl.load(base[:, None] + part[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(xv * xv, 1) / D + eps)
    wv = 1.0 + tl.load(wt + o_d).to(tl.float32)
    wp = 1.0 + tl.load(wt + part).to(tl.float32)
    xn = ((xv * r[:, None]) * wv[None, :]).to(dt).to(tl.float32)
    pn = ((xp * r[:, None]) * wp[None, :]).to(dt).to(tl.float32)
    rotated = tl.where((o_d < half)[None, :], -pn, pn)
    inr = (o_d < ROT)[None, :] & m[:, None]
    cv = tl.load(cs + t[:, None] * ROT + o_d[None, :], mask=inr, other=0.0).to(tl.float32)
    sv = tl.load(sn + t[:, None] * ROT + o_d[None, :], mask=inr, other=0.0).to(tl.float32)
    a = (xn * cv).to(dt).to(tl.float32)
    b = (rotated * sv).to(dt).to(tl.float32)
    y = tl.where((o_d < ROT)[None, :], (a + b).to(dt), xn.to(dt))
    tl.store(out + rows[:, None].to(tl.int64) * D + o_d[None, :], y, mask=m[:, None])


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """reference.rms_norm_rope in one kernel: x [T, H, D] (rows strided, e.g. q inside the
    doubled projection), cos/sin [T, rot] contiguous. Returns a contiguous [T, H, D]."""
    from engine.kernels import reference  # noqa: PLC0415

    t, h, d = x.shape
    rot = cos.shape[-1]
    if (x.stride(-1) != 1 or d & (d - 1) or rot % 2 or rot > d or not cos.is_contiguous()
            or not sin.is_contiguous() or cos.shape != (t, rot) or sin.shape != (t, rot)):
        return reference.rms_norm_rope(x, weight, eps, cos, sin)
    out = _empty(t, h, d, dtype=x.dtype, device=x.device)
    n = t * h
    if n:
        br = max(1, min(32, 4096 // d))
        _norm_rope_kernel[(triton.cdiv(n, br),)](x, weight.contiguous(), cos, sin, out, n,
                                                 x.stride(0), x.stride(1), float(eps), H=h,
                                                 D=d, ROT=rot, BR=br, num_warps=4)
    return out


@triton.jit(do_not_specialize=["n"])
def _swiglu_kernel(g, u, out, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dt = out.dtype.element_ty
    gv = tl.load(g + offs, mask=m, other=0.0).to(tl.float32)
    uv = tl.load(u + offs, mask=m, other=0.0).to(tl.float32)
    s = (gv * tl.sigmoid(gv)).to(dt).to(tl.float32)  # silu rounded, as torch's F.silu
    tl.store(out + offs, (s * uv).to(dt), mask=m)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """reference.swiglu: silu(gate) * up, each rounded to the input dtype as torch does."""
    from engine.kernels import reference  # noqa: PLC0415

    if gate.shape != up.shape or not (gate.is_contiguous() and up.is_contiguous()):
        return reference.swiglu(gate, up)
    out = _empty(*gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n:
        block = 2048
        _swiglu_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# attention: merge of key-range pieces by their log-sum-exp
# ---------------------------------------------------------------------------------------------


@triton.jit
def _piece_lse(lp, sl_h, sl_t, h, rows, m):
    return tl.load(lp + h * sl_h + rows.to(tl.int64) * sl_t, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _piece_out(op, so_h, so_t, h, rows, m, o_d):
    return tl.load(op + h * so_h + rows[:, None].to(tl.int64) * so_t + o_d[None, :],
                   mask=m[:, None], other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["t"])
def _merge_kernel(o0, o1, o2, o3, l0, l1, l2, l3, out, lout, t,
                  so0h, so0t, so1h, so1t, so2h, so2t, so3h, so3t,
                  sl0h, sl0t, sl1h, sl1t, sl2h, sl2t, sl3h, sl3t, sout_h, sout_t,
                  NP: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, WRITE_L: tl.constexpr):
    # softmax-weighted sum of NP partial attention outputs over disjoint key ranges:
    # O = sum_i e^(l_i - m) O_i / sum_i e^(l_i - m), L = m + log sum_i e^(l_i - m)
    h = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    m = rows < t
    o_d = tl.arange(0, D)
    a0 = _piece_lse(l0, sl0h, sl0t, h, rows, m)
    a1 = _piece_lse(l1, sl1h, sl1t, h, rows, m)
    mx = tl.maximum(a0, a1)
    a2 = a0
    a3 = a0
    if NP > 2:
        a2 = _piece_lse(l2, sl2h, sl2t, h, rows, m)
        mx = tl.maximum(mx, a2)
    if NP > 3:
        a3 = _piece_lse(l3, sl3h, sl3t, h, rows, m)
        mx = tl.maximum(mx, a3)
    w0 = tl.exp(a0 - mx)
    w1 = tl.exp(a1 - mx)
    acc = w0[:, None] * _piece_out(o0, so0h, so0t, h, rows, m, o_d)
    acc += w1[:, None] * _piece_out(o1, so1h, so1t, h, rows, m, o_d)
    den = w0 + w1
    if NP > 2:
        w2 = tl.exp(a2 - mx)
        acc += w2[:, None] * _piece_out(o2, so2h, so2t, h, rows, m, o_d)
        den += w2
    if NP > 3:
        w3 = tl.exp(a3 - mx)
        acc += w3[:, None] * _piece_out(o3, so3h, so3t, h, rows, m, o_d)
        den += w3
    res = acc / den[:, None]
    tl.store(out + h * sout_h + rows[:, None].to(tl.int64) * sout_t + o_d[None, :],
             res.to(out.dtype.element_ty), mask=m[:, None])
    if WRITE_L:
        tl.store(lout + h * t + rows, mx + tl.log(den), mask=m)


Piece = tuple[torch.Tensor, torch.Tensor]  # (output [1, H, T, D], log-sum-exp [1, H, T](, 1))


def attn_merge(pieces: list[Piece], dtype: torch.dtype) -> torch.Tensor:
    """Attention over the union of disjoint key ranges from each range's output and
    log-sum-exp (natural log, as flash attention and cuDNN return it), merged in fp32 in the
    pieces' order (fixed, so deterministic). Returns [T, H, D] in `dtype`. More than four pieces
    are merged four at a time through an fp32 partial result."""
    if len(pieces) < 2:
        raise ValueError("attn_merge needs at least two pieces")
    _, hq, t, d = pieces[0][0].shape
    dev = pieces[0][0].device
    todo = list(pieces)
    while True:
        group, todo = todo[:4], todo[4:]
        final = not todo
        if final:
            out = _empty(t, hq, d, dtype=dtype, device=dev)
            oh, ot = out.stride(1), out.stride(0)
            lout = out  # unused
        else:
            acc = _empty(1, hq, t, d, dtype=torch.float32, device=dev)
            lout = _empty(1, hq, t, dtype=torch.float32, device=dev)
            out, oh, ot = acc, acc.stride(1), acc.stride(2)
        np_ = len(group)
        pad = group + [group[0]] * (4 - np_)
        os_ = [x for o, _ in pad for x in (o.stride(1), o.stride(2))]
        ls_ = [x for _, lse in pad for x in (lse.stride(1), lse.stride(2))]
        for o, _ in pad:
            if o.stride(3) != 1 or o.shape != (1, hq, t, d):
                raise ValueError("attn_merge: pieces must be [1, H, T, D] with contiguous D")
        bt = 32 if d >= 256 else 64
        _merge_kernel[(triton.cdiv(t, bt), hq)](
            *[o for o, _ in pad], *[lse for _, lse in pad], out, lout, t, *os_, *ls_, oh, ot,
            NP=np_, D=d, BT=bt, WRITE_L=not final, num_warps=4)
        if final:
            return out
        todo = [(acc, lout)] + todo
