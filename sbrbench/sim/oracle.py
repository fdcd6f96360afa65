"""The future of a stream, for the offline references: when each possible snapshot is next usable.

`FutureIndex` gives the registry's `belady` policy its `next_use` (the classic farthest-next-use
rule) or `gain_rank` (next use per replay token saved), and an admission rule (bypass) that
refuses a newcomer ranked below its victim.
"""

from __future__ import annotations

import bisect
import math
from array import array
from collections.abc import Callable, Sequence

from engine.cache.manager import CacheConfig
from engine.cache.radix import RadixNode
from engine.cache.snapshots import SnapshotEntry
from engine.config import CHUNK
from sbrbench.sim.streams import Stream


def _grid_keys(tokens: Sequence[int], upto: int, chunk: int = CHUNK) -> array:
    """Chained hashes of tokens[:p], p = chunk, 2 chunk, ... <= upto (entry k-1 is p = k chunks)."""
    out = array("q")
    h = 0
    t = tokens if isinstance(tokens, tuple) else tuple(tokens)
    for p in range(chunk, upto + 1, chunk):
        h = hash((h, t[p - chunk : p]))
        out.append(h)
    return out


class FutureIndex:
    """For each possible snapshot (a grid prefix of some request), the requests that could resume
    from it: those whose prompt extends that prefix within its matchable part (whole pages, at
    least one token left to compute). `next_use(entry)` is the first such request after now.

    Built in one pass over the stream: chained hashes of every request's 64-token grid prefixes
    (O(total tokens)); only prefixes where the manager could admit a snapshot are indexed, so a
    lookup is a dict access and a bisect, memoised until the current request passes it.
    """

    def __init__(self, stream: Stream, cfg: CacheConfig, *, max_context: int = 262144) -> None:
        ps, chunk, every = cfg.page_size, cfg.chunk, cfg.snapshot_interval
        # With branch admission a snapshot may sit at any grid position a match ends near:
        # index every grid prefix then (more memory) instead of the foreseeable ones.
        every_grid = bool(getattr(cfg, "branch_admission", False))
        self.now = -1  # index (in the stream) of the request being simulated
        keys: list[array] = []
        ok: list[bool] = []
        self._admit_key: dict[tuple[int, int], int] = {}  # (request, pos) -> prefix key
        for i, req in enumerate(stream):
            L = len(req.prompt)
            fits = (
                0 < L
                and req.max_tokens >= 1
                and L + req.max_tokens <= max_context
                and -(-(L + req.max_tokens) // ps) <= cfg.kv_pages
            )
            ok.append(fits)
            full = req.prompt + req.reply
            end = len(full) // chunk * chunk
            k = _grid_keys(full, end, chunk)
            keys.append(k[: (L - 1) // ps * ps // chunk] if L else array("q"))
            if not fits:
                continue
            # every position the manager could admit a snapshot at for this request
            cand = {L // chunk * chunk, end}
            if every > 0:
                cand.update(range(every, L + 1, every))
            for p in cand:
                if p >= chunk:
                    self._admit_key[(i, p)] = k[p // chunk - 1]
        candidates = set(self._admit_key.values())
        self._uses: dict[int, list[int]] = {}
        for i, ks in enumerate(keys):
            if ok[i]:
                for h in ks:
                    if every_grid or h in candidates:
                        self._uses.setdefault(h, []).append(i)
        self._key: dict[int, int] = {}  # snapshot entry id -> prefix key
        self._memo: dict[int, float] = {}  # entry id -> next use (valid while > now)
        self.requests = len(keys)

    def on_admit(self, entry: SnapshotEntry, tokens: Sequence[int], pos: int) -> None:
        key = self._admit_key.get((self.now, pos))
        if key is None:  # not foreseen (cannot happen for streams this index was built from)
            key = _grid_keys(tokens, pos)[-1]
        self._key[entry.id] = key
        self._memo.pop(entry.id, None)

    def next_use(self, entry: SnapshotEntry, tick: int) -> float:
        """Stream index of the next request that could resume from `entry` (inf: never)."""
        v = self._memo.get(entry.id)
        if v is not None and v > self.now:
            return v
        uses = self._uses.get(self._key.get(entry.id, 0))
        nxt: float = math.inf
        if uses:
            j = bisect.bisect_right(uses, self.now)
            if j < len(uses):
                nxt = uses[j]
        self._memo[entry.id] = nxt
        return nxt

    def _next_of_key(self, key: int) -> float:
        uses = self._uses.get(key)
        if uses:
            j = bisect.bisect_right(uses, self.now)
            if j < len(uses):
                return uses[j]
        return math.inf

    def admission_rule(self, oracle: str) -> Callable[..., bool]:
        """A `Policy.should_admit` for the references (bypass): admit the newcomer only if it
        ranks better than the victim by the same key, so a snapshot never used again does not
        push out one that will be."""

        def should_admit(
            node: RadixNode, pos: int, session: str, tick: int, victim: SnapshotEntry
        ) -> bool:
            key = self._admit_key.get((self.now, pos))
            if key is None:
                return True
            u = self._next_of_key(key)
            if oracle != "gain":
                return u < self.next_use(victim, tick)
            new = u if u == math.inf else (u - self.now) / max(pos - _shallower(node), 1)
            return new < self.gain_rank(victim, tick)

        return should_admit

    def gain_rank(self, entry: SnapshotEntry, tick: int) -> float:
        """`belady-gain`'s key (larger = evict first): requests until the next use, per replay
        token that use saves over the next shallower live snapshot on the entry's path (which
        any request resuming from the entry could fall back to: it extends that prefix too)."""
        u = self.next_use(entry, tick)
        if u == math.inf:
            return u
        return (u - self.now) / max(entry.pos - _shallower(entry.node), 1)


def _shallower(node: RadixNode) -> int:
    """Position of the deepest snapshot strictly above `node` on its radix path (0 if none)."""
    p = node.parent
    while p is not None and p.snapshot is None:
        p = p.parent
    return p.snapshot.pos if p is not None and p.snapshot is not None else 0


