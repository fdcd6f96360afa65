"""Row invariance of the torch reference on the CPU: every row-wise op of a window's forward
gives a row the same bits whatever the number of rows in the call (a 64-row window, a
2048-row one, one decode row) and whatever the other rows hold, so that CPU windows can be
sized to the work and stay bitwise. reference.linear needs its fixed row blocks for that:
torch's CPU matmul of one row (a matrix-vector kernel) sums in another order than of 64; the
window attention its fixed query and absolute key blocks."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference as ref


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def threads(request: pytest.FixtureRequest) -> int:
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def _rows_invariant(fn, x: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    """fn's rows of x[1024:1088] are the same bits alone, inside 128 or all rows (x has more
    than 1088), one by one, and with the other rows replaced."""
    full = fn(x)
    sub = full[1024:1088]
    assert torch.equal(fn(x[1024:1088]), sub)
    assert torch.equal(fn(x[960:1088])[64:], sub)
    assert torch.equal(fn(x[1030:1031]), full[1030:1031])
    y = x.clone()
    y[1056:] = torch.randn_like(y[1056:])
    assert torch.equal(fn(y)[1024:1056], full[1024:1056])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k,n", [(64, 384), (2048, 256)], ids=["K64-N384", "K2048-N256"])
def test_linear_rows_do_not_depend_on_m(threads: int, k: int, n: int,
                                        dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(1152, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    _rows_invariant(lambda a: ref.linear(a, w), x)
    torch.testing.assert_close(ref.linear(x, w), torch.nn.functional.linear(x, w))
    assert ref.linear(x[:0], w).shape == (0, n)
    assert ref.linear(x.view(2, 576, k), w).shape == (2, 576, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_norms_and_glue_rows_do_not_depend_on_m(threads: int, dtype: torch.dtype) -> None:
    """RMSNorm, the residual add + norm, SwiGLU, q/k norm + RoPE, the gated norm and the GDN
    gates are row-local in the reference too."""
    gen = torch.Generator().manual_seed(1)
    d = 2048
    x = torch.randn(2048, d, generator=gen).to(dtype)
    y = torch.randn(2048, d, generator=gen).to(dtype)
    w = (0.1 * torch.randn(d, generator=gen)).to(dtype)
    _rows_invariant(lambda a: ref.rms_norm(a, w, 1e-6), x)
    xy = torch.cat([x, y], -1)  # both inputs in one row, so that the rows travel together
    _rows_invariant(lambda a: torch.cat(ref.add_rms_norm(a[:, :d], a[:, d:], w, 1e-6), -1), xy)
    _rows_invariant(lambda a: ref.swiglu(a, a * 0.5), x)
    q = x.view(2048, 8, 256)
    cos = torch.randn(2048, 64, generator=gen).to(dtype)
    sin = torch.randn(2048, 64, generator=gen).to(dtype)
    wq = w[:256]
    full = ref.rms_norm_rope(q, wq, 1e-6, cos, sin)
    assert torch.equal(ref.rms_norm_rope(q[1024:1088], wq, 1e-6, cos[1024:1088],
                                         sin[1024:1088]), full[1024:1088])
    assert torch.equal(ref.rms_norm_rope(q[1030:1031], wq, 1e-6, cos[1030:1031],
                                         sin[1030:1031]), full[1030:1031])
    oz = torch.randn(2048, 16, 256, generator=gen).to(dtype)  # the output and its gate
    _rows_invariant(lambda a: ref.gated_rms_norm(a[..., :128].float(), a[..., 128:], w[:128],
                                                 1e-6), oz)
    ba = torch.randn(2048, 16, 4, generator=gen).to(dtype)
    a_log, dt = torch.randn(32, generator=gen), torch.randn(32, generator=gen)
    _rows_invariant(lambda a: torch.cat(ref.gdn_gates(a, a_log, dt), -1), ba)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_window_attention_rows_do_not_depend_on_the_window(threads: int,
                                                            dtype: torch.dtype) -> None:
    """reference.window_attention gives positions 256..319 the same bits in windows of 64, 192
    (not a power of two: CPU SDPA differs there) and 384 rows, ending anywhere past them, and
    one row alone; and it is softmax attention (fp32 SDPA within fp32 rounding)."""
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(448, 4, 32, generator=gen).to(dtype)
    k = torch.randn(448, 2, 32, generator=gen).to(dtype)
    v = torch.randn(448, 2, 32, generator=gen).to(dtype)

    def window(a: int, b: int) -> torch.Tensor:
        return ref.window_attention(q[a:b], k[:b], v[:b])

    want = window(256, 320)
    for a, b in ((192, 384), (256, 448), (64, 448), (128, 320)):
        assert torch.equal(window(a, b)[256 - a:320 - a], want), (a, b)
    assert torch.equal(window(300, 301), want[44:45])
    qh, kh, vh = (x[:320].float().transpose(0, 1)[None] for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        qh, kh, vh, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    tol = 2e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(want.float(), sdpa[256:320], atol=tol, rtol=tol)
