"""Model conformance with transformers' Qwen3NextForCausalLM, and the kernels' exactness rules."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch

from engine.config import ModelConfig, preset
from engine.kernels import reference as ref
from engine.model.model import HybridModel
from engine.runtime import Engine, SamplingParams
from engine.weights import init_random

if not torch.cuda.is_available():
    # fla's kernels need a GPU; make transformers take its torch reference path on CPU.
    sys.modules.setdefault("fla", None)  # type: ignore[arg-type]
import transformers  # noqa: E402

# fp32 everywhere: the engine and transformers differ only in summation order (chunked vs
# per-call layouts), observed max |diff| ~1e-6 on logits of magnitude ~0.5.
LOGIT_ATOL = 2e-5


def _hf_model(model: HybridModel):  # type: ignore[no-untyped-def]
    hd = model.cfg.to_hf_dict()
    for k in ("model_type", "architectures", "rope_theta", "partial_rotary_factor"):
        hd.pop(k)
    cfg = transformers.Qwen3NextConfig(**hd)
    cfg._attn_implementation = "eager"
    hf = transformers.Qwen3NextForCausalLM(cfg).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


@pytest.fixture(scope="module")
def tiny() -> HybridModel:
    m = HybridModel(preset("tiny"))
    init_random(m, 0)
    return m.eval().requires_grad_(False)


def test_logits_match_transformers(tiny: HybridModel,
                                   engine_last_logits: Callable[..., torch.Tensor]) -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (200,))
    hf = _hf_model(tiny)
    with torch.no_grad():
        want = hf(ids[None]).logits[0].float()
    for n in (1, 17, 64, 65, 130, 200):
        got = engine_last_logits(tiny, ids[:n])
        err = (got - want[n - 1]).abs().max().item()
        assert err < LOGIT_ATOL, f"n={n}: max |diff| {err}"


def test_generate_matches_transformers_greedy(tiny: HybridModel) -> None:
    torch.manual_seed(2)
    prompt = torch.randint(0, 256, (90,)).tolist()
    eng = Engine(tiny, __import__("engine.tokenizer").tokenizer.ByteTokenizer(), "cpu",
                 torch.float32)
    got = eng.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True),
                       use_cache=False).tokens
    hf = _hf_model(tiny)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # full re-forward, no cache
            seq.append(int(hf(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    assert got == seq[len(prompt):]


@pytest.mark.parametrize("t,h,kd,vd", [(128, 2, 16, 16), (192, 3, 32, 8)],
                         ids=lambda x: str(x))
def test_chunked_equals_recurrent(t: int, h: int, kd: int, vd: int) -> None:
    g = torch.Generator().manual_seed(t + h)
    q, k = (torch.randn(t, h, kd, generator=g) for _ in range(2))
    v = torch.randn(t, h, vd, generator=g)
    gate = -torch.rand(t, h, generator=g) * 0.5
    beta = torch.rand(t, h, generator=g)
    s0 = torch.randn(h, kd, vd, generator=g) * 0.1
    out_c, s_c, _ = ref.chunk_gated_delta_rule(q, k, v, gate, beta, s0, 0, t)
    out_r, s_r = ref.recurrent_gated_delta_rule(q, k, v, gate, beta, s0)
    torch.testing.assert_close(out_c, out_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_c, s_r, atol=1e-4, rtol=1e-4)
    # a partial last chunk: the state at hi is exact
    out_p, s_p, _ = ref.chunk_gated_delta_rule(q, k, v, gate, beta, s0, 0, t - 23)
    _, s_rp = ref.recurrent_gated_delta_rule(q[:t - 23], k[:t - 23], v[:t - 23], gate[:t - 23],
                                             beta[:t - 23], s0)
    torch.testing.assert_close(s_p, s_rp, atol=1e-4, rtol=1e-4)


def test_resume_from_grid_state_is_bitwise() -> None:
    g = torch.Generator().manual_seed(7)
    t, h, kd, vd = 256, 2, 16, 16
    q, k = (torch.randn(t, h, kd, generator=g) for _ in range(2))
    v = torch.randn(t, h, vd, generator=g)
    gate = -torch.rand(t, h, generator=g)
    beta = torch.rand(t, h, generator=g)
    s0 = torch.zeros(h, kd, vd)
    out, s_end, states = ref.chunk_gated_delta_rule(q, k, v, gate, beta, s0, 0, t - 10)
    for r in (64, 128, 192):
        out2, s_end2, _ = ref.chunk_gated_delta_rule(q, k, v, gate, beta, states[r], r, t - 10)
        assert torch.equal(out2[r:t - 10], out[r:t - 10])
        assert torch.equal(s_end2, s_end)
    # padding rows beyond hi do not change valid rows or the state
    q2 = q.clone()
    q2[t - 10:] = 1e3
    k2 = k.clone()
    k2[t - 10:] = -7.0
    out3, s_end3, _ = ref.chunk_gated_delta_rule(q2, k2, v, gate, beta, s0, 0, t - 10)
    assert torch.equal(out3[:t - 10], out[:t - 10])
    assert torch.equal(s_end3, s_end)


def test_conv_matches_torch() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=g)
    w = torch.randn(6, 4, generator=g)
    st = torch.randn(3, 6, generator=g)
    full = ref.causal_conv1d(x, w, st)
    ext = torch.cat([st, x]).T[None]
    want = torch.nn.functional.silu(torch.nn.functional.conv1d(ext, w[:, None, :], groups=6))
    torch.testing.assert_close(full, want[0].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref.conv_state_after(x, st, 20), x[17:20])


@pytest.mark.parametrize("window", [128, 256])
def test_window_resume_mid_window_is_bitwise(tiny: HybridModel, window: int,
                                              mid_window_resume: Callable[..., None]) -> None:
    """Restoring a grid state inside a window (lo > 0) reproduces the run-through bitwise."""
    torch.manual_seed(4)
    mid_window_resume(tiny, torch.randint(0, 256, (window + 40,)), window, (64,))


def test_config_from_hf_dict_roundtrip() -> None:
    cfg = preset("a3b-proxy")
    back = ModelConfig.from_hf_dict(cfg.to_hf_dict())
    assert back.layer_types == cfg.layer_types
    assert len(back.gdn_layers) == 36 and len(back.attn_layers) == 12
    assert cfg.snapshot_bytes(2) > 36 * 32 * 128 * 128 * 4  # ~75 MB + conv state
