"""The simulator runs the engine's own cache path: same configuration, same decisions."""

from __future__ import annotations

import random

import pytest

from engine.cache.settings import CacheSettings
from engine.runtime import Engine, SamplingParams
from sbrbench import sim

KV_TOKENS = 512  # small enough that the KV pool evicts (and drops snapshots with it)


@pytest.mark.parametrize("policy", ["lru", "forecast", "tail-pin", "two-tier", "marconi",
                                    "adaptive"])
def test_cache_config_is_the_engines(sim_cache, policy: str) -> None:
    opts = {"k": 2} if policy == "tail-pin" else {}
    eng = Engine.from_preset("tiny", cache=CacheSettings(
        policy=policy, policy_opts=opts, snapshot_slots=5, snapshot_interval=128,
        kv_budget_tokens=4096))
    assert eng.cm is not None
    assert sim_cache(policy, 5, 128, 4096, **opts).config() == eng.cm.cfg


def _engine_stream(policy: str, opts: dict[str, object]) -> tuple[list[tuple], list, dict]:
    """Multi-turn conversations interleaved with one-shot pressure, through the tiny engine."""
    eng = Engine.from_preset("tiny", cache=CacheSettings(
        policy=policy, policy_opts=opts, snapshot_slots=3, snapshot_interval=128,
        kv_budget_tokens=KV_TOKENS))
    rnd = random.Random(3)
    convs = [[rnd.randrange(256) for _ in range(rnd.randrange(70, 140))] for _ in range(2)]
    sent, decided = [], []

    def send(prompt: list[int], max_tokens: int) -> list[int]:
        r = eng.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        u = r.stats.cache
        sent.append(sim.SimRequest(tuple(prompt), tuple(r.tokens), max_tokens))
        decided.append((u.cached_tokens, u.snapshot_pos, u.replay_tokens))
        return r.tokens

    for turn in range(3):
        for c in range(2):
            reply = send(convs[c], 10)
            convs[c] = convs[c] + reply + [rnd.randrange(256) for _ in range(rnd.randrange(20, 70))]
            if turn % 2 == 1:  # one-shot pressure between turns
                send([rnd.randrange(256) for _ in range(rnd.randrange(70, 140))], 4)
    return decided, sent, eng.cache_stats()


@pytest.mark.parametrize(
    ("policy", "opts"),
    [("lru", {}), ("forecast", {}), ("tail-pin", {"k": 1}), ("two-tier", {}), ("marconi", {}),
     ("adaptive", {})],
)
def test_simulator_decides_exactly_as_the_engine(sim_cache, cost, policy: str,
                                                 opts: dict[str, object]) -> None:
    engine_rows, stream, engine_stats = _engine_stream(policy, opts)
    s = sim.Simulator(sim_cache(policy, 3, 128, KV_TOKENS, **opts).config(), cost)
    sim_rows = [(r.use.cached_tokens, r.use.snapshot_pos, r.use.replay_tokens)
                for r in (s.step(req) for req in stream)]
    assert sim_rows == engine_rows
    st = s.cm.stats()
    for key in ("hits", "misses", "admits", "admit_refused", "evictions_policy", "evictions_kv",
                "kv_evicted_pages", "pages_in_use", "sessions", "resumable_sessions"):
        assert st[key] == engine_stats[key], key
    # the stream exercises the decisions it is meant to check
    assert any(r[1] > 0 for r in engine_rows) and any(r[2] > 0 for r in engine_rows)
    assert st["evictions_policy"] > 0 and st["kv_evicted_pages"] > 0


def test_refused_requests_are_rows_with_the_engines_error(sim_cache, cost) -> None:
    s = sim.Simulator(sim_cache("lru", 2, 0, 256).config(), cost, max_context=300)
    rows = [s.step(sim.SimRequest((), (1,), 1)),
            s.step(sim.SimRequest(tuple(range(200)), (1,), 200)),
            s.step(sim.SimRequest(tuple(range(250)), (1,), 20)),
            s.step(sim.SimRequest(tuple(range(100)), (1,), 4))]
    assert [r.tick for r in rows] == [-1, -1, -1, 0]
    assert rows[0].error == "UserError: empty prompt: at least one token is needed"
    assert rows[1].error is not None and "exceeds the context of 300" in rows[1].error
    assert rows[2].error is not None and "KV budget is 256 tokens" in rows[2].error
    assert rows[3].error is None and rows[3].use.prompt_tokens == 100
    run = sim.PolicyRun(sim.PolicyVariant("lru", "lru", {}), rows, s.cm.stats(), [""] * 4,
                        0.0, 2)
    summ = run.summary()
    assert summ["errors"] == 3 and summ["requests"] == 4 and summ["prompt_tokens"] == 100
