"""The `adaptive` snapshot policy: evict the snapshot whose loss costs the least expected replay
per request of residence (a GreedyDual-style rate), learned online from the session table.

Rule, for every evictable snapshot e of session S (n requests so far, idle requests since its
last one, tau = its own mean gap between requests, or the global mean for a 1-request session):

    value(e) = max(P(S), F(e)) * gap(e) * (1 if no deeper snapshot of S on e's path else delta)
    P(S)     = surv(n) / (tau + idle)        expected uses per request (heavy-tailed hazard)
    surv(n)  = P(a session with n requests gets another), counted over past sessions; censored:
               a session counts as ended only once idle > 8x the mean gap
    F(e)     = hits on e by *other* sessions / requests since e was admitted (shared prefixes)
    gap(e)   = e.pos - pos of the next shallower live snapshot on e's path (any session), or 0

Evict min value (ties: older, then shallower); when the pool is full, a newcomer worth less than
the victim is not admitted (Policy.should_admit). A deep idle conversation keeps its tail under
one-shot pressure (surv(1) of one-shots -> 0), in round-robin each conversation keeps its deepest
(the dominated ladder goes first), and a shared system-prompt snapshot lives on its hit rate.
The options (surv, rate, freq, censor, foreign) switch parts off for ablations (results/sim/
ADAPTIVE.md); all on is the rule above. Round-3 options, off by default because they lost on
the tuning traces (ADAPTIVE.md, "Round 3"): aging ("gdsf": priority = L at last use + value, L
rises to each victim's priority; "static": same without the idle term; "evict": inflation in
eviction only, not in admission), thin (a dominated snapshot's value scaled by thin x the share
of [below, next deeper) it covers) and admit_margin (admit if margin x newcomer >= victim).
Round-4 options (ADAPTIVE.md, "Round 4"): duel = N > 0 (set dueling: two metadata-only shadow
pools, engine/cache/shadow.py, run this rule with admission control on and off on the same
stream; the real pool admits as the one whose replay, exponentially decayed over ~N requests,
is lower) and hazard = "empirical" (P(S) from the observed gap distribution G instead of the
rate form: q = surv G(idle) / (surv G(idle) + 1 - surv) over the mean remaining wait
E[gap - idle | gap > idle]); duel_hazard (with duel: four shadows, both P(S) forms x both
admission rules; the real pool ranks and admits as the leader). Round-5 option (ADAPTIVE.md,
"Round 5"): swap (a newcomer of session S replaces S's deepest evictable snapshot on its own path
that is off the interval grid, was never hit by another session and is not a branch point S's
first request made inside another session's prefix, with no admission test: the older one would
be dominated by it).
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from engine.cache.policies import POLICIES, Policy
from engine.cache.shadow import ShadowCache
from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.cache.radix import RadixNode
    from engine.cache.snapshots import SessionInfo, SnapshotEntry


AGING = ("off", "gdsf", "static", "evict")
HAZARD = ("rate", "empirical")


class _Pool(Protocol):
    """What the rule reads of a snapshot pool: the real one or a shadow (engine/cache/shadow.py)."""

    @property
    def entries(self) -> dict[int, SnapshotEntry]: ...

    @property
    def foreign(self) -> dict[int, int]: ...

    @property
    def hazard(self) -> str: ...

    def at(self, node: RadixNode) -> SnapshotEntry | None: ...


class _RealPool:
    """The real pool as a `_Pool`: the bound index's entries, snapshots on the radix nodes."""

    def __init__(self, policy: Adaptive) -> None:
        self._policy = policy

    @property
    def entries(self) -> dict[int, SnapshotEntry]:
        assert self._policy.index is not None, "policy not bound to an index"
        return self._policy.index.entries

    @property
    def foreign(self) -> dict[int, int]:
        return self._policy._foreign

    @property
    def hazard(self) -> str:
        return self._policy.leader()[0]

    def at(self, node: RadixNode) -> SnapshotEntry | None:
        return node.snapshot


def _on_path(shallow: RadixNode, deep: RadixNode) -> bool:
    """Is `shallow` an ancestor of (or equal to) `deep` in the radix tree?"""
    node: RadixNode | None = deep
    while node is not None and node.end > shallow.end:
        node = node.parent
    return node is shallow


class Adaptive(Policy):
    """Expected-replay value eviction (see the module docstring for the rule)."""

    name = "adaptive"
    uses_model_flops = True

    def __init__(self, delta: float = 0.05, admit_control: bool = True,
                 surv: bool = True, rate: bool = True, freq: bool = True,
                 surv_a: float = 0.5, surv_b: float = 1.0, freq_w: float = 1.0,
                 censor: bool = True, horizon: float = 8.0, foreign: bool = True,
                 flops_per_token: float = 0.0, attn_flops_coeff: float = 0.0,
                 aging: str = "off", thin: float = 0.0,
                 admit_margin: float = 1.0, duel: int = 0, hazard: str = "rate",
                 duel_hazard: bool = False, swap: bool = False) -> None:
        super().__init__()
        self.swap = bool(swap)
        self._offer: tuple[RadixNode, str] | None = None  # the newcomer being offered now
        self._swapping: int | None = None  # id of the victim chosen by the swap rule
        self._matched = 0  # the running request's matched prefix length
        self._shared_nodes: dict[int, RadixNode] = {}  # nodes swap must spare (see on_offer)
        self._shared_prune = 1024  # prune nodes the KV tree evicted when this many are held
        if hazard not in HAZARD:
            raise ConfigError(f"adaptive hazard must be one of {', '.join(HAZARD)}, got {hazard!r}")
        self.hazard = hazard
        self._gaps: list[int] = []  # every inter-request gap seen, sorted
        self._tail_sums: list[int] | None = None  # _tail_sums[i] = sum(_gaps[i:]), lazily
        if duel < 0:
            raise ConfigError(f"adaptive duel must be >= 0 requests, got {duel}")
        if duel and (aging != "off" or not admit_control):
            raise ConfigError("adaptive duel needs admit_control on and aging off")
        self.duel = int(duel)
        if duel_hazard and not duel:
            raise ConfigError("adaptive duel_hazard needs duel > 0")
        self.duel_hazard = bool(duel_hazard)
        self._shadows: list[ShadowCache] = []  # (strict, lenient) per hazard form duelled
        self._pool = _RealPool(self)
        if not 0 <= delta <= 1:
            raise ConfigError(f"adaptive delta must be in [0, 1], got {delta}")
        if aging not in AGING:
            raise ConfigError(f"adaptive aging must be one of {', '.join(AGING)}, got {aging!r}")
        self.aging = aging
        if admit_margin <= 0:
            raise ConfigError(f"adaptive admit_margin must be > 0, got {admit_margin}")
        self.admit_margin = float(admit_margin)
        if thin < 0:
            raise ConfigError(f"adaptive thin must be >= 0, got {thin}")
        self.thin = float(thin)
        self._L = 0.0  # GDSF inflation: the priority of the last policy victim
        self._base: dict[int, float] = {}  # entry id -> L at its last use (admit or hit)
        self._chosen: tuple[int, float] | None = None  # (victim id, its priority)
        self.delta = float(delta)
        self.admit_control = bool(admit_control)
        self.surv = bool(surv)
        self.rate = bool(rate)
        self.freq = bool(freq)
        self.surv_a = float(surv_a)
        self.surv_b = float(surv_b)
        self.freq_w = float(freq_w)
        self.censor = bool(censor)
        self.foreign = bool(foreign)
        self._foreign: dict[int, int] = {}
        self._current: str | None = None
        self.horizon = float(horizon)
        self._dead: list[int] = [0]
        self._counted: dict[str, int] = {}
        self._idle_q: deque[tuple[int, str]] = deque()
        # Accepted so the engine can pass its FLOP model as to marconi; value is in tokens.
        self._flops = (flops_per_token, attn_flops_coeff)
        self._seen: set[str] = set()
        self._returned: set[str] = set()
        self._reach: list[int] = [0]  # _reach[n]: sessions that reached >= n requests
        self._gap_sum = 0.0  # sum and count of inter-request gaps of continued sessions
        self._gap_n = 0

    def options(self) -> dict[str, Any]:
        return {"delta": self.delta, "admit_control": self.admit_control, "surv": self.surv,
                "rate": self.rate, "freq": self.freq, "censor": self.censor,
                "horizon": self.horizon, "aging": self.aging, "thin": self.thin,
                "admit_margin": self.admit_margin, "duel": self.duel,
                "hazard": self.hazard, "duel_hazard": self.duel_hazard, "swap": self.swap}

    def bind(self, index: Any, sessions: Any) -> None:
        super().bind(index, sessions)
        if self.duel:
            decay = 1.0 - 1.0 / self.duel
            forms = [self.hazard]
            if self.duel_hazard:
                forms += [h for h in HAZARD if h != self.hazard]
            self._shadows = [ShadowCache(self, index.slots, strict, decay, h)
                             for h in forms for strict in (True, False)]

    # ---- set dueling -------------------------------------------------------------------------
    def on_match(self, path: Sequence[RadixNode], matched: int, tick: int) -> None:
        self._matched = matched
        if self._current is not None:
            for shadow in self._shadows:
                shadow.match(path, matched, self._current, tick)

    def on_offer(self, node: RadixNode, pos: int, session: str, tick: int) -> None:
        self._offer = (node, session)
        if self.swap and pos <= self._matched:
            # inside a prefix this request matched: a branch point. On a session's first request
            # the prefix came from other sessions (a shared document): swap spares it.
            info = self.sessions.get(session) if self.sessions is not None else None
            if info is not None and info.requests <= 1:
                self._shared_nodes[node.id] = node
                if len(self._shared_nodes) >= self._shared_prune:  # amortized: drop cut nodes
                    self._shared_nodes = {k: n for k, n in self._shared_nodes.items()
                                          if n.parent is not None}
                    self._shared_prune = max(self._shared_prune, 2 * len(self._shared_nodes))
        for shadow in self._shadows:
            shadow.offer(node, pos, session, tick)

    def leader(self) -> tuple[str, bool]:
        """(hazard form, strict admission) the real pool follows: without dueling its own
        options; with it, those of the shadow with the least decayed replay (ties: the first of
        own-form strict, own-form lenient, other-form strict, other-form lenient)."""
        if not self._shadows:
            return self.hazard, True
        best = min(self._shadows, key=lambda sh: sh.score)
        return best.hazard, best.strict

    def lenient(self) -> bool:
        """Set dueling: does a lenient shadow (admit everything) lead?"""
        return not self.leader()[1]

    # ---- session statistics ----------------------------------------------------------------
    def on_request(self, info: SessionInfo, tick: int, prev_tick: int | None) -> None:
        """Called by the manager for every request, after the session table recorded it."""
        n = info.requests
        while len(self._reach) <= n + 1:
            self._reach.append(0)
            self._dead.append(0)
        self._reach[n] += 1
        if prev_tick is not None:
            self._gap_sum += tick - prev_tick
            self._gap_n += 1
            if self.hazard == "empirical" or self.duel_hazard:
                bisect.insort(self._gaps, tick - prev_tick)
                self._tail_sums = None
        self._current = info.name
        was = self._counted.pop(info.name, None)
        if was is not None:  # declared dead too early: it came back
            self._dead[was] -= 1
        self._idle_q.append((tick, info.name))
        self._reap(tick)

    def _reap(self, tick: int) -> None:
        """Sessions idle for longer than the horizon count as ended (censoring: the others with
        the same request count are still unknown and do not count against survival)."""
        h = self.horizon * max(1.0, self._gap_sum / self._gap_n if self._gap_n else 1.0)
        q = self._idle_q
        while q and q[0][0] + h < tick:
            last, name = q.popleft()
            info = self.sessions.get(name) if self.sessions is not None else None
            if info is not None and info.last_tick == last and name not in self._counted:
                self._counted[name] = info.requests
                self._dead[info.requests] += 1

    def _note(self, session: str) -> None:
        self._seen.add(session)
        info = self.sessions.get(session) if self.sessions is not None else None
        if info is not None and info.continuations > 0:
            self._returned.add(session)

    def on_admit(self, entry: SnapshotEntry, tick: int) -> None:
        self._note(entry.session)
        self._base[entry.id] = self._L

    def on_hit(self, entry: SnapshotEntry, tick: int) -> None:
        self._note(entry.session)
        self._base[entry.id] = self._L
        if self._current is not None and self._current != entry.session:
            self._foreign[entry.id] = self._foreign.get(entry.id, 0) + 1

    def on_evict(self, entry: SnapshotEntry, tick: int) -> None:
        self._foreign.pop(entry.id, None)
        self._base.pop(entry.id, None)
        if self._chosen is not None and self._chosen[0] == entry.id:
            # GDSF: the inflation value rises to the priority of the policy's victim
            self._L = max(self._L, self._chosen[1])
        self._chosen = None

    def _fresh_prior(self) -> float:
        return (len(self._returned) + 0.5) / (len(self._seen) + 1.0)

    def _survival(self, n: int) -> float:
        """P(a session with n requests gets another), from the sessions seen so far."""
        r = self._reach
        more = r[n + 1] if n + 1 < len(r) else 0
        if self.censor:
            dead = self._dead[n] if n < len(self._dead) else 0
            return (more + self.surv_a) / (more + dead + self.surv_b)
        have = r[n] if n < len(r) else 0
        return (more + self.surv_a) / (have + self.surv_b)

    def _return_prob(self, session: str, tick: int, tau_fresh: float,
                     hazard: str | None = None) -> float:
        """P(S); with aging "static" the idle time does not enter (the inflation ages instead)."""
        info = self.sessions.get(session) if self.sessions is not None else None
        if info is None:
            return self._fresh_prior()
        if info.requests > 1:
            tau = max(1.0, (info.last_tick - info.first_tick) / max(1, info.requests - 1))
        else:
            tau = tau_fresh
        if self.surv:
            prior = self._survival(info.requests)
        elif info.continuations > 0:
            prior = 1.0
        else:
            prior = self._fresh_prior()
        idle = 0 if self.aging == "static" else max(0, tick - info.last_tick)
        if (hazard or self.hazard) == "empirical" and self._gaps:
            return self._empirical_rate(prior, idle)
        if self.rate:
            return prior / (tau + idle)
        return prior / (1.0 + idle / tau)

    def _empirical_rate(self, prior: float, idle: int) -> float:
        """Expected uses per request from the observed gap distribution G: with q = P(it comes
        back | idle) = prior G(idle) / (prior G(idle) + 1 - prior), q / E[gap - idle | gap >
        idle] (memoryless gaps keep the wait and let q decay; heavy tails stretch the wait)."""
        gaps = self._gaps
        if self._tail_sums is None:
            self._tail_sums = list(itertools.accumulate(reversed(gaps)))[::-1] + [0]
        i = bisect.bisect_right(gaps, idle)
        longer = len(gaps) - i
        g = (longer + 0.5) / (len(gaps) + 0.5)  # 1 at idle 0, > 0 past every gap seen
        q = prior * g / (prior * g + 1.0 - prior)
        wait = (self._tail_sums[i] - idle * longer) / longer if longer else float(idle)
        return q / max(1.0, wait)

    def _tau_fresh(self) -> float:
        if self.surv:
            return max(1.0, self._gap_sum / self._gap_n) if self._gap_n else 1.0
        gaps = []
        for name in self._returned:
            info = self.sessions.get(name) if self.sessions is not None else None
            if info is not None and info.requests > 1:
                gaps.append((info.last_tick - info.first_tick) / (info.requests - 1))
        return max(1.0, sum(gaps) / len(gaps)) if gaps else 1.0

    def _freq(self, e: SnapshotEntry, tick: int, pool: _Pool) -> float:
        """Observed use rate of e as an anchor (hits per request since admission)."""
        hits = pool.foreign.get(e.id, 0) if self.foreign else e.hit_count
        if not self.freq or hits == 0:
            return 0.0
        rate = hits / max(1, tick - e.created)
        if not self.rate:
            rate *= max(1, tick - e.created)  # hit count, in the "probability" scale
            rate = min(1.0, rate)
        return self.freq_w * rate

    # ---- values ------------------------------------------------------------------------------
    def values(self, entries: list[SnapshotEntry], tick: int,
               inflate: bool = True, pool: _Pool | None = None) -> dict[int, float]:
        """value(e) for each entry id (all live entries of `pool`, default the real one, take
        part in gap/dominance); with aging and `inflate`, plus the inflation value at e's last
        use (its GDSF priority)."""
        pool = pool or self._pool
        hazard = pool.hazard
        by_session: dict[str, list[SnapshotEntry]] = {}
        for e in pool.entries.values():
            by_session.setdefault(e.session, []).append(e)
        tau_fresh = self._tau_fresh()
        aging = inflate and self.aging != "off"
        prob: dict[str, float] = {}
        out: dict[int, float] = {}
        wanted = {e.id for e in entries}
        for session, live in by_session.items():
            live.sort(key=lambda e: e.pos)
            for i, e in enumerate(live):
                if e.id not in wanted:
                    continue
                below = self._below(e.node.parent, pool)
                above = [x.pos for x in live[i + 1:] if _on_path(e.node, x.node)]
                if session not in prob:
                    prob[session] = self._return_prob(session, tick, tau_fresh, hazard)
                p = max(prob[session], self._freq(e, tick, pool))
                cover = float(e.pos - below)
                if above:
                    cover *= self.delta
                    if self.thin:  # a resume uniform in [below, next deeper): replay it saves
                        cover *= self.thin * (min(above) - e.pos) / max(1, min(above) - below)
                out[e.id] = p * cover + (self._base.get(e.id, 0.0) if aging else 0.0)
        return out

    @staticmethod
    def _below(node: RadixNode | None, pool: _Pool) -> int:
        """Position of the nearest live snapshot of `pool` at or above `node` (any session), 0
        if none; from e.node.parent: the next shallower snapshot on e's path."""
        while node is not None:
            e = pool.at(node)
            if e is not None:
                return e.pos
            node = node.parent
        return 0

    def choose(self, candidates: list[SnapshotEntry], tick: int,
               pool: _Pool | None = None) -> SnapshotEntry:
        """The rule's victim among `candidates` of `pool` (default the real one)."""
        vals = self.values(candidates, tick, pool=pool)
        return min(candidates, key=lambda e: (vals[e.id], e.last_access, e.pos, e.id))

    def swap_victim(self, node: RadixNode, session: str, candidates: list[SnapshotEntry],
                    pool: _Pool | None = None) -> SnapshotEntry | None:
        """With `swap`: the deepest of `candidates` that belongs to `session`, lies on `node`'s
        path (strictly above it), sits off the interval grid (a request end or branch point, not
        an interval snapshot), has no hit from another session and is not a branch point a
        session's first request made inside another session's prefix; None if there is none."""
        if not self.swap:
            return None
        pool = pool or self._pool
        grid = self.grid_interval
        best = None
        for e in candidates:
            if (e.session == session and e.node is not node and not (grid and e.pos % grid == 0)
                    and not pool.foreign.get(e.id) and e.node.id not in self._shared_nodes
                    and _on_path(e.node, node)
                    and (best is None or e.pos > best.pos)):
                best = e
        return best

    def victim(self, candidates: list[SnapshotEntry], tick: int) -> SnapshotEntry | None:
        self._swapping = None
        if self._offer is not None:
            node, session = self._offer
            self._offer = None
            a = self.swap_victim(node, session, candidates)
            if a is not None:
                self._swapping = a.id
                return a
        v = self.choose(candidates, tick)
        if self.aging != "off":
            self._chosen = (v.id, self.values([v], tick)[v.id])
        return v

    def admit_value(self, pos: int, session: str, node: RadixNode, tick: int,
                    pool: _Pool | None = None) -> float:
        """Value a snapshot at `pos` would have if admitted now (for admission control)."""
        pool = pool or self._pool
        below = self._below(node.parent if node.end == pos else node, pool)
        base = self._L if self.aging in ("gdsf", "static") else 0.0
        return self._return_prob(session, tick, self._tau_fresh(), pool.hazard) * (
            pos - below) + base

    def admits(self, node: RadixNode, pos: int, session: str, tick: int, victim: SnapshotEntry,
               pool: _Pool | None = None) -> bool:
        """Admission control: is the newcomer worth at least the victim (times the margin)?"""
        vals = self.values([victim], tick, inflate=self.aging != "evict", pool=pool)
        return self.admit_margin * self.admit_value(pos, session, node, tick, pool) >= vals[
            victim.id]

    def should_admit(self, node: RadixNode, pos: int, session: str, tick: int,
                     victim: SnapshotEntry) -> bool:
        """Refuse a newcomer worth less than the cheapest victim (only when the pool is full);
        with `duel`, only while the strict shadow leads; a swap victim is always replaced."""
        if self._swapping == victim.id:
            return True
        if not self.admit_control or self.lenient():
            return True
        if self.admits(node, pos, session, tick, victim):
            return True
        self._chosen = None  # the victim stays: the inflation value does not move
        return False


POLICIES["adaptive"] = Adaptive
