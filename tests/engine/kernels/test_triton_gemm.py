"""engine.kernels.triton_gemm: the batch-invariant linear against reference.linear, and the
invariance itself: the same rows computed in calls of different row counts (a 64-row window, a
2048-row one, one decode row) give the same bits. Interp tests run through Triton's
interpreter on the CPU; the GPU tests run the compiled kernel."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.kernels import reference as ref

pytestmark = pytest.mark.timeout(120)  # a bound, not a timing: seconds when the machine is idle


def _data(m: int, k: int, n: int, dtype: torch.dtype, device: str = "cpu",
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device, dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 96), (37, 80, 130), (200, 160, 64)],
                         ids=["M1-K64-N96", "M37-K80-N130", "M200-K160-N64"])
def test_interp_linear_matches_reference(interp: Any, poison: Any, m: int, k: int, n: int,
                                         dtype: torch.dtype) -> None:
    """Against torch (fp32: to fp32 rounding; bf16: one bf16 rounding of the fp32 sum), with
    K and N that are not multiples of the tile, and every output element written."""
    poison(interp.gemm)
    x, w = _data(m, k, n, dtype, seed=m)
    got = interp.gemm.linear(x, w)
    want = ref.linear(x, w)
    assert got.shape == (m, n) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    exact = (x.double() @ w.double().T)
    torch.testing.assert_close(got.double(), exact, atol=4 * tol, rtol=4 * tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_interp_linear_rows_do_not_depend_on_m(interp: Any, dtype: torch.dtype) -> None:
    """Rows 128..191 computed alone, inside 192 and 320 rows, and one row at a time: the same
    bits (leading dims are flattened to rows)."""
    x, w = _data(320, 96, 160, dtype, seed=3)
    lin = interp.gemm.linear
    full = lin(x, w)
    assert torch.equal(lin(x[:192], w)[128:], full[128:192])
    assert torch.equal(lin(x[128:192], w), full[128:192])
    assert torch.equal(lin(x[130:131], w), full[130:131])
    assert torch.equal(lin(x.view(4, 80, 96), w).view(320, 160), full)
    assert lin(x[:0], w).shape == (0, 160)


def test_interp_linear_checks_its_arguments(interp: Any) -> None:
    x, w = _data(4, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        interp.gemm.linear(x, w[:, :16])
    with pytest.raises(ValueError, match="do not match"):
        interp.gemm.linear(x, w.bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(2048, 8192), (5632, 2048), (2048, 24)],
                         ids=["K2048-N8192", "K5632-N2048", "K2048-N24"])
def test_linear_rows_do_not_depend_on_m_on_gpu(poison: Any, k: int, n: int) -> None:
    """Compiled (bf16, a3b-proxy projection shapes): within bf16 rounding of cuBLAS, and the
    same rows bitwise in windows of 64, 128, 2048 and 4096 rows and as one decode row."""
    import engine.kernels.triton_gemm as gemm

    poison(gemm)
    x, w = _data(4096, k, n, torch.bfloat16, "cuda", seed=k + n)
    full = gemm.linear(x, w)
    torch.testing.assert_close(full.float(), torch.nn.functional.linear(x, w).float(),
                               atol=3e-2, rtol=3e-2)
    for m in (64, 128, 2048):
        assert torch.equal(gemm.linear(x[1024:1024 + m], w), full[1024:1024 + m])
    assert torch.equal(gemm.linear(x[1030:1031], w), full[1030:1031])
    assert torch.equal(gemm.linear(x, w), full)
