"""The `adaptive` snapshot policy: evict the snapshot whose loss costs the least expected replay.

Rule, for every evictable snapshot e of session S:

    value(e) = P(S resumes) * gap(e) * (1 if e is the deepest snapshot on its path else delta)
    gap(e)   = e.pos - pos of the next shallower live snapshot on e's path (0 if none)
    P(S)     = prior(S) / (1 + idle(S) / tau(S))          (a heavy-tailed return hazard)

prior is 1 for a session that has resumed before, and for a fresh session the rate at which
fresh sessions have come back so far (learned online, smoothed). tau is the session's own mean
gap between requests (in requests), or the mean gap of resumed sessions for a fresh one. Evict
min value (ties: older, then shallower). A new snapshot worth less than every candidate is not
admitted. Both regimes of the write-up fall out of it: a deep idle conversation keeps its tail
against one-shot pressure (its prior is 1, theirs tends to 0), and in balanced round-robin every
conversation keeps its deepest snapshot while the dominated shallower ones go first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.cache.policies import POLICIES, Policy
from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.cache.radix import RadixNode
    from engine.cache.snapshots import SnapshotEntry


def _on_path(shallow: RadixNode, deep: RadixNode) -> bool:
    """Is `shallow` an ancestor of (or equal to) `deep` in the radix tree?"""
    node: RadixNode | None = deep
    while node is not None and node.end > shallow.end:
        node = node.parent
    return node is shallow


class Adaptive(Policy):
    """Expected-replay value eviction (see the module docstring for the rule)."""

    name = "adaptive"

    def __init__(self, delta: float = 0.05, admit_control: bool = True,
                 flops_per_token: float = 0.0, attn_flops_coeff: float = 0.0) -> None:
        super().__init__()
        if not 0 <= delta <= 1:
            raise ConfigError(f"adaptive delta must be in [0, 1], got {delta}")
        self.delta = float(delta)
        self.admit_control = bool(admit_control)
        # Accepted so the engine can pass its FLOP model as to marconi; value is in tokens.
        self._flops = (flops_per_token, attn_flops_coeff)
        self._seen: set[str] = set()
        self._returned: set[str] = set()

    def options(self) -> dict[str, Any]:
        return {"delta": self.delta, "admit_control": self.admit_control}

    # ---- session statistics ----------------------------------------------------------------
    def _note(self, session: str) -> None:
        self._seen.add(session)
        info = self.sessions.get(session) if self.sessions is not None else None
        if info is not None and info.continuations > 0:
            self._returned.add(session)

    def on_admit(self, entry: SnapshotEntry, tick: int) -> None:
        self._note(entry.session)

    def on_hit(self, entry: SnapshotEntry, tick: int) -> None:
        self._note(entry.session)

    def _fresh_prior(self) -> float:
        return (len(self._returned) + 0.5) / (len(self._seen) + 1.0)

    def _return_prob(self, session: str, tick: int, tau_fresh: float) -> float:
        info = self.sessions.get(session) if self.sessions is not None else None
        if info is None:
            return self._fresh_prior()
        if info.continuations > 0:
            prior = 1.0
            tau = max(1.0, (info.last_tick - info.first_tick) / max(1, info.requests - 1))
        else:
            prior = self._fresh_prior()
            tau = tau_fresh
        idle = max(0, tick - info.last_tick)
        return prior / (1.0 + idle / tau)

    def _tau_fresh(self) -> float:
        gaps = []
        for name in self._returned:
            info = self.sessions.get(name) if self.sessions is not None else None
            if info is not None and info.requests > 1:
                gaps.append((info.last_tick - info.first_tick) / (info.requests - 1))
        return max(1.0, sum(gaps) / len(gaps)) if gaps else 1.0

    # ---- values ------------------------------------------------------------------------------
    def values(self, entries: list[SnapshotEntry], tick: int) -> dict[int, float]:
        """value(e) for each entry id (all live entries take part in gap/dominance)."""
        assert self.index is not None, "policy not bound to an index"
        by_session: dict[str, list[SnapshotEntry]] = {}
        for e in self.index.entries.values():
            by_session.setdefault(e.session, []).append(e)
        tau_fresh = self._tau_fresh()
        prob: dict[str, float] = {}
        out: dict[int, float] = {}
        wanted = {e.id for e in entries}
        for session, live in by_session.items():
            live.sort(key=lambda e: e.pos)
            for i, e in enumerate(live):
                if e.id not in wanted:
                    continue
                below = next((x.pos for x in reversed(live[:i]) if _on_path(x.node, e.node)), 0)
                deeper = any(_on_path(e.node, x.node) for x in live[i + 1:])
                if session not in prob:
                    prob[session] = self._return_prob(session, tick, tau_fresh)
                out[e.id] = prob[session] * (e.pos - below) * (self.delta if deeper else 1.0)
        return out

    def victim(self, candidates: list[SnapshotEntry], tick: int) -> SnapshotEntry | None:
        vals = self.values(candidates, tick)
        return min(candidates, key=lambda e: (vals[e.id], e.last_access, e.pos, e.id))

    def admit_value(self, pos: int, session: str, node: RadixNode, tick: int) -> float:
        """Value a snapshot at `pos` would have if admitted now (for admission control)."""
        assert self.index is not None
        below = max((e.pos for e in self.index.entries.values()
                     if e.session == session and e.pos < pos and _on_path(e.node, node)),
                    default=0)
        return self._return_prob(session, tick, self._tau_fresh()) * (pos - below)

    def should_admit(self, node: RadixNode, pos: int, session: str, tick: int,
                     victim: SnapshotEntry) -> bool:
        """Refuse a newcomer worth less than the cheapest victim (only when the pool is full)."""
        if not self.admit_control:
            return True
        vals = self.values([victim], tick)
        return self.admit_value(pos, session, node, tick) >= vals[victim.id]


POLICIES["adaptive"] = Adaptive
