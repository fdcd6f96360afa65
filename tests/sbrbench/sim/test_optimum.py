"""The yardstick: the integer program against exhaustive searches, and floor <= LP <= optimum <=
every policy the manager can run."""

from __future__ import annotations

import functools
import random

import pytest

from sbrbench import sim
from sbrbench.sim import optimum as opt

CHUNK = 64


def _tiny_stream(seed: int, n: int) -> sim.ListStream:
    """Conversations that come back (each turn extends the previous prompt and reply), new
    sessions sharing a system prefix, and one-shots; prompts of 64-600 tokens."""
    rng = random.Random(seed)
    system = tuple(rng.randrange(1000) for _ in range(rng.choice((64, 128, 192))))
    convs: list[tuple[int, ...]] = []
    reqs = []
    for i in range(n):
        r = rng.random()
        if convs and r < 0.5:
            j = rng.randrange(len(convs))
            prompt = convs[j]
        elif r < 0.8:
            prompt = system + tuple(rng.randrange(1000) for _ in range(rng.randrange(20, 300)))
        else:
            prompt = tuple(rng.randrange(1000) for _ in range(rng.randrange(70, 300)))
        reply = tuple(5000 + 100 * i + k for k in range(rng.randrange(1, 80)))
        reqs.append(sim.SimRequest(prompt, reply, len(reply)))
        grown = prompt + reply + tuple(rng.randrange(1000) for _ in range(rng.randrange(10, 150)))
        if convs and r < 0.5:
            convs[j] = grown
        else:
            convs.append(grown)
    return sim.ListStream(reqs)


def _model_brute_force(inst: opt.Instance, slots: int) -> int:
    """The program's model searched exhaustively (memoised over pool states): before a request
    begins any present anchor may be dropped, the rest is held through its offers; an offer may
    be refused or admitted (evicting any unheld snapshot when the pool is full)."""
    demands = inst.demands

    @functools.cache
    def best(i: int, state: frozenset[int]) -> int:
        if i == len(demands):
            return 0
        d = demands[i]
        present = [(k, p) for k, p in d.anchors if k in state]
        out = None
        for mask in range(1 << len(present)):
            keep = [present[b] for b in range(len(present)) if mask >> b & 1]
            drop = {k for k, _ in present} - {k for k, _ in keep}
            replay = d.matched - max((p for _, p in keep), default=0)
            held = frozenset(k for k, _ in keep)
            v = replay + offers(i, 0, state - drop, held)
            out = v if out is None else min(out, v)
        assert out is not None
        return out

    @functools.cache
    def offers(i: int, j: int, state: frozenset[int], held: frozenset[int]) -> int:
        d = demands[i]
        if j == len(d.offers):
            return best(i + 1, state)
        k = d.offers[j][0]
        if k in state:
            return offers(i, j + 1, state, held)
        out = offers(i, j + 1, state, held)  # refuse
        if len(state) < slots:
            out = min(out, offers(i, j + 1, state | {k}, held))
        else:
            for v in state - held:
                out = min(out, offers(i, j + 1, (state - {v}) | {k}, held))
        return out

    return best(0, frozenset())


def _manager_brute_force(stream: sim.ListStream, cache: sim.SimCache, cost,
                         limit: int = 800) -> int | None:
    """Every victim/refuse choice the manager allows, through the real CacheManager (a scripted
    policy replays each sequence of choices); None if the search exceeds ``limit`` runs."""
    cfg = cache.config()

    def run(choices: list[int]) -> tuple[int, int | None]:
        s = sim.Simulator(cfg, cost)
        step = [0]
        options_at_end: list[int] = []

        def victim(candidates, tick):
            opts = [None, *sorted(candidates, key=lambda e: e.id)]
            k = step[0]
            step[0] += 1
            if k < len(choices):
                return opts[choices[k]]
            if not options_at_end:
                options_at_end.append(len(opts))
            return None

        s.cm.policy.victim = victim  # type: ignore[method-assign]
        replay = sum(s.step(r).use.replay_tokens for r in stream)
        return replay, options_at_end[0] if options_at_end and step[0] > len(choices) else None

    best = None
    stack: list[list[int]] = [[]]
    runs = 0
    while stack:
        prefix = stack.pop()
        runs += 1
        if runs > limit:
            return None
        replay, branching = run(prefix)
        if branching is None:
            best = replay if best is None else min(best, replay)
            continue
        stack.extend(prefix + [o] for o in range(branching))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_program_is_exact_on_tiny_streams(seed, sim_cache, cost) -> None:
    rng = random.Random(seed)
    stream = _tiny_stream(seed, rng.randrange(3, 9))
    slots = rng.choice((1, 2, 3))
    cache = sim_cache("lru", slots, 0 if seed % 2 else 128, 1 << 14)
    inst = opt.extract(stream, cache)
    ys = opt.yardstick(inst, slots)[0]
    brute = _model_brute_force(inst, slots)
    assert ys.optimum == brute, (ys, brute)
    assert ys.floor <= ys.lp + 1e-6 <= brute + 1e-6 and ys.bound <= brute
    manager = _manager_brute_force(stream, cache, cost)
    if manager is not None:
        assert brute <= manager
    for name in ("lru", "forecast", "tail-pin", "marconi", "adaptive", "belady", "belady-gain"):
        v = sim.variants([name])[0]
        run = sim.run_policy(stream, cache, v, cost)
        assert [r.use.cached_tokens for r in run.rows] == inst.matched  # the KV assumption
        replay = run.summary()["replay_tokens"]
        assert brute <= replay, name
        if manager is not None:
            assert manager <= replay, name


def test_program_finds_what_belady_misses(sim_cache, cost) -> None:
    # A deep conversation's ladder (prompt end and end of turn) against two other sessions with
    # one snapshot each: belady counts the ladder's shallow rung as used (the next turn extends
    # it) though the next turn restores the deep one, and evicts another session's only one.
    rng = random.Random(1)

    def fresh(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(1000) for _ in range(n))

    deep = fresh(1000)
    a, b = fresh(300), fresh(300)
    reply = tuple(range(5000, 5040))
    reqs = [sim.SimRequest(deep, reply, 40), sim.SimRequest(a, (1,), 1),
            sim.SimRequest(b, (2,), 1), sim.SimRequest(deep + reply + fresh(100), (3,), 1),
            sim.SimRequest(a + fresh(50), (4,), 1), sim.SimRequest(b + fresh(50), (5,), 1)]
    stream = sim.ListStream(reqs)
    cache = sim_cache("lru", 3, 0, 1 << 14)
    inst = opt.extract(stream, cache)
    ys = opt.yardstick(inst, 3)[0]
    bel = sim.run_policy(stream, cache, sim.ORACLES["belady"], cost).summary()["replay_tokens"]
    assert ys.optimum is not None and ys.optimum < bel
    assert ys.optimum == _model_brute_force(inst, 3)


def test_floor_is_the_unlimited_pool_and_lp_bounds_large_pools(sim_cache, cost,
                                                               trace_slice) -> None:
    stream = sim.load_trace(trace_slice(120))
    cache = sim_cache("lru", 8, 4096, 1 << 22, model="a3b-proxy", dtype_bytes=2)
    inst = opt.extract(stream, cache)
    big = sim_cache("lru", 100_000, 4096, 1 << 22, model="a3b-proxy", dtype_bytes=2)
    lru = sim.run_policy(stream, big, sim.variants(["lru"])[0], cost).summary()
    assert inst.floor == lru["replay_tokens"]
    small, prog, sol = opt.yardstick(inst, 8, time_limit=30)
    huge = opt.yardstick(inst, 100_000, exact=False)[0]
    assert huge.lp == pytest.approx(inst.floor)
    assert inst.floor <= small.bound
    assert small.optimum is not None and small.bound == small.optimum
    assert sol is not None
    # the optimum's schedule run through the manager: achievable, at least the optimum, and
    # here no worse than any policy that does not know the future
    followed = opt.follow(stream, cache, inst, prog, sol, cost).summary()["replay_tokens"]
    assert small.optimum <= followed
    for name in ("lru", "marconi", "adaptive", "belady-gain"):
        run = sim.run_policy(stream, cache, sim.variants([name])[0], cost)
        assert small.optimum <= run.summary()["replay_tokens"]
        if name != "belady-gain":
            assert followed <= run.summary()["replay_tokens"]


def test_gap_closed_is_measured_against_the_best_simple_policy() -> None:
    replay = {"lru": 100.0, "forecast": 90.0, "marconi": 80.0, "adaptive": 50.0}
    assert opt.gap_closed(replay, 20.0) == pytest.approx(0.5)
    assert opt.gap_closed(replay, 80.0) is None  # nothing to close
    assert opt.gap_closed({"adaptive": 1.0}, 0.0) is None
