"""GPU exactness: policies and cold/warm give bitwise-identical tokens and logits on CUDA."""

from __future__ import annotations

import random

import pytest
import torch

from engine.cache.settings import CacheSettings
from engine.errors import ConfigError
from engine.runtime import Engine, SamplingParams
from engine.settings import EngineSettings

pytestmark = pytest.mark.gpu
WINDOW_256 = EngineSettings(exec_window=256)


def _stream(engine: Engine, seed: int = 3) -> list[tuple]:
    rnd = random.Random(seed)
    hist = [[rnd.randrange(256) for _ in range(rnd.randrange(300, 900))] for _ in range(3)]
    rows = []
    for _ in range(4):
        for c in range(3):
            r = engine.generate(hist[c], SamplingParams(max_tokens=8, ignore_eos=True))
            rows.append((r.stats.cache.snapshot_pos, r.stats.logits_sha256, tuple(r.tokens)))
            hist[c] += r.tokens + [rnd.randrange(256) for _ in range(rnd.randrange(50, 400))]
    return rows


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_parity_across_policies(dtype: str) -> None:
    runs = []
    for pol in ("forecast", "tail-pin"):
        eng = Engine.from_preset("small", device="cuda", dtype=dtype, cache=CacheSettings(
            policy=pol, snapshot_slots=3, snapshot_interval=256), settings=WINDOW_256)
        runs.append(_stream(eng))
        del eng
        torch.cuda.empty_cache()
    a, b = runs
    assert [r[0] for r in a] != [r[0] for r in b]
    assert [r[1:] for r in a] == [r[1:] for r in b]


def test_cuda_cold_equals_warm() -> None:
    eng = Engine.from_preset("small", device="cuda", dtype="bfloat16",
                             cache=CacheSettings(policy="lru"), settings=WINDOW_256)
    rnd = random.Random(9)
    prompt = [rnd.randrange(256) for _ in range(700)]
    first = eng.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    prompt2 = prompt + first.tokens + [rnd.randrange(256) for _ in range(333)]
    warm = eng.generate(prompt2, SamplingParams(max_tokens=8, ignore_eos=True))
    cold = eng.generate(prompt2, SamplingParams(max_tokens=8, ignore_eos=True), use_cache=False)
    assert warm.stats.cache.snapshot_pos > 0
    assert warm.tokens == cold.tokens
    assert warm.stats.logits_sha256 == cold.stats.logits_sha256


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_graphs_match_eager_step(dtype: str) -> None:
    """The captured decode step computes what HybridModel.step computes (same ops; fp32 within
    1e-4, bf16 within 2e-2) and is deterministic (two replays from one state are bitwise
    equal)."""
    from engine.model.graphs import DecodeGraphs

    eng = Engine.from_preset("small", device="cuda", dtype=dtype,
                             cache=CacheSettings(policy="lru"), settings=WINDOW_256)
    m, dev, dt = eng.model, eng.device, eng.dtype
    rnd = random.Random(5)
    prompt = torch.tensor([rnd.randrange(256) for _ in range(300)], device=dev)
    kv = m.kv_buffers(1024, dev, dt)
    w = torch.zeros(512, dtype=torch.long, device=dev)
    w[:300] = prompt
    _, state, _ = m.forward_window(w, 0, 0, 300, m.zero_state(dev, dt), kv, set())
    graphs = DecodeGraphs(m, dev, dt)
    toks = [int(prompt[-1])]
    kv_g = [(k.clone(), v.clone()) for k, v in kv]
    runs = []
    for _ in range(2):
        graphs.start(state)
        kv_run = [(k.clone(), v.clone()) for k, v in kv_g]
        run = [graphs.step(t, 300 + i, kv_run).clone() for i, t in enumerate(toks * 6)]
        runs.append(torch.stack(run))
    assert torch.equal(runs[0], runs[1])
    st = state
    eager = []
    for i, t in enumerate(toks * 6):
        h, st = m.step(t, 300 + i, st, kv)
        eager.append(m.logits(h))
    tol = 1e-4 if dtype == "float32" else 2e-2
    torch.testing.assert_close(runs[0], torch.stack(eager), atol=tol, rtol=tol)
    assert torch.equal(graphs.ssm, st.ssm) or torch.allclose(graphs.ssm, st.ssm, atol=tol)


def test_cuda_sized_windows_give_every_window_size_the_same_bits() -> None:
    """windows=sized on CUDA (the batch-invariant linear, the window-invariant attention):
    engines of exec windows 256 and 2048 under different policies give the same tokens and
    logits bitwise; a MoE model is refused (its grouped GEMM is not shown invariant)."""
    runs = []
    for w, pol in ((256, "forecast"), (2048, "tail-pin")):
        eng = Engine.from_preset("small", device="cuda", dtype="bfloat16", cache=CacheSettings(
            policy=pol, snapshot_slots=3, snapshot_interval=256),
            settings=EngineSettings(exec_window=w, windows="sized"))
        runs.append(_stream(eng))
        del eng
        torch.cuda.empty_cache()
    a, b = runs
    assert [r[1:] for r in a] == [r[1:] for r in b]
    with pytest.raises(ConfigError, match="dense model"):
        Engine.from_preset("tiny-moe", device="cuda", settings=EngineSettings(windows="sized"))
