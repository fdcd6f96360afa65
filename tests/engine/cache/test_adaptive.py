"""The `adaptive` policy's rule on hand-built request streams through the real CacheManager."""

from __future__ import annotations

import random

import pytest

from engine.cache.adaptive import _on_path
from engine.cache.manager import CacheConfig, CacheManager

PS, CHUNK = 16, 64


def manager(policy: str = "adaptive", slots: int = 8, branch: bool = False,
            **opts) -> CacheManager:
    return CacheManager(CacheConfig(page_size=PS, chunk=CHUNK, kv_pages=1 << 14,
                                    snapshot_slots=slots, snapshot_bytes=0, snapshot_interval=0,
                                    policy=policy, policy_opts=opts, branch_admission=branch))


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


def _mixed_stream(cm: CacheManager, seed: int, after=None) -> None:
    """Conversations that come back after random gaps, mixed with one-shots; ``after(cm)`` runs
    after every request."""
    rng = random.Random(seed)
    system = fresh(random.Random(99), 256)
    convs: dict[str, list[int]] = {}
    for i in range(300):
        r = rng.random()
        if convs and r < 0.45:
            name = rng.choice(sorted(convs))
            request(cm, convs[name], name)
            convs[name] = grow(convs[name], rng, rng.randrange(64, 400))
            if len(convs[name]) > 4000:  # ends (keeps prompts within a tight KV budget)
                del convs[name]
        elif r < 0.7:
            name = f"c{i}"
            convs[name] = system + fresh(rng, rng.randrange(100, 900))
            request(cm, convs[name], name)
            convs[name] = grow(convs[name], rng, rng.randrange(64, 400))
        else:
            request(cm, fresh(rng, rng.randrange(64, 600)), f"one{i}", reply=1)
        if after is not None:
            after(cm)


def _entry(cm: CacheManager, session: str, pos: int):
    return next(e for e in cm.index.entries.values() if e.session == session and e.pos == pos)


def _audit_tree(cm: CacheManager) -> None:
    """The policy's incremental snapshot tree equals one recomputed from the radix tree."""
    pol = cm.policy
    live = cm.index.entries
    assert set(pol._live) == set(live)
    for e in live.values():
        node, below = e.node.parent, None
        while node is not None:
            if node.snapshot is not None:
                below = node.snapshot
                break
            node = node.parent
        assert pol._below[e.id] is below, e
        deeper = [x for x in live.values() if x is not e and x.session == e.session
                  and x.pos > e.pos and _on_path(e.node, x.node)]
        assert pol._dom[e.id] == len(deeper), e
        cover = float(e.pos - (below.pos if below is not None else 0))
        assert pol._cover[e.id] == (cover * pol.delta if deeper else cover), e


@pytest.mark.parametrize(("kv_pages", "swap"), [(1 << 14, False), (600, False), (600, True)],
                         ids=["kv-ample", "kv-tight", "kv-tight-swap"])
def test_snapshot_tree_is_kept_exact_through_admissions_and_evictions(kv_pages, swap):
    # below(e) and the dominance counts are maintained incrementally (admit, evict by the
    # policy, drop by KV eviction, radix splits): after every request they must equal what a
    # walk of the radix tree gives.
    cm = CacheManager(CacheConfig(page_size=PS, chunk=CHUNK, kv_pages=kv_pages,
                                  snapshot_slots=6, snapshot_bytes=0, snapshot_interval=256,
                                  policy="adaptive", policy_opts={"swap": swap},
                                  branch_admission=True))
    checked = []

    def after(cm_: CacheManager) -> None:
        _audit_tree(cm_)
        checked.append(len(cm_.index.entries))

    _mixed_stream(cm, seed=7, after=after)
    assert cm.index.counters["evictions_policy"] > 0 and max(checked) == 6
    if kv_pages < 1 << 14:
        assert cm.index.counters["evictions_kv"] > 0


def test_options_are_checked():
    from engine.errors import ConfigError

    for opts in ({"delta": 2.0}, {"horizon": 0}, {"duel": 10}):
        with pytest.raises(ConfigError):
            manager(**opts)


def _conv_stream(cm: CacheManager, seed: int, rounds: int = 6) -> list[int]:
    """Four conversations in turn, each turn extending the previous prompt and reply, plus a
    one-shot after each round; returns every resume's replay."""
    rng = random.Random(seed)
    convs = {f"c{i}": fresh(rng, 300 + 100 * i) for i in range(4)}
    replays = []
    for rnd in range(rounds):
        for name in convs:
            m, s = request(cm, convs[name], name)
            if rnd:
                replays.append(m - s)
            convs[name] = grow(convs[name], rng, rng.randrange(80, 300))
        request(cm, fresh(rng, 200), f"one{rnd}", reply=1)
    return replays


def test_swap_moves_a_sessions_snapshot_down_its_path_instead_of_evicting_another():
    # Each request admits its prompt end and its full end: a session holds its restore anchor
    # plus older, dominated snapshots on its path. With swap, a newcomer takes the slot of the
    # deepest such own ancestor (evictable, off the grid, no foreign hit) with no admission
    # test, where the plain rule refuses some newcomers.
    plain = manager(slots=9, swap=False)
    replay_plain = _conv_stream(plain, seed=12)
    cm = manager(slots=9, swap=True)
    pol = cm.policy
    swaps: list[tuple[str, str]] = []  # (victim's session, newcomer's session)
    real_victim = pol.victim

    def victim(candidates, tick):
        offer = pol._offer
        v = real_victim(candidates, tick)
        if pol._swapping is not None:
            assert offer is not None and v is not None and v.id == pol._swapping
            swaps.append((v.session, offer[1]))
        return v

    pol.victim = victim
    replay = _conv_stream(cm, seed=12)
    assert swaps and all(a == b for a, b in swaps)
    assert cm.index.counters["admit_refused"] == 0 < plain.index.counters["admit_refused"]
    assert sum(replay) < sum(replay_plain)
    assert max(replay) < CHUNK  # every resume restores its own last end-of-turn snapshot


def test_swap_spares_grid_snapshots_and_snapshots_other_sessions_hit():
    rng = random.Random(13)
    cm = manager(slots=16, swap=True)
    cm.policy.grid_interval = 256  # what the manager sets from its snapshot interval
    conv = fresh(rng, 356)
    request(cm, conv[:256], "s", reply=0)  # a snapshot at 256: on the grid
    request(cm, conv, "s", reply=0)  # at 320: off the grid, never hit by another session
    deeper = conv + fresh(rng, 200)
    request(cm, deeper, "s", reply=0)  # its tip at 512
    tip = cm.radix.find(deeper, 512)
    assert tip is not None and tip.snapshot is not None
    pol, grid, off = cm.policy, _entry(cm, "s", 256), _entry(cm, "s", 320)
    cand = [grid, off, tip.snapshot]
    assert pol.swap_victim(tip, "s", cand) is off  # the deepest own ancestor off the grid
    assert pol.swap_victim(tip, "other", cand) is None  # only the session's own
    assert pol.swap_victim(tip, "s", [grid, tip.snapshot]) is None  # grid: spared
    pol._foreign[off.id] = 1  # another session restored from it: shared, spared
    assert pol.swap_victim(tip, "s", cand) is None
    assert manager(slots=16, swap=False).policy.swap_victim(tip, "s", [off]) is None  # off


def test_swap_spares_a_first_requests_branch_point_inside_another_sessions_prefix():
    # B's first request branches at 592 inside A's document: the snapshot admitted there (576,
    # owned by B) is where the next reader of that document restores, so swap spares it; B's
    # own prompt end (896, past what it matched) is not spared.
    rng = random.Random(14)
    cm = manager(slots=16, branch=True, swap=True)
    doc = fresh(rng, 1000)
    request(cm, doc, "A")
    b = doc[:600] + fresh(rng, 300)
    assert request(cm, b, "B") == (592, 0)
    shared, tip = _entry(cm, "B", 576), _entry(cm, "B", 896)
    pol = cm.policy
    assert pol.swap_victim(tip.node, "B", [shared]) is None
    assert request(cm, b + fresh(rng, 200), "B") == (896, 896)  # B's second turn
    own, deeper = tip, _entry(cm, "B", 1088)
    assert pol.swap_victim(deeper.node, "B", [shared, own]) is own


def test_swap_forgets_spared_branch_points_whose_nodes_the_kv_tree_evicted():
    from engine.cache.radix import RadixNode

    cm = manager(slots=4, swap=True)
    request(cm, fresh(random.Random(15), 200), "s")  # "s" has made one request
    pol = cm.policy
    pol._shared_prune = 4
    pol.on_match([], 10_000, cm.tick)  # offers below 10,000 lie inside the matched prefix
    live = RadixNode(9_999, (0,), [], cm.radix.root, 0)  # still in the tree (has a parent)
    pol.on_offer(live, 64, "s", cm.tick)
    for i in range(9):  # cut from the tree (parent None): what a KV eviction leaves
        pol.on_offer(RadixNode(10_000 + i, (i,), [], None, 0), 64, "s", cm.tick)
    assert len(pol._shared_nodes) < 4  # pruned as it grew, not one entry per offer
    assert live.id in pol._shared_nodes
