"""Snapshot eviction policies: one small class each, and the registry the CLI chooses from.

A policy only chooses victims. ``victim`` receives the evictable entries (none in use) and
returns one of them, or None to refuse the admission (e.g. everything left is pinned). Ties are
broken deterministically everywhere: shallower ``pos`` first, then older (smaller) ``id``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.cache.radix import RadixNode
    from engine.cache.snapshots import SessionTable, SnapshotEntry, SnapshotIndex


def forecast_score(entry: SnapshotEntry) -> int:
    """The reference write-up's forecast: ``last_access * (1 + hit_count)``; low = evict."""
    return entry.last_access * (1 + entry.hit_count)


class Policy(ABC):
    """Base: bound to one index and its session table; chooses victims among candidates."""

    name: ClassVar[str]
    offline: ClassVar[bool] = False  # True: needs the future (simulator only)
    # True: takes the model's FLOP figures (settings.policy_flops) as constructor options
    uses_model_flops: ClassVar[bool] = False
    # The manager's snapshot interval (0 = off): positions on this grid are interval snapshots,
    # the others request ends or branch points (the adaptive policy's `swap` tells them apart).
    grid_interval: int = 0

    def __init__(self) -> None:
        self.index: SnapshotIndex | None = None
        self.sessions: SessionTable | None = None

    def bind(self, index: SnapshotIndex, sessions: SessionTable) -> None:
        self.index = index
        self.sessions = sessions

    @abstractmethod
    def victim(self, candidates: list[SnapshotEntry], tick: int) -> SnapshotEntry | None:
        """One of ``candidates`` (all evictable, non-empty) to evict, or None to refuse."""

    def should_admit(
        self, node: RadixNode, pos: int, session: str, tick: int, victim: SnapshotEntry
    ) -> bool:
        """Admission control, asked only when the pool is full and ``victim`` was chosen:
        False refuses the newcomer (counted as ``admit_refused``) and keeps the victim."""
        return True

    def on_match(self, path: Sequence[RadixNode], matched: int, tick: int) -> None:  # noqa: B027
        """A request matched ``path`` (its KV prefix) up to ``matched``; before its restore."""

    def on_offer(self, node: RadixNode, pos: int, session: str, tick: int) -> None:  # noqa: B027
        """A snapshot at ``pos`` on ``node`` is offered for admission (every offer, also those
        the index then skips because one is already there, before any eviction)."""

    def on_admit(self, entry: SnapshotEntry, tick: int) -> None:  # noqa: B027
        pass

    def on_hit(self, entry: SnapshotEntry, tick: int) -> None:  # noqa: B027
        pass

    def on_evict(self, entry: SnapshotEntry, tick: int) -> None:  # noqa: B027
        pass

    def options(self) -> dict[str, Any]:
        """The policy's options, for result JSON."""
        return {}

    def _resumable(self, session: str) -> bool:
        return self.sessions is not None and self.sessions.is_resumable(session)


class LRU(Policy):
    """Evict the least recently used: min ``last_access`` (admission, or last use as anchor)."""

    name = "lru"

    def victim(self, candidates: list[SnapshotEntry], tick: int) -> SnapshotEntry | None:
        return min(candidates, key=lambda e: (e.last_access, e.pos, e.id))


class Forecast(Policy):
    """Evict min ``last_access * (1 + hit_count)`` (the baseline of the PR 207 write-up)."""

    name = "forecast"

    def victim(self, candidates: list[SnapshotEntry], tick: int) -> SnapshotEntry | None:
        return min(candidates, key=lambda e: (forecast_score(e), e.pos, e.id))


class TailPin(Policy):
    """Pin the ``k`` deepest snapshots of each resumable session; forecast among the rest.

    A session is resumable once a continuation request arrived for it. The pinned set is the
    top ``k`` by (pos, then newer id) among all of the session's live entries, in use or not.
    Returns None (refuse the admission) when every candidate is pinned.
    """

    name = "tail-pin"

    def __init__(self, k: int = 8) -> None:
        super().__init__()
        if k < 0:
            raise ConfigError(f"tail-pin k must be >= 0, got {k}")
        self.k = k

    def options(self) -> dict[str, Any]:
        return {"k": self.k}

    def pinned(self) -> set[int]:
        """Ids of the pinned entries."""
        assert self.index is not None, "policy not bound to an index"
        by_session: dict[str, list[SnapshotEntry]] = {}
        for e in self.index.entries.values():
            if self._resumable(e.session):
                by_session.setdefault(e.session, []).append(e)
        pins: set[int] = set()
        for entries in by_session.values():
            entries.sort(key=lambda e: (e.pos, e.id), reverse=True)
            pins.update(e.id for e in entries[: self.k])
        return pins

    def victim(self, candidates: list[SnapshotEntry], tick: int) -> SnapshotEntry | None:
        pins = self.pinned() if self.k else set()
        rest = [e for e in candidates if e.id not in pins]
        if not rest:
            return None
        return min(rest, key=lambda e: (forecast_score(e), e.pos, e.id))


class TwoTier(Policy):
    """Evict non-resumable sessions' snapshots before any resumable one's; forecast per tier."""

    name = "two-tier"

    def victim(self, candidates: list[SnapshotEntry], tick: int) -> SnapshotEntry | None:
        return min(
            candidates,
            key=lambda e: (self._resumable(e.session), forecast_score(e), e.pos, e.id),
        )


class Marconi(Policy):
    """Evict min of normalised recency + ``alpha`` * normalised FLOPs saved per byte.

    Recency is ``last_access`` min-max normalised over the candidates; FLOPs saved by a snapshot
    at ``pos`` are ``flops_per_token * pos + attn_flops_coeff * pos**2`` (the prefill it spares),
    divided by its bytes and min-max normalised likewise. Defaults model Qwen3-Next-80B-A3B:
    2 x 3e9 active parameters per token, and 12 attention layers x 16 query heads x head dim 256
    x 2 FLOPs x 2 matmuls / 2 (causal) = 98304 per pos**2.
    """

    name = "marconi"
    uses_model_flops = True

    def __init__(
        self,
        alpha: float = 1.0,
        flops_per_token: float = 6.0e9,
        attn_flops_coeff: float = 98304.0,
    ) -> None:
        super().__init__()
        if alpha < 0 or flops_per_token < 0 or attn_flops_coeff < 0:
            raise ConfigError("marconi alpha, flops_per_token and attn_flops_coeff must be >= 0")
        self.alpha = float(alpha)
        self.flops_per_token = float(flops_per_token)
        self.attn_flops_coeff = float(attn_flops_coeff)

    def options(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "flops_per_token": self.flops_per_token,
            "attn_flops_coeff": self.attn_flops_coeff,
        }

    def flops_per_byte(self, entry: SnapshotEntry) -> float:
        p = entry.pos
        return (self.flops_per_token * p + self.attn_flops_coeff * p * p) / max(entry.nbytes, 1)

    def victim(self, candidates: list[SnapshotEntry], tick: int) -> SnapshotEntry | None:
        # one pass for the ranges, one for the scores (this is most of marconi's time)
        fpt, coeff, alpha = self.flops_per_token, self.attn_flops_coeff, self.alpha
        recency = [float(e.last_access) for e in candidates]
        value = [(fpt * e.pos + coeff * e.pos * e.pos) / max(e.nbytes, 1) for e in candidates]
        r_lo, r_hi, v_lo, v_hi = min(recency), max(recency), min(value), max(value)
        r_span, v_span = r_hi - r_lo, v_hi - v_lo
        best: tuple[float, int, int] | None = None
        pick = candidates[0]
        for e, r, v in zip(candidates, recency, value, strict=True):
            rn = (r - r_lo) / r_span if r_hi > r_lo else 0.0
            vn = (v - v_lo) / v_span if v_hi > v_lo else 0.0
            key = (rn + alpha * vn, e.pos, e.id)
            if best is None or key < best:
                best, pick = key, e
        return pick


class Belady(Policy):
    """Offline optimum: evict the entry whose next use as a resume anchor is farthest (or never).

    Simulator only: ``next_use(entry, tick)`` returns the tick of the entry's next use, or
    ``math.inf``. Ties (e.g. several never used again): shallower pos, then older id.
    """

    name = "belady"
    offline = True

    def __init__(self, next_use: Callable[[SnapshotEntry, int], float] | None = None) -> None:
        super().__init__()
        if next_use is None:
            raise ConfigError("policy 'belady' is simulator-only: it needs next_use (the future)")
        self.next_use = next_use

    def victim(self, candidates: list[SnapshotEntry], tick: int) -> SnapshotEntry | None:
        return min(candidates, key=lambda e: (-self.next_use(e, tick), e.pos, e.id))


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (LRU, Forecast, TailPin, TwoTier, Marconi, Belady)
}


def online_policies() -> list[str]:
    """Policy names the engine can run (those that need no future)."""
    return [name for name, cls in POLICIES.items() if not cls.offline]


def make_policy(name: str, **opts: Any) -> Policy:
    """Build a registered policy; unknown names or options raise ConfigError."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    try:
        return cls(**opts)
    except TypeError as exc:
        raise ConfigError(f"bad options for policy {name!r}: {exc}") from None


__all__ = [
    "POLICIES",
    "LRU",
    "Belady",
    "Forecast",
    "Marconi",
    "Policy",
    "TailPin",
    "TwoTier",
    "forecast_score",
    "make_policy",
    "online_policies",
]
