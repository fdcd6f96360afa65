"""The `adaptive` policy's rule on hand-built request streams through the real CacheManager."""

from __future__ import annotations

import random

import pytest

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


def _mixed_stream(cm: CacheManager, seed: int) -> None:
    """Conversations that come back after random gaps, mixed with one-shots (the stream the
    duel tests replay under several admission rules)."""
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


@pytest.mark.parametrize("kv_pages", [1 << 14, 600], ids=["kv-ample", "kv-tight"])
def test_duel_shadows_replay_exactly_what_strict_and_lenient_pools_would(kv_pages):
    # The strict shadow is the rule as is, the lenient one the rule without admission control:
    # each must count the very replay a real pool under that rule causes.
    def run(**opts) -> CacheManager:
        cm = CacheManager(CacheConfig(page_size=PS, chunk=CHUNK, kv_pages=kv_pages,
                                      snapshot_slots=6, snapshot_bytes=0, snapshot_interval=0,
                                      policy="adaptive", policy_opts=opts,
                                      branch_admission=True))
        _mixed_stream(cm, seed=7)
        return cm

    duel, strict, lenient = run(duel=50), run(), run(admit_control=False)
    shadows = duel.policy._shadows
    assert shadows is not None
    for shadow in shadows:  # never over capacity, never an entry on an evicted node
        assert len(shadow.entries) <= 6
        assert all(e.node.parent is not None for e in shadow.entries.values())
    if kv_pages < 1 << 14:
        # the offered positions (hence radix splits, hence KV victims) follow the real pool's
        # restores, so under KV pressure a shadow is only an estimate: it must drop what the
        # KV tree evicts
        assert strict.index.counters["evictions_kv"] > 0
        assert all(shadow.dropped_kv > 0 for shadow in shadows)
        return
    assert strict.counters["replay_tokens"] != lenient.counters["replay_tokens"]
    assert shadows[0].replay == strict.counters["replay_tokens"]
    assert shadows[1].replay == lenient.counters["replay_tokens"]
    assert shadows[0].refused == strict.index.counters["admit_refused"] > 0
    assert shadows[1].refused == 0


def test_duel_admits_as_the_shadow_with_less_decayed_replay():
    rng = random.Random(4)
    cm = manager(slots=4, duel=20)
    pol = cm.policy
    convs = {f"c{i}": fresh(rng, 1000) for i in range(4)}
    for _ in range(3):  # as in the admission-control test: one-shots get refused
        for name in convs:
            request(cm, convs[name], name)
            convs[name] = grow(convs[name], rng, 100)
    for i in range(20):
        request(cm, fresh(rng, 70), f"x{i}", reply=1)
    strict, lenient = pol._shadows
    assert strict.score < lenient.score  # refusing the one-shots kept the tails: strict leads
    assert not pol.lenient()
    refused = cm.index.counters["admit_refused"]
    request(cm, fresh(rng, 70), "early", reply=1)
    assert cm.index.counters["admit_refused"] == refused + 1  # strict: refused
    lenient.score = strict.score - 1.0  # the lenient shadow leads: the real pool follows it
    assert pol.lenient()
    request(cm, fresh(rng, 70), "late", reply=1)
    assert cm.index.counters["admit_refused"] == refused + 1
    assert any(e.session == "late" for e in cm.index.entries.values())


def test_duel_decay_is_an_exponential_window_over_requests():
    cm = manager(slots=2, duel=4)
    strict, _ = cm.policy._shadows
    rng = random.Random(8)
    conv = fresh(rng, 300)
    request(cm, conv, "a")
    conv = grow(conv, rng, 700)
    strict.score = 100.0
    m, s = request(cm, conv, "a")
    assert strict.score == pytest.approx(100.0 * 0.75 + (m - s))


@pytest.mark.parametrize("opts", [{"duel": -1}, {"duel": 10, "aging": "gdsf"},
                                  {"duel": 10, "admit_control": False}])
def test_duel_rejects_options_it_cannot_combine_with(opts):
    from engine.errors import ConfigError

    with pytest.raises(ConfigError):
        manager(**opts)


def test_empirical_hazard_lets_an_idle_session_fade_when_gaps_are_short():
    # Every past gap was 1-4 requests; a session idle for 40 requests has outlived them all.
    # The heavy-tailed rate form still gives it prior / (tau + idle) > 0 of a fresh session's
    # value; the empirical hazard sees that almost no session comes back after such a wait.
    vals = {}
    for hazard in ("rate", "empirical"):
        cm = manager(slots=64, hazard=hazard)
        rng = random.Random(9)
        convs = {f"c{i}": fresh(rng, 300) for i in range(4)}
        for _ in range(6):  # short gaps, learned by both
            for name in convs:
                request(cm, convs[name], name)
                convs[name] = grow(convs[name], rng, 100)
        request(cm, fresh(rng, 300), "idle")
        for i in range(40):
            request(cm, convs[f"c{i % 4}"], f"c{i % 4}")
            convs[f"c{i % 4}"] = grow(convs[f"c{i % 4}"], rng, 100)
        request(cm, fresh(rng, 300), "fresh")
        pol = cm.policy
        p_idle = pol._return_prob("idle", cm.tick, pol._tau_fresh())
        p_fresh = pol._return_prob("fresh", cm.tick, pol._tau_fresh())
        vals[hazard] = p_idle / p_fresh
    assert vals["rate"] > 0.05
    assert vals["empirical"] < 0.2 * vals["rate"]


def test_empirical_hazard_of_a_fresh_session_is_the_rate_form():
    # idle 0: P(back) = prior and the expected wait is the mean gap, as in the rate form
    cm = manager(slots=8, hazard="empirical")
    rng = random.Random(10)
    conv = fresh(rng, 300)
    for _ in range(5):
        request(cm, conv, "a")
        conv = grow(conv, rng, 100)
    pol = cm.policy
    prior = pol._survival(1)
    assert pol._empirical_rate(prior, 0) == pytest.approx(prior / (pol._gap_sum / pol._gap_n))


def test_duel_hazard_shadows_replay_what_each_form_and_admission_would():
    def run(**opts) -> CacheManager:
        cm = manager(slots=6, branch=True, **opts)
        _mixed_stream(cm, seed=11)
        return cm

    duel = run(duel=50, duel_hazard=True)
    shadows = duel.policy._shadows
    assert [(sh.hazard, sh.strict) for sh in shadows] == [
        ("rate", True), ("rate", False), ("empirical", True), ("empirical", False)]
    plain = {(h, ac): run(hazard=h, admit_control=ac)
             for h in ("rate", "empirical") for ac in (True, False)}
    replays = {k: cm.counters["replay_tokens"] for k, cm in plain.items()}
    assert len(set(replays.values())) > 2  # the four rules differ on this stream
    for sh in shadows:
        assert sh.replay == replays[(sh.hazard, sh.strict)]
    best = min(shadows, key=lambda sh: sh.score)
    assert duel.policy.leader() == (best.hazard, best.strict)
    assert duel.policy._pool.hazard == best.hazard


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
    plain = manager(slots=9)
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
    assert manager(slots=16).policy.swap_victim(tip, "s", [off]) is None  # option off


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


def test_duel_shadows_follow_swap_exactly():
    # Without KV pressure a strict shadow with swap counts the replay of a real pool with swap.
    def run(**opts) -> CacheManager:
        cm = manager(slots=6, branch=True, **opts)
        _mixed_stream(cm, seed=7)
        return cm

    duel, strict, lenient = run(duel=50, swap=True), run(swap=True), run(
        swap=True, admit_control=False)
    assert strict.counters["replay_tokens"] != run().counters["replay_tokens"]
    s_shadow, l_shadow = duel.policy._shadows
    assert s_shadow.replay == strict.counters["replay_tokens"]
    assert l_shadow.replay == lenient.counters["replay_tokens"]


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
