"""sbrbench.peers: the adapters hand fla and FlashInfer our inputs in their layouts (checked
against stand-in modules that record the call) and read the results back in ours."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch

from sbrbench import bench_kernels, peers


@pytest.fixture
def inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    t, hq, hv, d = 128, 2, 4, 16
    q, k = (torch.randn(t, hq, d, generator=gen).bfloat16() for _ in range(2))
    v = torch.randn(t, hv, d, generator=gen).bfloat16()
    g = -torch.rand(t, hv, generator=gen)
    beta = torch.rand(t, hv, generator=gen).bfloat16()
    s0 = torch.randn(hv, d, d, generator=gen)
    return q, k, v, g, beta, s0


def _fake(monkeypatch: pytest.MonkeyPatch, name: str, fn: Any) -> None:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]),
                            types.ModuleType(".".join(parts[:i])))
    setattr(sys.modules[name], fn.__name__, fn)


def test_absent_peers_give_none(monkeypatch: pytest.MonkeyPatch, inputs: Any) -> None:
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import fails
    monkeypatch.setitem(sys.modules, "fla", None)
    assert peers.flashinfer_call(*inputs, capture=True) is None
    assert peers.fla_fn(*inputs) is None
    assert peers.version("flashinfer") is None


def test_flashinfer_adapter_layouts(monkeypatch: pytest.MonkeyPatch, inputs: Any) -> None:
    q, k, v, g, beta, s0 = inputs
    seen: dict[str, Any] = {}

    def chunk_gated_delta_rule(q, k, v, g, beta, **kw):  # type: ignore[no-untyped-def]
        seen.update(kw, q=q, g=g, beta=beta)
        kw["output"].copy_(v)
        kw["output_state"].copy_(kw["initial_state"] * 2)
        return kw["output"], kw["output_state"]

    _fake(monkeypatch, "flashinfer.gdn_prefill", chunk_gated_delta_rule)
    call = peers.flashinfer_call(q, k, v, g, beta, s0, capture=True)
    assert call is not None and call.checkpoints == 128 // 64
    call.run()
    assert seen["gate_domain"] == "log" and seen["use_qk_l2norm_in_kernel"] is True
    assert seen["g"].dtype == torch.float32 and seen["beta"].dtype == torch.float32
    assert seen["q"].shape == q.shape  # grouped heads, not expanded
    assert seen["scale"] == 16 ** -0.5 and seen["checkpoint_every_n_tokens"] == 64
    assert seen["state_checkpoints"].shape == (2, 4, 16, 16)
    assert seen["cu_seqlens"].tolist() == [0, 128]
    # state in FlashInfer's [N, HV, V, K] layout, read back as ours
    assert torch.equal(seen["initial_state"][0], s0.transpose(-1, -2))
    assert torch.equal(call.final_state(), s0 * 2)
    assert torch.equal(call.output(), v)
    assert call.notes == ["none"]
    plain = peers.flashinfer_call(q, k, v, g, beta, s0, capture=False)
    assert plain is not None and plain.checkpoints == 0
    seen.clear()
    plain.run()
    assert "state_checkpoints" not in seen and "checkpoint_every_n_tokens" not in seen


def test_flashinfer_fallback_notice_is_kept(monkeypatch: pytest.MonkeyPatch,
                                            inputs: Any) -> None:
    import warnings

    def chunk_gated_delta_rule(*a, **kw):  # type: ignore[no-untyped-def]
        warnings.warn("CP delta rule heuristic matched but CP dispatch is unavailable",
                      RuntimeWarning, stacklevel=2)

    _fake(monkeypatch, "flashinfer.gdn_prefill", chunk_gated_delta_rule)
    call = peers.flashinfer_call(*inputs, capture=False)
    assert call is not None
    call.run()
    call.run()
    assert len(call.notes) == 1 and "CP dispatch is unavailable" in call.notes[0]


def test_fla_adapter_batches_one_sequence(monkeypatch: pytest.MonkeyPatch,
                                          inputs: Any) -> None:
    q, k, v, g, beta, s0 = inputs
    seen: dict[str, Any] = {}

    def chunk_gated_delta_rule(q, k, v, g, beta, **kw):  # type: ignore[no-untyped-def]
        seen.update(kw, q=q)

    _fake(monkeypatch, "fla.ops.gated_delta_rule", chunk_gated_delta_rule)
    fn = peers.fla_fn(q, k, v, g, beta, s0)
    assert fn is not None
    fn()
    assert seen["q"].shape == (1, *q.shape) and seen["initial_state"].shape == (1, *s0.shape)
    assert seen["use_qk_l2norm_in_kernel"] is True and seen["output_final_state"] is True


def test_speedups_with_flashinfer() -> None:
    def row(impl: str, ms: float, **kw: object) -> dict[str, object]:
        return {"kernel": "gdn_chunk_fwd", "impl": impl, "T": 8192, "H": 16, "ms": ms, **kw}

    rows = [row("sbrbench", 2.0, capture=True), row("sbrbench", 1.6, capture=False),
            row("flashinfer", 1.0, capture=False), row("flashinfer", 1.5, capture=True)]
    (sp,) = bench_kernels.speedups(rows)
    assert sp["fi_over_ours"] == 0.5 and sp["fi_ckpt_over_ours"] == 0.75
    assert sp["fi_over_ours_no_capture"] == round(1.0 / 1.6, 3)
    assert sp["ours_capture_cost"] == 1.25 and sp["fi_capture_cost"] == 1.5
    assert "fla_ms" not in sp
