"""Triton GDN kernels against reference.py, and their exactness rules (bitwise resume from a
grid state, bitwise independence from padding rows).

GPU tests run the compiled kernels on CUDA. CPU tests run the same kernels through Triton's
interpreter (TRITON_INTERPRET=1, fp32 numpy arithmetic) when triton is installed; they check
indexing, masking and the algebra, not tensor-core rounding.

Tolerances (relative L2 error against the fp32 reference on the same bf16 inputs): the default
(tf32) configuration keeps fp32 operands, rounded to tf32 by the tensor cores: ~1e-3 measured
on an H200. The fast bf16 configuration rounds X, Aqk, the state and Vn to bf16 for the dots
(accumulation and the carried state stay fp32), as fla does: ~3e-3 measured, 1e-2 worst seen in
the interpreter. In the interpreter the tf32 dots are exact fp32, so the default matches the
reference to ~1e-6.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from engine.kernels import reference as ref

C = 64
# relative L2 error on the GPU / in the interpreter, keyed by configuration name
TOL = {"fast-bf16": 2.5e-2, "exact-tf32": 4e-3, "split": 2.5e-2, "split-tf32": 4e-3,
       "split2": 2.5e-2}
INTERP_TOL = {"fast-bf16": 2.5e-2, "exact-tf32": 1e-5, "split": 2.5e-2, "split-tf32": 1e-5,
              "split2": 2.5e-2}


def named(tg: ModuleType, spec: str, kd: int = 128, vd: int = 128):  # type: ignore[no-untyped-def]
    """A configuration from 'name[,field=value...]' (values: ints or True/False)."""
    name, *fields = spec.split(",")
    cfg = tg.config_for(kd, vd, name=name)
    for f in fields:
        key, val = f.split("=")
        cfg = cfg._replace(**{key: val == "True" if val in ("True", "False") else int(val)})
    return cfg


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.double() - b.double()).norm()
    return float(d / b.double().norm().clamp_min(1e-30))


def gdn_inputs(t: int, hv: int, hq: int, kd: int, vd: int, dtype: torch.dtype,
               device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random GDN inputs shaped like the engine's (g from the Qwen3-Next gate formula)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen)

    q = rnd(t, hq, kd).to(dtype)
    k = rnd(t, hq, kd).to(dtype)
    v = rnd(t, hv, vd).to(dtype)
    a_log = torch.log(torch.empty(hv).uniform_(1.0, 16.0, generator=gen))
    dt_bias = torch.empty(hv).uniform_(-7.0, -2.0, generator=gen)
    g = -a_log.exp() * torch.nn.functional.softplus(rnd(t, hv) + dt_bias)
    beta = torch.sigmoid(rnd(t, hv)).to(dtype)
    s0 = rnd(hv, kd, vd) * 0.05
    return tuple(x.to(device) for x in (q, k, v, g, beta, s0))


def expand(x: torch.Tensor, hv: int) -> torch.Tensor:
    return x.repeat_interleave(hv // x.shape[1], dim=1)


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every buffer the kernels allocate starts as NaN (or -1 for integers)."""
    import engine.kernels.triton_gdn as tg

    def nan_empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(tg, "_empty", nan_empty)
    yield


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

# (T, HV, H of q/k, K, V)
# Head dims >= 64 only: smaller ones take the reference (triton_gdn._SAFE_DOT).
GPU_SHAPES = [
    pytest.param(64, 2, 2, 64, 64, id="T64-H2-K64"),
    pytest.param(512, 4, 4, 64, 64, id="T512-H4-K64"),
    pytest.param(512, 8, 4, 128, 128, id="T512-H8-HQ4-K128"),
    pytest.param(1024, 32, 16, 128, 128, id="T1024-H32-HQ16-K128"),
]
WINDOWS = [pytest.param(0, 1.0, id="full"), pytest.param(2, 0.71, id="lo2-partial"),
           pytest.param(0, 0.33, id="partial")]
CONFIGS = ["fast-bf16", "exact-tf32", "split", "split-tf32", "split,fuse_prep=False", "split2"]
# Exactness of the fast bf16 configuration: with Triton 3.6 on sm_90 its state pass gives
# run-to-run differences at 32 value heads (docs/KERNELS.md), so it is not the default.
BF16_NOT_EXACT = pytest.mark.xfail(reason="bf16 state pass nondeterministic on sm_90 / Triton "
                                   "3.6 (not the production config)", strict=False)
EXACT_CONFIGS = [pytest.param("fast-bf16", marks=BF16_NOT_EXACT), "exact-tf32", "split",
                 "split-tf32", "split,fuse_prep=False", "split,overlap=True,seg_chunks=4",
                 "split,overlap=True,prio=True,seg_chunks=4", "split,grp_share=True", "split2",
                 "split2,grp_share=True"]


def _cfg(name: str, kd: int = 128, vd: int = 128):  # type: ignore[no-untyped-def]
    import engine.kernels.triton_gdn as tg

    return named(tg, name, kd, vd)


def _window(t: int, lo_chunks: int, frac: float) -> tuple[int, int]:
    lo = min(lo_chunks * C, t - C)
    hi = max(lo + 1, int(t * frac))
    return lo, min(hi, t)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("lo_chunks,frac", WINDOWS)
@pytest.mark.parametrize("t,hv,hq,kd,vd", GPU_SHAPES)
def test_chunk_matches_reference(poison: None, t: int, hv: int, hq: int, kd: int, vd: int,
                                 lo_chunks: int, frac: float, name: str) -> None:
    import engine.kernels.triton_gdn as tg

    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.bfloat16, "cuda", seed=t + hv)
    lo, hi = _window(t, lo_chunks, frac)
    out, s, st = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, lo, hi, True, _cfg(name, kd, vd))
    ro, rs, rst = ref.chunk_gated_delta_rule(expand(q, hv), expand(k, hv), v, g, beta, s0, lo,
                                             hi, True)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(s).all()
    assert (out[:lo] == 0).all() and (out[hi:] == 0).all()
    assert sorted(st) == sorted(rst)
    tol = TOL[name.split(",")[0]]
    assert rel_err(out[lo:hi], ro[lo:hi]) < tol
    assert rel_err(s, rs) < tol
    for r in rst:
        assert torch.isfinite(st[r]).all()
        assert rel_err(st[r], rst[r]) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("name", EXACT_CONFIGS)
@pytest.mark.parametrize("t,hv,hq,kd,vd", GPU_SHAPES[1:])
def test_chunk_resume_is_bitwise(t: int, hv: int, hq: int, kd: int, vd: int,
                                 name: str) -> None:
    """Restarting at any grid row from its captured state gives the run-through numbers."""
    import engine.kernels.triton_gdn as tg

    cfg = _cfg(name, kd, vd)
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.bfloat16, "cuda", seed=7)
    out, s, st = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 0, t, True, cfg)
    for r in (C, t // 2, t - C):
        o2, s2, st2 = tg.gdn_chunk_fwd(q, k, v, g, beta, st[r].clone(), r, t, True, cfg)
        assert torch.equal(o2[r:], out[r:])
        assert torch.equal(s2, s)
        for row in st2:
            assert torch.equal(st2[row], st[row])
    assert torch.equal(st[t], s)


@pytest.mark.gpu
@pytest.mark.parametrize("name", EXACT_CONFIGS)
@pytest.mark.parametrize("t,hv,hq,kd,vd", GPU_SHAPES[1:])
def test_chunk_padding_is_ignored(t: int, hv: int, hq: int, kd: int, vd: int,
                                  name: str) -> None:
    """Valid rows are bitwise independent of what padding rows hold (NaN, inf, data), and of
    the valid rows after them (a window that later grows)."""
    import engine.kernels.triton_gdn as tg

    cfg = _cfg(name, kd, vd)
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.bfloat16, "cuda", seed=11)
    lo, hi = C, t - C // 2 - 3
    out, s, st = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, lo, hi, True, cfg)
    for fill in (float("nan"), float("inf"), 1e4):
        xs = [x.clone() for x in (q, k, v, g, beta)]
        for x in xs:
            x[:lo] = fill
            x[hi:] = fill
        o2, s2, st2 = tg.gdn_chunk_fwd(*xs, s0, lo, hi, True, cfg)
        assert torch.equal(o2, out) and torch.equal(s2, s)
        assert all(torch.equal(st2[r], st[r]) for r in st)
    # the same rows inside a longer valid range
    o3, _, st3 = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, lo, t, True, cfg)
    assert torch.equal(o3[:hi], out[:hi])
    assert all(torch.equal(st3[r], st[r]) for r in st)


@pytest.mark.gpu
@pytest.mark.parametrize("name", EXACT_CONFIGS)
def test_chunk_is_deterministic(name: str) -> None:
    """Repeated calls on the same inputs give the same bits (a miscompiled shared-memory reuse
    once showed up here as run-to-run differences)."""
    import engine.kernels.triton_gdn as tg

    cfg = _cfg(name)
    q, k, v, g, beta, s0 = gdn_inputs(1024, 32, 16, 128, 128, torch.bfloat16, "cuda", seed=13)
    out, s, st = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 989, True, cfg)
    for _ in range(10):
        o2, s2, st2 = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 989, True, cfg)
        assert torch.equal(o2, out) and torch.equal(s2, s)
        assert torch.equal(st2.buffer, st.buffer)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["exact-tf32", "split"])
def test_chunk_segments_are_invisible(name: str) -> None:
    """The prep/state-pass overlap (segments on two streams) does not change a bit."""
    import engine.kernels.triton_gdn as tg

    cfg = tg.config_for(128, 128, name=name)._replace(overlap=False)
    q, k, v, g, beta, s0 = gdn_inputs(4096, 32, 16, 128, 128, torch.bfloat16, "cuda", seed=17)
    ref_run = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 128, 4000, True, cfg)
    for seg in (0, 1, 7, 16):
        o, s, st = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 128, 4000, True,
                                    cfg._replace(overlap=True, seg_chunks=seg))
        assert torch.equal(o, ref_run[0]) and torch.equal(s, ref_run[1])
        assert torch.equal(st.buffer, ref_run[2].buffer)


@pytest.mark.gpu
def test_small_heads_take_the_reference() -> None:
    import engine.kernels.triton_gdn as tg

    q, k, v, g, beta, s0 = gdn_inputs(128, 4, 2, 32, 32, torch.bfloat16, "cuda", seed=19)
    out, s, st = tg.chunk_gated_delta_rule(q, k, v, g, beta, s0, 0, 100, True)
    ro, rs, rst = ref.chunk_gated_delta_rule(expand(q, 4), expand(k, 4), v, g, beta, s0, 0,
                                             100, True)
    assert torch.equal(out, ro) and torch.equal(s, rs) and sorted(st) == sorted(rst)


@pytest.mark.gpu
def test_chunk_long_window_in_one_call() -> None:
    """T = 16k in one call (the kernel takes any multiple of 64), close to the reference."""
    import engine.kernels.triton_gdn as tg

    t, hv, hq, kd, vd = 16384, 4, 2, 128, 128
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.bfloat16, "cuda", seed=3)
    out, s, st = tg.chunk_gated_delta_rule(q, k, v, g, beta, s0, 0, t, True)
    ro, rs, _ = ref.chunk_gated_delta_rule(expand(q, hv), expand(k, hv), v, g, beta, s0, 0, t,
                                           False)
    assert len(st) == t // C
    assert rel_err(out, ro) < TOL[tg.production_name()]
    assert rel_err(s, rs) < TOL[tg.production_name()]


@pytest.mark.gpu
@pytest.mark.parametrize("hv,hq,kd,vd", [(4, 4, 32, 32), (32, 16, 128, 128)],
                         ids=["H4-K32", "H32-HQ16-K128"])
def test_recurrent_step_matches_reference(poison: None, hv: int, hq: int, kd: int,
                                          vd: int) -> None:
    import engine.kernels.triton_gdn as tg

    q, k, v, g, beta, s0 = gdn_inputs(8, hv, hq, kd, vd, torch.bfloat16, "cuda", seed=5)
    s, rs = s0, s0
    for i in range(8):
        o, s = tg.recurrent_step(q[i], k[i], v[i], g[i], beta[i], s)
        ro, rs = ref.recurrent_step(expand(q, hv)[i], expand(k, hv)[i], v[i], g[i], beta[i], rs)
        assert rel_err(o, ro) < 1e-5
    assert rel_err(s, rs) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("t,d", [(1, 96), (512, 8192), (77, 300)], ids=["T1-D96", "T512-D8192",
                                                                          "T77-D300"])
def test_causal_conv1d(poison: None, t: int, d: int) -> None:
    import engine.kernels.triton_gdn as tg

    gen = torch.Generator().manual_seed(t)
    x = torch.randn(t + 40, d, generator=gen).to("cuda", torch.bfloat16)
    w = (torch.randn(d, 4, generator=gen) * 0.3).to("cuda", torch.bfloat16)
    st = torch.randn(3, d, generator=gen).to("cuda", torch.bfloat16)
    y = tg.causal_conv1d(x[:t], w, st)
    torch.testing.assert_close(y, ref.causal_conv1d(x[:t], w, st), atol=2e-2, rtol=1e-2)
    # rows do not depend on the call's extent: split the call, carry the state
    full = tg.causal_conv1d(x, w, st)
    a = tg.causal_conv1d(x[:t], w, st)
    b = tg.causal_conv1d(x[t:], w, ref.conv_state_after(x, st, t))
    assert torch.equal(torch.cat([a, b]), full)


@pytest.mark.gpu
@pytest.mark.parametrize("t,h,d", [(512, 32, 128), (3, 4, 32)], ids=["T512-H32-D128",
                                                                     "T3-H4-D32"])
def test_gated_rms_norm(poison: None, t: int, h: int, d: int) -> None:
    import engine.kernels.triton_gdn as tg

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(t, h, d, generator=gen).to("cuda", torch.bfloat16)
    z = torch.randn(t, h, d, generator=gen).to("cuda", torch.bfloat16)
    w = (1 + 0.1 * torch.randn(d, generator=gen)).to("cuda", torch.bfloat16)
    torch.testing.assert_close(tg.gated_rms_norm(x, z, w, 1e-6),
                               ref.gated_rms_norm(x, z, w, 1e-6), atol=1.6e-2, rtol=1.6e-2)


@pytest.mark.gpu
def test_engine_parity_on_gpu() -> None:
    """Cold vs warm on the GPU with the Triton kernels: bitwise-identical tokens and digests."""
    from engine.cache.settings import CacheSettings
    from engine.kernels import ops
    from engine.runtime import Engine, SamplingParams
    from engine.settings import EngineSettings

    assert ops.impl_name("cuda") == "triton"
    eng = Engine.from_preset("small", device="cuda", dtype="bfloat16",
                             cache=CacheSettings(policy="lru", snapshot_interval=256),
                             settings=EngineSettings(exec_window=256))
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (700,), generator=gen).tolist()
    b = a + torch.randint(0, 256, (300,), generator=gen).tolist()
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    cold = eng.generate(b, p, use_cache=False)
    eng.generate(a, p, session="s")
    warm = eng.generate(b, p, session="s")
    assert warm.stats.cache.snapshot_pos > 0
    assert warm.tokens == cold.tokens
    assert warm.stats.logits_sha256 == cold.stats.logits_sha256


# ---------------------------------------------------------------------------------------------
# CPU, through Triton's interpreter
# ---------------------------------------------------------------------------------------------


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def test_kernels_through_the_triton_interpreter() -> None:
    """Runs this file's test_interp_* tests in a fresh process with TRITON_INTERPRET=1 (Triton
    reads that variable when it is imported, and this process may have imported it already)."""
    if torch.cuda.is_available():
        pytest.skip("the GPU tests cover the compiled kernels")
    if INTERPRETING:
        pytest.skip("already inside the interpreter run")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p",
                          "no:cacheprovider", "-k", "test_interp_"],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


@pytest.fixture(scope="module")
def itg() -> ModuleType:
    """triton_gdn with its kernels in Triton's interpreter (only inside the run above)."""
    if not INTERPRETING:
        pytest.skip("runs inside test_kernels_through_the_triton_interpreter")
    import triton.runtime.interpreter as ti

    orig = ti._patch_lang_tensor

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        # numpy >= 2.4 refuses int() of the 1-element arrays that the interpreter uses for
        # scalar kernel arguments (loop bounds); read the element instead.
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor = patched
    return importlib.import_module("engine.kernels.triton_gdn")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("lo,hi", [(0, 192), (64, 150), (128, 129)],
                         ids=["full", "lo64-partial", "one-row"])
def test_interp_chunk_matches_reference(itg: ModuleType, lo: int, hi: int, name: str) -> None:
    t, hv, hq, kd, vd = 192, 4, 2, 32, 32
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.float32, "cpu", seed=lo + hi)
    cfg = named(itg, name, kd, vd)._replace(bv=16)
    out, s, st = itg.gdn_chunk_fwd(q, k, v, g, beta, s0, lo, hi, True, cfg)
    ro, rs, rst = ref.chunk_gated_delta_rule(expand(q, hv), expand(k, hv), v, g, beta, s0, lo,
                                             hi, True)
    assert (out[:lo] == 0).all() and (out[hi:] == 0).all()
    assert sorted(st) == sorted(rst)
    tol = INTERP_TOL[name.split(",")[0]]
    assert rel_err(out[lo:hi], ro[lo:hi]) < tol
    assert rel_err(s, rs) < tol
    assert all(rel_err(st[r], rst[r]) < tol for r in rst)


@pytest.mark.parametrize("name", ["fast-bf16", "split", "split,fuse_prep=False,kt_ptr=True",
                                  "split2"])
def test_interp_chunk_resume_and_padding(itg: ModuleType, name: str) -> None:
    t, hv, hq, kd, vd = 256, 2, 2, 32, 32
    cfg = named(itg, name, kd, vd)._replace(bv=32)
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.float32, "cpu", seed=2)
    out, s, st = itg.gdn_chunk_fwd(q, k, v, g, beta, s0, 0, t, True, cfg)
    o2, s2, _ = itg.gdn_chunk_fwd(q, k, v, g, beta, st[128].clone(), 128, t, True, cfg)
    assert torch.equal(o2[128:], out[128:]) and torch.equal(s2, s)
    xs = [x.clone() for x in (q, k, v, g, beta)]
    for x in xs:
        x[:64] = float("nan")
        x[200:] = float("inf")
    o3, s3, st3 = itg.gdn_chunk_fwd(*xs, st[64].clone(), 64, 200, True, cfg)
    o4, s4, st4 = itg.gdn_chunk_fwd(q, k, v, g, beta, st[64].clone(), 64, 200, True, cfg)
    assert torch.equal(o3, o4) and torch.equal(s3, s4)
    assert torch.isfinite(o3).all()
    assert sorted(st3) == [128, 192] and torch.equal(st3[192], st[192])


@pytest.mark.parametrize("name", ["fast-bf16", "split"])
def test_interp_chunk_segments_are_invisible(itg: ModuleType, name: str) -> None:
    t, hv, hq, kd, vd = 320, 2, 1, 32, 32
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.float32, "cpu", seed=8)
    base = itg.NAMED_CONFIGS[name]._replace(bv=32)
    o1, s1, st1 = itg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 300, True, base)
    o2, s2, st2 = itg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 300, True,
                                    base._replace(seg_chunks=2))
    assert torch.equal(o1, o2) and torch.equal(s1, s2) and torch.equal(st1.buffer, st2.buffer)


def test_interp_split2_equals_split(itg: ModuleType) -> None:
    """split2 moves the causal scores into the output kernel and shares q/k tiles between a
    group's value heads: the same operations, so with fp32 inputs (fp32 output either way) the
    same bits as split."""
    q, k, v, g, beta, s0 = gdn_inputs(256, 4, 2, 32, 32, torch.float32, "cpu", seed=6)
    base = itg.NAMED_CONFIGS["split"]._replace(bv=16)
    o1, s1, st1 = itg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 230, True, base)
    for cfg in (itg.NAMED_CONFIGS["split2"]._replace(bv=16),
                base._replace(aqk_out=True), base._replace(out_bf16=True)):
        o2, s2, st2 = itg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 230, True, cfg)
        assert torch.equal(o1, o2) and torch.equal(s1, s2) and torch.equal(st1.buffer, st2.buffer)
    o3, _, _ = itg.gdn_chunk_fwd(q, k, v.bfloat16(), g, beta, s0, 64, 230, True,
                                 itg.NAMED_CONFIGS["split2"]._replace(bv=16))
    assert o3.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["exact-tf32", "split", "split2"])
def test_interp_chunk_poisoned_buffers(itg: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                       name: str) -> None:
    def nan_empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(itg, "_empty", nan_empty)
    q, k, v, g, beta, s0 = gdn_inputs(256, 2, 1, 32, 32, torch.float32, "cpu", seed=4)
    out, s, st = itg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 170, True,
                                   itg.NAMED_CONFIGS[name]._replace(bv=16))
    assert torch.isfinite(out).all() and torch.isfinite(s).all()
    assert all(torch.isfinite(st[r]).all() for r in st)


def test_interp_step_conv_norm(itg: ModuleType) -> None:
    q, k, v, g, beta, s0 = gdn_inputs(3, 4, 2, 32, 32, torch.float32, "cpu", seed=6)
    o, s = itg.recurrent_step(q[0], k[0], v[0], g[0], beta[0], s0)
    ro, rs = ref.recurrent_step(expand(q, 4)[0], expand(k, 4)[0], v[0], g[0], beta[0], s0)
    assert rel_err(o, ro) < 1e-5 and rel_err(s, rs) < 1e-5

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 300, generator=gen)
    w = torch.randn(300, 4, generator=gen) * 0.3
    st = torch.randn(3, 300, generator=gen)
    torch.testing.assert_close(itg.causal_conv1d(x, w, st), ref.causal_conv1d(x, w, st))
    full = itg.causal_conv1d(x, w, st)
    split = torch.cat([itg.causal_conv1d(x[:10], w, st),
                       itg.causal_conv1d(x[10:], w, ref.conv_state_after(x, st, 10))])
    assert torch.equal(full, split)

    xs = torch.randn(5, 4, 32, generator=gen)
    zs = torch.randn(5, 4, 32, generator=gen)
    ws = 1 + 0.1 * torch.randn(32, generator=gen)
    torch.testing.assert_close(itg.gated_rms_norm(xs, zs, ws, 1e-6),
                               ref.gated_rms_norm(xs, zs, ws, 1e-6))


def test_interp_engine_warm_equals_cold(itg: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's window loop on the Triton kernels (CPU, interpreted): warm == cold bitwise,
    and the logits stay close to the reference kernels'."""
    from engine.cache.settings import CacheSettings
    from engine.kernels import ops
    from engine.runtime import Engine, SamplingParams
    from engine.settings import EngineSettings

    args = CacheSettings(policy="lru", snapshot_interval=64)
    run = EngineSettings(exec_window=128)
    p = SamplingParams(max_tokens=2, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (150,), generator=gen).tolist()
    b = a + torch.randint(0, 256, (40,), generator=gen).tolist()
    ref_eng = Engine.from_preset("tiny", cache=args, settings=run)
    ref_cold = ref_eng.generate(b, p, use_cache=False)

    glue = importlib.import_module("engine.kernels.triton_glue")
    monkeypatch.setattr(ops, "_pick",
                        lambda name, x: getattr(itg, name, None) or getattr(glue, name))
    monkeypatch.setattr(itg, "_SAFE_DOT", 16)  # the tiny preset's 32-dim heads: no sm_90 here
    eng = Engine.from_preset("tiny", cache=args, settings=run)
    cold = eng.generate(b, p, use_cache=False)
    eng.generate(a, p, session="s")
    warm = eng.generate(b, p, session="s")
    assert warm.stats.cache.snapshot_pos > 0
    assert warm.tokens == cold.tokens
    assert warm.stats.logits_sha256 == cold.stats.logits_sha256
    assert cold.tokens[0] == ref_cold.tokens[0]


# ---------------------------------------------------------------------------------------------
# bench helpers (sbrbench/bench.py, CPU)
# ---------------------------------------------------------------------------------------------


def test_bench_counts_and_names() -> None:
    from engine.config import preset
    from sbrbench import bench

    # 180 kFLOP per token and value head at K = V = 128, C = 64
    assert bench.gdn_flops(1, 1, 128, 128) == 2 * 64 * (3 * 128 + 2 * 128) + 6 * 128 * 128
    assert bench.gdn_bytes(64, 16, 32, 128, 128, 4, 1) > bench.gdn_bytes(64, 16, 32, 128, 128, 4, 0)
    assert bench.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.gpu_slug("NVIDIA H200") == "h200"
    cfg = preset("tiny")
    whole = bench.model_flops(cfg, 0, 256)
    assert whole == pytest.approx(bench.model_flops(cfg, 0, 128) + bench.model_flops(cfg, 128, 256))


def test_bench_cli_needs_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from engine.errors import UserError
    from sbrbench.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(app, ["bench", "kernels", "--T", "4096"])
    assert isinstance(res.exception, UserError) and "CUDA" in str(res.exception)
    res = CliRunner().invoke(app, ["bench", "prefill", "--lengths", "4096,x"])
    assert isinstance(res.exception, UserError) and "--lengths" in str(res.exception)


def test_interp_chunk_sparse_capture(itg: ModuleType) -> None:
    """Requested rows only: the split pipeline stores those states and they equal the dense
    run's bitwise; rows off the grid or out of range are dropped; v3 filters its dense run."""
    t, hv, hq, kd, vd = 320, 2, 1, 32, 32
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.float32, "cpu", seed=9)
    for name in ("split", "exact-tf32"):
        cfg = named(itg, name, kd, vd)._replace(bv=16)
        o1, s1, dense = itg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 300, True, cfg)
        o2, s2, sparse = itg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 300,
                                           {64, 100, 128, 256, 320, 384}, cfg)
        assert sorted(sparse) == [128, 256]
        assert torch.equal(o1, o2) and torch.equal(s1, s2)
        assert all(torch.equal(sparse[r], dense[r]) for r in sparse)
        o3, s3, none = itg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 300, {7}, cfg)
        assert none == {} and torch.equal(o3, o1) and torch.equal(s3, s1)
    _, _, rst = ref.chunk_gated_delta_rule(expand(q, hv), expand(k, hv), v, g, beta, s0, 64,
                                           300, {128, 256, 300})
    assert sorted(rst) == [128, 256]


@pytest.mark.gpu
def test_chunk_sparse_capture_is_bitwise() -> None:
    """Storing only the requested grid states (the engine's snapshot rows) changes no bit."""
    import engine.kernels.triton_gdn as tg

    cfg = tg.config_for(128, 128)
    q, k, v, g, beta, s0 = gdn_inputs(2048, 32, 16, 128, 128, torch.bfloat16, "cuda", seed=23)
    o1, s1, dense = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 128, 2000, True, cfg)
    o2, s2, sparse = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 128, 2000, {512, 1024, 1984}, cfg)
    assert sorted(sparse) == [512, 1024, 1984]
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    assert all(torch.equal(sparse[r], dense[r]) for r in sparse)


def test_bench_speedups_by_capture() -> None:
    from sbrbench import bench

    def row(impl: str, ms: float, h: int = 16, **kw: object) -> dict[str, object]:
        return {"kernel": "gdn_chunk_fwd", "impl": impl, "T": 8192, "H": h, "ms": ms, **kw}

    rows = [row("sbrbench", 2.0, production=True, capture=True),
            row("sbrbench", 1.6, production=True, capture=f"every {bench.ENGINE_INTERVAL}"),
            row("sbrbench", 1.0, production=False, capture=True),  # a sweep config: not counted
            row("sbrbench", 1.5, production=True, capture=False),
            row("fla", 1.8), row("fla", 1.0, h=32)]
    (sp,) = bench.speedups(rows)
    assert sp["ours_ms"] == 2.0 and sp["fla_over_ours"] == 0.9
    assert sp["fla_over_ours_engine_capture"] == round(1.8 / 1.6, 3)
    assert sp["fla_over_ours_no_capture"] == 1.2


def test_bench_speedups_skip_other_kernels() -> None:
    from sbrbench import bench

    rows = [{"kernel": "recurrent_step", "impl": "sbrbench", "HV": 32, "ms": 0.01},
            {"kernel": "gdn_chunk_fwd", "impl": "sbrbench", "T": 64, "H": 1, "ms": 1.0,
             "production": True, "capture": True},
            {"kernel": "gdn_chunk_fwd", "impl": "fla", "T": 64, "H": 1, "ms": 2.0}]
    assert [r["fla_over_ours"] for r in bench.speedups(rows)] == [2.0]



def test_interp_glue_kernels(itg: ModuleType) -> None:
    """RMSNorm (contiguous rows, strided head rows, 1-row) and SwiGLU against the reference;
    the gated norm takes fp32 x and rounds it to the gate's dtype like the reference."""
    glue = importlib.import_module("engine.kernels.triton_glue")
    gen = torch.Generator().manual_seed(5)
    w = 0.1 * torch.randn(64, generator=gen)
    x = torch.randn(37, 64, generator=gen)
    torch.testing.assert_close(glue.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    qg = torch.randn(9, 3, 128, generator=gen)  # q of a doubled projection: strided head rows
    q = qg[..., :64]
    got = glue.rms_norm(q, w, 1e-6)
    assert got.shape == q.shape and got.is_contiguous()
    torch.testing.assert_close(got, ref.rms_norm(q, w, 1e-6))
    torch.testing.assert_close(glue.rms_norm(x[:1], w, 1e-6), ref.rms_norm(x[:1], w, 1e-6))
    assert torch.equal(glue.rms_norm(x, w, 1e-6)[5:6], glue.rms_norm(x[5:6], w, 1e-6))
    g = torch.randn(5, 300, generator=gen)
    u = torch.randn(5, 300, generator=gen)
    torch.testing.assert_close(glue.swiglu(g, u), ref.swiglu(g, u))
    # bf16, as on the GPU: outputs in bf16, within a bf16 rounding of the reference
    xb16, wb16 = x.bfloat16(), w.bfloat16()
    got = glue.rms_norm(xb16, wb16, 1e-6)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.rms_norm(xb16, wb16, 1e-6).float(),
                               atol=1.6e-2, rtol=1.6e-2)
    got = glue.swiglu(g.bfloat16(), u.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.swiglu(g.bfloat16(), u.bfloat16()).float(),
                               atol=1.6e-2, rtol=1.6e-2)
    xb = torch.randn(6, 4, 32, generator=gen)
    zb = torch.randn(6, 4, 32, generator=gen).bfloat16()
    wb = (1 + 0.1 * torch.randn(32, generator=gen)).bfloat16()
    got = itg.gated_rms_norm(xb, zb, wb, 1e-6)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.gated_rms_norm(xb, zb, wb, 1e-6).float(),
                               atol=2e-2, rtol=2e-2)


def test_grouped_heads_reach_the_reference_expanded() -> None:
    """ops expands grouped q/k for the torch reference (the Triton kernels read them grouped):
    the same numbers as expanding first."""
    from engine.kernels import ops

    q, k, v, g, beta, s0 = gdn_inputs(128, 4, 2, 32, 32, torch.float32, "cpu", seed=1)
    o1, s1, st1 = ops.chunk_gated_delta_rule(q, k, v, g, beta, s0, 0, 100, True)
    o2, s2, st2 = ref.chunk_gated_delta_rule(expand(q, 4), expand(k, 4), v, g, beta, s0, 0, 100)
    assert torch.equal(o1, o2) and torch.equal(s1, s2) and sorted(st1) == sorted(st2)
    a, b = ops.recurrent_step(q[0], k[0], v[0], g[0], beta[0], s0)
    c, d = ref.recurrent_step(expand(q, 4)[0], expand(k, 4)[0], v[0], g[0], beta[0], s0)
    assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.gpu
def test_glue_kernels_on_gpu(poison: None) -> None:
    import engine.kernels.triton_gdn as tg
    import engine.kernels.triton_glue as glue

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 2048, generator=gen).bfloat16().cuda()
    w = (0.1 * torch.randn(2048, generator=gen)).bfloat16().cuda()
    torch.testing.assert_close(glue.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6),
                               atol=1.6e-2, rtol=1.6e-2)
    assert torch.equal(glue.rms_norm(x, w, 1e-6)[100:101], glue.rms_norm(x[100:101], w, 1e-6))
    qg = torch.randn(512, 16, 512, generator=gen).bfloat16().cuda()
    wq = (0.1 * torch.randn(256, generator=gen)).bfloat16().cuda()
    torch.testing.assert_close(glue.rms_norm(qg[..., :256], wq, 1e-6),
                               ref.rms_norm(qg[..., :256], wq, 1e-6), atol=1.6e-2, rtol=1.6e-2)
    g = torch.randn(4096, 5632, generator=gen).bfloat16().cuda()
    u = torch.randn(4096, 5632, generator=gen).bfloat16().cuda()
    torch.testing.assert_close(glue.swiglu(g, u), ref.swiglu(g, u), atol=1.6e-2, rtol=1.6e-2)
    o = torch.randn(512, 32, 128, generator=gen).cuda()
    z = torch.randn(512, 32, 128, generator=gen).bfloat16().cuda()
    wn = torch.ones(128).bfloat16().cuda()
    torch.testing.assert_close(tg.gated_rms_norm(o, z, wn, 1e-6),
                               ref.gated_rms_norm(o, z, wn, 1e-6), atol=1.6e-2, rtol=1.6e-2)


def test_bench_kernel_families() -> None:
    from sbrbench import bench

    ev = [("sm90_xmma_gemm_bf16", 30.0, 100), ("flash_fwd_kernel", 20.0, 12),
          ("_seq2_kernel", 5.0, 36), ("_rmsnorm_kernel", 1.0, 96),
          ("elementwise_kernel<add>", 4.0, 96), ("elementwise_kernel<copy>", 6.0, 200)]
    fam = bench.kernel_families(ev, {"gdn_triton": ["_seq2_kernel"],
                                     "glue_triton": ["_rmsnorm_kernel"]}, top=1)
    assert fam["gemm"] == 30.0 and fam["attention"] == 20.0
    assert fam["gdn_triton"] == 5.0 and fam["glue_triton"] == 1.0
    assert fam["other"] == 10.0 and fam["total"] == 66.0
    assert fam["other_top"] == {"elementwise_kernel<copy>": [6.0, 200]}
    # kernel names cut to the same prefix are added up, not overwritten
    long = "x" * 200
    fam = bench.kernel_families([(long + "a", 2.0, 3), (long + "b", 0.5, 1)], {}, top=4)
    assert fam["other_top"] == {long[:160]: [2.5, 4]}


def test_bench_speedups_graph_column_and_eager_headline() -> None:
    """Graph-replay rows give their own column and never replace the eager headline."""
    from sbrbench import bench

    def row(impl: str, ms: float, launch: str = "eager", **kw: object) -> dict[str, object]:
        return {"kernel": "gdn_chunk_fwd", "impl": impl, "T": 16384, "H": 16, "ms": ms,
                "launch": launch, **kw}

    rows = [row("sbrbench", 1.2, production=True, capture=True),
            row("fla", 1.0),
            row("sbrbench", 1.0, "graph", production=True, capture=True),
            row("fla", 0.9, "graph")]
    (sp,) = bench.speedups(rows)
    assert sp["ours_ms"] == 1.2 and sp["fla_ms"] == 1.0
    assert sp["fla_over_ours_graph"] == 0.9
    if not torch.cuda.is_available():
        assert bench.graph_ms(lambda: None) is None


@pytest.mark.gpu
def test_bench_graph_ms_captures_our_kernel() -> None:
    from functools import partial

    import engine.kernels.triton_gdn as tg
    from sbrbench import bench

    q, k, v, g, beta, s0 = gdn_inputs(1024, 32, 16, 128, 128, torch.bfloat16, "cuda", seed=29)
    ms = bench.graph_ms(partial(tg.gdn_chunk_fwd, q, k, v, g, beta, s0, 0, 1024, True,
                                tg.config_for(128, 128)))
    assert ms is not None and ms > 0


def test_glue_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.kernels import ops

    monkeypatch.setenv("SBR_GLUE_KERNELS", "0")
    assert not ops.glue_enabled()
    monkeypatch.setenv("SBR_GLUE_KERNELS", "1")
    assert ops.glue_enabled()
    x = torch.randn(3, 8)
    assert ops._pick("rms_norm", x) is ref.rms_norm  # CPU: always the reference


def test_attention_choice_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU attends with SDPA whatever SBR_ATTN says, warms nothing, and piece sizes depend
    on the window only (16 windows, at most 16384 keys)."""
    from engine.config import preset
    from engine.model import attention as at

    for val in ("cudnn", "flash"):
        monkeypatch.setenv("SBR_ATTN", val)
        assert at.attention_impl("cpu") == "sdpa"
    assert at.warm_pieces(preset("tiny"), 2048, torch.bfloat16, torch.device("cpu"), 10**6) == 0
    assert [at.piece_keys(e) for e in (64, 512, 1024, 2048, 4096)] == [1024, 8192, 16384,
                                                                       16384, 16384]



@pytest.mark.parametrize("spec", ["split,grp_share=True", "split,grp_share=True,fuse_prep=False"])
def test_interp_grp_share_changes_no_bit(itg: ModuleType, spec: str) -> None:
    """One prep/output program per q/k head computes the same numbers as one per value head."""
    t, hv, hq, kd, vd = 192, 4, 2, 32, 32
    q, k, v, g, beta, s0 = gdn_inputs(t, hv, hq, kd, vd, torch.float32, "cpu", seed=12)
    base = named(itg, "split", kd, vd)._replace(bv=16)
    o1, s1, st1 = itg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 170, True, base)
    o2, s2, st2 = itg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 170, True,
                                    named(itg, spec, kd, vd)._replace(bv=16))
    assert torch.equal(o1, o2) and torch.equal(s1, s2) and torch.equal(st1.buffer, st2.buffer)


@pytest.mark.gpu
def test_grp_share_changes_no_bit_on_gpu() -> None:
    import engine.kernels.triton_gdn as tg

    q, k, v, g, beta, s0 = gdn_inputs(1024, 32, 16, 128, 128, torch.bfloat16, "cuda", seed=31)
    base = tg.config_for(128, 128, name="split")
    o1, s1, st1 = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 989, True, base)
    o2, s2, st2 = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 64, 989, True,
                                   base._replace(grp_share=True))
    assert torch.equal(o1, o2) and torch.equal(s1, s2) and torch.equal(st1.buffer, st2.buffer)


def test_bench_kernels_cli_parses_profile_at(monkeypatch: pytest.MonkeyPatch) -> None:
    """--profile-at reaches run_kernels as a list (and a bad value is a one-line error)."""
    from typer.testing import CliRunner

    from sbrbench import bench
    from sbrbench.cli import app

    seen: dict[str, object] = {}

    def fake_run(ts, out, **kw):  # type: ignore[no-untyped-def]
        seen.update(kw, ts=ts)
        return out, []

    monkeypatch.setattr(bench, "run_kernels", fake_run)
    res = CliRunner().invoke(app, ["bench", "kernels", "--T", "4096", "--profile-at", "4096",
                                   "--graphs"])
    assert res.exit_code == 0, res.output
    assert seen["profile_at"] == [4096] and seen["graphs"] is True and seen["ts"] == [4096]
    res = CliRunner().invoke(app, ["bench", "kernels", "--profile-at", "x"])
    assert res.exit_code != 0 and "--profile-at" in str(res.exception) + res.output


def _attn_piece(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (fp64) attention of q [H, T, D] over k/v [H, S, D] and its log-sum-exp."""
    s = (q.double() @ k.double().transpose(1, 2)) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1) @ v.double()), lse


@pytest.mark.parametrize("n_prefix", [1, 2, 4])
def test_interp_attn_merge(itg: ModuleType, n_prefix: int) -> None:
    """attn_merge of key-range pieces equals attention over all keys (bottom-right causal): 2,
    3 and 5 pieces (5 goes through the fp32 partial result), pieces in a [T, H, D] layout, and
    log-sum-exp as [1, H, T] or [1, H, T, 1]."""
    glue = importlib.import_module("engine.kernels.triton_glue")
    gen = torch.Generator().manual_seed(n_prefix)
    h, t, d, piece = 3, 24, 32, 16
    s = n_prefix * piece + t
    q, k, v = (torch.randn(h, n, d, generator=gen) for n in (t, s, s))
    pieces = []
    for i in range(n_prefix):
        o, lse = _attn_piece(q, k[:, i * piece:(i + 1) * piece], v[:, i * piece:(i + 1) * piece],
                             False)
        o = o.float().transpose(0, 1).contiguous().transpose(0, 1)[None]  # [T, H, D] storage
        pieces.append((o, lse.float()[None, ..., None] if i % 2 else lse.float()[None]))
    o, lse = _attn_piece(q, k[:, -t:], v[:, -t:], True)
    pieces.append((o.float()[None], lse.float()[None]))
    got = glue.attn_merge(pieces, torch.float32)
    # the whole: the window's queries are the last t of s positions
    full = (q.double() @ k.double().transpose(1, 2)) * d ** -0.5
    mask = torch.arange(s)[None, :] > (s - t + torch.arange(t))[:, None]
    want = torch.softmax(full.masked_fill(mask, float("-inf")), -1) @ v.double()
    assert got.shape == (t, h, d)
    torch.testing.assert_close(got.double(), want.transpose(0, 1), atol=1e-5, rtol=1e-5)
    assert torch.equal(glue.attn_merge(pieces, torch.float32), got)


@pytest.mark.gpu
def test_attention_pieces_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cuDNN key pieces merged by log-sum-exp (prefill windows) against the single flash
    call with a bottom-right causal mask: within bf16 rounding, repeatable, and each window's
    result independent of the piece size only through that rounding."""
    from engine.model import attention as at

    gen = torch.Generator().manual_seed(0)
    t, hq, hkv, d = 1024, 16, 2, 256
    for e0, piece in ((0, 16384), (3072, 16384), (3072, 1024), (5120, 2048)):
        monkeypatch.setattr(at, "_PIECE", piece)
        q = torch.randn(t, hq, d, generator=gen).bfloat16().cuda()
        keys = torch.randn(e0 + t, hkv, d, generator=gen).bfloat16().cuda()
        vals = torch.randn(e0 + t, hkv, d, generator=gen).bfloat16().cuda()
        got = at.attend_pieces(q, keys, vals, d ** -0.5)
        qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, keys, vals))
        from torch.nn.attention.bias import causal_lower_right
        want = torch.nn.functional.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=causal_lower_right(t, e0 + t), scale=d ** -0.5,
            enable_gqa=True)[0].transpose(0, 1)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
        assert all(torch.equal(at.attend_pieces(q, keys, vals, d ** -0.5), got)
                   for _ in range(3))


def _proj_layout(t: int, hk: int, kd: int, r: int, vd: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, tuple[int, int, int]]:
    qkvz = torch.randn(t, hk, 2 * kd + 2 * r * vd, generator=gen)
    return qkvz, (hk, kd, r * vd)


def test_interp_conv_window_gates_and_strided_gate(itg: ModuleType) -> None:
    """The window conv read straight from the projection, the fused gates and the gated norm
    with z as a strided view equal the reference (conv and norm bitwise in fp32)."""
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
        # the old path: [q | k | v] copied, the state placed before lo (bitwise, same kernel
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


@pytest.mark.gpu
def test_conv_window_gates_on_gpu() -> None:
    """The same on CUDA at a3b-proxy's GDN shapes (bf16): conv bitwise equal to the copying
    path through the Triton conv, gates within fp32 rounding of torch's."""
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


def test_interp_add_norm_and_norm_rope(itg: ModuleType) -> None:
    """The fused residual add + RMSNorm and q/k RMSNorm + partial RoPE equal the reference
    (bitwise in fp32; within bf16 rounding in bf16), reading q in place from the doubled
    projection."""
    glue = importlib.import_module("engine.kernels.triton_glue")
    from engine.config import preset
    from engine.model.attention import rope_cos_sin

    gen = torch.Generator().manual_seed(13)
    x, y = torch.randn(37, 64, generator=gen), torch.randn(37, 64, generator=gen)
    w = 0.1 * torch.randn(64, generator=gen)
    s1, n1 = glue.add_rms_norm(x, y, w, 1e-6)
    s2, n2 = ref.add_rms_norm(x, y, w, 1e-6)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(n1, n2)
    cfg = preset("tiny")
    t, h, d = 20, 3, cfg.head_dim
    qg = torch.randn(t, h, 2 * d, generator=gen)
    wq = 0.1 * torch.randn(d, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = rope_cos_sin(cfg, torch.arange(100, 100 + t), dtype)
        q = qg.to(dtype)[..., :d]
        got = glue.rms_norm_rope(q, wq.to(dtype), 1e-6, cos, sin)
        want = ref.rms_norm_rope(q, wq.to(dtype), 1e-6, cos, sin)
        assert torch.equal(want, ref.apply_rope(ref.rms_norm(q, wq.to(dtype), 1e-6), cos, sin))
        tol = 1e-6 if dtype == torch.float32 else 1.6e-2
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.gpu
def test_add_norm_and_norm_rope_on_gpu() -> None:
    """On CUDA (bf16, a3b-proxy shapes): the fused add + norm equals torch's add and our norm
    bitwise; the fused norm + RoPE is within a bf16 step of the op-by-op result, repeatable
    and row-local."""
    import engine.kernels.triton_glue as glue
    from engine.config import preset
    from engine.model.attention import rope_cos_sin

    gen = torch.Generator().manual_seed(14)
    x = torch.randn(4096, 2048, generator=gen).bfloat16().cuda()
    y = torch.randn(4096, 2048, generator=gen).bfloat16().cuda()
    w = (0.1 * torch.randn(2048, generator=gen)).bfloat16().cuda()
    s1, n1 = glue.add_rms_norm(x, y, w, 1e-6)
    assert torch.equal(s1, x + y)
    assert torch.equal(n1, glue.rms_norm(x + y, w, 1e-6))
    cfg = preset("a3b-proxy")
    qg = torch.randn(4096, 16, 512, generator=gen).bfloat16().cuda()
    wq = (0.1 * torch.randn(256, generator=gen)).bfloat16().cuda()
    cos, sin = rope_cos_sin(cfg, torch.arange(8192, 8192 + 4096, device="cuda"), torch.bfloat16)
    got = glue.rms_norm_rope(qg[..., :256], wq, 1e-6, cos, sin)
    # within a bf16 step of torch's op-by-op result (the norm's fp32 sum may round differently
    # in a different kernel), and row-local: a row's result does not depend on the batch
    want = ref.apply_rope(glue.rms_norm(qg[..., :256], wq, 1e-6), cos, sin)
    torch.testing.assert_close(got.float(), want.float(), atol=1.6e-2, rtol=1.6e-2)
    one = glue.rms_norm_rope(qg[100:101, :, :256], wq, 1e-6, cos[100:101].contiguous(),
                             sin[100:101].contiguous())
    assert torch.equal(one, got[100:101])
    assert torch.equal(glue.rms_norm_rope(qg[..., :256], wq, 1e-6, cos, sin), got)


@pytest.mark.gpu
def test_warm_pieces_builds_every_shape() -> None:
    """warm_pieces runs every key-piece shape a window can meet (square + j windows of prefix
    up to one piece), capped by the KV budget; nothing on the CPU."""
    from engine.config import preset
    from engine.model import attention as at

    cfg = preset("small")
    dev = torch.device("cuda")
    assert at.piece_keys(2048) == 16384 and at.piece_keys(256) == 4096
    assert at.warm_pieces(cfg, 2048, torch.bfloat16, dev, 100_000) == 9
    assert at.warm_pieces(cfg, 2048, torch.bfloat16, dev, 8192) == 4
    assert at.warm_pieces(cfg, 2048, torch.float32, dev, 100_000) == 0
    assert at.warm_pieces(cfg, 1024, torch.bfloat16, dev, 100_000) == 0  # flash below 2048
    assert at.warm_pieces(cfg, 2048, torch.bfloat16, torch.device("cpu"), 100_000) == 0
