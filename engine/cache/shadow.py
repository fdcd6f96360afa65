"""Shadow snapshot pools for set-dueling admission: metadata only (no tensors, no slots), run
beside the real pool on the same request stream to count the replay an admission rule would
have caused.

A shadow holds `SnapshotEntry` records keyed by the radix node they would hang on (the real
pool's `node.snapshot` stays the real one's). It sees every request's match and every offered
snapshot position, evicts with its owner's eviction rule (`Adaptive.choose`) and admits either
everything ("lenient") or what the owner's admission control accepts ("strict"). Entries whose
radix node the KV tree evicted are dropped lazily, as the real pool drops them eagerly.

Without KV evictions a shadow replays exactly what a real pool under its rule would (the test
suite checks it); under KV pressure only approximately, since the positions offered and hence
the radix splits follow the real pool's restores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine.cache.snapshots import SnapshotEntry

if TYPE_CHECKING:
    from engine.cache.adaptive import Adaptive
    from engine.cache.radix import RadixNode


class ShadowCache:
    """One metadata-only snapshot pool of ``slots`` entries under ``owner``'s eviction rule."""

    def __init__(self, owner: Adaptive, slots: int, strict: bool, decay: float,
                 hazard: str = "rate") -> None:
        self.owner = owner
        self.slots = slots
        self.strict = strict
        self.hazard = hazard  # the owner's P(S) form this pool ranks by
        self.decay = decay  # score := score * decay + this request's replay
        self.entries: dict[int, SnapshotEntry] = {}  # id -> entry, in admission order
        self.foreign: dict[int, int] = {}  # entry id -> hits by other sessions
        self._by_node: dict[RadixNode, SnapshotEntry] = {}
        self._held: SnapshotEntry | None = None  # the current request's anchor (not evictable)
        self._next_id = 0
        self.replay = 0  # total replay tokens it would have caused
        self.score = 0.0  # exponentially decayed replay (the duel compares these)
        self.admits = 0
        self.refused = 0
        self.dropped_kv = 0  # entries dropped because the KV tree evicted their node

    def at(self, node: RadixNode) -> SnapshotEntry | None:
        """The shadow entry sitting on ``node``, if any."""
        return self._by_node.get(node)

    def match(self, path: Sequence[RadixNode], matched: int, session: str, tick: int) -> int:
        """A request matched ``path`` up to ``matched``: restore from this pool's deepest entry on
        it (a hit), count the replay; returns the replay tokens."""
        self._purge()
        entry = None
        for node in reversed(path):
            e = self._by_node.get(node)
            if e is not None and e.pos <= matched:
                entry = e
                break
        self._held = entry
        s = 0
        if entry is not None:
            s = entry.pos
            entry.hit_count += 1
            entry.last_access = tick
            if entry.session != session:
                self.foreign[entry.id] = self.foreign.get(entry.id, 0) + 1
        self.replay += matched - s
        self.score = self.score * self.decay + (matched - s)
        return matched - s

    def offer(self, node: RadixNode, pos: int, session: str, tick: int) -> bool:
        """The real pool was offered a snapshot at ``pos`` on ``node``: admit it here by this
        pool's rule (evicting the owner's victim when full). True if admitted."""
        if node in self._by_node:
            return False
        self._purge()
        if len(self.entries) >= self.slots:
            candidates = [e for e in self.entries.values() if e is not self._held]
            if not candidates:
                self.refused += 1
                return False
            swap = self.owner.swap_victim(node, session, candidates, self)
            victim = swap or self.owner.choose(candidates, tick, self)
            if (swap is None and self.strict
                    and not self.owner.admits(node, pos, session, tick, victim, self)):
                self.refused += 1
                return False
            self._drop(victim)
        entry = SnapshotEntry(id=self._next_id, pos=pos, node=node, session=session, slot=-1,
                              created=tick, last_access=tick, hit_count=0, in_use=0, nbytes=0)
        self._next_id += 1
        self.entries[entry.id] = entry
        self._by_node[node] = entry
        self.admits += 1
        return True

    def _drop(self, entry: SnapshotEntry) -> None:
        del self.entries[entry.id]
        del self._by_node[entry.node]
        self.foreign.pop(entry.id, None)
        if self._held is entry:
            self._held = None

    def _purge(self) -> None:
        """Drop entries whose radix node the KV tree evicted (its parent link is cut)."""
        dead = [e for e in self.entries.values() if e.node.parent is None]
        for e in dead:
            self._drop(e)
        self.dropped_kv += len(dead)
