"""Fixtures of the kernel tests: the Triton modules run through Triton's CPU interpreter,
random GDN inputs shaped like the engine's, and NaN-poisoned buffers.

Where CUDA is absent (CI), this conftest turns on Triton's interpreter (TRITON_INTERPRET=1)
before anything imports triton: Triton reads it when it decorates a kernel, its own library
functions (tl.sum, tl.cumsum...) included, which happens when triton is first imported. The
kernels then run in numpy on CPU tensors; the interp tests check indexing, masking and the
algebra, not tensor-core rounding (the bf16 products run as fp32 products of bf16-rounded
operands). Where CUDA is present the GPU tests run the compiled kernels instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import NamedTuple

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GdnInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                  torch.Tensor]


class Interp(NamedTuple):
    gdn: ModuleType  # engine.kernels.triton_gdn, interpreted
    glue: ModuleType  # engine.kernels.triton_glue, interpreted
    gemm: ModuleType  # engine.kernels.triton_gemm, interpreted
    attn: ModuleType  # engine.kernels.triton_attention, interpreted


@pytest.fixture(scope="session")
def interp() -> Iterator[Interp]:
    """triton_gdn, triton_glue, triton_gemm and triton_attention with every kernel in Triton's
    interpreter (CPU only)."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the GPU tests run the compiled kernels")
    imported = "triton" in sys.modules
    import triton.language as tl
    import triton.runtime.interpreter as ti

    if os.environ.get("TRITON_INTERPRET") != "1" or not isinstance(tl.sum, ti.InterpretedFunction):
        pytest.fail("triton is not in interpreter mode: TRITON_INTERPRET must be 1 before triton "
                    f"is first imported (set: {os.environ.get('TRITON_INTERPRET')!r}, triton "
                    f"imported before this fixture: {imported})")
    orig = ti._patch_lang_tensor

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        # numpy >= 2.4 refuses int() of the 1-element arrays that the interpreter uses for
        # scalar kernel arguments (loop bounds); read the element instead.
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    orig_lang = ti._patch_lang

    def patch_lang_once(fn):  # type: ignore[no-untyped-def]
        # The interpreter re-patches triton.language's builtins (inspect.getmembers over its
        # modules) on every call of a @triton.jit helper inside a kernel: two thirds of the
        # interpreted time. Skip it where the helper's language modules are patched already
        # (their builtins replaced: a kernel's own patch, or an earlier helper's, which the
        # interpreter never undoes); the numbers are the same, the tests ~3x faster.
        langs = [m for m in fn.__globals__.values() if isinstance(m, ModuleType)
                 and m in (tl, tl.core)]
        if langs and not any(tl.core.is_builtin(m.dot) for m in langs):
            return ti._LangPatchScope()
        return orig_lang(fn)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ti, "_patch_lang_tensor", patched)
        mp.setattr(ti, "_patch_lang", patch_lang_once)
        import engine.kernels.triton_attention as attn
        import engine.kernels.triton_gdn as gdn
        import engine.kernels.triton_gemm as gemm
        import engine.kernels.triton_glue as glue

        assert gdn._EMU_BF16 and gemm._EMU and attn._EMU
        yield Interp(gdn, glue, gemm, attn)


def make_gdn_inputs(t: int, hv: int, hq: int, kd: int, vd: int, dtype: torch.dtype,
                    device: str = "cpu", seed: int = 0) -> GdnInputs:
    """Random GDN inputs shaped like the engine's (g from the Qwen3-Next gate formula):
    q, k [T, H, K], v [T, HV, V], g, beta [T, HV], a small fp32 state [HV, K, V]."""
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
    q, k, v, g, beta, s0 = (x.to(device) for x in (q, k, v, g, beta, s0))
    return q, k, v, g, beta, s0


@pytest.fixture
def gdn_inputs() -> Callable[..., GdnInputs]:
    return make_gdn_inputs


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64."""
    d = (a.double() - b.double()).norm()
    return float(d / b.double().norm().clamp_min(1e-30))


@pytest.fixture
def rel_err() -> Callable[[torch.Tensor, torch.Tensor], float]:
    return relative_l2


@pytest.fixture
def expand() -> Callable[[torch.Tensor, int], torch.Tensor]:
    """q/k heads repeated to the value heads (the reference's layout)."""
    return lambda x, hv: x.repeat_interleave(hv // x.shape[1], dim=1)


def _nan_empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> Callable[[ModuleType], None]:
    """poison(module): every buffer that module's kernels fill starts as NaN (-1 for
    integers), so a value the kernels fail to write shows up."""
    return lambda mod: monkeypatch.setattr(mod, "_empty", _nan_empty)
