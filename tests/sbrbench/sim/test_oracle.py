"""The offline references: Belady's next use (classic and per replay token saved), bypass."""

from __future__ import annotations

import random

from sbrbench import sim


def _seq(seed: int, n: int) -> tuple[int, ...]:
    rnd = random.Random(seed)
    return tuple(rnd.randrange(1000) for _ in range(n))


def _req(prompt: tuple[int, ...]) -> sim.SimRequest:
    return sim.SimRequest(prompt, (7,), 1)


def _run(sim_cache, cost, stream: sim.ListStream, policy: str,
         slots: int = 2) -> tuple[list[sim.SimRow], sim.PolicyRun]:
    run = sim.run_policy(stream, sim_cache(policy, slots), sim.PolicyVariant(policy, policy, {}),
                         cost)
    return run.rows, run


def test_belady_evicts_the_snapshot_never_used_again(sim_cache, cost) -> None:
    A, B, C = _seq(1, 130), _seq(2, 130), _seq(3, 130)
    # each of A, B, C leaves one snapshot (at 128); only A is resumed later
    stream = sim.ListStream([_req(A), _req(B), _req(C), _req(A + _seq(4, 40))])
    bel, _ = _run(sim_cache, cost, stream, "belady")
    lru, _ = _run(sim_cache, cost, stream, "lru")
    assert bel[3].use.snapshot_pos == 128 and bel[3].use.replay_tokens == 0
    assert lru[3].use.snapshot_pos == 0 and lru[3].use.replay_tokens == 128  # LRU dropped A first


def test_belady_evicts_the_farthest_next_use(sim_cache, cost) -> None:
    A, B, C = _seq(1, 130), _seq(2, 130), _seq(3, 130)
    stream = sim.ListStream(
        [_req(A), _req(B), _req(C), _req(B + _seq(5, 30)), _req(A + _seq(6, 30))]
    )
    rows, run = _run(sim_cache, cost, stream, "belady")
    # at C's admission both A (next use: request 4) and B (request 3) are live: A goes
    assert rows[3].use.snapshot_pos == 128 and rows[4].use.snapshot_pos == 0
    assert run.stats["evictions_policy"] >= 1


def test_belady_next_use_needs_the_whole_prefix_within_the_matchable_part(sim_cache,
                                                                          cost) -> None:
    A = _seq(1, 130)
    other = A[:64] + _seq(9, 100)  # shares only A's first chunk: cannot resume at 128
    exact = A[:128]  # extends A to 128 but leaves nothing to compute past it: cap = 112
    stream = sim.ListStream([_req(A), _req(other), _req(exact), _req(A + (1,))])
    base = sim_cache("belady", 4).config()
    fut = sim.FutureIndex(stream, base)
    s = sim.Simulator(base._replace(policy_opts={"next_use": fut.next_use}), cost,
                      on_admit=fut.on_admit)
    fut.now = 0
    s.step(stream.requests[0])
    entry = next(e for e in s.cm.index.entries.values() if e.pos == 128)
    assert fut.next_use(entry, 0) == 3
    fut.now = 3
    assert fut.next_use(entry, 3) == float("inf")  # memo moves past a use


def test_offline_references_beat_recency_on_a_trace_slice(sim_cache, cost, trace_slice) -> None:
    stream = sim.load_trace(trace_slice(400))
    base = sim_cache("lru", 8, 4096, 1 << 22, model="a3b-proxy", dtype_bytes=2)
    fut = sim.FutureIndex(stream, base.config())
    replay = {}
    for v in sim.with_belady(sim.variants(["lru", "forecast", "marconi"])):
        run = sim.run_policy(stream, base, v, cost, future=fut)
        replay[v.name] = run.summary()["replay_tokens"]
    assert replay["belady"] < min(replay["lru"], replay["forecast"])
    # classic Belady ignores how much a use saves: the gain-aware oracle does better here
    assert replay["belady-gain"] < min(replay.values()) + 1
    assert replay["belady-gain"] < replay["belady"]


def test_branch_admission_reaches_the_manager_and_the_oracle(sim_cache, cost,
                                                             trace_slice) -> None:
    stream = sim.load_trace(trace_slice(200))
    on_cache = sim_cache("lru", 8, 4096, 1 << 22, model="a3b-proxy", dtype_bytes=2)
    off_cache = sim_cache("lru", 8, 4096, 1 << 22, model="a3b-proxy", dtype_bytes=2,
                          branch_admission=False)
    assert on_cache.config().branch_admission  # the default
    bel = sim.ORACLES["belady"]
    on = sim.run_policy(stream, on_cache, bel, cost).summary()
    off = sim.run_policy(stream, off_cache, bel, cost).summary()
    # every request shares the 512-token system block: a snapshot there is a branch point
    assert on["snapshot_hits"] > off["snapshot_hits"] + 100
    assert on["replay_tokens"] < off["replay_tokens"]


def test_bypass_reference_refuses_a_newcomer_never_used_again(sim_cache, cost) -> None:
    A, B = _seq(1, 130), _seq(2, 130)
    stream = sim.ListStream([_req(A), _req(B), _req(A + _seq(4, 40))])
    one = sim_cache("belady", 1)
    plain = sim.run_policy(stream, one, sim.ORACLES["belady-gain"], cost)
    bypass = sim.run_policy(stream, one, sim.variants(["belady-gain-bypass"])[0], cost)
    assert plain.rows[2].use.snapshot_pos == 0  # B pushed A out of the single slot
    assert bypass.rows[2].use.snapshot_pos == 128 and bypass.stats["admit_refused"] >= 1


def test_belady_knows_the_next_use_of_a_branch_point_snapshot(sim_cache, cost) -> None:
    S = _seq(10, 256)
    A, B, C = S + _seq(11, 100), S + _seq(12, 100), S + _seq(13, 100)
    stream = sim.ListStream([_req(A), _req(B), _req(C)])
    # B branches off A at 256 (admitted there, then at its own 320): with two slots belady must
    # keep the branch snapshot, used by C, over A's 320, never used again (a tie at 'never'
    # would evict the shallower, the branch snapshot)
    run = sim.run_policy(stream, sim_cache("lru", 2), sim.ORACLES["belady"], cost)
    assert [r.use.snapshot_pos for r in run.rows] == [0, 0, 256]
    off = sim.run_policy(stream, sim_cache("lru", 2, branch_admission=False),
                         sim.ORACLES["belady"], cost)
    assert off.rows[2].use.snapshot_pos == 0  # no snapshot at the branch point without it


def test_adaptive_told_which_sessions_return_drops_the_others(sim_cache, cost) -> None:
    # A and B are conversations of two turns; the one-shots between them never come back. Told
    # which sessions return, the rule values the one-shots' snapshots at zero: they are refused
    # or go first, so both second turns restore their first turn's snapshot (at 640); the rule
    # without the oracle fact loses at least one.
    A, B = _seq(1, 700), _seq(2, 700)
    reqs = [sim.SimRequest(A, (7,), 1, session="A"), sim.SimRequest(B, (8,), 1, session="B")]
    reqs += [sim.SimRequest(_seq(10 + i, 900), (9,), 1, session=f"one{i}") for i in range(6)]
    reqs += [sim.SimRequest(A + (7,) + _seq(30, 80), (1,), 1, session="A"),
             sim.SimRequest(B + (8,) + _seq(31, 80), (1,), 1, session="B")]
    stream = sim.ListStream(reqs)
    from sbrbench.sim.simulator import _continued

    assert _continued(stream) == [True, True] + [False] * 8
    cache = sim_cache("adaptive", 2)
    plain = sim.run_policy(stream, cache, sim.variants(["adaptive"])[0], cost)
    told = sim.run_policy(stream, cache, sim.variants(["adaptive-knows-returns"])[0], cost)
    assert all(r.use.snapshot_pos == 640 for r in told.rows[-2:])  # both turns' snapshots
    assert any(r.use.snapshot_pos < 640 for r in plain.rows[-2:])
    assert told.summary()["replay_tokens"] < plain.summary()["replay_tokens"]


def test_a_trace_stream_knows_which_requests_are_continued(trace_slice) -> None:
    from sbrbench.sim.simulator import _continued

    stream = sim.load_trace(trace_slice(300))
    cont = _continued(stream)
    assert sum(cont) == len({it.parent for it in stream.items if it.parent >= 0}) > 0
