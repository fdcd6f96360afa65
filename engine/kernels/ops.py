"""Kernel dispatch: Triton kernels on CUDA when available and chosen, else the torch reference.

The choice is an engine's (`Kernels`, made from its EngineSettings at construction) and holds
while the engine runs a request (`using`); without one, ops take the defaults (Triton on CUDA,
glue kernels on, cuDNN attention pieces). Nothing here reads the environment.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.kernels import reference

_triton: Any = None
_glue: Any = None
_gemm: Any = None
_triton_checked = False


@dataclass
class Kernels:
    """Which implementations an engine's ops take on CUDA: the Triton kernels or the torch
    reference (`triton`), the Triton glue kernels (`glue`: norms, SwiGLU, conv, the
    batch-invariant linear), and prefill attention ("cudnn" key pieces or one "flash" call).
    `failures` records a cuDNN attention that failed, after which the engine attends with flash
    (the same numbers for the rest of the run: the failure happens at warm-up). `sized`: the
    engine sizes its windows to the work, so inside a window (`window()`) the projections take
    the batch-invariant linear and attention the window-invariant kernel (`rows_invariant`)."""

    triton: bool = True
    glue: bool = True
    attention: str = "cudnn"
    failures: list[str] = field(default_factory=list)
    sized: bool = False

    @classmethod
    def of(cls, settings: Any) -> Kernels:
        """From an engine.settings.EngineSettings."""
        return cls(triton=settings.kernels == "auto", glue=settings.glue_kernels,
                   attention=settings.attention, sized=settings.windows == "sized")


_DEFAULT = Kernels()  # the choice of ops run outside any engine's request
_current: contextvars.ContextVar[Kernels | None] = contextvars.ContextVar("kernels", default=None)
_in_window: contextvars.ContextVar[bool] = contextvars.ContextVar("in_window", default=False)


@contextlib.contextmanager
def window() -> Iterator[None]:
    """The ops of this block compute a prefill window (not a decode step)."""
    token = _in_window.set(True)
    try:
        yield
    finally:
        _in_window.reset(token)


def rows_invariant() -> bool:
    """Whether the current op computes rows of a window whose size follows the work (an engine
    with sized windows, inside a window): then every row's bits must not depend on the window's
    other rows or their number."""
    return current().sized and _in_window.get()


@contextlib.contextmanager
def using(kernels: Kernels) -> Iterator[Kernels]:
    """Run the ops of this block (this thread or task) with `kernels`."""
    token = _current.set(kernels)
    try:
        yield kernels
    finally:
        _current.reset(token)


def current() -> Kernels:
    k = _current.get()
    return k if k is not None else _DEFAULT


def _triton_mod() -> Any:
    """engine.kernels.triton_gdn where Triton can run (CUDA, triton importable) and the current
    choice takes it, else None."""
    global _triton, _glue, _gemm, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        if torch.cuda.is_available():
            try:
                from engine.kernels import triton_gdn, triton_gemm, triton_glue  # noqa: PLC0415

                _triton, _glue, _gemm = triton_gdn, triton_glue, triton_gemm
            except ImportError:
                _triton = _glue = _gemm = None
    return _triton if current().triton else None


def glue_module() -> Any:
    """engine.kernels.triton_glue where Triton runs (CUDA) and the choice takes it, else None."""
    return _glue if _triton_mod() is not None else None


def glue_enabled() -> bool:
    """Whether the Triton glue kernels run on CUDA under the current choice."""
    return current().glue


def _pick(name: str, x: torch.Tensor) -> Callable[..., Any]:
    if x.is_cuda:
        mod = _triton_mod()
        glue = (_glue, _gemm) if mod is not None and glue_enabled() else ()
        for m in (mod, *glue):
            if m is not None and hasattr(m, name):
                return getattr(m, name)  # type: ignore[no-any-return]
    return getattr(reference, name)  # type: ignore[no-any-return]


def _expand(q: torch.Tensor, k: torch.Tensor, hv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k heads repeated to the value heads (the reference takes them expanded; the Triton
    kernels read grouped heads directly)."""
    if q.shape[-2] == hv:
        return q, k
    r = hv // q.shape[-2]
    return q.repeat_interleave(r, dim=-2), k.repeat_interleave(r, dim=-2)


def chunk_gated_delta_rule(q, k, v, g, beta, state, lo, hi, capture=True):  # type: ignore[no-untyped-def]
    """q, k [T, H, K] with H dividing v's heads (grouped) or equal to them."""
    fn = _pick("chunk_gated_delta_rule", q)
    if fn is reference.chunk_gated_delta_rule:
        q, k = _expand(q, k, v.shape[1])
    return fn(q, k, v, g, beta, state, lo, hi, capture)


def recurrent_step(q, k, v, g, beta, state):  # type: ignore[no-untyped-def]
    """q, k [H, K] with H dividing v's heads (grouped) or equal to them."""
    fn = _pick("recurrent_step", q)
    if fn is reference.recurrent_step:
        q, k = _expand(q, k, v.shape[0])
    return fn(q, k, v, g, beta, state)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T with every row's bits independent of the number of rows
    (reference.linear; triton_gemm.linear on CUDA): the batch-invariant replacement for
    nn.Linear's forward in a window (bias-free, as every projection of the models is)."""
    return _pick("linear", x)(x, weight)  # type: ignore[no-any-return]


def rms_norm(x, weight, eps):  # type: ignore[no-untyped-def]
    return _pick("rms_norm", x)(x, weight, eps)


def add_rms_norm(x, y, weight, eps):  # type: ignore[no-untyped-def]
    return _pick("add_rms_norm", x)(x, y, weight, eps)


def rms_norm_rope(x, weight, eps, cos, sin):  # type: ignore[no-untyped-def]
    return _pick("rms_norm_rope", x)(x, weight, eps, cos, sin)


def swiglu(gate, up):  # type: ignore[no-untyped-def]
    return _pick("swiglu", gate)(gate, up)


def causal_conv1d(x, weight, state):  # type: ignore[no-untyped-def]
    return _pick("causal_conv1d", x)(x, weight, state)


def conv_window(qkvz, layout, weight, state, lo):  # type: ignore[no-untyped-def]
    return _pick("conv_window", qkvz)(qkvz, layout, weight, state, lo)


def gdn_gates(ba, a_log, dt_bias):  # type: ignore[no-untyped-def]
    return _pick("gdn_gates", ba)(ba, a_log, dt_bias)


def gated_rms_norm(x, gate, weight, eps):  # type: ignore[no-untyped-def]
    return _pick("gated_rms_norm", x)(x, gate, weight, eps)


def impl_name(device: torch.device | str) -> str:
    """Which implementation runs on this device: 'triton' or 'reference'."""
    if torch.device(device).type == "cuda" and _triton_mod() is not None:
        return "triton"
    return "reference"


def gdn_config(device: torch.device | str, kd: int = 128, vd: int = 128) -> str | None:
    """The Triton chunk kernel's launch shape for head dims (kd, vd) on this device, or None
    where the torch reference runs."""
    if impl_name(device) != "triton":
        return None
    return str(_triton_mod().launch_for(kd, vd).describe())


def moe_experts(x, idx, w, gate_up, down, lo, hi):  # type: ignore[no-untyped-def]
    """Routed experts of rows [lo, hi): grouped GEMMs on CUDA in bf16 (no host sync, fixed
    shapes); elsewhere the fixed-block reference, or, for a CUDA decode step (one row, where
    a graph may be capturing), the sync-free gathered form."""
    if x.is_cuda and current().triton:
        from engine.kernels import moe_grouped  # noqa: PLC0415

        if moe_grouped.grouped_available(x):
            return moe_grouped.moe_experts_grouped(x, idx, w, gate_up, down, lo, hi)
    if x.is_cuda and x.shape[0] == 1 and (lo, hi) == (0, 1):
        return reference.moe_experts_gathered(x, idx, w, gate_up, down)
    return reference.moe_experts(x, idx, w, gate_up, down, lo, hi)
