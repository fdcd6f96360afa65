"""The policy yardstick: the exact offline optimum of the snapshot pool on a stream (an integer
program), its LP relaxation as a lower bound, and the unlimited-pool floor.

The program (docs/POLICIES.md states it in full):

- The stream is first replayed once with an unlimited pool (`extract`). That gives, per request,
  its KV match point m (as the manager computes it), its *offers* (every snapshot position the
  manager would ask the pool to admit, in order; a branch point is offered even where the
  unlimited pool already holds it) and its *anchors* (the offered snapshots on its matched
  path, positions <= m). A snapshot is named by the radix node it hangs on, so a prefix whose KV
  the tree evicted and rebuilt is a new snapshot, as in the manager. Assumption: the KV match and
  the KV lifetimes do not depend on the snapshot policy (true when the KV budget is large; the
  yardstick checks every policy run's match points against these).
- A schedule keeps at most `slots` snapshots at every moment; a snapshot enters only at one of
  its offers and may leave at any time; a request restores from its deepest present anchor and
  replays m minus that position (m if none); an anchor present when a request begins stays until
  that request's last offer (the engine holds what it restores until the request ends).
- Minimise the total replay. Binary z: "snapshot k is kept from its previous event to its use by
  request i" (one per anchor); y: "request i restores from k"; capacity is checked at every offer
  through a running occupancy (one row per offer, two nonzeros per kept interval).

The manager is a little stricter (it must admit while a slot is free and evicts only to admit),
so every policy run through it replays at least the optimum; tests/sbrbench/sim/test_optimum.py
checks the program against an exhaustive search of the same model and of the manager's own
choices on small streams. Solved with `scipy.optimize.milp` (HiGHS).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from engine.cache.radix import RadixNode
from sbrbench.costmodel import CostModel
from sbrbench.sim.simulator import SimCache, Simulator
from sbrbench.sim.streams import Stream

_NO_COST = CostModel(a=0.0, b=0.0, c=0.0, restore=0.0)


class Demand(NamedTuple):
    """One request of the program: its match point, anchors and offers (snapshots named by the
    id of their radix node in the unlimited-pool replay)."""

    matched: int
    anchors: tuple[tuple[int, int], ...]  # (snapshot, pos) on the matched path, shallow first
    offers: tuple[tuple[int, int], ...]  # (snapshot, pos) in the order the manager offers them


class Instance(NamedTuple):
    """A stream as the program sees it; `floor` is the replay with an unlimited pool."""

    demands: tuple[Demand, ...]
    floor: int

    @property
    def matched(self) -> list[int]:
        return [d.matched for d in self.demands]


def extract(stream: Stream, cache: SimCache, *, max_context: int = 262144) -> Instance:
    """Replay ``stream`` once with an unlimited pool and record what the program needs."""
    cfg = cache.config()
    bound = sum(3 + (len(r.prompt) // cfg.snapshot_interval if cfg.snapshot_interval else 0)
                for r in stream)
    cfg = cfg._replace(snapshot_slots=max(bound, 1), policy="lru", policy_opts={})
    sim = Simulator(cfg, _NO_COST, max_context=max_context)
    policy = sim.cm.policy
    chunk = cfg.chunk
    cur: dict[str, Any] = {}

    def on_match(path: Sequence[RadixNode], matched: int, tick: int) -> None:
        anchors = tuple((n.id, n.end) for n in path if n.snapshot is not None)
        offers: list[tuple[int, int]] = []
        b = matched // chunk * chunk
        if cfg.branch_admission and path and path[-1].children and b > 0 and anchors \
                and anchors[-1][1] == b:
            # the manager offers the branch point only past its restore position; with a
            # smaller pool it may not hold it, so the offer is part of the request
            offers.append(anchors[-1])
        cur.update(matched=matched, anchors=anchors, offers=offers)

    def on_offer(node: RadixNode, pos: int, session: str, tick: int) -> None:
        cur["offers"].append((node.id, pos))

    policy.on_match = on_match  # type: ignore[method-assign]
    policy.on_offer = on_offer  # type: ignore[method-assign]
    demands: list[Demand] = []
    floor = 0
    for req in stream:
        cur.clear()
        row = sim.step(req)
        if row.error is not None or not cur:
            demands.append(Demand(0, (), ()))
            continue
        d = Demand(cur["matched"], cur["anchors"], tuple(cur["offers"]))
        demands.append(d)
        floor += d.matched - (d.anchors[-1][1] if d.anchors else 0)
    return Instance(tuple(demands), floor)


class Program(NamedTuple):
    """The integer program of one instance at one pool size, in `scipy.optimize.milp` form."""

    c: np.ndarray
    const: int  # objective constant: sum of match points
    rows: Any  # scipy.sparse matrix
    lo: np.ndarray
    hi: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    integrality: np.ndarray
    n_z: int  # the first n_z variables are z, in anchor order (request, then shallow first)
    z_of: list[tuple[int, int]]  # (request, snapshot) of each z
    z_start: list[int]  # the moment each z's interval starts (an offer, or after a use)
    z_fresh: list[bool]  # whether it starts at an offer (an admission) rather than a use
    end_of: list[int]  # the last moment of each request (its last offer, or its begin)
    offer_moment: list[dict[int, int]]  # request -> {snapshot: moment of its offer}
    slots: int


def program(inst: Instance, slots: int) -> Program:
    """Build the program (module docstring) for a pool of ``slots``."""
    from scipy import sparse

    # moments: begin of request i, then one per offer; capacity is checked at offers
    begin: list[int] = []
    last: list[int] = []
    offer_at: list[dict[int, int]] = []  # request -> {snapshot: moment of its offer}
    events: dict[int, list[tuple[int, int, int]]] = {}  # snapshot -> [(moment, kind, request)]
    t = 0
    n_offer_moments = 0
    offer_index: dict[int, int] = {}  # moment -> index among offer moments
    for i, d in enumerate(inst.demands):
        begin.append(t)
        for k, _ in d.anchors:
            events.setdefault(k, []).append((t, 0, i))
        t += 1
        here: dict[int, int] = {}
        for k, _ in d.offers:
            if k in here:
                continue
            here[k] = t
            events.setdefault(k, []).append((t, 1, i))
            offer_index[t] = n_offer_moments
            n_offer_moments += 1
            t += 1
        offer_at.append(here)
        last.append(t - 1)

    z_of: list[tuple[int, int]] = []
    z_pos: list[int] = []
    z_id: dict[tuple[int, int], int] = {}
    prev_use: list[int] = []  # z index of the kept interval this one continues, -1 if it starts
    start: list[int] = []  # first moment the interval occupies a slot
    for i, d in enumerate(inst.demands):
        for k, pos in d.anchors:
            ev = events[k]
            j = _index(ev, begin[i], 0)
            if j == 0:
                continue  # never offered before (cannot happen for extracted instances)
            pt, kind, pi = ev[j - 1]
            if kind == 0 and (pi, k) not in z_id:
                continue  # its previous use could not hold it either
            z_id[(i, k)] = len(z_of)
            z_of.append((i, k))
            z_pos.append(pos)
            if kind == 1:
                prev_use.append(-1)
                start.append(pt)
            else:
                prev_use.append(z_id[(pi, k)])
                start.append(last[pi] + 1)
    n_z = len(z_of)
    # y per z (same order); h where a request both restores from k and offers it again
    n_y = n_z
    holds: list[tuple[int, int, int]] = []  # (z of the use at i, z of the interval from the
    # offer at i or -1, moment of the offer)
    hold_of_use: dict[int, int] = {}
    starts_at_offer: dict[tuple[int, int], int] = {}
    for zi, (_, k) in enumerate(z_of):
        if prev_use[zi] == -1:
            starts_at_offer[(start[zi], k)] = zi
    for zi, (i, k) in enumerate(z_of):
        tk = offer_at[i].get(k)
        if tk is not None:
            hold_of_use[zi] = len(holds)
            holds.append((zi, starts_at_offer.get((tk, k), -1), tk))
    n_h = len(holds)
    n_o = n_offer_moments
    n = n_z + n_y + n_h + n_o
    off_y, off_h, off_o = n_z, n_z + n_y, n_z + n_y + n_h

    c = np.zeros(n)
    c[off_y:off_y + n_y] = -np.asarray(z_pos, dtype=float)
    r_i: list[int] = []
    r_j: list[int] = []
    r_v: list[float] = []
    lo: list[float] = []
    hi: list[float] = []

    def row(entries: Sequence[tuple[int, float]], a: float, b: float) -> None:
        r = len(lo)
        for j, v in entries:
            r_i.append(r)
            r_j.append(j)
            r_v.append(v)
        lo.append(a)
        hi.append(b)

    inf = math.inf
    per_request: dict[int, list[int]] = {}
    for zi, (i, _) in enumerate(z_of):
        row([(off_y + zi, 1.0), (zi, -1.0)], -inf, 0.0)  # restore only from what is kept
        per_request.setdefault(i, []).append(off_y + zi)
        if prev_use[zi] >= 0:
            row([(zi, 1.0), (prev_use[zi], -1.0)], -inf, 0.0)  # kept only if kept before
    for ys in per_request.values():
        row([(y, 1.0) for y in ys], -inf, 1.0)  # one restore per request
    # occupancy intervals over offer moments: (variable, first moment, last moment)
    spans: list[tuple[int, int, int]] = []
    inside_hold = {zn: zu for zu, zn, _ in holds if zn >= 0}
    for zi, (i, _) in enumerate(z_of):
        end = last[i]
        if zi in hold_of_use:  # up to the offer; the hold variable covers the rest
            end = holds[hold_of_use[zi]][2] - 1
        s0 = start[zi]
        if zi in inside_hold:  # starts at an offer inside a use's hold: counted after it
            s0 = last[z_of[inside_hold[zi]][0]] + 1
        spans.append((zi, s0, end))
    for hi_, (zu, zn, tk) in enumerate(holds):
        h = off_h + hi_
        row([(h, 1.0), (zu, -1.0)], 0.0, inf)
        if zn >= 0:
            row([(h, 1.0), (zn, -1.0)], 0.0, inf)
        spans.append((h, tk, last[z_of[zu][0]]))
    offer_moments = sorted(offer_index)
    enter: dict[int, list[int]] = {}
    leave: dict[int, list[int]] = {}
    for var, a, b in spans:
        ra = _first_at_or_after(offer_moments, a)
        rb = _first_at_or_after(offer_moments, b + 1) - 1
        if ra > rb:
            continue
        enter.setdefault(ra, []).append(var)
        leave.setdefault(rb + 1, []).append(var)
    for r in range(n_o):
        entries = [(off_o + r, 1.0)]
        if r:
            entries.append((off_o + r - 1, -1.0))
        entries += [(v, -1.0) for v in enter.get(r, ())]
        entries += [(v, 1.0) for v in leave.get(r, ())]
        row(entries, 0.0, 0.0)
    rows = sparse.csr_array((r_v, (r_i, r_j)), shape=(len(lo), n))
    lb = np.zeros(n)
    ub = np.ones(n)
    ub[off_o:] = slots
    integrality = np.zeros(n, dtype=np.uint8)
    integrality[:n_z] = 1
    return Program(c, sum(inst.matched), rows, np.asarray(lo), np.asarray(hi), lb, ub,
                   integrality, n_z, z_of, start, [p < 0 for p in prev_use], last, offer_at,
                   slots)


def _index(ev: list[tuple[int, int, int]], moment: int, kind: int) -> int:
    """Index of the event (moment, kind) in the sorted event list ``ev``."""
    import bisect

    return bisect.bisect_left(ev, (moment, kind, -1))


def _first_at_or_after(moments: list[int], t: int) -> int:
    import bisect

    return bisect.bisect_left(moments, t)


class Solution(NamedTuple):
    """What the solver found: the program's value (replay tokens), a proven lower bound and
    whether the two meet (``exact``)."""

    replay: float | None  # best schedule found (None: none within the time limit)
    bound: float  # proven lower bound on the optimum
    exact: bool
    status: str
    solve_s: float
    variables: int
    constraints: int
    kept: list[int] | None = None  # the z of every kept interval (Program.z_of gives them)


def solve(prog: Program, *, relax: bool = False, time_limit: float = 60.0) -> Solution:
    """Solve the program (``relax``: its LP relaxation) with HiGHS."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = len(prog.c)
    if prog.n_z == 0:  # nothing can be restored: replay is the sum of match points
        return Solution(float(prog.const), float(prog.const), True, "trivial", 0.0, n, 0, [])
    t0 = time.perf_counter()
    integrality = np.zeros(n, dtype=np.uint8) if relax else prog.integrality
    res = milp(prog.c, integrality=integrality, bounds=Bounds(prog.lb, prog.ub),
               constraints=LinearConstraint(prog.rows, prog.lo, prog.hi),
               options={"time_limit": time_limit, "mip_rel_gap": 0.0, "disp": False,
                        "presolve": True})
    wall = time.perf_counter() - t0
    rows = prog.rows.shape[0]
    if res.x is None:
        dual = getattr(res, "mip_dual_bound", None)
        bound = prog.const + dual if dual is not None and math.isfinite(dual) else 0.0
        return Solution(None, max(bound, 0.0), False, res.message, wall, n, rows)
    value = prog.const + float(res.fun)
    if relax:
        return Solution(value, value, False, res.message, wall, n, rows)
    dual = getattr(res, "mip_dual_bound", None)
    bound = prog.const + dual if dual is not None and math.isfinite(dual) else value
    exact = res.status == 0
    kept = [j for j in range(prog.n_z) if res.x[j] > 0.5]
    return Solution(round(value), min(bound, value) if not exact else round(value), exact,
                    res.message, wall, n, rows, kept)


class _Follower:
    """The manager's policy that follows a solved schedule: it admits at an offer only where the
    schedule starts keeping that snapshot, and evicts what the schedule no longer keeps (first
    what it never keeps again). Manager entries are matched to the program's snapshots by the
    request and position of their offer."""

    def __init__(self, inst: Instance, prog: Program, kept: Sequence[int]) -> None:
        self.inst = inst
        self.prog = prog
        self.spans: dict[int, list[tuple[int, int]]] = {}  # snapshot -> kept (start, end)
        self.fresh: set[tuple[int, int]] = set()  # (snapshot, moment) of scheduled admissions
        for j in kept:
            i, k = prog.z_of[j]
            self.spans.setdefault(k, []).append((prog.z_start[j], prog.end_of[i]))
            if prog.z_fresh[j]:
                self.fresh.add((k, prog.z_start[j]))
        for v in self.spans.values():
            v.sort()
        self.now = 0  # stream index of the running request
        self.key_of: dict[int, int] = {}  # manager entry id -> program snapshot
        self._offer: tuple[int, int] | None = None  # (snapshot, moment) being offered

    def on_offer(self, node: RadixNode, pos: int, session: str, tick: int) -> None:
        k = dict((p, k) for k, p in self.inst.demands[self.now].offers).get(pos)
        t = self.prog.offer_moment[self.now].get(k, -1) if k is not None else -1
        self._offer = (k, t) if k is not None else None

    def on_admit(self, entry: Any, tick: int) -> None:
        if self._offer is not None:
            self.key_of[entry.id] = self._offer[0]

    def _next_kept(self, key: int | None, t: int) -> float:
        """0 if the schedule keeps ``key`` at moment t, else the start of its next kept interval
        (inf: never again)."""
        if key is None:
            return math.inf
        nxt = math.inf
        for a, b in self.spans.get(key, ()):
            if a <= t <= b:
                return 0.0
            if a > t:
                nxt = min(nxt, a)
        return nxt

    def victim(self, candidates: list[Any], tick: int) -> Any:
        if self._offer is None or self._offer not in self.fresh:
            return None  # the schedule does not admit here: refuse
        t = self._offer[1]
        ranked = [(self._next_kept(self.key_of.get(e.id), t), -e.pos, e.id, e) for e in candidates]
        free = [r for r in ranked if r[0] > 0]
        if not free:
            return None
        return max(free, key=lambda r: r[:3])[3]


def follow(stream: Stream, cache: SimCache, inst: Instance, prog: Program,
           sol: Solution, cost: CostModel, *, max_context: int = 262144) -> Any:
    """Run ``stream`` through the manager with a policy that follows the solved schedule: an
    achievable offline schedule (its replay is at least the optimum, equal where the manager's
    stricter rules cost nothing). Returns a `PolicyRun` named ``opt-schedule``."""
    from sbrbench.sim.simulator import PolicyRun, PolicyVariant

    cfg = cache.config()._replace(snapshot_slots=prog.slots, policy="lru", policy_opts={})
    sim = Simulator(cfg, cost, max_context=max_context)
    f = _Follower(inst, prog, sol.kept or [])
    pol = sim.cm.policy
    pol.victim = f.victim  # type: ignore[method-assign]
    pol.on_offer = f.on_offer  # type: ignore[method-assign]
    pol.on_admit = f.on_admit  # type: ignore[method-assign]
    rows, phases = [], []
    t0 = time.perf_counter()
    for i, req in enumerate(stream):
        f.now = i
        rows.append(sim.step(req))
        phases.append(req.phase)
    wall = time.perf_counter() - t0
    return PolicyRun(PolicyVariant("opt-schedule", "lru", {}), rows, sim.cm.stats(), phases,
                     wall, prog.slots)


class Yardstick(NamedTuple):
    """Per pool size: floor <= bound <= optimum, and how they were obtained."""

    slots: int
    requests: int
    floor: int  # replay with an unlimited pool (measured by the simulator)
    lp: float | None  # the LP relaxation's value (None: not solved)
    optimum: int | None  # the program's exact optimum (None: not proven)
    best_found: int | None  # best schedule of the program found (= optimum when proven)
    bound: float  # the best lower bound: max(floor, LP, the MILP's dual bound)
    status: str
    solve_s: float
    variables: int

    def reference(self) -> tuple[float, str]:
        """What a gap is measured against: the optimum where proven, else the bound."""
        if self.optimum is not None:
            return float(self.optimum), "optimum"
        return self.bound, "bound"

    def describe(self) -> dict[str, Any]:
        ref, kind = self.reference()
        return {"slots": self.slots, "requests": self.requests, "floor": self.floor,
                "lp_bound": self.lp, "optimum": self.optimum, "best_found": self.best_found,
                "bound": self.bound, "reference": ref, "reference_kind": kind,
                "status": self.status, "solve_s": round(self.solve_s, 3),
                "variables": self.variables, "units": "replay tokens (modelled by the "
                "simulator's cache; the program's optimum is exact for its model)"}


def yardstick(inst: Instance, slots: int, *, exact: bool = True, lp: bool = True,
              time_limit: float = 60.0) -> tuple[Yardstick, Program, Solution | None]:
    """Floor, LP bound and (with ``exact``) the program's optimum for one pool size; also the
    program and the integer solution (None without ``exact``)."""
    floor = inst.floor
    prog = program(inst, slots)
    n = len(prog.c)
    lp_val: float | None = None
    bound = float(floor)
    status, wall = "floor only", 0.0
    if lp or exact:
        rel = solve(prog, relax=True, time_limit=time_limit)
        wall += rel.solve_s
        if rel.replay is not None:
            lp_val = rel.replay
            bound = max(bound, rel.replay)
        status = "lp: " + rel.status
    optimum = best = None
    sol = None
    if exact:
        sol = solve(prog, time_limit=time_limit)
        wall += sol.solve_s
        status = "exact" if sol.exact else f"milp: {sol.status}"
        bound = max(bound, sol.bound)
        if sol.replay is not None:
            best = int(sol.replay)
            if sol.exact:
                optimum = best
    # a replay is a whole number of tokens: a bound may be rounded up to one (1e-6 of slack)
    bound = float(math.ceil(bound - 1e-6))
    return Yardstick(slots, len(inst.demands), floor, lp_val, optimum, best, bound, status,
                     wall, n), prog, sol


SIMPLE = ("lru", "forecast", "tail-pin", "two-tier", "marconi")


def gap_closed(replay: dict[str, float], reference: float, *, target: str = "adaptive",
               simple: Sequence[str] = SIMPLE) -> float | None:
    """(best simple - target) / (best simple - reference): the share of the gap between the best
    simple online policy and the optimum (or bound) that ``target`` closes; None when the best
    simple policy already sits at the reference or a policy is missing."""
    have = [replay[s] for s in simple if s in replay]
    if not have or target not in replay:
        return None
    best = min(have)
    span = best - reference
    if span <= 0:
        return None
    return (best - replay[target]) / span


def kv_independent(inst: Instance, matched: Callable[[], Sequence[Sequence[int]]]) -> bool:
    """Do the match points of every given run equal the instance's (the KV assumption)?"""
    ref = inst.matched
    return all(list(m) == ref for m in matched())
