"""The prefix cache's state and decisions: the KV radix tree, the snapshot index and the policy.

`engine.cache.driver.run_request` is the one caller-side sequence (the engine and the simulator
both go through it): ``begin`` (match, choose the snapshot, lock the path, plan admissions) ->
``alloc_pages`` -> ``insert`` the prompt's whole pages -> ``admit`` the planned positions ->
``insert`` prompt + reply -> ``admit`` the end-of-generation position -> ``finish`` (or
``abort`` on failure).

Pages allocated with ``alloc_pages(n, plan)`` belong to the plan until ``insert`` hands them to
the tree; ``finish``/``abort`` frees the rest (e.g. the partial last page), so the caller never
frees them itself. ``insert`` returns the page list to use from then on: where the tree already
held a page for the same tokens, the caller's duplicate is freed and the tree's page replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from engine.cache.policies import make_policy
from engine.cache.radix import RadixCache, RadixNode
from engine.cache.snapshots import SnapshotEntry, SnapshotIndex
from engine.errors import BudgetError, ConfigError, UserError


class CacheConfig(NamedTuple):
    """The manager's resolved configuration; `CacheSettings.resolve` is where it is made."""

    page_size: int
    chunk: int  # GDN chunk: snapshots only at multiples of it
    kv_pages: int  # KV budget in pages of page_size tokens
    snapshot_slots: int  # snapshot pool size
    snapshot_bytes: int  # bytes of one snapshot (reporting and marconi's per-byte value)
    snapshot_interval: int  # also admit every this many tokens inside a prefill; 0 = off
    policy: str
    policy_opts: dict[str, Any]  # never mutated
    # Also admit at the deepest grid position of the matched prefix when the request branches
    # off a cached path there (Marconi's branch points); free: the replay passes through it.
    branch_admission: bool


class Plan(NamedTuple):
    tick: int
    session: str
    continuation: bool
    prompt_len: int
    matched: int  # m (page multiple, <= prompt_len - 1)
    snapshot: SnapshotEntry | None  # deepest usable with pos <= m; in use until finish
    restore_pos: int  # s = snapshot.pos or 0
    kv_pages: list[int]  # pages covering [0, matched), locked until finish
    admit_positions: list[int]  # grid positions in (max(s, m), prompt_len] to capture


@dataclass(slots=True)
class _Active:
    """What a running request holds: locked radix nodes, its snapshot, its uncached pages."""

    locks: list[RadixNode] = field(default_factory=list)
    snapshot: SnapshotEntry | None = None
    owned: set[int] = field(default_factory=set)  # page ids allocated, not yet in the tree


def _check_config(cfg: CacheConfig) -> None:
    if cfg.page_size < 1:
        raise ConfigError(f"page_size must be >= 1, got {cfg.page_size}")
    if cfg.chunk < 1 or cfg.chunk % cfg.page_size:
        raise ConfigError(
            f"chunk ({cfg.chunk}) must be a positive multiple of page_size ({cfg.page_size})"
        )
    if cfg.kv_pages < 1:
        raise ConfigError(f"KV budget must be at least one page, got {cfg.kv_pages}")
    if cfg.snapshot_slots < 0:
        raise ConfigError(f"snapshot slots must be >= 0, got {cfg.snapshot_slots}")
    if cfg.snapshot_interval < 0 or cfg.snapshot_interval % cfg.chunk:
        raise ConfigError(
            f"snapshot interval ({cfg.snapshot_interval}) must be 0 or a multiple of the "
            f"chunk ({cfg.chunk})"
        )


class CacheManager:
    """Prefix cache (KV radix tree + snapshot index + policy) driven one request at a time."""

    def __init__(self, cfg: CacheConfig) -> None:
        _check_config(cfg)
        self.cfg = cfg
        self.policy = make_policy(cfg.policy, **dict(cfg.policy_opts))
        self.policy.grid_interval = cfg.snapshot_interval
        self.index = SnapshotIndex(cfg.snapshot_slots, cfg.snapshot_bytes, self.policy)
        self.sessions = self.index.sessions
        self.radix = RadixCache(cfg.page_size, cfg.kv_pages, self._on_kv_evict)
        self.tick = -1  # begin() makes the first request tick 0
        self._active: dict[int, _Active] = {}
        self.counters: dict[str, int] = {
            "requests": 0,
            "cold": 0,
            "rejected": 0,
            "hit_tokens": 0,
            "replay_tokens": 0,
        }

    # ---- one request ------------------------------------------------------------------------

    def begin(self, prompt: Sequence[int], session: str | None = None) -> Plan:
        """Start a request: match, choose the snapshot, lock what it uses, plan admissions."""
        cfg = self.cfg
        n = len(prompt)
        if n == 0:
            raise UserError("empty prompt: at least one token is needed")
        need = -(-n // cfg.page_size)
        if need > cfg.kv_pages:
            self.counters["rejected"] += 1
            raise BudgetError(
                f"prompt of {n} tokens needs {need} KV pages of {cfg.page_size} tokens; the KV "
                f"budget is {cfg.kv_pages} pages ({cfg.kv_pages * cfg.page_size} tokens)"
            )
        self.tick += 1
        tick = self.tick
        self.radix.clock = tick
        self.index.clock = tick
        toks = tuple(prompt)
        cap = (n - 1) // cfg.page_size * cfg.page_size  # leave at least one token to compute
        m, path = self.radix.match(toks[:cap])

        continuation = False
        if session is not None:
            continuation = session in self.sessions
        else:
            for node in reversed(path):
                if node.seq_end_session is not None:
                    session, continuation = node.seq_end_session, True
                    break
            else:
                session = f"r{tick}"
        prev = self.sessions.get(session)
        prev_tick = prev.last_tick if prev is not None else None
        info = self.sessions.record(session, tick, continuation)
        on_request = getattr(self.policy, "on_request", None)  # optional policy hook
        if on_request is not None:
            on_request(info, tick, prev_tick)

        self.policy.on_match(path, m, tick)
        entry = self.index.deepest(path, m)
        if entry is not None:
            self.index.hit(entry, tick)
            s = entry.pos
        else:
            s = 0
            if m > 0:
                self.index.counters["misses"] += 1
            else:
                self.counters["cold"] += 1
        act = _Active(snapshot=entry)
        if path:
            self.radix.lock_node(path[-1])
            act.locks.append(path[-1])
        self._active[tick] = act
        self.counters["requests"] += 1
        self.counters["hit_tokens"] += m
        self.counters["replay_tokens"] += m - s
        kv_pages: list[int] = []
        for node in path:
            kv_pages += node.pages
        return Plan(
            tick=tick,
            session=session,
            continuation=continuation,
            prompt_len=n,
            matched=m,
            snapshot=entry,
            restore_pos=s,
            kv_pages=kv_pages,
            admit_positions=self._plan_positions(path, s, m, n),
        )

    def _plan_positions(self, path: list[RadixNode], s: int, m: int, n: int) -> list[int]:
        out = self.admit_positions(s, m, n)
        if self.cfg.branch_admission and path and path[-1].children:
            b = m // self.cfg.chunk * self.cfg.chunk
            if b > s:
                out = sorted({b, *out})
        return out

    def admit_positions(self, s: int, m: int, prompt_len: int) -> list[int]:
        """Grid positions p, max(s, m) < p <= prompt_len: the last one, and interval multiples."""
        chunk, every = self.cfg.chunk, self.cfg.snapshot_interval
        lo = max(s, m)
        out = set()
        last = prompt_len // chunk * chunk
        if last > lo:
            out.add(last)
        if every > 0:
            out.update(range((lo // every + 1) * every, prompt_len + 1, every))
        return sorted(out)

    def final_admit_position(self, plan: Plan, total_len: int) -> int | None:
        """The end-of-generation snapshot position: the last grid position <= ``total_len`` if it
        lies past everything this plan already covers (m and its admit positions), else None."""
        chunk = self.cfg.chunk
        p = total_len // chunk * chunk
        covered = max([plan.matched, plan.restore_pos, *plan.admit_positions])
        return p if p > covered else None

    def alloc_pages(self, n: int, plan: Plan | None = None) -> list[int]:
        """``n`` free KV pages (evicting unlocked LRU leaves); BudgetError if they can't exist.

        With ``plan``, the pages belong to that request until inserted; ``finish`` frees the rest.
        """
        act = self._get(plan) if plan is not None else None
        pages = self.radix.alloc(n)
        if act is not None:
            act.owned.update(pages)
        return pages

    def free_pages(self, pages: list[int], plan: Plan | None = None) -> None:
        """Give back pages obtained from ``alloc_pages`` that were never inserted."""
        if plan is not None:
            act = self._get(plan)
            act.owned.difference_update(pages)
        self.radix.free(pages)

    def insert(self, plan: Plan, tokens: Sequence[int], pages: list[int]) -> list[int]:
        """Cache the whole pages of ``tokens`` (backed by ``pages[:n]``) and hold them for ``plan``.

        Returns ``pages`` with duplicates replaced by the tree's own page ids (the duplicates are
        freed); pages past the whole pages of ``tokens`` are returned untouched.
        """
        act = self._get(plan)
        ps = self.cfg.page_size
        n = len(tokens) // ps
        if n == 0:
            return list(pages)
        if len(pages) < n:
            raise ValueError(f"insert of {n} whole pages got only {len(pages)} page ids")
        head = pages[:n]
        node, duplicates = self.radix.insert_path(tokens[: n * ps], head)
        act.owned.difference_update(head)
        if duplicates:
            self.radix.free(duplicates)
            head = self.radix.pages_of(node)
        assert node is not None
        self._hold(act, node)
        return head + pages[n:]

    def admit(self, plan: Plan, tokens: Sequence[int], pos: int) -> SnapshotEntry | None:
        """Admit the snapshot at grid position ``pos``; ``tokens[:pos]`` must be inserted.

        Returns the entry (its ``slot`` is where to write the state), or None when a snapshot
        already sits there or the policy refused.
        """
        self._get(plan)
        if pos <= 0 or pos % self.cfg.chunk:
            raise ValueError(
                f"snapshot position must be a positive multiple of the chunk, got {pos}"
            )
        node = self.radix.find(tokens, pos)
        if node is None:
            raise ValueError(f"admit at {pos}: tokens[:{pos}] must be inserted first")
        self.policy.on_offer(node, pos, plan.session, plan.tick)
        return self.index.admit(node, pos, plan.session, plan.tick)

    def finish(self, plan: Plan, full_tokens: Sequence[int]) -> None:
        """End a request: mark where its full sequence ends, unlock, free its uncached pages.

        Safe to call twice and after an exception mid-request (the marker is set only if the
        whole pages of ``full_tokens`` are cached).
        """
        act = self._active.pop(plan.tick, None)
        if act is None:
            return
        try:
            n = len(full_tokens) // self.cfg.page_size * self.cfg.page_size
            if n > 0:
                node = self.radix.find(full_tokens, n)
                if node is not None:
                    node.seq_end_session = plan.session
        finally:
            self._release(act)

    def abort(self, plan: Plan) -> None:
        """End a failed request: unlock and free, no seq_end marker. Safe to call twice."""
        act = self._active.pop(plan.tick, None)
        if act is not None:
            self._release(act)

    # ---- introspection ----------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Requests begun and not yet finished."""
        return len(self._active)

    def held_pages(self) -> list[int]:
        """Pages allocated to running plans and not yet inserted (for audits)."""
        return [p for act in self._active.values() for p in sorted(act.owned)]

    def lock_nodes(self) -> list[RadixNode]:
        """Radix nodes locked by running plans, one per lock taken (for audits)."""
        return [n for act in self._active.values() for n in act.locks]

    def stats(self) -> dict[str, Any]:
        """Counters for /metrics and the result JSON."""
        c = self.index.counters
        return {
            "policy": self.policy.name,
            "requests": self.counters["requests"],
            "hits": c["hits"],
            "misses": c["misses"],
            "cold": self.counters["cold"],
            "rejected": self.counters["rejected"],
            "admits": c["admits"],
            "admit_refused": c["admit_refused"],
            "evictions_policy": c["evictions_policy"],
            "evictions_kv": c["evictions_kv"],
            "evictions_replaced": c["evictions_replaced"],
            "pages_in_use": self.radix.pages_in_use,
            "pages_cached": self.radix.tree_pages,
            "pages_total": self.radix.max_pages,
            "page_size": self.cfg.page_size,
            "kv_evicted_pages": self.radix.evicted_pages,
            "snapshots_in_use": len(self.index),
            "snapshot_slots": self.index.slots,
            "snapshot_bytes_in_use": len(self.index) * self.index.nbytes,
            "snapshot_bytes_total": self.index.slots * self.index.nbytes,
            "hit_tokens": self.counters["hit_tokens"],
            "replay_tokens": self.counters["replay_tokens"],
            "sessions": len(self.sessions),
            "resumable_sessions": self.sessions.resumable_count,
            "active_requests": len(self._active),
        }

    def describe(self) -> dict[str, Any]:
        """The cache configuration, for the result JSON's "engine" object."""
        cfg = self.cfg
        return {
            "policy": self.policy.name,
            "policy_opts": self.policy.options(),
            "page_size": cfg.page_size,
            "chunk": cfg.chunk,
            "kv_pages": cfg.kv_pages,
            "snapshot_slots": cfg.snapshot_slots,
            "snapshot_bytes": cfg.snapshot_bytes,
            "snapshot_interval": cfg.snapshot_interval,
        }

    # ---- internals --------------------------------------------------------------------------

    def _get(self, plan: Plan) -> _Active:
        act = self._active.get(plan.tick)
        if act is None:
            raise ValueError(f"request {plan.tick} is not running (finished or never begun)")
        return act

    def _hold(self, act: _Active, node: RadixNode) -> None:
        """Lock ``node`` for the plan; drop locks it subsumes (its ancestors-or-self)."""
        self.radix.lock_node(node)
        keep = []
        for held in act.locks:
            if _is_ancestor_or_self(held, node):
                self.radix.unlock_node(held)
            else:
                keep.append(held)
        keep.append(node)
        act.locks = keep

    def _release(self, act: _Active) -> None:
        for node in act.locks:
            self.radix.unlock_node(node)
        act.locks = []
        if act.snapshot is not None:
            self.index.release(act.snapshot)
            act.snapshot = None
        if act.owned:
            self.radix.free(sorted(act.owned))  # sorted: deterministic free-list order
            act.owned = set()

    def _on_kv_evict(self, node: RadixNode) -> None:
        if node.snapshot is not None:
            self.index.drop(node.snapshot, "kv")


def _is_ancestor_or_self(a: RadixNode, b: RadixNode) -> bool:
    x: RadixNode | None = b
    while x is not None and x.end > a.end:
        x = x.parent
    return x is a
