"""Fixtures of the cache tests: an independent consistency audit of a CacheManager, recomputed
from scratch (O(everything)), and a CacheConfig with test defaults."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pytest

from engine.cache import CacheConfig, CacheManager, Plan, RadixCache, RadixNode


def attached(radix: RadixCache, node: RadixNode) -> bool:
    """``node`` hangs under the root through live parent links."""
    x: RadixNode | None = node
    while x is not None and x is not radix.root:
        parent = x.parent
        if parent is None or parent.children.get(x.tokens[: radix.page_size]) is not x:
            return False
        x = parent
    return x is radix.root


def audit_radix(radix: RadixCache, held: Iterable[int] = ()) -> list[RadixNode]:
    """Tree shape, page ownership (free / tree / held, each id exactly once) and counters."""
    ps = radix.page_size
    nodes = list(radix.iter_nodes())
    owners: Counter[int] = Counter()
    tree_pages = locked_pages = 0
    for node in nodes:
        parent = node.parent
        assert parent is not None
        assert parent.children[node.tokens[:ps]] is node
        assert node.start == parent.end
        assert node.end == node.start + len(node.tokens)
        assert len(node.tokens) > 0 and len(node.tokens) == len(node.pages) * ps
        assert node.ref >= 0
        if parent is not radix.root:
            assert parent.ref >= node.ref, "a locked node's ancestors are locked"
        owners.update(node.pages)
        tree_pages += len(node.pages)
        if node.ref:
            locked_pages += len(node.pages)
    everything = Counter(radix.free_list()) + owners + Counter(held)
    assert everything == Counter(range(radix.max_pages)), "a page is leaked or owned twice"
    assert radix.tree_pages == tree_pages
    assert radix.locked_pages == locked_pages
    assert radix.node_count == len(nodes)
    assert 0 <= radix.pages_in_use <= radix.max_pages
    return nodes


def audit(cm: CacheManager, plans: Iterable[Plan] = (), held: Iterable[int] = ()) -> None:
    """Everything ``cm`` promises: budgets, ownership, ref counts, snapshot placement, pins.

    ``plans``: the running plans (their snapshots must be held, their paths locked);
    ``held``: pages the test itself holds outside the cache.
    """
    radix, index = cm.radix, cm.index
    plans = list(plans)
    nodes = audit_radix(radix, [*cm.held_pages(), *held])

    # ref counts: one per lock taken, on the locked node and each ancestor
    expected: Counter[int] = Counter()
    for lock in cm.lock_nodes():
        assert attached(radix, lock), "a locked node was evicted"
        x: RadixNode | None = lock
        while x is not None and x is not radix.root:
            expected[x.id] += 1
            x = x.parent
    for node in nodes:
        assert node.ref == expected[node.id], (node, expected[node.id])

    # snapshots: budget, slots, placement
    entries = list(index.entries.values())
    assert len(entries) <= index.slots
    slots = [e.slot for e in entries]
    assert len(set(slots)) == len(slots)
    assert all(0 <= s < index.slots for s in slots)
    assert sorted(slots + index._free_slots) == list(range(index.slots))
    on_nodes = [n.snapshot for n in nodes if n.snapshot is not None]
    assert {id(e) for e in on_nodes} == {id(e) for e in entries}
    for e in entries:
        assert e.node.snapshot is e and attached(radix, e.node)
        assert e.pos == e.node.end and e.pos % cm.cfg.chunk == 0

    # running plans hold their snapshot and their matched KV
    in_use: Counter[int] = Counter()
    for plan in plans:
        if plan.snapshot is not None:
            in_use[plan.snapshot.id] += 1
            assert index.entries.get(plan.snapshot.id) is plan.snapshot, "in-use snapshot evicted"
    for e in entries:
        assert e.in_use == in_use[e.id]
    live_tree_pages = Counter(p for n in nodes for p in n.pages)
    for plan in plans:
        assert all(live_tree_pages[p] == 1 for p in plan.kv_pages), "locked KV was evicted"


def make_config(**kw: object) -> CacheConfig:
    """A CacheConfig for tests: page 16, chunk 64, 4096 pages, 16 slots, no interval, forecast,
    branch admission on; any field can be given."""
    base: dict[str, object] = dict(page_size=16, chunk=64, kv_pages=4096, snapshot_slots=16,
                                   snapshot_bytes=0, snapshot_interval=0, policy="forecast",
                                   policy_opts={}, branch_admission=True)
    base.update(kw)
    return CacheConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(name="audit", scope="session")
def audit_fixture():
    return audit


@pytest.fixture(name="audit_radix", scope="session")
def audit_radix_fixture():
    return audit_radix


@pytest.fixture(name="config", scope="session")
def config_fixture():
    return make_config
