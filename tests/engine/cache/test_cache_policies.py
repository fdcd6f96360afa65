"""Each policy's victim order on hand-built snapshot sets, and the policy registry."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cache import POLICIES, RadixNode, SnapshotIndex, make_policy, online_policies
from engine.cache.policies import Forecast, Policy, TailPin
from engine.errors import ConfigError


def node_at(pos: int) -> RadixNode:
    """A detached node ending at ``pos`` (policies never look at the tree)."""
    return RadixNode(pos + 1, tuple(range(pos)), [], None, 0)


class Pool:
    """A snapshot index with hand-set entries: ``add(pos, session, tick, hits=0)``."""

    def __init__(self, policy: Policy, slots: int = 64, nbytes: int = 1000) -> None:
        self.index = SnapshotIndex(slots, nbytes, policy)
        self.policy = policy

    def add(self, pos: int, session: str, tick: int, hits: int = 0, last: int | None = None):
        entry = self.index.admit(node_at(pos), pos, session, tick)
        assert entry is not None
        entry.hit_count = hits
        entry.last_access = tick if last is None else last
        return entry

    def resumed(self, session: str, tick: int = 0) -> None:
        self.index.sessions.record(session, tick, continuation=False)
        self.index.sessions.record(session, tick, continuation=True)

    def victim(self, tick: int = 100):
        return self.policy.victim(self.index.candidates(), tick)

    def order(self, tick: int = 100) -> list[int]:
        """Eviction order (entry ids) by repeatedly dropping the victim, until it refuses."""
        out = []
        while self.index.candidates():
            v = self.victim(tick)
            if v is None:
                break
            out.append(v.id)
            self.index.drop(v, "policy")
        return out


# ---- lru ------------------------------------------------------------------------------------


def test_lru_evicts_oldest_use_then_shallower_then_older_id():
    pool = Pool(make_policy("lru"))
    a = pool.add(640, "s", tick=5)
    b = pool.add(128, "s", tick=9)
    c = pool.add(256, "t", tick=3, last=9)  # admitted early, used as anchor at 9
    d = pool.add(128, "u", tick=9)  # same tick and pos as b, newer id
    e = pool.add(64, "u", tick=7, hits=50)  # hits do not matter to lru
    assert pool.order() == [a.id, e.id, b.id, d.id, c.id]


# ---- forecast -------------------------------------------------------------------------------


def test_forecast_evicts_min_last_access_times_one_plus_hits():
    pool = Pool(make_policy("forecast"))
    used = pool.add(64, "s", tick=10, hits=1)  # 10 * 2 = 20
    fresh = pool.add(64, "t", tick=15)  # 15
    old = pool.add(64, "u", tick=12)  # 12
    tie_deep = pool.add(192, "v", tick=20)  # 20, deeper than `used`
    assert pool.order() == [old.id, fresh.id, used.id, tie_deep.id]


def test_forecast_strands_a_deep_idle_conversation_before_fresh_one_shots():
    """The PR 207 pathology: a conversation's intermediate snapshots (never the resume anchor,
    hit_count 0) look like stale one-shots, so forecast evicts them before fresh one-shots."""
    pool = Pool(make_policy("forecast"))
    pool.resumed("conv")
    deep = [pool.add(pos, "conv", tick=t) for t, pos in enumerate(range(1024, 8192, 1024), 1)]
    anchor = pool.add(960, "conv", tick=3, hits=1, last=8)  # resumed at tick 8: score 16
    one_shots = [pool.add(512, f"r{t}", tick=t) for t in range(20, 24)]
    order = pool.order()
    assert order[: len(deep)] == [e.id for e in deep]  # all deep intermediates go first
    assert order[len(deep)] == anchor.id
    assert order[len(deep) + 1 :] == [e.id for e in one_shots]


# ---- tail-pin -------------------------------------------------------------------------------


def test_tail_pin_keeps_top_k_deepest_of_a_resumed_session():
    pool = Pool(make_policy("tail-pin", k=3))
    pool.resumed("conv")
    conv = [pool.add(pos, "conv", tick=t) for t, pos in enumerate(range(64, 64 * 7, 64), 1)]
    one_shots = [pool.add(512, f"r{t}", tick=t) for t in range(20, 23)]
    order = pool.order()
    # the 3 shallowest of conv (not pinned) and the one-shots go, by forecast; then it refuses
    assert order == [conv[0].id, conv[1].id, conv[2].id] + [e.id for e in one_shots]
    assert sorted(e.pos for e in pool.index.entries.values()) == [256, 320, 384]
    assert pool.victim() is None


def test_tail_pin_refuses_admission_when_all_candidates_are_pinned():
    pool = Pool(make_policy("tail-pin", k=2), slots=4)
    pool.resumed("a")
    pool.resumed("b")
    for pos in (64, 128):
        pool.add(pos, "a", tick=1)
        pool.add(pos, "b", tick=1)
    assert pool.index.admit(node_at(192), 192, "c", tick=50) is None
    assert pool.index.counters["admit_refused"] == 1
    assert len(pool.index) == 4


def test_tail_pin_counts_in_use_entries_towards_k_and_pins_only_resumable_sessions():
    pool = Pool(make_policy("tail-pin", k=2))
    pool.resumed("conv")
    shallow = pool.add(64, "conv", tick=50)
    pool.add(128, "conv", tick=1)
    held = pool.add(192, "conv", tick=1)
    held.in_use = 1  # pinned (one of the top 2) even though not a candidate
    idle = [pool.add(pos, "idle", tick=2) for pos in (640, 704, 768)]  # never resumed: no pins
    assert pool.order() == [e.id for e in idle] + [shallow.id]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 20), st.integers(0, 9), st.integers(0, 3), st.integers(0, 2)),
        min_size=1,
        max_size=20,
    )
)
def test_tail_pin_without_resumable_sessions_is_forecast(rows):
    pin = Pool(TailPin(k=8))
    fc = Pool(Forecast())
    for chunks, tick, hits, sess in rows:
        pin.add(64 * chunks, f"s{sess}", tick, hits)
        fc.add(64 * chunks, f"s{sess}", tick, hits)
    assert pin.order() == fc.order()


# ---- two-tier -------------------------------------------------------------------------------


def test_two_tier_evicts_every_non_resumable_snapshot_before_any_resumable_one():
    pool = Pool(make_policy("two-tier"))
    pool.resumed("conv")
    conv_old = pool.add(1024, "conv", tick=1)  # forecast 1: would go first under forecast
    conv_used = pool.add(2048, "conv", tick=2, hits=3)  # 8
    shots = [pool.add(64, f"r{t}", tick=t, hits=h) for t, h in ((40, 0), (30, 1), (35, 0))]
    # non-resumable tier by forecast: 35 (r35), 40 (r40), 60 (r30); then the resumable tier
    assert pool.order() == [shots[2].id, shots[0].id, shots[1].id, conv_old.id, conv_used.id]


# ---- marconi --------------------------------------------------------------------------------


def test_marconi_alpha_zero_is_recency_and_large_alpha_protects_deep_snapshots():
    rec = Pool(make_policy("marconi", alpha=0.0))
    a = rec.add(4096, "s", tick=1)
    b = rec.add(64, "t", tick=5)
    assert rec.victim().id == a.id  # least recent, however much it saves

    deep = Pool(make_policy("marconi", alpha=10.0))
    a = deep.add(4096, "s", tick=1)
    b = deep.add(64, "t", tick=5)
    assert deep.victim().id == b.id  # saves the least compute per byte


def test_marconi_scores_normalised_recency_plus_alpha_normalised_flops_per_byte():
    policy = make_policy("marconi", alpha=1.0, flops_per_token=1.0, attn_flops_coeff=0.0)
    pool = Pool(policy)
    # recency: (0, 0.5, 1); flops/byte linear in pos: (0.5, 0, 1) -> scores 0.5, 0.5, 2.0
    x = pool.add(128, "x", tick=0)
    y = pool.add(64, "y", tick=5)
    pool.add(192, "z", tick=10)
    assert pool.victim().id == y.id  # 0.5 tie broken by the shallower pos
    pool.index.drop(y, "policy")
    assert pool.victim().id == x.id


def test_marconi_flops_include_the_quadratic_attention_term():
    policy = make_policy("marconi", flops_per_token=2.0, attn_flops_coeff=3.0)
    pool = Pool(policy, nbytes=10)
    e = pool.add(64, "s", tick=0)
    assert policy.flops_per_byte(e) == (2.0 * 64 + 3.0 * 64 * 64) / 10


# ---- belady ---------------------------------------------------------------------------------


def test_belady_evicts_the_farthest_next_use_never_used_first():
    future = {}
    policy = make_policy("belady", next_use=lambda e, tick: future[e.id])
    pool = Pool(policy)
    soon = pool.add(640, "s", tick=1)
    late = pool.add(128, "s", tick=2)
    never_deep = pool.add(512, "t", tick=3)
    never_shallow = pool.add(256, "u", tick=4)
    future.update({soon.id: 7, late.id: 30, never_deep.id: math.inf, never_shallow.id: math.inf})
    assert pool.order() == [never_shallow.id, never_deep.id, late.id, soon.id]


# ---- registry -------------------------------------------------------------------------------


def test_registry_and_option_errors():
    assert set(POLICIES) == {"lru", "forecast", "tail-pin", "two-tier", "marconi", "belady",
                             "adaptive"}
    assert "belady" not in online_policies()
    for name in online_policies():
        policy = make_policy(name)
        assert policy.name == name and (policy.__doc__ or "").strip()
    assert make_policy("tail-pin").k == 8
    assert make_policy("marconi").alpha == 1.0
    with pytest.raises(ConfigError, match="unknown policy 'mru'"):
        make_policy("mru")
    with pytest.raises(ConfigError, match="bad options for policy 'forecast'"):
        make_policy("forecast", k=8)
    with pytest.raises(ConfigError, match="simulator-only"):
        make_policy("belady")
    with pytest.raises(ConfigError):
        make_policy("tail-pin", k=-1)


def test_index_rejects_a_policy_choosing_an_in_use_entry():
    class Bad(Policy):
        name = "bad"

        def victim(self, candidates, tick):
            return next(e for e in self.index.entries.values() if e.in_use)

    pool = Pool(Bad(), slots=2)
    held = pool.add(64, "s", tick=0)
    held.in_use = 1
    pool.add(128, "s", tick=0)
    with pytest.raises(RuntimeError, match="ineligible victim"):
        pool.index.admit(node_at(192), 192, "s", tick=1)


def test_should_admit_false_refuses_the_newcomer_and_keeps_the_victim():
    class Picky(Forecast):
        name = "picky"

        def should_admit(self, node, pos, session, tick, victim):
            return pos > victim.pos  # only deeper newcomers get in

    pool = Pool(Picky(), slots=1)
    kept = pool.add(256, "s", tick=0)
    assert pool.index.admit(node_at(128), 128, "t", tick=1) is None
    assert pool.index.counters["admit_refused"] == 1 and list(pool.index.entries) == [kept.id]
    deeper = pool.index.admit(node_at(512), 512, "t", tick=2)
    assert deeper is not None and list(pool.index.entries) == [deeper.id]
    assert pool.index.counters["evictions_policy"] == 1
