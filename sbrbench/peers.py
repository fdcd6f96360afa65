"""Other GDN prefill kernels called on our bench inputs: fla's chunk_gated_delta_rule and
FlashInfer's (its Hopper context-parallel CuTe-DSL kernel on SM90). Each adapter turns our
layout (q, k [T, H, K], v [T, HV, V], log decay g, beta [T, HV], state [HV, K, V] fp32) into
the peer's, outside the timed call, and returns that call, or None when the peer is not
importable. benchmarks/peers/ builds the packages for the GPU machine, which has no
internet."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from engine.config import CHUNK


def version(name: str) -> str | None:
    """The importable peer's version (fla, flashinfer), or None."""
    try:
        mod = __import__(name)
    except ImportError:
        return None
    return str(getattr(mod, "__version__", "?"))


def fla_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
           beta: torch.Tensor, s0: torch.Tensor) -> Callable[[], Any] | None:
    """fla's chunked rule (batch of one, q/k normalised in the kernel), with the final state;
    it returns no intermediate states."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: PLC0415
    except ImportError:
        return None
    args = (q[None], k[None], v[None], g[None], beta[None])
    h0 = s0[None].contiguous()

    def run() -> Any:
        return chunk_gated_delta_rule(*args, initial_state=h0, output_final_state=True,
                                      use_qk_l2norm_in_kernel=True)

    return run


class PeerCall(NamedTuple):
    """A peer's timed call and how to read its results in our layout."""

    run: Callable[[], Any]
    output: Callable[[], torch.Tensor]  # [T, HV, V], after run()
    final_state: Callable[[], torch.Tensor]  # [HV, K, V] fp32, after run()
    checkpoints: int  # grid states it stores (every CHUNK rows), 0 without capture
    notes: list[str]  # what the peer warned of on its first call (a kernel fallback, say)


def flashinfer_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                    beta: torch.Tensor, s0: torch.Tensor, capture: bool,
                    use_cp: bool | str = "auto") -> PeerCall | None:
    """FlashInfer's chunk_gated_delta_rule on one sequence: grouped q/k (GVA), log decay
    (gate_domain="log"), fp32 g and beta, q/k normalised by FlashInfer (use_qk_l2norm), the
    state in its [HV, V, K] layout, outputs preallocated; with `capture` it stores the state
    every CHUNK rows (state_checkpoints), as ours does with capture=True. use_cp="auto" lets
    FlashInfer pick its context-parallel kernel, as the serving engines that call it do."""
    try:
        from flashinfer.gdn_prefill import chunk_gated_delta_rule  # noqa: PLC0415
    except ImportError:
        return None
    t, hv, vd = v.shape
    kd = q.shape[-1]
    dev = q.device
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g32, b32 = g.float().contiguous(), beta.float().contiguous()
    cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
    h0 = s0.transpose(-1, -2).contiguous()[None]
    out = torch.empty(t, hv, vd, dtype=v.dtype, device=dev)
    s_out = torch.empty_like(h0)
    kw: dict[str, Any] = {}
    n_ck = t // CHUNK if capture else 0
    if capture:
        kw = {"state_checkpoints": torch.empty(n_ck, hv, vd, kd, dtype=torch.float32,
                                               device=dev),
              "checkpoint_cu_starts": torch.tensor([0, n_ck], dtype=torch.int32, device=dev),
              "checkpoint_every_n_tokens": CHUNK}
    notes: list[str] = []

    def call() -> Any:
        return chunk_gated_delta_rule(q, k, v, g32, b32, scale=kd ** -0.5, initial_state=h0,
                                      output_final_state=True, cu_seqlens=cu,
                                      use_qk_l2norm_in_kernel=True, output=out,
                                      output_state=s_out, use_cp=use_cp, gate_domain="log",
                                      **kw)

    def run() -> Any:
        if notes:  # said once; the later calls' repeats are noise
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return call()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            res = call()
        notes.extend([str(w.message)[:300] for w in seen] or ["none"])
        return res

    return PeerCall(run, lambda: out, lambda: s_out[0].transpose(-1, -2), n_ck, notes)
