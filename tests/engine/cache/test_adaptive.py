"""The `adaptive` policy's rule on hand-built request streams through the real CacheManager."""

from __future__ import annotations

import random

import pytest

from engine.cache.manager import CacheConfig, CacheManager

PS, CHUNK = 16, 64


def manager(policy: str = "adaptive", slots: int = 8, branch: bool = False,
            **opts) -> CacheManager:
    return CacheManager(CacheConfig(page_size=PS, chunk=CHUNK, kv_pages=1 << 14,
                                    snapshot_slots=slots, snapshot_interval=0, policy=policy,
                                    policy_opts=opts, branch_admission=branch))


def request(cm: CacheManager, prompt: list[int], session: str, reply: int = 16) -> tuple[int, int]:
    """One request as the engine/simulator drive it; returns (matched, restore_pos)."""
    plan = cm.begin(prompt, session)
    L = len(prompt)
    pages = plan.kv_pages + cm.alloc_pages(-(-(L + reply) // PS) - plan.matched // PS, plan)
    pages = cm.insert(plan, prompt[: L // PS * PS], pages)
    for p in plan.admit_positions:
        cm.admit(plan, prompt, p)
    full = prompt + [10**6 + len(prompt) + i for i in range(reply)]
    cm.insert(plan, full[: len(full) // PS * PS], pages)
    end = len(full) // CHUNK * CHUNK
    if end > L // CHUNK * CHUNK:
        cm.admit(plan, full, end)
    cm.finish(plan, full)
    return plan.matched, plan.restore_pos


def fresh(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 900000) for _ in range(n)]


def grow(history: list[int], rng: random.Random, n: int) -> list[int]:
    return history + [10**6 + len(history) + i for i in range(16)] + fresh(rng, n)


def test_deep_idle_conversation_keeps_its_tail_under_one_shot_pressure():
    rng = random.Random(0)
    out = {}
    for policy in ("forecast", "adaptive"):
        cm = manager(policy, slots=8)
        conv = fresh(rng := random.Random(1), 300)
        for _ in range(10):  # build: a deep conversation, turn after turn
            request(cm, conv, "deep")
            conv = grow(conv, rng, 200)
        request(cm, conv, "deep")
        for i in range(40):  # idle under one-shot pressure
            request(cm, fresh(rng, 150), f"one{i}", reply=1)
        m, s = request(cm, grow(conv, rng, 40), "deep")
        out[policy] = m - s
    assert out["forecast"] > 1000  # stranded
    assert out["adaptive"] < CHUNK  # resumes from its tail


def test_round_robin_keeps_each_conversations_deepest():
    rng = random.Random(2)
    cm = manager(slots=8)
    convs = {f"c{i}": fresh(rng, 200) for i in range(6)}
    replays = []
    for rnd in range(8):
        for name in convs:
            m, s = request(cm, convs[name], name)
            if rnd >= 1:
                replays.append(m - s)
            convs[name] = grow(convs[name], rng, rng.randrange(32, 160))
    # every resume restores its own last end-of-turn snapshot: replay < one chunk
    assert max(replays) < CHUNK


def test_shared_prefix_snapshot_with_many_hits_survives():
    rng = random.Random(3)
    cm = manager(slots=6, branch=True)
    system = fresh(rng, 512)
    request(cm, system + fresh(rng, 100), "first")
    request(cm, system + fresh(rng, 100), "second")  # branches at 512: admitted there
    node = cm.radix.find(system, 512)
    assert node is not None and node.snapshot is not None
    shared = node.snapshot
    replay = []
    for i in range(60):  # one-shots through the shared prefix (each adds its own snapshot)
        m, s = request(cm, system + fresh(rng, 200), f"u{i}")
        replay.append(m - s)
    assert node.snapshot is shared and shared.hit_count >= 60
    assert max(replay) == 0


def test_should_admit_refuses_a_newcomer_worth_less_than_the_victim():
    rng = random.Random(4)
    cm = manager(slots=4)
    convs = {f"c{i}": fresh(rng, 1000) for i in range(4)}
    for _ in range(3):  # four resumed conversations fill the pool with their tails
        for name in convs:
            request(cm, convs[name], name)
            convs[name] = grow(convs[name], rng, 100)
    for _ in range(5):  # fresh sessions die out: the learned survival of a 1-request session
        for i in range(20):  # falls (each is idle past the horizon by the next batch)
            request(cm, fresh(rng, 70), f"x{_}-{i}", reply=1)
        for name in convs:
            request(cm, convs[name], name)
            convs[name] = grow(convs[name], rng, 100)
    refused = cm.index.counters["admit_refused"]
    assert refused > 0
    # a refused one-shot never displaced a conversation's tail
    sessions = {e.session for e in cm.index.entries.values()}
    assert sessions == set(convs)
    before = cm.index.counters["admit_refused"]
    request(cm, fresh(rng, 70), "late", reply=1)
    assert cm.index.counters["admit_refused"] == before + 1


def _entry(cm: CacheManager, session: str, pos: int):
    return next(e for e in cm.index.entries.values() if e.session == session and e.pos == pos)


def test_thin_evicts_the_dominated_snapshot_nearest_the_next_deeper_one():
    # One session's ladder 0 < 1024 < 1088 < 4096 (tail): 1088 sits next to 1024 and saves
    # little over it; 1024 covers [0, 1024). Plain delta ranks the dominated ones by the
    # replay below them (evicts 1024's neighbour only if shallower); thinning evicts 1024.
    rng = random.Random(5)
    conv = fresh(rng, 4200)
    victims = {}
    for thin in (0.0, 1.0):
        cm = manager(slots=4, thin=thin)
        for p in (1024, 1088, 4096):  # prefixes of one conversation: a ladder of snapshots
            request(cm, conv[:p], "s", reply=0)
        request(cm, fresh(rng, 300), "other", reply=0)  # fills the pool (4 entries)
        victim = cm.policy.victim(cm.index.candidates(), cm.tick)
        victims[thin] = victim.pos
    assert victims[0.0] == 1088  # delta * gap: 0.05 * 64 < 0.05 * 1024
    assert victims[1.0] == 1024  # thinning: 1024 * (1088-1024)/1088 < 64 * (4096-1088)/3072


def test_gdsf_aging_inflation_rises_to_each_victims_priority():
    # GDSF: L becomes the priority of every policy victim, and an entry's priority is its value
    # plus L at its last use, so snapshots admitted after evictions start above idle old ones.
    rng = random.Random(6)
    cm = manager(slots=4, aging="gdsf", admit_control=False)
    pol = cm.policy
    conv = fresh(rng, 1500)
    for _ in range(4):
        request(cm, conv, "deep", reply=0)
        conv = grow(conv, rng, 100)
    chosen: list[tuple[int, float]] = []
    pick = pol.victim

    def spy(candidates, tick):
        v = pick(candidates, tick)
        chosen.append(pol._chosen)
        return v

    pol.victim = spy
    for i in range(12):
        before = set(cm.index.entries)
        request(cm, fresh(rng, 300), f"one{i}", reply=0)
        (vid,) = before - set(cm.index.entries)
        prios = [pr for c_id, pr in chosen if c_id == vid]
        assert prios and pol._L >= prios[-1]
        assert pol._L == pytest.approx(max(pr for _, pr in chosen))
    assert pol._L > 0
    newest = max(cm.index.entries.values(), key=lambda e: e.id)
    raw = pol.values([newest], cm.tick, inflate=False)[newest.id]
    assert pol.values([newest], cm.tick)[newest.id] - raw == pytest.approx(pol._base[newest.id])
    assert pol._base[newest.id] > 0


def test_admit_margin_admits_what_plain_admission_control_refuses():
    rng = random.Random(4)
    refused = {}
    for margin in (1.0, 1e6):
        cm = manager(slots=4, admit_margin=margin)
        convs = {f"c{i}": fresh(rng, 1000) for i in range(4)}
        for _ in range(3):
            for name in convs:
                request(cm, convs[name], name)
                convs[name] = grow(convs[name], rng, 100)
        for i in range(20):
            request(cm, fresh(rng, 70), f"x{i}", reply=1)
        refused[margin] = cm.index.counters["admit_refused"]
    assert refused[1.0] > 0 and refused[1e6] == 0
