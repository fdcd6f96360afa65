"""engine.kernels.triton_attention: the window-invariant causal attention against
reference.window_attention, and the invariance itself: the same positions computed in windows of
different sizes and starts give the same bits. Interp tests run through Triton's interpreter on
the CPU; the GPU tests run the compiled kernel (and compare flash attention, which is not
invariant, within a tolerance)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.kernels import reference as ref

pytestmark = pytest.mark.timeout(120)  # a bound, not a timing: seconds when the machine is idle


def _qkv(s: int, hq: int, hkv: int, d: int, dtype: torch.dtype, device: str = "cpu",
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of s positions (the queries of every position, so windows are
    slices of one sequence)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(s, hq, d, generator=gen).to(device, dtype)
    k = torch.randn(s, hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(s, hkv, d, generator=gen).to(device, dtype)
    return q, k, v


def _window(fn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: int,
            b: int) -> torch.Tensor:
    """Positions [a, b) as one window: their queries over the keys [0, b)."""
    return fn(q[a:b], k[:b], v[:b])  # type: ignore[no-any-return]


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal as bit patterns (torch.equal would let -0.0 equal 0.0)."""
    ints = {2: torch.int16, 4: torch.int32}[x.element_size()]
    return x.shape == y.shape and torch.equal(x.view(ints), y.view(ints))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t,s,hq,hkv,d", [(1, 1, 2, 1, 16), (40, 100, 4, 2, 32),
                                          (70, 70, 4, 4, 64)],
                         ids=["T1-S1", "T40-S100-GQA2", "T70-S70-MHA"])
def test_interp_attention_matches_reference(interp: Any, poison: Any, t: int, s: int, hq: int,
                                            hkv: int, d: int, dtype: torch.dtype) -> None:
    """Against the fp32 oracle (fp32: to fp32 rounding; bf16: the probabilities rounded to
    bf16 for the value product, as flash attention does), every output element written, with
    windows that are not multiples of the tile and keys before the window."""
    poison(interp.attn)
    q, k, v = _qkv(s, hq, hkv, d, dtype, seed=t)
    got = _window(interp.attn.window_attention, q, k, v, s - t, s)
    want = _window(ref.window_attention, q, k, v, s - t, s)
    assert got.shape == (t, hq, d) and got.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_interp_attention_rows_do_not_depend_on_the_window(interp: Any,
                                                           dtype: torch.dtype) -> None:
    """Positions 192..255 computed in a 64-row window, in 128-row windows ending at 256 and
    starting at 192, inside the whole 320-row sequence and one row at a time (at 200): the same
    bits."""
    q, k, v = _qkv(320, 4, 2, 32, dtype, seed=5)
    fn = interp.attn.window_attention
    base = _window(fn, q, k, v, 192, 256)
    assert _same_bits(_window(fn, q, k, v, 128, 256)[64:], base)
    assert _same_bits(_window(fn, q, k, v, 192, 320)[:64], base)
    assert _same_bits(_window(fn, q, k, v, 0, 320)[192:256], base)
    assert _same_bits(_window(fn, q, k, v, 200, 201), base[8:9])


@pytest.mark.parametrize("split", [64, 96])
def test_interp_attention_splits_merge_the_same_way_in_every_window(
        interp: Any, poison: Any, monkeypatch: pytest.MonkeyPatch, split: int) -> None:
    """With the keys cut every 64 or 96 positions (several splits per row) and rows grouped
    into launches of 32: still the oracle's numbers, and positions 192..255 get the same bits
    in windows of 64, 128 and 320 rows and alone."""
    poison(interp.attn)
    monkeypatch.setattr(interp.attn, "SPLIT_KEYS", split)
    monkeypatch.setattr(interp.attn, "_MAX_PARTIAL_BYTES", 32 * (320 // split + 1) * 4 * 34 * 4)
    q, k, v = _qkv(320, 4, 2, 32, torch.float32, seed=7)
    fn = interp.attn.window_attention
    base = _window(fn, q, k, v, 192, 256)
    torch.testing.assert_close(base, _window(ref.window_attention, q, k, v, 192, 256),
                               atol=2e-5, rtol=2e-5)
    assert _same_bits(_window(fn, q, k, v, 128, 256)[64:], base)
    assert _same_bits(_window(fn, q, k, v, 0, 320)[192:256], base)
    assert _same_bits(_window(fn, q, k, v, 230, 231), base[38:39])


def test_interp_attention_checks_its_arguments(interp: Any) -> None:
    q, k, v = _qkv(8, 4, 2, 32, torch.float32)
    fn = interp.attn.window_attention
    with pytest.raises(ValueError, match="do not match"):
        fn(q[:8], k[:4], v[:4])  # fewer keys than queries
    with pytest.raises(ValueError, match="do not match"):
        fn(q[:, :3], k, v)  # 3 query heads over 2 key heads
    with pytest.raises(ValueError, match="power of two"):
        fn(q[..., :24], k[..., :24], v[..., :24])
    with pytest.raises(ValueError, match="dtype"):
        fn(q, k.bfloat16(), v)
    assert fn(q[:0], k, v).shape == (0, 4, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("d,hq,hkv", [(256, 16, 2), (128, 16, 2)], ids=["D256-GQA8", "D128"])
def test_attention_compiled_rows_do_not_depend_on_the_window(d: int, hq: int, hkv: int) -> None:
    """Compiled, bf16, the a3b-proxy's head shape: positions 4096..4159 in windows of 64, 128
    and 2048 rows starting on the 64-row grid, and one row: the same bits; within flash
    attention's bf16 tolerance of SDPA."""
    from engine.kernels import triton_attention as ta

    q, k, v = _qkv(6144, hq, hkv, d, torch.bfloat16, device="cuda", seed=1)
    fn = ta.window_attention
    base = _window(fn, q, k, v, 4096, 4160)
    assert _same_bits(_window(fn, q, k, v, 4032, 4160)[64:], base)
    assert _same_bits(_window(fn, q, k, v, 4096, 4224)[:64], base)
    assert _same_bits(_window(fn, q, k, v, 2048, 4096 + 2048)[2048:2112], base)
    assert _same_bits(_window(fn, q, k, v, 4100, 4101), base[4:5])
    want = _window(ref.window_attention, q, k, v, 4096, 4160)
    torch.testing.assert_close(base.float(), want.float(), atol=2e-2, rtol=2e-2)
