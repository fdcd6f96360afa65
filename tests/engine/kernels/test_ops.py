"""engine.kernels.ops: which implementation runs where, grouped heads reaching the reference
expanded, and the engine's window loop on the Triton kernels (through the interpreter on the
CPU): warm == cold bitwise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from engine.kernels import ops
from engine.kernels import reference as ref


def test_cpu_runs_the_reference() -> None:
    """On the CPU every op is the reference, whatever the kernel choice says; the choice holds
    inside `using` and only there."""
    for glue in (False, True):
        with ops.using(ops.Kernels(glue=glue)):
            assert ops.glue_enabled() == glue
            x = torch.randn(3, 8)
            assert ops._pick("rms_norm", x) is ref.rms_norm
            assert ops._pick("chunk_gated_delta_rule", x) is ref.chunk_gated_delta_rule
    assert ops.current() == ops.Kernels()
    assert ops.impl_name("cpu") == "reference"
    assert ops.gdn_config("cpu") is None


def test_grouped_heads_reach_the_reference_expanded(gdn_inputs: Callable[..., Any],
                                                    expand: Any) -> None:
    """ops expands grouped q/k for the torch reference (the Triton kernels read them grouped):
    the same numbers as expanding first."""
    q, k, v, g, beta, s0 = gdn_inputs(128, 4, 2, 32, 32, torch.float32, seed=1)
    o1, s1, st1 = ops.chunk_gated_delta_rule(q, k, v, g, beta, s0, 0, 100, True)
    o2, s2, st2 = ref.chunk_gated_delta_rule(expand(q, 4), expand(k, 4), v, g, beta, s0, 0, 100)
    assert torch.equal(o1, o2) and torch.equal(s1, s2) and sorted(st1) == sorted(st2)
    a, b = ops.recurrent_step(q[0], k[0], v[0], g[0], beta[0], s0)
    c, d = ref.recurrent_step(expand(q, 4)[0], expand(k, 4)[0], v[0], g[0], beta[0], s0)
    assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.timeout(300)  # ~30 s on an idle 2-core machine; the bound allows a busy one
def test_interp_engine_warm_equals_cold(interp: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's window loop on the Triton kernels (CPU, interpreted): warm == cold bitwise,
    and the first token agrees with the reference kernels'."""
    from engine.cache.settings import CacheSettings
    from engine.runtime import Engine, SamplingParams
    from engine.settings import EngineSettings

    args = CacheSettings(policy="lru", snapshot_interval=64)
    run = EngineSettings(exec_window=64)
    p = SamplingParams(max_tokens=1, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (100,), generator=gen).tolist()
    b = a + torch.randint(0, 256, (20,), generator=gen).tolist()
    ref_cold = Engine.from_preset("tiny", cache=args, settings=run).generate(b, p, use_cache=False)

    monkeypatch.setattr(ops, "_pick",
                        lambda name, x: getattr(interp.gdn, name, None) or getattr(interp.glue,
                                                                                   name))
    monkeypatch.setattr(interp.gdn, "_SAFE_DOT", 16)  # the tiny preset's 32-dim heads
    eng = Engine.from_preset("tiny", cache=args, settings=run)
    cold = eng.generate(b, p, use_cache=False)
    eng.generate(a, p, session="s")
    warm = eng.generate(b, p, session="s")
    assert warm.stats.cache.snapshot_pos > 0
    assert warm.tokens == cold.tokens
    assert warm.stats.logits_sha256 == cold.stats.logits_sha256
    assert cold.tokens[0] == ref_cold.tokens[0]


@pytest.mark.gpu
def test_engine_parity_on_gpu() -> None:
    """Cold vs warm on the GPU with the Triton kernels: bitwise-identical tokens and digests."""
    from engine.cache.settings import CacheSettings
    from engine.runtime import Engine, SamplingParams
    from engine.settings import EngineSettings

    assert ops.impl_name("cuda") == "triton"
    assert ops.gdn_config("cuda") == "bv=32,warps=4,stages=3"
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
