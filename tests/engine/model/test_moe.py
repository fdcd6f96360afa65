"""The sparse MoE block: transformers' numbers, and a token's output independent of which other
rows of its window are valid (bitwise), from the kernel up to cold vs warm generation."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
import transformers

from engine.cache.settings import CacheSettings
from engine.config import preset
from engine.kernels import moe_grouped
from engine.kernels import reference as ref
from engine.model.moe import SparseMoE
from engine.runtime import Engine, SamplingParams
from engine.settings import EngineSettings
from engine.weights import build_random

H, E, K, INTER = 64, 8, 2, 32
# fp32, outputs of magnitude ~10 (weights N(0, 0.3)): forms that run GEMMs of other shapes or
# sum in another order differ by rounding; observed max |diff| <= 7e-6.
TOL = dict(atol=2e-5, rtol=1e-5)


def _block(dtype: torch.dtype = torch.float32, device: str = "cpu",
           seed: int = 0) -> SparseMoE:
    cfg = preset("tiny-moe")
    moe = SparseMoE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return moe.to(device=device, dtype=dtype).eval()


def _x(t: int = 64, seed: int = 1, dtype: torch.dtype = torch.float32,
       device: str = "cpu") -> torch.Tensor:
    return torch.randn(t, H, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@pytest.mark.parametrize("norm", [True, False])
def test_block_matches_transformers(norm: bool) -> None:
    cfg = transformers.Qwen3NextConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K,
                                       moe_intermediate_size=INTER, norm_topk_prob=norm,
                                       shared_expert_intermediate_size=64)
    hf = transformers.models.qwen3_next.modeling_qwen3_next.Qwen3NextSparseMoeBlock(cfg)
    ours = _block()
    ours.norm_topk = norm
    hf.load_state_dict(ours.state_dict(), strict=True)  # the same parameter names
    x = _x(50)
    with torch.no_grad():
        want = hf(x[None])[0]
        got = ours(x)
    torch.testing.assert_close(got, want, **TOL)


def test_router_sums_in_transformers_order_then_sorts_by_expert() -> None:
    logits = torch.randn(40, E, generator=torch.Generator().manual_seed(3))
    idx, w = ref.moe_route(logits, 3, True)
    probs = torch.softmax(logits, -1, dtype=torch.float32)
    top, want_idx = torch.topk(probs, 3, dim=-1)
    top /= top.sum(-1, keepdim=True)
    for r in range(40):
        assert idx[r].tolist() == sorted(want_idx[r].tolist())
        assert dict(zip(idx[r].tolist(), w[r].tolist(), strict=True)) == \
            dict(zip(want_idx[r].tolist(), top[r].tolist(), strict=True))


RANGES = [(0, 64), (16, 64), (0, 40), (32, 50), (63, 64), (5, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_valid_rows_do_not_depend_on_padding(dtype: torch.dtype) -> None:
    """Each valid row of a window, whatever the valid range and whatever the padding rows
    hold, is bitwise what the whole-window pass gives it."""
    moe = _block(dtype)
    x = _x(dtype=dtype)
    with torch.no_grad():
        full = moe(x)
        for lo, hi in RANGES:
            junk = _x(seed=lo + 100 * hi, dtype=dtype) * 5
            xp = torch.where(((torch.arange(64) >= lo) & (torch.arange(64) < hi))[:, None],
                             x, junk)
            got = moe(xp, lo, hi)
            assert torch.equal(got[lo:hi], full[lo:hi]), (lo, hi)


def test_padding_rows_get_no_routed_experts() -> None:
    moe = _block()
    x = _x()
    with torch.no_grad():
        out = moe(x, 10, 20)
        shared = torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
    assert torch.equal(out[:10], shared[:10]) and torch.equal(out[20:], shared[20:])


def test_blocked_experts_match_a_per_token_loop() -> None:
    moe = _block()
    x = _x(64)
    idx, w = ref.moe_route(moe.gate(x), K, True)
    gu, dn = moe.experts.gate_up_proj, moe.experts.down_proj
    with torch.no_grad():
        got = ref.moe_experts(x, idx, w, gu, dn, 0, 64, block=4)
        want = torch.stack([sum(w[r, j] * ref.expert_mlp(x[r:r + 1], gu[idx[r, j]],
                                                         dn[idx[r, j]])[0]
                                for j in range(K)) for r in range(64)])
    torch.testing.assert_close(got, want, **TOL)


def test_gathered_decode_form_matches_the_reference() -> None:
    moe = _block()
    x = _x(1)
    idx, w = ref.moe_route(moe.gate(x), K, True)
    gu, dn = moe.experts.gate_up_proj, moe.experts.down_proj
    with torch.no_grad():
        torch.testing.assert_close(ref.moe_experts_gathered(x, idx, w, gu, dn),
                                   ref.moe_experts(x, idx, w, gu, dn, 0, 1),
                                   **TOL)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
def test_grouped_layout_matches_the_reference_on_cpu() -> None:
    """The grouped path's sort / offsets / unpermute (run by torch's CPU grouped GEMM here;
    on the GPU it is one CUTLASS kernel): the reference's numbers, zeros on padding rows."""
    moe = _block()
    x = _x(64)
    idx, w = ref.moe_route(moe.gate(x), K, True)
    gu, dn = moe.experts.gate_up_proj, moe.experts.down_proj
    with torch.no_grad():
        for lo, hi in RANGES:
            got = moe_grouped.moe_experts_grouped(x, idx, w, gu, dn, lo, hi)
            want = ref.moe_experts(x, idx, w, gu, dn, lo, hi)
            torch.testing.assert_close(got, want, **TOL)
            assert not got[:lo].any() and not got[hi:].any()


@pytest.mark.parametrize("window", [128, 256])
def test_tiny_moe_window_resume_mid_window_is_bitwise(
        window: int, mid_window_resume: Callable[..., None]) -> None:
    """Restoring a grid state inside a window (lo > 0: the MoE blocks route fewer rows)
    reproduces the run-through bitwise."""
    model = build_random(preset("tiny-moe"), "cpu", torch.float32, 0).eval()
    ids = torch.randint(0, 256, (window + 40,), generator=torch.Generator().manual_seed(4))
    mid_window_resume(model, ids, window, (64, 128) if window > 128 else (64,))


def test_tiny_moe_cold_and_warm_are_identical() -> None:
    """A growing conversation on the tiny MoE preset: the warm request (restored snapshot,
    replayed tail) gives the cold request's tokens and logits, bitwise."""
    eng = Engine.from_preset("tiny-moe", cache=CacheSettings(policy="lru", snapshot_slots=4,
                                                               snapshot_interval=64))
    rnd = random.Random(5)
    conv = [rnd.randrange(256) for _ in range(150)]
    warm_seen = 0
    for _ in range(3):
        warm = eng.generate(conv, SamplingParams(max_tokens=8, ignore_eos=True))
        cold = eng.generate(conv, SamplingParams(max_tokens=8, ignore_eos=True),
                            use_cache=False)
        assert warm.tokens == cold.tokens
        assert warm.stats.logits_sha256 == cold.stats.logits_sha256
        warm_seen += warm.stats.cache.snapshot_pos > 0 and warm.stats.cache.replay_tokens > 0
        conv = conv + warm.tokens + [rnd.randrange(256) for _ in range(rnd.randrange(30, 90))]
    assert warm_seen >= 2


def test_tiny_moe_counts() -> None:
    cfg = preset("tiny-moe")
    model = build_random(cfg, "cpu", torch.float32, 0)
    assert cfg.moe_layers == list(range(8))
    assert sum(p.numel() for p in model.parameters()) == cfg.param_count()
    assert cfg.param_count() - cfg.active_param_count() == 8 * (E - K) * 3 * H * INTER


# ---- GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_grouped_moe_is_padding_invariant_and_close_to_the_reference() -> None:
    """bf16 on CUDA takes the grouped GEMMs: valid rows bitwise independent of the valid
    range and padding, numbers within bf16 rounding of the fixed-block reference (same
    routing, bf16 cuBLAS GEMMs)."""
    moe = _block(torch.bfloat16, "cuda")
    x = _x(2048, dtype=torch.bfloat16, device="cuda")
    assert moe_grouped.grouped_available(x)
    ranges = [(0, 2048), (512, 2048), (0, 1000), (64, 65), (1984, 2048), (700, 1900)]
    rows = torch.arange(2048, device="cuda")
    with torch.no_grad():
        full = moe(x)
        for lo, hi in ranges:
            junk = _x(2048, seed=lo + hi, dtype=torch.bfloat16, device="cuda") * 5
            xp = torch.where(((rows >= lo) & (rows < hi))[:, None], x, junk)
            assert torch.equal(moe(xp, lo, hi)[lo:hi], full[lo:hi]), (lo, hi)
        idx, w = ref.moe_route(moe.gate(x), K, True)
        gu, dn = moe.experts.gate_up_proj, moe.experts.down_proj
        got = moe_grouped.moe_experts_grouped(x, idx, w, gu, dn, 0, 2048).float()
        want = ref.moe_experts(x, idx, w, gu, dn, 0, 2048).float()
    assert (got - want).abs().max().item() < 2e-2 * want.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_moe_decode_step_is_graph_capturable(dtype: torch.dtype) -> None:
    """One decode row (bf16: grouped GEMMs; fp32: gathered weights) needs no host sync, so a
    CUDA graph holds it, and a replay gives the eager result bitwise."""
    moe = _block(dtype, "cuda")
    x = _x(1, dtype=dtype, device="cuda")
    with torch.no_grad():
        eager = moe(x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            moe(x)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = moe(x)
        x2 = _x(1, seed=9, dtype=dtype, device="cuda")
        x.copy_(x2)
        g.replay()
        assert torch.equal(out, moe(x2))
    assert not torch.equal(out, eager)


@pytest.mark.gpu
def test_cuda_tiny_moe_cold_and_warm_are_identical() -> None:
    eng = Engine.from_preset("tiny-moe", device="cuda", dtype="bfloat16",
                             cache=CacheSettings(policy="lru", snapshot_slots=4,
                                                 snapshot_interval=64),
                             settings=EngineSettings(exec_window=128))
    rnd = random.Random(6)
    conv = [rnd.randrange(256) for _ in range(300)]
    for _ in range(3):
        warm = eng.generate(conv, SamplingParams(max_tokens=8, ignore_eos=True))
        cold = eng.generate(conv, SamplingParams(max_tokens=8, ignore_eos=True),
                            use_cache=False)
        assert warm.tokens == cold.tokens
        assert warm.stats.logits_sha256 == cold.stats.logits_sha256
        conv = conv + warm.tokens + [rnd.randrange(256) for _ in range(rnd.randrange(30, 200))]
