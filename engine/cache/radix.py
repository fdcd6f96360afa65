"""Radix tree over token ids at page granularity: the attention-KV prefix cache and its page pool.

Every node holds whole pages (``page_size`` tokens each) and the ids of the KV pages that back
them. Page ids come from one pool of ``max_pages``; a page id is at every moment either free,
owned by exactly one tree node, or held by a caller between ``alloc`` and ``insert``/``free``.

Nodes on a locked path (``ref > 0``) are never evicted. ``alloc`` evicts unlocked leaves in LRU
order (``last_access`` tick, then node id) when the free list runs short, and calls
``on_evict(node)`` for each one so the owner can drop what hangs on it (its snapshot).

Cost per operation is O(nodes on the path) plus tuple slice compares done in C; nothing loops
over all pages or all nodes, except ``iter_nodes`` (tests, heap compaction).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from engine.errors import BudgetError

if TYPE_CHECKING:
    from engine.cache.snapshots import SnapshotEntry


class RadixNode:
    """One edge of the tree: the pages ``[start, end)`` of every sequence that passes through it."""

    __slots__ = (
        "id",
        "tokens",
        "pages",
        "parent",
        "children",
        "start",
        "end",
        "ref",
        "last_access",
        "snapshot",
        "seq_end_session",
    )

    def __init__(
        self,
        id: int,
        tokens: tuple[int, ...],
        pages: list[int],
        parent: RadixNode | None,
        start: int,
        last_access: int = 0,
    ) -> None:
        self.id = id
        self.tokens = tokens
        self.pages = pages
        self.parent = parent
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.start = start
        self.end = start + len(tokens)
        self.ref = 0
        self.last_access = last_access
        self.snapshot: SnapshotEntry | None = None
        self.seq_end_session: str | None = None

    def __repr__(self) -> str:
        return (
            f"RadixNode(id={self.id}, [{self.start}, {self.end}), ref={self.ref}, "
            f"last_access={self.last_access}, children={len(self.children)}, "
            f"snapshot={'yes' if self.snapshot is not None else 'no'})"
        )


class MatchResult(NamedTuple):
    length: int  # m: matched tokens, a multiple of page_size
    path: list[RadixNode]  # root-exclusive nodes; the last ends exactly at m (split if needed)


class InsertResult(NamedTuple):
    node: RadixNode | None  # the node ending exactly at len(tokens); None when tokens is empty
    duplicates: list[int]  # caller pages whose tokens the tree already held (caller frees them)


class RadixCache:
    """Paged KV prefix cache: radix tree, page pool, ref counts and LRU leaf eviction."""

    def __init__(
        self,
        page_size: int,
        max_pages: int,
        on_evict: Callable[[RadixNode], None] | None = None,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if max_pages < 0:
            raise ValueError(f"max_pages must be >= 0, got {max_pages}")
        self.page_size = page_size
        self.max_pages = max_pages
        self.on_evict = on_evict
        self.clock = 0  # logical tick stamped on touched nodes; the manager advances it
        self.root = RadixNode(0, (), [], None, 0)
        self.root.ref = 1  # never evicted, never offered
        self._next_id = 1
        self._free: list[int] = list(range(max_pages - 1, -1, -1))  # pop() hands out 0, 1, ...
        self._heap: list[tuple[int, int, int, RadixNode]] = []  # (last_access, id, seq, node), lazy
        self._seq = itertools.count()  # keeps heap tuples from ever comparing nodes
        self.node_count = 0  # root excluded
        self.tree_pages = 0  # pages owned by tree nodes
        self.locked_pages = 0  # pages owned by nodes with ref > 0
        self.evicted_nodes = 0
        self.evicted_pages = 0

    # ---- accounting -------------------------------------------------------------------------

    @property
    def pages_in_use(self) -> int:
        """Pages not on the free list: owned by the tree or held by callers."""
        return self.max_pages - len(self._free)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def evictable_pages(self) -> int:
        return self.tree_pages - self.locked_pages

    def free_list(self) -> list[int]:
        """A copy of the free page ids (for audits and tests)."""
        return list(self._free)

    # ---- lookup -----------------------------------------------------------------------------

    def match(self, tokens: Sequence[int]) -> MatchResult:
        """Longest cached prefix of ``tokens`` in whole pages; touches the path's nodes."""
        toks = tuple(tokens)
        path, m = self._walk(toks, len(toks) - len(toks) % self.page_size)
        for node in path:
            node.last_access = self.clock
        if path:
            self._offer(path[-1])
        return MatchResult(m, path)

    def split_at(self, tokens: Sequence[int], pos: int) -> RadixNode:
        """The node ending exactly at ``pos`` on the path of ``tokens`` (splitting one if needed).

        ``tokens[:pos]`` must be cached; ``pos`` is a positive multiple of ``page_size``.
        """
        node = self.find(tokens, pos)
        if node is None:
            raise KeyError(f"tokens[:{pos}] are not in the radix cache (insert them first)")
        return node

    def find(self, tokens: Sequence[int], pos: int) -> RadixNode | None:
        """Like ``split_at`` but returns None when ``tokens[:pos]`` is not fully cached."""
        if pos <= 0 or pos % self.page_size or pos > len(tokens):
            raise ValueError(
                f"pos must be a positive multiple of page_size {self.page_size} "
                f"and <= len(tokens) {len(tokens)}, got {pos}"
            )
        toks = tokens if type(tokens) is tuple else tuple(tokens[:pos])  # no copy of long tuples
        path, m = self._walk(toks, pos)
        return path[-1] if m == pos else None

    def path_to(self, node: RadixNode) -> list[RadixNode]:
        """Root-exclusive path ending at ``node``."""
        path = []
        while node is not self.root:
            path.append(node)
            assert node.parent is not None, "node is not in the tree"
            node = node.parent
        path.reverse()
        return path

    def pages_of(self, node: RadixNode | None) -> list[int]:
        """Page ids covering ``[0, node.end)``."""
        if node is None:
            return []
        out: list[int] = []
        for n in self.path_to(node):
            out += n.pages
        return out

    def iter_nodes(self) -> Iterator[RadixNode]:
        """Every node except the root (depth first; O(nodes), for audits and tests)."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ---- mutation ---------------------------------------------------------------------------

    def insert(self, tokens: Sequence[int], pages: list[int]) -> list[int]:
        """Cache ``tokens`` (whole pages from position 0) backed by ``pages``.

        Returns the caller's pages whose tokens were already cached (the caller frees them);
        afterwards a node ends exactly at ``len(tokens)``.
        """
        return self.insert_path(tokens, pages).duplicates

    def insert_path(self, tokens: Sequence[int], pages: list[int]) -> InsertResult:
        """``insert`` that also returns the node ending at ``len(tokens)``."""
        ps = self.page_size
        toks = tuple(tokens)
        n = len(toks)
        if n % ps:
            raise ValueError(f"insert needs whole pages: {n} tokens at page_size {ps}")
        if len(pages) != n // ps:
            raise ValueError(f"insert of {n} tokens needs {n // ps} pages, got {len(pages)}")
        path, m = self._walk(toks, n)
        duplicates: list[int] = []
        off = 0
        for node in path:
            k = len(node.pages)
            mine = pages[off : off + k]
            if mine != node.pages:
                duplicates += [p for p, q in zip(mine, node.pages, strict=True) if p != q]
            off += k
            node.last_access = self.clock
        parent = path[-1] if path else self.root
        if m < n:
            leaf = RadixNode(self._next_id, toks[m:], list(pages[m // ps :]), parent, m, self.clock)
            self._next_id += 1
            parent.children[leaf.tokens[:ps]] = leaf
            self.node_count += 1
            self.tree_pages += len(leaf.pages)
            parent = leaf
        if parent is not self.root:
            self._offer(parent)
        return InsertResult(parent if n else None, duplicates)

    def lock(self, path: Sequence[RadixNode]) -> None:
        """Take one reference on ``path[-1]`` and each of its ancestors (no-op for [])."""
        if path:
            self.lock_node(path[-1])

    def unlock(self, path: Sequence[RadixNode]) -> None:
        """Release a reference taken by ``lock`` with the same last node."""
        if path:
            self.unlock_node(path[-1])

    def lock_node(self, node: RadixNode) -> None:
        # Walking parent links (not a stored path) keeps counts right across later splits.
        while node is not self.root:
            node.ref += 1
            if node.ref == 1:
                self.locked_pages += len(node.pages)
            assert node.parent is not None, "locking a node that is not in the tree"
            node = node.parent

    def unlock_node(self, node: RadixNode) -> None:
        while node is not self.root:
            if node.ref <= 0:
                raise RuntimeError(f"unlock without lock on {node!r}")
            node.ref -= 1
            if node.ref == 0:
                self.locked_pages -= len(node.pages)
                self._offer(node)
            assert node.parent is not None
            node = node.parent

    def alloc(self, n: int) -> list[int]:
        """``n`` free page ids, evicting LRU unlocked leaves if needed.

        Raises BudgetError (having evicted nothing) when even evicting every unlocked page
        would not free ``n``.
        """
        if n <= 0:
            return []
        if n > len(self._free):
            freeable = len(self._free) + self.evictable_pages
            if n > freeable:
                held = self.max_pages - len(self._free) - self.tree_pages
                raise BudgetError(
                    f"KV budget too small: need {n} pages ({n * self.page_size} tokens) but only "
                    f"{freeable} of {self.max_pages} can be freed ({self.locked_pages} locked by "
                    f"running requests, {held} held by requests and not yet cached)"
                )
            while len(self._free) < n:
                self._evict_one()
        out = self._free[-n:]
        del self._free[-n:]
        out.reverse()
        return out

    def free(self, pages: Sequence[int]) -> None:
        """Return caller-held pages to the pool."""
        self._free.extend(reversed(pages))

    # ---- internals --------------------------------------------------------------------------

    def _walk(self, toks: tuple[int, ...], limit: int) -> tuple[list[RadixNode], int]:
        """Follow ``toks[:limit]`` (limit a page multiple) from the root.

        Returns the root-exclusive path and the matched length m; splits the last node so that
        it ends exactly at m.
        """
        ps = self.page_size
        node = self.root
        path: list[RadixNode] = []
        pos = 0
        while pos < limit:
            child = node.children.get(toks[pos : pos + ps])
            if child is None:
                break
            clen = len(child.tokens)
            if pos + clen <= limit and child.tokens == toks[pos : pos + clen]:
                path.append(child)
                pos += clen
                node = child
                continue
            # Partial: the first page matches (dict key); binary-search the last matching page.
            lo, hi = 1, min(clen, limit - pos) // ps
            if hi > 1 and child.tokens[: hi * ps] == toks[pos : pos + hi * ps]:
                lo = hi  # the whole reachable part matches: one compare instead of log2(pages)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                cut = mid * ps
                if child.tokens[:cut] == toks[pos : pos + cut]:
                    lo = mid
                else:
                    hi = mid - 1
            path.append(self._split(child, lo))
            pos += lo * ps
            break
        return path, pos

    def _split(self, node: RadixNode, k: int) -> RadixNode:
        """Cut ``node`` after ``k`` pages; returns the new upper part.

        The existing object keeps the lower part so everything anchored at its end (snapshot,
        seq_end marker, heap entries, callers' references) stays valid.
        """
        ps = self.page_size
        cut = k * ps
        parent = node.parent
        assert parent is not None and 0 < cut < len(node.tokens)
        upper = RadixNode(
            self._next_id, node.tokens[:cut], node.pages[:k], parent, node.start, node.last_access
        )
        self._next_id += 1
        upper.ref = node.ref  # every lock through node now runs through upper too
        node.tokens = node.tokens[cut:]
        node.pages = node.pages[k:]
        node.start += cut
        node.parent = upper
        upper.children[node.tokens[:ps]] = node
        parent.children[upper.tokens[:ps]] = upper
        self.node_count += 1
        return upper

    def _offer(self, node: RadixNode) -> None:
        """Record an evictable leaf in the LRU heap (stale entries are skipped on pop)."""
        if node.ref == 0 and not node.children and node.parent is not None:
            heapq.heappush(self._heap, (node.last_access, node.id, next(self._seq), node))
            if len(self._heap) > 2 * self.node_count + 1024:
                self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        self._heap = [
            (n.last_access, n.id, next(self._seq), n)
            for n in self.iter_nodes()
            if n.ref == 0 and not n.children
        ]
        heapq.heapify(self._heap)

    def _evict_one(self) -> None:
        for attempt in range(2):
            while self._heap:
                la, _, _, node = heapq.heappop(self._heap)
                if node.parent is None or node.ref or node.children or node.last_access != la:
                    continue  # stale entry
                self._evict(node)
                return
            if attempt == 0:
                self._rebuild_heap()
        raise RuntimeError("radix cache: evictable pages counted but no evictable leaf found")

    def _evict(self, node: RadixNode) -> None:
        parent = node.parent
        assert parent is not None
        del parent.children[node.tokens[: self.page_size]]
        node.parent = None
        self.free(node.pages)
        self.tree_pages -= len(node.pages)
        self.node_count -= 1
        self.evicted_nodes += 1
        self.evicted_pages += len(node.pages)
        if self.on_evict is not None:
            self.on_evict(node)
        if parent is not self.root:
            self._offer(parent)
