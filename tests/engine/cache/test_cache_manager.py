"""CacheManager: the warm-path plan, sessions, admissions, budgets and the stranding scenario."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cache import CacheManager, Plan
from engine.errors import BudgetError, ConfigError, UserError

_fresh = itertools.count(10_000)


def fresh(n: int) -> list[int]:
    """``n`` token ids never used before (so prompts diverge at their first page)."""
    return [next(_fresh) for _ in range(n)]


@pytest.fixture(scope="session")
def manager(config):
    """A CacheManager with the test defaults (conftest.make_config) and these changes."""
    return lambda **kw: CacheManager(config(**kw))


@pytest.fixture(scope="session")
def serve(audit):
    """One request through the manager's API, each admission right after the insert of its
    tokens, auditing the cache with the plan running and after it; returns (plan, full)."""

    def run(cm: CacheManager, prompt: list[int], reply_len: int = 20, session=None):
        plan = cm.begin(prompt, session)
        ps = cm.cfg.page_size
        full = prompt + fresh(reply_len)
        try:
            pages = plan.kv_pages + cm.alloc_pages(
                -(-len(full) // ps) - len(plan.kv_pages), plan)
            for p in plan.admit_positions:
                pages = cm.insert(plan, prompt[:p], pages)
                cm.admit(plan, prompt, p)
            pages = cm.insert(plan, full, pages)
            audit(cm, [plan])
        finally:
            cm.finish(plan, full)
        audit(cm)
        return plan, full

    return run


# ---- the plan -------------------------------------------------------------------------------


def test_cold_then_warm_turn_restores_the_prompt_end_snapshot(manager, serve):
    cm = manager()
    p1 = fresh(300)
    plan1, full1 = serve(cm, p1)
    assert (plan1.tick, plan1.matched, plan1.snapshot, plan1.admit_positions) == (0, 0, None, [256])
    p2 = full1 + fresh(100)  # 320 cached (whole pages of 300 + 20), snapshot at 256
    plan2, _ = serve(cm, p2)
    assert plan2.tick == 1 and plan2.matched == 320
    assert plan2.snapshot is not None and plan2.restore_pos == 256
    assert plan2.admit_positions == [384]
    assert plan2.kv_pages == cm.radix.pages_of(cm.radix.find(p2, 320))
    st_ = cm.stats()
    assert (st_["requests"], st_["hits"], st_["misses"], st_["cold"]) == (2, 1, 0, 1)
    assert (st_["hit_tokens"], st_["replay_tokens"]) == (320, 64)
    assert plan2.snapshot.hit_count == 1 and plan2.snapshot.last_access == 1
    assert plan2.snapshot.in_use == 0  # released by finish


def test_branch_point_is_admitted_by_default_and_not_when_off(manager, serve):
    for on in (True, False):
        cm = manager() if on else manager(branch_admission=False)
        system = fresh(200)
        serve(cm, system + fresh(100))
        plan, _ = serve(cm, system + fresh(100))  # branches off the first at 192 (page 12)
        assert plan.matched == 192 and plan.snapshot is None
        assert plan.admit_positions == ([192, 256] if on else [256])
        assert (cm.radix.find(system, 192).snapshot is not None) == on


def test_match_leaves_at_least_one_token_to_compute(manager, serve, audit):
    cm = manager()
    p = fresh(320)  # a whole number of pages
    serve(cm, p, reply_len=0)
    plan = cm.begin(p)
    assert plan.matched == 304  # not 320: the last token must be computed for logits
    cm.finish(plan, p)
    plan = cm.begin(p[:310])
    assert plan.matched == 304
    cm.abort(plan)
    audit(cm)


def test_miss_counts_only_with_a_kv_match(manager, serve):
    cm = manager(snapshot_slots=0)
    _, full = serve(cm, fresh(100))
    plan, _ = serve(cm, full + fresh(10))
    assert plan.matched == 112 and plan.snapshot is None and plan.restore_pos == 0
    st_ = cm.stats()
    assert (st_["hits"], st_["misses"], st_["cold"], st_["replay_tokens"]) == (0, 1, 1, 112)
    assert st_["admit_refused"] == 2  # slots=0 refuses every admission


@pytest.mark.parametrize(
    ("s", "m", "length", "interval", "expected"),
    [
        (0, 0, 200, 0, [192]),
        (0, 0, 192, 0, [192]),
        (0, 0, 63, 0, []),
        (0, 192, 200, 0, []),
        (64, 128, 300, 0, [256]),
        (0, 0, 300, 128, [128, 256]),
        (0, 0, 330, 128, [128, 256, 320]),
        (0, 208, 600, 256, [256, 512, 576]),
        (0, 256, 600, 256, [512, 576]),
    ],
)
def test_admit_positions_examples(manager, s, m, length, interval, expected):
    cm = manager(snapshot_interval=interval)
    assert cm.admit_positions(s, m, length) == expected


@given(
    s=st.integers(0, 40).map(lambda k: 64 * k),
    extra=st.integers(0, 2000),
    length=st.integers(1, 3000),
    interval=st.sampled_from([0, 64, 128, 512]),
)
@settings(max_examples=150, deadline=None)
def test_admit_positions_match_their_definition(manager, s, extra, length, interval):
    m = (s + extra) // 16 * 16
    cm = manager(snapshot_interval=interval)
    last = length // 64 * 64
    brute = [
        p
        for p in range(64, length + 1, 64)
        if max(s, m) < p and (p == last or (interval and p % interval == 0))
    ]
    assert cm.admit_positions(s, m, length) == brute


def test_final_admit_position(manager):
    cm = manager()
    plan = cm.begin(fresh(300))
    assert plan.admit_positions == [256]
    assert cm.final_admit_position(plan, 310) is None
    assert cm.final_admit_position(plan, 330) == 320
    cm.abort(plan)


# ---- sessions -------------------------------------------------------------------------------


def test_session_is_inherited_through_seq_end_markers(manager, serve):
    cm = manager()
    plan1, full1 = serve(cm, fresh(200))
    assert (plan1.session, plan1.continuation) == ("r0", False)
    assert not cm.sessions.is_resumable("r0")
    plan2, full2 = serve(cm, full1 + fresh(50))
    assert (plan2.session, plan2.continuation) == ("r0", True)
    assert cm.sessions.is_resumable("r0")
    plan3, _ = serve(cm, fresh(200))  # unrelated
    assert (plan3.session, plan3.continuation) == ("r2", False)
    # a prefix of turn 1 that ends before its seq_end marker is not a continuation
    plan4, _ = serve(cm, full1[:150] + fresh(80))
    assert (plan4.session, plan4.continuation) == ("r3", False)
    # branching off after turn 1's end (an edited turn 2) is still r0's continuation
    plan5, _ = serve(cm, full1 + fresh(70))
    assert (plan5.session, plan5.continuation) == ("r0", True)
    assert cm.sessions.get("r0").continuations == 2
    assert cm.stats()["resumable_sessions"] == 1


def test_deepest_marker_wins_and_explicit_session_ids(manager, serve):
    cm = manager()
    _, full1 = serve(cm, fresh(200))  # marker r0 at 208
    plan2, full2 = serve(cm, full1 + fresh(100), session="chat-7")
    assert (plan2.session, plan2.continuation) == ("chat-7", False)  # first time seen
    plan3, _ = serve(cm, full2 + fresh(10))  # passes r0's marker, ends past chat-7's
    assert (plan3.session, plan3.continuation) == ("chat-7", True)
    plan4, _ = serve(cm, fresh(30), session="chat-7")
    assert (plan4.session, plan4.continuation) == ("chat-7", True)  # explicit and seen before
    assert cm.sessions.is_resumable("chat-7") and not cm.sessions.is_resumable("r0")


def test_snapshots_carry_the_session_of_the_request_that_admitted_them(manager, serve):
    cm = manager()
    _, full1 = serve(cm, fresh(200))
    plan2, _ = serve(cm, full1 + fresh(200))
    assert {e.session for e in cm.index.entries.values()} == {"r0"}
    assert sorted(e.pos for e in cm.index.entries.values()) == [192, 384]
    assert plan2.snapshot.pos == 192


# ---- admission ------------------------------------------------------------------------------


def test_admit_is_none_when_a_snapshot_already_sits_there(manager, serve):
    cm = manager()
    prompt = fresh(200)
    _, _ = serve(cm, prompt)
    plan = cm.begin(prompt + fresh(1))  # m = 192: the snapshot at 192 is the anchor
    assert plan.restore_pos == 192
    before = dict(cm.stats())
    assert cm.admit(plan, prompt, 192) is None
    assert cm.stats() == before
    cm.finish(plan, prompt)


def test_admit_requires_inserted_tokens_and_a_running_plan(manager, audit):
    cm = manager()
    prompt = fresh(200)
    plan = cm.begin(prompt)
    with pytest.raises(ValueError, match="inserted first"):
        cm.admit(plan, prompt, 192)
    with pytest.raises(ValueError, match="multiple of the chunk"):
        cm.admit(plan, prompt, 100)
    cm.finish(plan, prompt)
    cm.finish(plan, prompt)  # twice is fine
    with pytest.raises(ValueError, match="not running"):
        cm.admit(plan, prompt, 192)
    audit(cm)


def test_admit_refused_when_policy_names_no_victim_and_in_use_is_never_a_candidate(
        manager, serve, audit):
    cm = manager(snapshot_slots=1, policy="tail-pin", policy_opts={"k": 1})
    _, full1 = serve(cm, fresh(100))  # snapshot at 64 (r0)
    plan, _ = serve(cm, full1 + fresh(100))  # continuation: r0 resumable, restores 64
    assert plan.restore_pos == 64
    # the only slot holds r0's single (pinned) snapshot: one-shots cannot get in
    serve(cm, fresh(100))
    assert cm.stats()["admit_refused"] == 2  # turn 2's 192 and the one-shot's 64
    # while a request holds the snapshot, even forecast has no candidate
    cm2 = manager(snapshot_slots=1)
    _, f = serve(cm2, fresh(100))
    plan = cm2.begin(f + fresh(100))
    assert plan.snapshot is not None
    pages = plan.kv_pages + cm2.alloc_pages(20, plan)
    p = plan.admit_positions[0]
    cm2.insert(plan, (f + [0] * 200)[:p], pages)
    assert cm2.admit(plan, (f + [0] * 200)[:p], p) is None
    cm2.finish(plan, f)
    audit(cm2)


# ---- KV pages -------------------------------------------------------------------------------


def test_insert_returns_the_caches_pages_and_frees_duplicates(manager, audit):
    cm = manager()
    prompt = fresh(100)
    plan = cm.begin(prompt)
    mine = cm.alloc_pages(7, plan)
    assert cm.insert(plan, prompt, mine) == mine  # 6 whole pages; the 7th stays the caller's
    cm.finish(plan, prompt)  # frees the partial 7th page
    assert cm.radix.tree_pages == 6 and cm.radix.pages_in_use == 6

    full = prompt + fresh(12)  # 112 tokens: 7 whole pages
    plan = cm.begin(prompt)  # m = 96: the last page must be recomputed
    assert plan.matched == 96
    x = cm.alloc_pages(1, plan)
    assert cm.insert(plan, full, plan.kv_pages + x) == plan.kv_pages + x  # page 7 is new
    audit(cm, [plan])
    cm.finish(plan, full)

    plan = cm.begin(full)  # m = 96 again (cap 111); page 7 recomputed into y
    y = cm.alloc_pages(1, plan)
    got = cm.insert(plan, full, plan.kv_pages + y)
    assert got == plan.kv_pages + x  # the cached id replaces the duplicate...
    assert y[0] in cm.radix.free_list()  # ...which is freed
    audit(cm, [plan])
    cm.finish(plan, full)
    assert cm.radix.pages_in_use == 7
    audit(cm)


def test_a_plan_keeps_its_matched_path_locked_after_inserting_another_branch(manager, serve, audit):
    cm = manager(kv_pages=8)
    a = fresh(64)
    serve(cm, a, reply_len=0)  # 4 pages
    plan = cm.begin(a + [1])  # locks them
    b = fresh(32)
    cm.insert(plan, b, cm.alloc_pages(2, plan))  # an unrelated branch, also held
    with pytest.raises(BudgetError):
        cm.alloc_pages(3, plan)  # 2 free, nothing evictable
    audit(cm, [plan])
    cm.finish(plan, a)
    assert len(cm.alloc_pages(8)) == 8


def test_kv_eviction_drops_snapshots_on_evicted_nodes(manager, serve):
    cm = manager(kv_pages=30, snapshot_slots=8)
    serve(cm, fresh(200), reply_len=0)  # 12 whole pages cached, snapshot at 192
    serve(cm, fresh(200), reply_len=0)  # 12 whole pages cached, snapshot at 192
    assert cm.stats()["snapshots_in_use"] == 2
    serve(cm, fresh(200), reply_len=0)  # needs 13: evicts the first request's leaf
    st_ = cm.stats()
    assert st_["evictions_kv"] == 1 and st_["snapshots_in_use"] == 2
    assert st_["kv_evicted_pages"] == 12


def test_budget_error_for_a_prompt_larger_than_the_kv_budget_changes_nothing(manager, serve):
    cm = manager(kv_pages=10)
    with pytest.raises(BudgetError, match="needs 11 KV pages"):
        cm.begin(fresh(161))
    assert cm.tick == -1 and cm.stats()["requests"] == 0 and cm.stats()["rejected"] == 1
    with pytest.raises(UserError):
        cm.begin([])
    plan, _ = serve(cm, fresh(150), reply_len=0)
    assert plan.tick == 0


def test_budget_error_mid_request_leaves_the_cache_consistent_and_usable(manager, serve, audit):
    cm = manager(kv_pages=20)
    _, full = serve(cm, fresh(150), reply_len=10)  # 10 pages cached
    plan = cm.begin(full + fresh(5))  # locks those 10
    with pytest.raises(BudgetError, match="need 11 pages"):
        cm.alloc_pages(11, plan)
    assert cm.radix.tree_pages == 10  # nothing evicted
    got = cm.alloc_pages(4, plan)
    audit(cm, [plan])
    cm.abort(plan)  # the engine's `finally` after the error
    audit(cm)
    assert cm.radix.pages_in_use == 10 and got
    plan, _ = serve(cm, fresh(300), reply_len=0)  # evicts the old conversation to fit
    assert cm.radix.tree_pages == 18


def test_stats_and_describe(manager, serve):
    cm = manager(policy="tail-pin", policy_opts={"k": 4}, snapshot_bytes=1000, snapshot_slots=3)
    serve(cm, fresh(100))
    st_ = cm.stats()
    for key in (
        "requests hits misses cold admits admit_refused evictions_policy evictions_kv "
        "pages_in_use pages_total snapshots_in_use snapshot_slots hit_tokens replay_tokens"
    ).split():
        assert isinstance(st_[key], int), key
    assert st_["policy"] == "tail-pin" and st_["snapshot_bytes_total"] == 3000
    assert cm.describe()["policy_opts"] == {"k": 4}


def test_config_errors(manager):
    with pytest.raises(ConfigError, match="multiple of page_size"):
        manager(chunk=60)
    with pytest.raises(ConfigError, match="interval"):
        manager(snapshot_interval=100)
    with pytest.raises(ConfigError, match="unknown policy"):
        manager(policy="nope")


# ---- the stranding scenario (PR 207), end to end ---------------------------------------------


def deep_resume(manager, serve, policy: str, **opts) -> tuple[Plan, list[int]]:
    """A conversation built over 6 turns, idle under 12 one-shots, then resumed."""
    cm = manager(snapshot_slots=8, snapshot_interval=256, policy=policy, policy_opts=opts)
    full = fresh(300)
    for _ in range(6):
        plan, full = serve(cm, full, reply_len=40)
        full = full + fresh(300)
    deepest = max(e.pos for e in cm.index.entries.values() if e.session == "r0")
    for _ in range(12):
        serve(cm, fresh(700), reply_len=10)
    plan = cm.begin(full)
    cm.finish(plan, full)
    return plan, [deepest]


def test_forecast_strands_the_idle_conversation_and_tail_pin_does_not(manager, serve):
    fc, (deepest,) = deep_resume(manager, serve, "forecast")
    pin, _ = deep_resume(manager, serve, "tail-pin", k=4)
    two, _ = deep_resume(manager, serve, "two-tier")
    assert fc.session == pin.session == "r0" and fc.continuation
    assert fc.matched == pin.matched == two.matched
    assert pin.restore_pos == deepest and two.restore_pos == deepest
    assert fc.restore_pos == 0  # every snapshot of the conversation was evicted
    assert fc.matched - fc.restore_pos > 10 * (pin.matched - pin.restore_pos)
