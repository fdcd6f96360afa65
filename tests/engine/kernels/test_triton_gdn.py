"""engine.kernels.triton_gdn against reference.py, and its exactness rules: bitwise resume from
a grid state, bitwise independence from padding rows and from the rows after a window, every
buffer written (poisoned buffers), grouped heads read in place.

GPU tests run the compiled kernels; the interp tests run the same kernels through Triton's
interpreter on the CPU (the `interp` fixture), at small shapes, each bounded by a timeout.

Tolerance (relative L2 error against the fp32 reference on the same inputs): the kernels round
X, W, U, Aqk, the entry states and Vn to bf16 for the products, as fla does (sums and the
carried state stay fp32): ~3e-3 measured on an H200, 1e-2 the worst seen in the interpreter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from engine.kernels import reference as ref

C = 64
TOL = 2.5e-2
pytestmark = pytest.mark.timeout(120)  # a bound, not a timing: seconds when the machine is idle


# ---------------------------------------------------------------------------------------------
# CPU, through Triton's interpreter
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lo,hi", [(0, 192), (64, 150), (128, 129)],
                         ids=["full", "lo64-partial", "one-row"])
def test_interp_chunk_matches_reference(interp: Any, gdn_inputs: Callable[..., Any],
                                        rel_err: Any, expand: Any, lo: int, hi: int,
                                        dtype: torch.dtype) -> None:
    t, hv, hq, kd, vd = 192, 4, 2, 32, 32
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, dtype, seed=lo + hi)
    launch = interp.gdn.GdnLaunch(bv=16)
    out, s, st = interp.gdn.gdn_chunk_fwd(q, k, v, g, beta, s0, lo, hi, True, launch)
    ro, rs, rst = ref.chunk_gated_delta_rule(expand(q, hv), expand(k, hv), v, g, beta, s0, lo,
                                             hi, True)
    assert out.dtype == dtype and out.shape == (t, hv, vd)
    assert (out[:lo] == 0).all() and (out[hi:] == 0).all()
    assert sorted(st) == sorted(rst)
    assert rel_err(out[lo:hi], ro[lo:hi]) < TOL
    assert rel_err(s, rs) < TOL
    assert all(rel_err(st[r], rst[r]) < TOL for r in rst)


def test_interp_chunk_resume_and_padding(interp: Any, gdn_inputs: Callable[..., Any]) -> None:
    """Restarting at a grid row from its captured state gives the run-through bits; rows
    outside [lo, hi) (NaN, inf) change no bit of the valid rows."""
    t, hv, hq, kd, vd = 256, 2, 2, 32, 32
    launch = interp.gdn.GdnLaunch(bv=32)
    fwd = interp.gdn.gdn_chunk_fwd
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.float32, seed=2)
    out, s, st = fwd(q, k, v, g, beta, s0, 0, t, True, launch)
    assert torch.equal(st[t], s)
    o2, s2, st2 = fwd(q, k, v, g, beta, st[128].clone(), 128, t, True, launch)
    assert torch.equal(o2[128:], out[128:]) and torch.equal(s2, s)
    assert all(torch.equal(st2[r], st[r]) for r in st2)
    xs = [x.clone() for x in (q, k, v, g, beta)]
    for x in xs:
        x[:64] = float("nan")
        x[200:] = float("inf")
    o3, s3, st3 = fwd(*xs, st[64].clone(), 64, 200, True, launch)
    o4, s4, st4 = fwd(q, k, v, g, beta, st[64].clone(), 64, 200, True, launch)
    assert torch.equal(o3, o4) and torch.equal(s3, s4)
    assert torch.isfinite(o3).all()
    assert sorted(st3) == [128, 192] and torch.equal(st3[192], st[192])
    # the same rows inside a longer valid range (the run-through): rows do not depend on the
    # valid rows after them
    assert torch.equal(o4[64:200], out[64:200])
    assert all(torch.equal(st4[r], st[r]) for r in st4)


def test_interp_chunk_rows_do_not_depend_on_the_window(interp: Any,
                                                      gdn_inputs: Callable[..., Any]) -> None:
    """Positions 128..191 computed in a 64-row window (its own call, from the state at 128),
    inside a 192-row window and inside a 256-row one: the same bits, outputs and states (the
    engine's windows are separate calls whose row 0 is the window's start)."""
    t, hv, hq, kd, vd = 256, 2, 1, 32, 32
    fwd, launch = interp.gdn.gdn_chunk_fwd, interp.gdn.GdnLaunch(bv=32)
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.bfloat16, seed=14)
    full, _, st = fwd(q, k, v, g, beta, s0, 0, t, True, launch)
    mid, s_mid, _ = fwd(q[:192], k[:192], v[:192], g[:192], beta[:192], s0, 0, 192, True,
                        launch)
    w = slice(128, 192)
    own, s_own, _ = fwd(q[w], k[w], v[w], g[w], beta[w], st[128].clone(), 0, 64, True, launch)
    assert torch.equal(own, full[w]) and torch.equal(mid[w], full[w])
    assert torch.equal(s_own, st[192]) and torch.equal(s_mid, st[192])


def test_interp_chunk_poisoned_buffers(interp: Any, poison: Any,
                                       gdn_inputs: Callable[..., Any]) -> None:
    poison(interp.gdn)
    q, k, v, g, beta, s0 = gdn_inputs(256, 2, 1, 32, 32, torch.float32, seed=4)
    out, s, st = interp.gdn.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 170, True,
                                          interp.gdn.GdnLaunch(bv=16))
    assert torch.isfinite(out).all() and torch.isfinite(s).all()
    assert len(st) == 1 and all(torch.isfinite(st[r]).all() for r in st)


def test_interp_chunk_sparse_capture(interp: Any, gdn_inputs: Callable[..., Any],
                                     expand: Any) -> None:
    """Requested rows only: those states are stored and equal the dense run's bitwise; rows off
    the grid or out of range are dropped, as in the reference."""
    t, hv, hq, kd, vd = 320, 2, 1, 32, 32
    fwd, launch = interp.gdn.gdn_chunk_fwd, interp.gdn.GdnLaunch(bv=16)
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.float32, seed=9)
    o1, s1, dense = fwd(q, k, v, g, beta, s0, 64, 300, True, launch)
    o2, s2, sparse = fwd(q, k, v, g, beta, s0, 64, 300, {64, 100, 128, 256, 320, 384}, launch)
    assert sorted(sparse) == [128, 256]
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    assert all(torch.equal(sparse[r], dense[r]) for r in sparse)
    o3, s3, none = fwd(q, k, v, g, beta, s0, 64, 300, {7}, launch)
    assert none == {} and torch.equal(o3, o1) and torch.equal(s3, s1)
    _, _, rst = ref.chunk_gated_delta_rule(expand(q, hv), expand(k, hv), v, g, beta, s0, 64,
                                           300, {128, 256, 300})
    assert sorted(rst) == [128, 256]


def test_interp_chunk_grouped_heads_read_in_place(interp: Any,
                                                  gdn_inputs: Callable[..., Any],
                                                  expand: Any) -> None:
    """Grouped q/k (value head h reads q/k head h // 2), as strided views of a wider buffer,
    give the bits of the expanded, contiguous q/k."""
    t, hv, hq, kd, vd = 128, 4, 2, 32, 32
    fwd, launch = interp.gdn.gdn_chunk_fwd, interp.gdn.GdnLaunch(bv=32)
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.float32, seed=5)
    wide = torch.cat([q, k], dim=-1)  # q and k as views with a row stride of 2K
    o1, s1, st1 = fwd(wide[..., :kd], wide[..., kd:], v, g, beta, s0, 0, 100, True, launch)
    o2, s2, st2 = fwd(expand(q, hv), expand(k, hv), v, g, beta, s0, 0, 100, True, launch)
    assert torch.equal(o1, o2) and torch.equal(s1, s2) and torch.equal(st1.buffer, st2.buffer)


def test_interp_chunk_checks_its_arguments(interp: Any, gdn_inputs: Callable[..., Any]) -> None:
    q, k, v, g, beta, s0 = gdn_inputs(128, 2, 2, 32, 32, torch.float32)
    fwd, gl = interp.gdn.gdn_chunk_fwd, interp.gdn
    with pytest.raises(ValueError, match="bad window"):
        fwd(q, k, v, g, beta, s0, 32, 100, True, gl.GdnLaunch(bv=32))
    with pytest.raises(ValueError, match="bv"):
        fwd(q, k, v, g, beta, s0, 0, 100, True, gl.GdnLaunch(bv=24))
    assert gl.launch_for(128, 128) == gl.GdnLaunch()
    assert gl.launch_for(128, 16).bv == 16
    assert gl.GdnLaunch().describe() == "bv=32,warps=4,stages=3"


def test_interp_small_heads_take_the_reference(interp: Any,
                                               gdn_inputs: Callable[..., Any],
                                               expand: Any) -> None:
    q, k, v, g, beta, s0 = gdn_inputs(128, 4, 2, 32, 32, torch.float32, seed=19)
    out, s, st = interp.gdn.chunk_gated_delta_rule(q, k, v, g, beta, s0, 0, 100, True)
    ro, rs, rst = ref.chunk_gated_delta_rule(expand(q, 4), expand(k, 4), v, g, beta, s0, 0,
                                             100, True)
    assert torch.equal(out, ro) and torch.equal(s, rs) and sorted(st) == sorted(rst)


def test_interp_recurrent_step(interp: Any, poison: Any, gdn_inputs: Callable[..., Any],
                               rel_err: Any, expand: Any) -> None:
    poison(interp.gdn)
    q, k, v, g, beta, s0 = gdn_inputs(3, 4, 2, 32, 32, torch.float32, seed=6)
    s, rs = s0, s0
    for i in range(3):
        o, s = interp.gdn.recurrent_step(q[i], k[i], v[i], g[i], beta[i], s)
        ro, rs = ref.recurrent_step(expand(q, 4)[i], expand(k, 4)[i], v[i], g[i], beta[i], rs)
        assert rel_err(o, ro) < 1e-5
    assert rel_err(s, rs) < 1e-5


def test_interp_causal_conv1d(interp: Any, poison: Any) -> None:
    """The conv equals the reference, and rows do not depend on the call's extent (split the
    call, carry the state: the same bits)."""
    poison(interp.gdn)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 300, generator=gen)
    w = torch.randn(300, 4, generator=gen) * 0.3
    st = torch.randn(3, 300, generator=gen)
    conv = interp.gdn.causal_conv1d
    full = conv(x, w, st)
    torch.testing.assert_close(full, ref.causal_conv1d(x, w, st))
    split = torch.cat([conv(x[:10], w, st), conv(x[10:], w, ref.conv_state_after(x, st, 10))])
    assert torch.equal(full, split)
    assert conv(x[:0], w, st).shape == (0, 300)


def _proj_layout(t: int, hk: int, kd: int, r: int, vd: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, tuple[int, int, int]]:
    qkvz = torch.randn(t, hk, 2 * kd + 2 * r * vd, generator=gen)
    return qkvz, (hk, kd, r * vd)


def test_interp_conv_window_gates_and_strided_gate(interp: Any, poison: Any) -> None:
    """The window conv read straight from the projection, the fused gates and the gated norm
    with z as a strided view equal the reference (conv and norm bitwise in fp32)."""
    poison(interp.gdn)
    itg = interp.gdn
    gen = torch.Generator().manual_seed(11)
    t, hk, kd, r, vd, wk = 48, 2, 16, 2, 16, 4
    qkvz, layout = _proj_layout(t, hk, kd, r, vd, gen)
    d = hk * (2 * kd + r * vd)
    w = torch.randn(d, wk, generator=gen)
    st = torch.randn(wk - 1, d, generator=gen)
    mixed = ref.mixed_rows(qkvz, layout, 0, t)
    for lo in (0, 16, 40):
        got = itg.conv_window(qkvz, layout, w, st, lo)
        torch.testing.assert_close(got[lo:], ref.conv_window(qkvz, layout, w, st, lo)[lo:])
        # the [q | k | v] copy with the state placed before lo: bitwise the same (same kernel
        # arithmetic; and the reference likewise)
        ext = torch.cat([torch.zeros(wk - 1, d), mixed])
        ext[lo:lo + wk - 1] = st
        assert torch.equal(got[lo:], itg.causal_conv1d(ext[wk - 1:], w, ext[:wk - 1])[lo:])
        assert torch.equal(ref.conv_window(qkvz, layout, w, st, lo)[lo:],
                           ref.causal_conv1d(ext[wk - 1:], w, ext[:wk - 1])[lo:])
    ba = torch.randn(t, hk, 2 * r, generator=gen)
    a_log, dt = torch.randn(hk * r, generator=gen), torch.randn(hk * r, generator=gen)
    ba[0, 0, r] = 40.0  # the softplus threshold branch
    g1, b1 = itg.gdn_gates(ba, a_log, dt)
    g2, b2 = ref.gdn_gates(ba, a_log, dt)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b1, b2, rtol=1e-6, atol=1e-7)
    o = torch.randn(t, hk * r, vd, generator=gen)
    z = qkvz[..., 2 * kd + r * vd:].unflatten(-1, (r, vd))
    wn = 1 + 0.1 * torch.randn(vd, generator=gen)
    got = itg.gated_rms_norm(o.view(t, hk, r, vd), z, wn, 1e-6)
    assert got.shape == (t, hk, r, vd)
    zc = z.reshape(t, hk * r, vd)  # a contiguous copy
    assert torch.equal(got.reshape(t, hk * r, vd), itg.gated_rms_norm(o, zc, wn, 1e-6))
    torch.testing.assert_close(got.reshape(t, hk * r, vd), ref.gated_rms_norm(o, zc, wn, 1e-6))


def test_interp_gated_rms_norm_rounds_x_first(interp: Any) -> None:
    """fp32 x (the chunk kernel's output) is rounded to the gate's dtype in the kernel, as the
    reference rounds it."""
    gen = torch.Generator().manual_seed(5)
    xb = torch.randn(6, 4, 32, generator=gen)
    zb = torch.randn(6, 4, 32, generator=gen).bfloat16()
    wb = (1 + 0.1 * torch.randn(32, generator=gen)).bfloat16()
    got = interp.gdn.gated_rms_norm(xb, zb, wb, 1e-6)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.gated_rms_norm(xb, zb, wb, 1e-6).float(),
                               atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

# (T, HV, H of q/k, K, V); head dims >= 64 only: smaller ones take the reference (_SAFE_DOT)
GPU_SHAPES = [
    pytest.param(64, 2, 2, 64, 64, id="T64-H2-K64"),
    pytest.param(512, 4, 4, 64, 64, id="T512-H4-K64"),
    pytest.param(512, 8, 4, 128, 128, id="T512-H8-HQ4-K128"),
    pytest.param(1024, 32, 16, 128, 128, id="T1024-H32-HQ16-K128"),
]
WINDOWS = [pytest.param(0, 1.0, id="full"), pytest.param(2, 0.71, id="lo2-partial"),
           pytest.param(0, 0.33, id="partial")]


def _window(t: int, lo_chunks: int, frac: float) -> tuple[int, int]:
    lo = min(lo_chunks * C, t - C)
    hi = max(lo + 1, int(t * frac))
    return lo, min(hi, t)


@pytest.mark.gpu
@pytest.mark.parametrize("lo_chunks,frac", WINDOWS)
@pytest.mark.parametrize("t,hv,hq,kd,vd", GPU_SHAPES)
def test_chunk_matches_reference(poison: Any, gdn_inputs: Callable[..., Any], rel_err: Any,
                                 expand: Any, t: int, hv: int, hq: int, kd: int, vd: int,
                                 lo_chunks: int, frac: float) -> None:
    import engine.kernels.triton_gdn as tg

    poison(tg)
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.bfloat16, "cuda", seed=t + hv)
    lo, hi = _window(t, lo_chunks, frac)
    out, s, st = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, lo, hi, True, tg.launch_for(kd, vd))
    ro, rs, rst = ref.chunk_gated_delta_rule(expand(q, hv), expand(k, hv), v, g, beta, s0, lo,
                                             hi, True)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(s).all()
    assert (out[:lo] == 0).all() and (out[hi:] == 0).all()
    assert sorted(st) == sorted(rst)
    assert rel_err(out[lo:hi], ro[lo:hi]) < TOL
    assert rel_err(s, rs) < TOL
    for r in rst:
        assert torch.isfinite(st[r]).all()
        assert rel_err(st[r], rst[r]) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("t,hv,hq,kd,vd", GPU_SHAPES[1:])
def test_chunk_resume_is_bitwise(gdn_inputs: Callable[..., Any], t: int, hv: int, hq: int,
                                 kd: int, vd: int) -> None:
    """Restarting at any grid row from its captured state gives the run-through numbers."""
    import engine.kernels.triton_gdn as tg

    launch = tg.launch_for(kd, vd)
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.bfloat16, "cuda", seed=7)
    out, s, st = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 0, t, True, launch)
    for r in (C, t // 2, t - C):
        o2, s2, st2 = tg.gdn_chunk_fwd(q, k, v, g, beta, st[r].clone(), r, t, True, launch)
        assert torch.equal(o2[r:], out[r:])
        assert torch.equal(s2, s)
        for row in st2:
            assert torch.equal(st2[row], st[row])
    assert torch.equal(st[t], s)


@pytest.mark.gpu
@pytest.mark.parametrize("t,hv,hq,kd,vd", GPU_SHAPES[1:])
def test_chunk_padding_is_ignored(gdn_inputs: Callable[..., Any], t: int, hv: int, hq: int,
                                  kd: int, vd: int) -> None:
    """Valid rows are bitwise independent of what padding rows hold (NaN, inf, data), and of
    the valid rows after them (a window that later grows)."""
    import engine.kernels.triton_gdn as tg

    launch = tg.launch_for(kd, vd)
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.bfloat16, "cuda", seed=11)
    lo, hi = C, t - C // 2 - 3
    out, s, st = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, lo, hi, True, launch)
    for fill in (float("nan"), float("inf"), 1e4):
        xs = [x.clone() for x in (q, k, v, g, beta)]
        for x in xs:
            x[:lo] = fill
            x[hi:] = fill
        o2, s2, st2 = tg.gdn_chunk_fwd(*xs, s0, lo, hi, True, launch)
        assert torch.equal(o2, out) and torch.equal(s2, s)
        assert all(torch.equal(st2[r], st[r]) for r in st)
    o3, _, st3 = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, lo, t, True, launch)
    assert torch.equal(o3[:hi], out[:hi])
    assert all(torch.equal(st3[r], st[r]) for r in st)


@pytest.mark.gpu
def test_chunk_is_deterministic(gdn_inputs: Callable[..., Any]) -> None:
    """Repeated calls on the same inputs give the same bits (a miscompiled shared-memory reuse
    would show up here as run-to-run differences)."""
    import engine.kernels.triton_gdn as tg

    launch = tg.launch_for(128, 128)
    q, k, v, g, beta, s0 = gdn_inputs(1024, 32, 16, 128, 128, torch.bfloat16, "cuda", seed=13)
    out, s, st = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 989, True, launch)
    for _ in range(10):
        o2, s2, st2 = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 989, True, launch)
        assert torch.equal(o2, out) and torch.equal(s2, s)
        assert torch.equal(st2.buffer, st.buffer)


@pytest.mark.gpu
def test_chunk_sparse_capture_is_bitwise(gdn_inputs: Callable[..., Any]) -> None:
    """Storing only the requested grid states (the engine's snapshot rows) changes no bit."""
    import engine.kernels.triton_gdn as tg

    launch = tg.launch_for(128, 128)
    q, k, v, g, beta, s0 = gdn_inputs(2048, 32, 16, 128, 128, torch.bfloat16, "cuda", seed=23)
    o1, s1, dense = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 128, 2000, True, launch)
    o2, s2, sparse = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 128, 2000, {512, 1024, 1984},
                                      launch)
    assert sorted(sparse) == [512, 1024, 1984]
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    assert all(torch.equal(sparse[r], dense[r]) for r in sparse)


@pytest.mark.gpu
def test_small_heads_take_the_reference(gdn_inputs: Callable[..., Any], expand: Any) -> None:
    import engine.kernels.triton_gdn as tg

    q, k, v, g, beta, s0 = gdn_inputs(128, 4, 2, 32, 32, torch.bfloat16, "cuda", seed=19)
    out, s, st = tg.chunk_gated_delta_rule(q, k, v, g, beta, s0, 0, 100, True)
    ro, rs, rst = ref.chunk_gated_delta_rule(expand(q, 4), expand(k, 4), v, g, beta, s0, 0,
                                             100, True)
    assert torch.equal(out, ro) and torch.equal(s, rs) and sorted(st) == sorted(rst)


@pytest.mark.gpu
def test_chunk_long_window_in_one_call(gdn_inputs: Callable[..., Any], rel_err: Any,
                                       expand: Any) -> None:
    """T = 16k in one call (the kernel takes any multiple of 64), close to the reference."""
    import engine.kernels.triton_gdn as tg

    t, hv, hq, kd, vd = 16384, 4, 2, 128, 128
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.bfloat16, "cuda", seed=3)
    out, s, st = tg.chunk_gated_delta_rule(q, k, v, g, beta, s0, 0, t, True)
    ro, rs, _ = ref.chunk_gated_delta_rule(expand(q, hv), expand(k, hv), v, g, beta, s0, 0, t,
                                           False)
    assert len(st) == t // C
    assert rel_err(out, ro) < TOL
    assert rel_err(s, rs) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("hv,hq,kd,vd", [(4, 4, 32, 32), (32, 16, 128, 128)],
                         ids=["H4-K32", "H32-HQ16-K128"])
def test_recurrent_step_matches_reference(poison: Any, gdn_inputs: Callable[..., Any],
                                          rel_err: Any, expand: Any, hv: int, hq: int, kd: int,
                                          vd: int) -> None:
    import engine.kernels.triton_gdn as tg

    poison(tg)
    q, k, v, g, beta, s0 = gdn_inputs(8, hv, hq, kd, vd, torch.bfloat16, "cuda", seed=5)
    s, rs = s0, s0
    for i in range(8):
        o, s = tg.recurrent_step(q[i], k[i], v[i], g[i], beta[i], s)
        ro, rs = ref.recurrent_step(expand(q, hv)[i], expand(k, hv)[i], v[i], g[i], beta[i], rs)
        assert rel_err(o, ro) < 1e-5
    assert rel_err(s, rs) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("t,d", [(1, 96), (512, 8192), (77, 300)],
                         ids=["T1-D96", "T512-D8192", "T77-D300"])
def test_causal_conv1d(poison: Any, t: int, d: int) -> None:
    import engine.kernels.triton_gdn as tg

    poison(tg)
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(t + 40, d, generator=gen).to("cuda", torch.bfloat16)
    w = (torch.randn(d, 4, generator=gen) * 0.3).to("cuda", torch.bfloat16)
    st = torch.randn(3, d, generator=gen).to("cuda", torch.bfloat16)
    y = tg.causal_conv1d(x[:t], w, st)
    torch.testing.assert_close(y, ref.causal_conv1d(x[:t], w, st), atol=2e-2, rtol=1e-2)
    full = tg.causal_conv1d(x, w, st)
    a = tg.causal_conv1d(x[:t], w, st)
    b = tg.causal_conv1d(x[t:], w, ref.conv_state_after(x, st, t))
    assert torch.equal(torch.cat([a, b]), full)


@pytest.mark.gpu
@pytest.mark.parametrize("t,h,d", [(512, 32, 128), (3, 4, 32)],
                         ids=["T512-H32-D128", "T3-H4-D32"])
def test_gated_rms_norm(poison: Any, t: int, h: int, d: int) -> None:
    import engine.kernels.triton_gdn as tg

    poison(tg)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(t, h, d, generator=gen).to("cuda", torch.bfloat16)
    z = torch.randn(t, h, d, generator=gen).to("cuda", torch.bfloat16)
    w = (1 + 0.1 * torch.randn(d, generator=gen)).to("cuda", torch.bfloat16)
    torch.testing.assert_close(tg.gated_rms_norm(x, z, w, 1e-6),
                               ref.gated_rms_norm(x, z, w, 1e-6), atol=1.6e-2, rtol=1.6e-2)
    o = torch.randn(t, h, d, generator=gen).cuda()  # fp32 x, as the chunk kernel may give
    torch.testing.assert_close(tg.gated_rms_norm(o, z, w, 1e-6),
                               ref.gated_rms_norm(o, z, w, 1e-6), atol=1.6e-2, rtol=1.6e-2)


@pytest.mark.gpu
def test_conv_window_gates_on_gpu() -> None:
    """At a3b-proxy's GDN shapes (bf16): the window conv bitwise equal to the copying path
    through the Triton conv, gates within fp32 rounding of torch's."""
    import engine.kernels.triton_gdn as tg

    gen = torch.Generator().manual_seed(12)
    t, hk, kd, r, vd = 4096, 16, 128, 2, 128
    qkvz, layout = _proj_layout(t, hk, kd, r, vd, gen)
    qkvz = qkvz.bfloat16().cuda()
    d = hk * (2 * kd + r * vd)
    w = torch.randn(d, 4, generator=gen).bfloat16().cuda()
    st = torch.randn(3, d, generator=gen).bfloat16().cuda()
    for lo in (0, 1024):
        got = tg.conv_window(qkvz, layout, w, st, lo)
        mixed = ref.mixed_rows(qkvz, layout, 0, t)
        ext = torch.cat([torch.zeros(3, d, dtype=mixed.dtype, device="cuda"), mixed])
        ext[lo:lo + 3] = st
        assert torch.equal(got[lo:], tg.causal_conv1d(ext[3:], w, ext[:3])[lo:])
    ba = torch.randn(t, hk, 2 * r, generator=gen).bfloat16().cuda()
    a_log = torch.randn(hk * r, generator=gen).cuda()
    dt = torch.randn(hk * r, generator=gen).cuda()
    g1, b1 = tg.gdn_gates(ba, a_log, dt)
    g2, b2 = ref.gdn_gates(ba, a_log, dt)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b1.float(), b2.float(), rtol=8e-3, atol=1e-3)
