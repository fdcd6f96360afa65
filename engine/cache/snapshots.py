"""Snapshot index: which recurrent-state snapshots exist, where they sit, and which slot holds each.

A snapshot is the full recurrent state at one grid position ``pos`` (a multiple of the chunk,
64) on one radix path; it hangs on the radix node that ends exactly at ``pos``. The engine keeps
the tensors in a pool of ``slots`` equal slots and indexes it with ``SnapshotEntry.slot``; this
module only does the bookkeeping, so the simulator runs the very same code.

Snapshots do not pin KV: when the radix tree evicts a node its snapshot is dropped (reason
"kv"). Entries held by a running request (``in_use > 0``) are never dropped by a policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.cache.radix import RadixNode

if TYPE_CHECKING:
    from engine.cache.policies import Policy

DROP_REASONS = ("policy", "kv", "replaced")


@dataclass(slots=True, eq=False)
class SnapshotEntry:
    """One snapshot; identity (not value) equality, so entries can live in sets."""

    id: int
    pos: int  # multiple of chunk (64)
    node: RadixNode  # the radix node that ends exactly at pos
    session: str
    slot: int  # index into the engine's tensor pool
    created: int  # tick of admission
    last_access: int  # tick of admission or of the last restore as a resume anchor
    hit_count: int
    in_use: int  # > 0 while a request holds it (never evicted then)
    nbytes: int

    def __repr__(self) -> str:
        return (
            f"SnapshotEntry(id={self.id}, pos={self.pos}, session={self.session!r}, "
            f"slot={self.slot}, created={self.created}, last_access={self.last_access}, "
            f"hit_count={self.hit_count}, in_use={self.in_use})"
        )


@dataclass(slots=True)
class SessionInfo:
    """What the cache knows about one conversation."""

    name: str
    first_tick: int
    last_tick: int
    requests: int = 0
    continuations: int = 0  # requests that continued this session

    @property
    def resumable(self) -> bool:
        """Resumed at least once: a continuation request arrived for it."""
        return self.continuations > 0


class SessionTable:
    """Sessions seen so far, keyed by name (explicit ids or inherited ``r<tick>`` ids)."""

    def __init__(self) -> None:
        self._by_name: dict[str, SessionInfo] = {}
        self.resumable_count = 0

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> SessionInfo | None:
        return self._by_name.get(name)

    def is_resumable(self, name: str) -> bool:
        info = self._by_name.get(name)
        return info is not None and info.continuations > 0

    def record(self, name: str, tick: int, continuation: bool) -> SessionInfo:
        """Count one request of session ``name`` at ``tick``."""
        info = self._by_name.get(name)
        if info is None:
            info = self._by_name[name] = SessionInfo(name, tick, tick)
        info.requests += 1
        info.last_tick = tick
        if continuation:
            if info.continuations == 0:
                self.resumable_count += 1
            info.continuations += 1
        return info


class SnapshotIndex:
    """Slot allocation, placement on radix nodes and policy-driven eviction of snapshots."""

    def __init__(self, slots: int, nbytes: int, policy: Policy) -> None:
        if slots < 0:
            raise ValueError(f"slots must be >= 0, got {slots}")
        self.slots = slots
        self.nbytes = nbytes
        self.policy = policy
        self.sessions = SessionTable()
        self.clock = 0  # current tick, for policy hooks on drops; the manager advances it
        self.entries: dict[int, SnapshotEntry] = {}  # id -> entry, in admission order
        self._free_slots: list[int] = list(range(slots - 1, -1, -1))  # pop() hands out 0, 1, ...
        self._next_id = 0
        self.counters: dict[str, int] = {
            "hits": 0,
            "misses": 0,
            "admits": 0,
            "admit_refused": 0,
            **{f"evictions_{r}": 0 for r in DROP_REASONS},
        }
        policy.bind(self, self.sessions)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def full(self) -> bool:
        return len(self.entries) >= self.slots

    def deepest(self, path: list[RadixNode], limit: int) -> SnapshotEntry | None:
        """The deepest snapshot on ``path`` with ``pos <= limit`` (O(len(path)))."""
        for node in reversed(path):
            entry = node.snapshot
            if entry is not None and entry.pos <= limit:
                return entry
        return None

    def candidates(self) -> list[SnapshotEntry]:
        """Entries a policy may evict: not held by a running request."""
        return [e for e in self.entries.values() if e.in_use == 0]

    def admit(self, node: RadixNode, pos: int, session: str, tick: int) -> SnapshotEntry | None:
        """Place a new snapshot on ``node`` (which ends at ``pos``), evicting via the policy.

        Returns None, changing nothing, when the node already has one; returns None and counts
        ``admit_refused`` when the pool is full and the policy names no victim or refuses the
        newcomer (``Policy.should_admit``).
        """
        if node.end != pos:
            raise ValueError(f"snapshot at {pos} must sit on a node ending there, not {node!r}")
        if node.snapshot is not None:
            return None
        if len(self.entries) >= self.slots:
            victim = self._choose_victim(tick)
            if victim is None or not self.policy.should_admit(node, pos, session, tick, victim):
                self.counters["admit_refused"] += 1
                return None
            self.drop(victim, "policy")
        entry = SnapshotEntry(
            id=self._next_id,
            pos=pos,
            node=node,
            session=session,
            slot=self._free_slots.pop(),
            created=tick,
            last_access=tick,
            hit_count=0,
            in_use=0,
            nbytes=self.nbytes,
        )
        self._next_id += 1
        node.snapshot = entry
        self.entries[entry.id] = entry
        self.counters["admits"] += 1
        self.policy.on_admit(entry, tick)
        return entry

    def hit(self, entry: SnapshotEntry, tick: int) -> None:
        """``entry`` is restored as a resume anchor at ``tick``; hold it until ``release``."""
        entry.hit_count += 1
        entry.last_access = tick
        entry.in_use += 1
        self.counters["hits"] += 1
        self.policy.on_hit(entry, tick)

    def release(self, entry: SnapshotEntry) -> None:
        if entry.in_use <= 0:
            raise RuntimeError(f"release of a snapshot not in use: {entry!r}")
        entry.in_use -= 1

    def drop(self, entry: SnapshotEntry, reason: str) -> None:
        """Remove ``entry`` and free its slot; reason: "policy" | "kv" | "replaced"."""
        if reason not in DROP_REASONS:
            raise ValueError(f"drop reason must be one of {DROP_REASONS}, got {reason!r}")
        if entry.in_use:
            raise RuntimeError(f"dropping a snapshot in use ({reason}): {entry!r}")
        if self.entries.pop(entry.id, None) is not entry:
            raise RuntimeError(f"dropping a snapshot that is not in the index: {entry!r}")
        if entry.node.snapshot is entry:
            entry.node.snapshot = None
        self._free_slots.append(entry.slot)
        self.counters[f"evictions_{reason}"] += 1
        self.policy.on_evict(entry, self.clock)

    def _choose_victim(self, tick: int) -> SnapshotEntry | None:
        candidates = self.candidates()
        if not candidates:
            return None
        victim = self.policy.victim(candidates, tick)
        if victim is not None and (victim.in_use or self.entries.get(victim.id) is not victim):
            raise RuntimeError(f"policy {self.policy.name!r} chose an ineligible victim {victim!r}")
        return victim
