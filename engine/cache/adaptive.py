"""The `adaptive` snapshot policy: evict the snapshot whose loss costs the least expected replay
per request of residence, learned online from the session table.

The rule, for an evictable snapshot e of session S (n requests so far, idle = requests since its
last one, tau = its mean gap between requests, or the mean gap of all sessions for a new one):

    value(e) = max(P(S), F(e)) * (e.pos - below(e)) * (delta if S holds a deeper one on e's path)
    P(S)     = surv(n) / (tau + idle)   expected uses per request (heavy-tailed return)
    surv(n)  = share of sessions with n requests that got another (a session counts as ended
               once idle for `horizon` x the mean gap; the others are not counted yet)
    F(e)     = hits on e by other sessions per request since it was admitted (shared prefixes)
    below(e) = position of the nearest live snapshot above e on its path (any session), or 0

Evict the lowest value (ties: older, then shallower); when the pool is full a newcomer worth
less than that victim is not admitted. `swap` (on by default): a newcomer of session S first
takes the slot of S's deepest evictable snapshot on its own path that it makes redundant (off
the interval grid, never hit by another session, not a branch point S's first request made
inside another session's prefix), with no admission test. On the yardstick (docs/POLICIES.md)
swap closes more of the gap on the chat and agentic families and about 0.01-0.02 less on the
conversation slices than the rule without it (swap=false, the default before).

`below` and the dominance counts are kept up to date on every admission and eviction (the
snapshot tree is walked only between a changed snapshot and the next ones under it), so a
decision costs O(candidates), not O(pool x path).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from engine.cache.policies import POLICIES, Policy
from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.cache.radix import RadixNode
    from engine.cache.snapshots import SessionInfo, SnapshotEntry

_SURV_A, _SURV_B = 0.5, 1.0  # survival prior: (more + 0.5) / (more + ended + 1)


def _on_path(shallow: RadixNode, deep: RadixNode) -> bool:
    """Is `shallow` an ancestor of (or equal to) `deep` in the radix tree?"""
    node: RadixNode | None = deep
    while node is not None and node.end > shallow.end:
        node = node.parent
    return node is shallow


class Adaptive(Policy):
    """Expected-replay value eviction with admission control (the module docstring's rule)."""

    name = "adaptive"

    def __init__(self, delta: float = 0.05, admit_control: bool = True, horizon: float = 8.0,
                 swap: bool = True) -> None:
        super().__init__()
        if not 0 <= delta <= 1:
            raise ConfigError(f"adaptive delta must be in [0, 1], got {delta}")
        if horizon <= 0:
            raise ConfigError(f"adaptive horizon must be > 0, got {horizon}")
        self.delta = float(delta)
        self.admit_control = bool(admit_control)
        self.horizon = float(horizon)
        self.swap = bool(swap)
        # session statistics
        self._reach: list[int] = [0]  # _reach[n]: sessions that reached >= n requests
        self._dead: list[int] = [0]  # _dead[n]: sessions counted as ended with n requests
        self._counted: dict[str, int] = {}  # session -> n it was counted as ended with
        self._idle_q: deque[tuple[int, str]] = deque()
        self._gap_sum = 0.0  # inter-request gaps of continued sessions
        self._gap_n = 0
        self._seen: set[str] = set()  # sessions that held a snapshot
        self._returned: set[str] = set()  # ... and came back
        self._current: str | None = None  # session of the running request
        self._foreign: dict[int, int] = {}  # entry id -> hits by other sessions
        self._p: dict[str, float] = {}  # P(S) memo for the tick `_p_tick`
        self._p_tick = -1
        # snapshot tree: nearest live snapshot above each entry, and who hangs below whom
        self._below: dict[int, SnapshotEntry | None] = {}
        self._kids: dict[int, set[int]] = {}  # entry id -> ids whose `below` it is (-1: none)
        self._dom: dict[int, int] = {}  # entry id -> live same-session snapshots under it
        self._cover: dict[int, float] = {}  # entry id -> (pos - below) * (delta if dominated)
        self._live: dict[int, SnapshotEntry] = {}
        # swap
        self._offer: tuple[RadixNode, str] | None = None  # the newcomer being offered now
        self._swapping: int | None = None  # id of the victim chosen by the swap rule
        self._matched = 0  # the running request's matched prefix length
        self._shared_nodes: dict[int, RadixNode] = {}  # branch points swap must spare
        self._shared_prune = 1024  # prune nodes the KV tree has cut when this many are held

    def options(self) -> dict[str, Any]:
        return {"delta": self.delta, "admit_control": self.admit_control,
                "horizon": self.horizon, "swap": self.swap}

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
        self._current = info.name
        was = self._counted.pop(info.name, None)
        if was is not None:  # counted as ended too early: it came back
            self._dead[was] -= 1
        self._idle_q.append((tick, info.name))
        self._reap(tick)
        self._p_tick = -1

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

    def _survival(self, n: int) -> float:
        """P(a session with n requests gets another), from the sessions seen so far."""
        r = self._reach
        more = r[n + 1] if n + 1 < len(r) else 0
        dead = self._dead[n] if n < len(self._dead) else 0
        return (more + _SURV_A) / (more + dead + _SURV_B)

    def _tau_fresh(self) -> float:
        return max(1.0, self._gap_sum / self._gap_n) if self._gap_n else 1.0

    def _return_prob(self, session: str, tick: int) -> float:
        """P(S): expected uses per request of a snapshot of ``session`` (memoised per tick)."""
        if tick != self._p_tick:
            self._p.clear()
            self._p_tick = tick
        p = self._p.get(session)
        if p is not None:
            return p
        info = self.sessions.get(session) if self.sessions is not None else None
        if info is None:  # not in the table (yet): the share of sessions that came back
            return (len(self._returned) + 0.5) / (len(self._seen) + 1.0)
        if info.requests > 1:
            tau = max(1.0, (info.last_tick - info.first_tick) / max(1, info.requests - 1))
        else:
            tau = self._tau_fresh()
        p = self._survival(info.requests) / (tau + max(0, tick - info.last_tick))
        self._p[session] = p
        return p

    def _note(self, session: str) -> None:
        self._seen.add(session)
        info = self.sessions.get(session) if self.sessions is not None else None
        if info is not None and info.continuations > 0:
            self._returned.add(session)

    # ---- the snapshot tree -------------------------------------------------------------------
    @staticmethod
    def _above(node: RadixNode | None) -> SnapshotEntry | None:
        """The nearest live snapshot at or above ``node`` (None if none)."""
        while node is not None:
            if node.snapshot is not None:
                return node.snapshot
            node = node.parent
        return None

    def _link(self, e: SnapshotEntry, below: SnapshotEntry | None) -> None:
        self._below[e.id] = below
        self._kids.setdefault(below.id if below is not None else -1, set()).add(e.id)
        self._recover(e)

    def _recover(self, e: SnapshotEntry) -> None:
        """Refresh e's cover after its `below` or its dominance count changed."""
        below = self._below.get(e.id)
        cover = float(e.pos - (below.pos if below is not None else 0))
        if self._dom.get(e.id, 0):
            cover *= self.delta
        self._cover[e.id] = cover

    def _unlink(self, e: SnapshotEntry) -> None:
        below = self._below.pop(e.id, None)
        kids = self._kids.get(below.id if below is not None else -1)
        if kids is not None:
            kids.discard(e.id)

    def on_admit(self, entry: SnapshotEntry, tick: int) -> None:
        self._note(entry.session)
        below = self._above(entry.node.parent)
        self._live[entry.id] = entry
        self._link(entry, below)
        # the nearest snapshots under entry's node hung from `below`: now they hang from entry
        todo = list(entry.node.children.values())
        while todo:
            node = todo.pop()
            x = node.snapshot
            if x is None:
                todo.extend(node.children.values())
            elif x.id in self._live:
                self._unlink(x)
                self._link(x, entry)
        self._dom[entry.id] = sum(1 for x in self._subtree(entry)
                                  if x.session == entry.session)
        self._recover(entry)
        a = below
        while a is not None:
            if a.session == entry.session:
                self._dom[a.id] += 1
                if self._dom[a.id] == 1:
                    self._recover(a)
            a = self._below[a.id]

    def _subtree(self, e: SnapshotEntry) -> list[SnapshotEntry]:
        """Every live snapshot under ``e`` (through the `below` links)."""
        out: list[SnapshotEntry] = []
        todo = list(self._kids.get(e.id, ()))
        while todo:
            x = self._live[todo.pop()]
            out.append(x)
            todo.extend(self._kids.get(x.id, ()))
        return out

    def on_hit(self, entry: SnapshotEntry, tick: int) -> None:
        self._note(entry.session)
        if self._current is not None and self._current != entry.session:
            self._foreign[entry.id] = self._foreign.get(entry.id, 0) + 1

    def on_evict(self, entry: SnapshotEntry, tick: int) -> None:
        self._foreign.pop(entry.id, None)
        if self._live.pop(entry.id, None) is None:
            return
        below = self._below.get(entry.id)
        a = below
        while a is not None:
            if a.session == entry.session:
                self._dom[a.id] -= 1
                if self._dom[a.id] == 0:
                    self._recover(a)
            a = self._below[a.id]
        self._unlink(entry)
        for x in self._kids.pop(entry.id, ()):  # its dominance count does not change
            self._link(self._live[x], below)
        self._dom.pop(entry.id, None)
        self._cover.pop(entry.id, None)

    # ---- values ------------------------------------------------------------------------------
    def value(self, e: SnapshotEntry, tick: int) -> float:
        """value(e) of the rule."""
        p = self._return_prob(e.session, tick)
        hits = self._foreign.get(e.id, 0)
        if hits:
            p = max(p, hits / max(1, tick - e.created))
        return p * self._cover[e.id]

    def values(self, entries: list[SnapshotEntry], tick: int) -> dict[int, float]:
        """value(e) for each entry id."""
        return {e.id: self.value(e, tick) for e in entries}

    def choose(self, candidates: list[SnapshotEntry], tick: int) -> SnapshotEntry:
        """The rule's victim among ``candidates``: min (value, last_access, pos, id); `value`
        inlined, since this loop is most of the policy's time."""
        if tick != self._p_tick:
            self._p.clear()
            self._p_tick = tick
        memo, foreign, covers = self._p, self._foreign, self._cover
        best: SnapshotEntry | None = None
        best_v = 0.0
        for e in candidates:
            p = memo.get(e.session)
            if p is None:
                p = self._return_prob(e.session, tick)
            if foreign:
                hits = foreign.get(e.id)
                if hits:
                    p = max(p, hits / max(1, tick - e.created))
            v = p * covers[e.id]
            if best is None or v < best_v or (v == best_v and (e.last_access, e.pos, e.id) < (
                    best.last_access, best.pos, best.id)):
                best, best_v = e, v
        assert best is not None, "choose needs candidates"
        return best

    def admit_value(self, pos: int, session: str, node: RadixNode, tick: int) -> float:
        """Value a snapshot at ``pos`` would have if admitted now (for admission control)."""
        below = self._above(node.parent if node.end == pos else node)
        return self._return_prob(session, tick) * (pos - (below.pos if below else 0))

    # ---- swap --------------------------------------------------------------------------------
    def on_match(self, path: Sequence[RadixNode], matched: int, tick: int) -> None:
        self._matched = matched

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

    def swap_victim(self, node: RadixNode, session: str,
                    candidates: list[SnapshotEntry]) -> SnapshotEntry | None:
        """With `swap`: the deepest of `candidates` that belongs to `session`, lies on `node`'s
        path (strictly above it), sits off the interval grid (a request end or branch point, not
        an interval snapshot), has no hit from another session and is not a branch point a
        session's first request made inside another session's prefix; None if there is none."""
        if not self.swap:
            return None
        grid = self.grid_interval
        best = None
        for e in candidates:
            if (e.session == session and e.node is not node and not (grid and e.pos % grid == 0)
                    and not self._foreign.get(e.id) and e.node.id not in self._shared_nodes
                    and _on_path(e.node, node)
                    and (best is None or e.pos > best.pos)):
                best = e
        return best

    # ---- decisions ---------------------------------------------------------------------------
    def victim(self, candidates: list[SnapshotEntry], tick: int) -> SnapshotEntry | None:
        self._swapping = None
        if self._offer is not None:
            node, session = self._offer
            self._offer = None
            a = self.swap_victim(node, session, candidates)
            if a is not None:
                self._swapping = a.id
                return a
        return self.choose(candidates, tick)

    def should_admit(self, node: RadixNode, pos: int, session: str, tick: int,
                     victim: SnapshotEntry) -> bool:
        """Refuse a newcomer worth less than the victim (asked only when the pool is full); a
        swap victim is always replaced."""
        if self._swapping == victim.id or not self.admit_control:
            return True
        return self.admit_value(pos, session, node, tick) >= self.value(victim, tick)


POLICIES["adaptive"] = Adaptive
