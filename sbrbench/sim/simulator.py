"""The policy simulator: the engine's own cache path (engine.cache.driver.run_request) on a
request stream, with a cost model in place of the model, and the offline references beside the
online policies.

`Simulator.step` goes through exactly the calls `Engine.generate` makes, with an executor that
computes nothing, so a policy decides in simulation what it decides in the engine, request for
request. `run_policy` replays a whole stream under one policy variant; `summarize` gives the
`summary.policies.<name>` object of a sim result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from engine.cache.driver import check_request, run_request
from engine.cache.manager import CacheConfig, CacheManager, Plan
from engine.cache.policies import POLICIES
from engine.cache.settings import CacheSettings
from engine.cache.snapshots import SnapshotEntry
from engine.errors import BudgetError, UserError
from engine.record import CacheUse
from sbrbench.costmodel import CostModel
from sbrbench.sim.oracle import FutureIndex
from sbrbench.sim.streams import SimRequest, Stream

SIM_SCHEMA = "sbrbench.sim/v1"
SWEEP_SCHEMA = "sbrbench.sweep/v1"


class SimRow(NamedTuple):
    """The cache's decision for one request and its modelled TTFT (tick -1: refused before the
    cache; ttft_s None with an error)."""

    tick: int
    session: str | None
    use: CacheUse
    generated_tokens: int
    ttft_s: float | None
    error: str | None = None


class AdmitHook(Protocol):
    def __call__(self, entry: SnapshotEntry, tokens: Sequence[int], pos: int) -> None: ...


class _NoStates(dict):  # type: ignore[type-arg]
    """The simulator's 'captured states': nothing, at every position."""

    def __missing__(self, key: int) -> None:
        return None


class _Charge:
    """The simulator's side of a request (engine.cache.driver.Executor): no compute; admitted
    snapshots are reported to `on_admit` (the offline references' index)."""

    def __init__(self, req: SimRequest, on_admit: AdmitHook | None) -> None:
        self.req = req
        self.on_admit = on_admit
        self.full = req.prompt + req.reply

    def prompt(self, plan: Plan | None, pages: list[int]) -> Mapping[int, None]:
        return _NoStates()

    def store(self, entry: SnapshotEntry, state: None) -> None:
        if self.on_admit is not None:
            self.on_admit(entry, self.full, entry.pos)

    def generate(self) -> tuple[int, ...]:
        return self.req.reply

    def reply(self, full: tuple[int, ...], pages: list[int], end: int | None) -> Mapping[int, None]:
        return _NoStates()


class Simulator:
    """One CacheManager driven request by request through the engine's own request path."""

    def __init__(self, cfg: CacheConfig, cost: CostModel, *, max_context: int = 262144,
                 on_admit: AdmitHook | None = None, vocab_size: int | None = None) -> None:
        self.cm = CacheManager(cfg)
        self.cost = cost
        self.max_context = max_context
        self.on_admit = on_admit
        self.vocab_size = vocab_size

    def step(self, req: SimRequest) -> SimRow:
        L = len(req.prompt)
        try:
            check_request(self.cm.cfg, req.prompt, req.max_tokens,
                          max_context=self.max_context, vocab_size=self.vocab_size)
        except UserError as e:
            return SimRow(-1, req.session, CacheUse.of(L, 0, 0), 0, None,
                          f"{type(e).__name__}: {e}")
        try:
            served = run_request(self.cm, req.prompt, req.max_tokens, req.session,
                                 _Charge(req, self.on_admit))
        except BudgetError as e:  # pages the tree could not free (the plan was aborted)
            return SimRow(self.cm.tick, req.session, CacheUse.of(L, 0, 0), 0, None,
                          f"{type(e).__name__}: {e}")
        plan = served.plan
        assert plan is not None
        u = served.use
        return SimRow(plan.tick, plan.session, u, len(req.reply),
                      self.cost.ttft(u.snapshot_pos, u.cached_tokens, L))


class SimCache(NamedTuple):
    """The cache a simulation runs: the user's settings and the model quantities they resolve
    with (engine.cache.settings: the one place budgets become slots and pages)."""

    settings: CacheSettings
    snapshot_bytes: int
    model_flops: dict[str, float]

    def config(self, variant: PolicyVariant | None = None) -> CacheConfig:
        s = self.settings
        if variant is not None:
            s = s.replace(policy=variant.policy, policy_opts=variant.opts)
        return s.resolve(self.snapshot_bytes, self.model_flops)


class PolicyVariant(NamedTuple):
    """One column of results: a registered policy with options, under a display name."""

    name: str
    policy: str
    opts: dict[str, Any]


def variants(
    policies: Sequence[str],
    *,
    tail_pin_k: Sequence[int] = (8,),
    marconi_alpha: Sequence[float] = (),
) -> list[PolicyVariant]:
    """Policy names -> variants: tail-pin once per K, marconi once per alpha (default: its own)."""
    out: list[PolicyVariant] = []
    refs = {**ORACLES, **EXTRA_ORACLES}
    known = list(dict.fromkeys([*POLICIES, *refs]))
    for p in policies:
        if p in refs:
            out.append(refs[p])
            continue
        if p not in POLICIES:
            raise UserError(f"--policy: unknown policy {p!r} (known: {', '.join(known)})")
        if p == "tail-pin":
            ks = list(tail_pin_k) or [8]
            out += [
                PolicyVariant(p if len(ks) == 1 else f"tail-pin(k={k})", p, {"k": k}) for k in ks
            ]
        elif p == "marconi" and marconi_alpha:
            out += [
                PolicyVariant(
                    p if len(marconi_alpha) == 1 else f"marconi(a={a:g})", p, {"alpha": float(a)}
                )
                for a in marconi_alpha
            ]
        else:
            out.append(PolicyVariant(p, p, {}))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise UserError(f"--policy: a policy is listed twice ({', '.join(names)})")
    return out


# Offline references, both the registry's `belady` policy fed by a FutureIndex: `belady` ranks
# by next use (the classic rule), `belady-gain` by next use per replay token saved.
ORACLES = {
    "belady": PolicyVariant("belady", "belady", {"oracle": "next_use"}),
    "belady-gain": PolicyVariant("belady-gain", "belady", {"oracle": "gain"}),
}
# On request only: belady-gain that also refuses a newcomer ranked below its victim (bypass).
EXTRA_ORACLES = {
    "belady-gain-bypass": PolicyVariant(
        "belady-gain-bypass", "belady", {"oracle": "gain", "bypass": True}
    ),
    # adaptive told one fact of the future: whether a session sends another request (not when)
    "adaptive-knows-returns": PolicyVariant("adaptive-knows-returns", "adaptive",
                                            {"oracle": "returns"}),
}
REFERENCES = (*ORACLES, *EXTRA_ORACLES)


def with_belady(vs: list[PolicyVariant]) -> list[PolicyVariant]:
    """The variants plus both offline references (always reported beside online policies)."""
    have = {v.name for v in vs}
    return [*vs, *(v for name, v in ORACLES.items() if name not in have)]


@dataclass
class PolicyRun:
    """Per-request decisions of one policy on one stream, and the manager's counters."""

    variant: PolicyVariant
    rows: list[SimRow]
    stats: dict[str, Any]
    phases: list[str]
    wall_s: float
    slots: int

    def summary(self, warmup: int = 0) -> dict[str, Any]:
        """Totals over the requests after the first `warmup` (which still drive the cache: a
        slice of a longer trace then starts with a filled pool and learned session statistics).
        The manager's counters (hits, evictions, admits) cover the whole stream."""
        if not 0 <= warmup < max(len(self.rows), 1):
            raise UserError(
                f"warm-up of {warmup} requests leaves none of {len(self.rows)} to count")
        out = summarize(self.rows[warmup:], self.stats, self.wall_s, self.phases[warmup:])
        if warmup:
            out["warmup_requests"] = warmup
        return out


def run_policy(
    stream: Stream,
    cache: SimCache,
    variant: PolicyVariant,
    cost: CostModel,
    *,
    future: FutureIndex | None = None,
    max_context: int = 262144,
    progress: Callable[[int], None] | None = None,
) -> PolicyRun:
    """Simulate the whole stream under one policy (a fresh cache; `cache` gives the budgets)."""
    cfg = cache.config(variant)
    opts = dict(cfg.policy_opts)
    knows_returns = variant.policy == "adaptive" and opts.pop("oracle", None) == "returns"
    oracle, bypass = "next_use", False
    if variant.policy == "belady":
        if future is None:
            future = FutureIndex(stream, cfg, max_context=max_context)
        oracle = opts.pop("oracle", "next_use")
        bypass = opts.pop("bypass", False)
        opts["next_use"] = future.gain_rank if oracle == "gain" else future.next_use
    else:
        future = None
    sim = Simulator(cfg._replace(policy_opts=opts), cost, max_context=max_context,
                    on_admit=future.on_admit if future is not None else None)
    if future is not None and bypass:
        # instance attribute: the registry's Belady with the references' admission rule
        sim.cm.policy.should_admit = future.admission_rule(oracle)  # type: ignore[method-assign]
    index_of: list[int] = []  # manager tick -> stream index
    if knows_returns:
        _tell_returns(sim.cm, stream, index_of)
    rows: list[SimRow] = []
    phases: list[str] = []
    t0 = time.perf_counter()
    for i, req in enumerate(stream):
        if future is not None:
            future.now = i
        if knows_returns:
            index_of.append(i)  # the tick this request gets if the manager begins it
        row = sim.step(req)
        if knows_returns and row.tick < 0:
            index_of.pop()
        rows.append(row)
        phases.append(req.phase)
        if progress is not None and i % 256 == 255:
            progress(i + 1)
    wall = time.perf_counter() - t0
    return PolicyRun(variant, rows, sim.cm.stats(), phases, wall, cfg.snapshot_slots)


def _continued(stream: Stream) -> list[bool]:
    """Per request: does a later request continue its session (its turn, or its session id)?"""
    items = getattr(stream, "items", None)
    out = [False] * len(stream)
    if items is not None:  # a trace: turns are linked to their parent request
        for it in items:
            if it.parent >= 0:
                out[it.parent] = True
        return out
    last: dict[str, int] = {}
    for i, req in enumerate(stream):
        if req.session is not None:
            if req.session in last:
                out[last[req.session]] = True
            last[req.session] = i
    return out


def _tell_returns(cm: CacheManager, stream: Stream, index_of: list[int]) -> None:
    """Give the adaptive policy of ``cm`` one oracle fact: a session's P(S) is 0 once its last
    request so far is one no later request continues."""
    continued = _continued(stream)
    pol = cm.policy
    plain = pol._return_prob  # type: ignore[attr-defined]

    def knows(session: str, tick: int) -> float:
        info = cm.sessions.get(session)
        if info is not None and info.last_tick < len(index_of) \
                and not continued[index_of[info.last_tick]]:
            return 0.0
        return float(plain(session, tick))

    pol._return_prob = knows  # type: ignore[attr-defined]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    # numpy's default (linear) percentile
    x = (len(v) - 1) * q / 100.0
    lo = math.floor(x)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (x - lo)


def _dist(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    return {
        "mean": sum(values) / len(values),
        "p50": _pct(values, 50),
        "p90": _pct(values, 90),
        "p99": _pct(values, 99),
        "max": max(values),
    }


def summarize(
    rows: Sequence[SimRow], stats: dict[str, Any], wall_s: float, phases: Sequence[str] = ()
) -> dict[str, Any]:
    """The `summary.policies.<name>` object of a sim result."""
    ok = [r for r in rows if r.error is None]
    replay = [float(r.use.replay_tokens) for r in ok]
    ttft = [float(r.ttft_s) for r in ok if r.ttft_s is not None]
    out: dict[str, Any] = {
        "requests": len(rows),
        "errors": len(rows) - len(ok),
        "replay_tokens": int(sum(r.use.replay_tokens for r in ok)),
        "hit_tokens": int(sum(r.use.cached_tokens for r in ok)),
        "new_tokens": int(sum(r.use.new_tokens for r in ok)),
        "prompt_tokens": int(sum(r.use.prompt_tokens for r in ok)),
        "snapshot_hits": stats["hits"],
        "snapshot_misses": stats["misses"],
        "cold": stats["cold"],
        "evictions": stats["evictions_policy"],
        "evictions_kv": stats["evictions_kv"],
        "admits": stats["admits"],
        "admit_refused": stats["admit_refused"],
        "kv_evicted_pages": stats["kv_evicted_pages"],
        "sessions": stats["sessions"],
        "resumable_sessions": stats["resumable_sessions"],
        "replay_per_request": _dist(replay),
        "ttft_model_s": _dist(ttft),
        "ttft_model_total_s": sum(ttft),
        "sim_wall_s": round(wall_s, 3),
    }
    if phases and any(phases):
        per: dict[str, Any] = {}
        for ph in dict.fromkeys(phases):
            prs = [r for r, p in zip(rows, phases, strict=True) if p == ph and r.error is None]
            per[ph] = {
                "n": len(prs),
                "replay_tokens": int(sum(r.use.replay_tokens for r in prs)),
                "replay_per_request": _dist([float(r.use.replay_tokens) for r in prs]),
                "ttft_model_s": _dist([float(r.ttft_s) for r in prs if r.ttft_s is not None]),
            }
        out["phases"] = per
    return out


def versus_belady(summaries: dict[str, dict[str, Any]]) -> None:
    """Add, in place, `replay_vs_belady` (replay tokens / classic Belady's) and
    `replay_vs_oracle` (/ the best offline reference's: min of belady and belady-gain)."""
    refs = [summaries[n]["replay_tokens"] for n in REFERENCES if n in summaries]
    if not refs:
        return
    bel = summaries.get("belady", {}).get("replay_tokens")
    best = min(refs)
    for s in summaries.values():
        r = s["replay_tokens"]
        s["replay_vs_belady"] = r / bel if bel else None
        s["replay_vs_oracle"] = r / best if best else None


def rows_json(run: PolicyRun) -> dict[str, list[Any]]:
    """Per-request decisions as columns (compact JSON)."""
    return {
        "tick": [r.tick for r in run.rows],
        "cached_tokens": [r.use.cached_tokens for r in run.rows],
        "snapshot_pos": [r.use.snapshot_pos for r in run.rows],
        "replay_tokens": [r.use.replay_tokens for r in run.rows],
        "ttft_model_s": [None if r.ttft_s is None else round(r.ttft_s, 6) for r in run.rows],
        "error": [r.error for r in run.rows],
    }


