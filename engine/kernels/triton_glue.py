"""Triton kernels for the per-layer glue around the GEMMs (CUDA): zero-centred RMSNorm and the
SwiGLU product, with reference.py's contracts. Each replaces several torch elementwise
launches and their fp32 round trips through memory (docs/KERNELS.md, run 5: ~35 ms of a
110 ms a3b-proxy window is such glue).

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
