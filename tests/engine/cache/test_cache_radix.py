"""Radix tree: match against a brute-force longest common prefix, duplicates, LRU eviction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cache import RadixCache
from engine.errors import BudgetError

PS = 2


def lcp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# sequences over a 2-letter alphabet share prefixes often and diverge mid-page often
seqs = st.lists(st.integers(0, 1), min_size=0, max_size=24).map(tuple)


@settings(max_examples=150, deadline=None)
@given(inserts=st.lists(seqs, max_size=12), queries=st.lists(seqs, min_size=1, max_size=6))
def test_match_is_page_floored_longest_common_prefix(audit_radix, inserts, queries):
    radix = RadixCache(PS, max_pages=1000)
    first_page: dict[tuple[int, ...], int] = {}  # prefix (whole pages) -> page id that owns it
    inserted: list[tuple[int, ...]] = []
    for seq in inserts:
        toks = seq[: len(seq) // PS * PS]
        pages = radix.alloc(len(toks) // PS)
        expect_dups = [p for i, p in enumerate(pages) if toks[: (i + 1) * PS] in first_page]
        for i, p in enumerate(pages):
            first_page.setdefault(toks[: (i + 1) * PS], p)
        dups = radix.insert(toks, pages)
        assert dups == expect_dups
        radix.free(dups)
        inserted.append(toks)
        if toks:  # a node ends exactly at len(tokens)
            assert radix.find(toks, len(toks)) is not None
        audit_radix(radix)
    for q in queries:
        best = max((lcp(q, s) for s in inserted), default=0) // PS * PS
        m, path = radix.match(q)
        assert m == best
        assert (path[-1].end if path else 0) == m
        pos = 0
        for node in path:  # contiguous, and spells q[:m] backed by the owning pages
            assert node.start == pos
            assert node.tokens == q[pos : node.end]
            for i, p in enumerate(node.pages):
                assert first_page[q[: pos + (i + 1) * PS]] == p
            pos = node.end
        audit_radix(radix)


def test_match_splits_so_path_ends_at_m():
    radix = RadixCache(4, 100)
    a = tuple(range(16))
    radix.insert(a, radix.alloc(4))
    m, path = radix.match(a[:8] + (99, 99, 99, 99))
    assert m == 8 and len(path) == 1 and path[0].end == 8
    (lower,) = path[0].children.values()
    assert (lower.start, lower.end) == (8, 16)
    # partial trailing page is ignored
    m, path = radix.match(a[:10])
    assert m == 8
    assert radix.match(a[:3]).length == 0


def test_snapshot_and_marker_stay_on_the_lower_half_of_a_split():
    radix = RadixCache(4, 100)
    a = tuple(range(16))
    radix.insert(a, radix.alloc(4))
    node = radix.find(a, 16)
    node.seq_end_session = "s"
    upper = radix.split_at(a, 8)
    assert upper.end == 8 and node.end == 16 and node.parent is upper
    assert node.seq_end_session == "s" and upper.seq_end_session is None


def test_lock_survives_a_later_split_and_unlocks_cleanly(audit_radix):
    radix = RadixCache(4, 8)
    a = tuple(range(16))
    radix.insert(a, radix.alloc(4))
    leaf = radix.find(a, 16)
    radix.lock([leaf])
    radix.split_at(a, 8)  # a new upper node appears above the locked one
    assert radix.locked_pages == 4
    with pytest.raises(BudgetError):
        radix.alloc(5)  # 4 free, 4 locked
    radix.unlock([leaf])
    assert radix.locked_pages == 0 and all(n.ref == 0 for n in radix.iter_nodes())
    assert len(radix.alloc(8)) == 8  # everything evictable again
    audit_radix(radix, held=range(8))


def test_lru_evicts_least_recently_used_unlocked_leaf_first(audit_radix):
    radix = RadixCache(2, 6)
    evicted = []
    radix.on_evict = lambda n: evicted.append(n.tokens)
    radix.clock = 1
    radix.insert((1, 1, 1, 1), radix.alloc(2))  # A
    radix.clock = 2
    radix.insert((2, 2, 2, 2), radix.alloc(2))  # B
    radix.clock = 3
    radix.insert((3, 3, 3, 3), radix.alloc(2))  # C
    radix.clock = 4
    radix.match((1, 1, 1, 1))  # touch A: B is now the oldest
    b_path = radix.match((2, 2)).path  # splits B and touches its first half
    radix.lock(b_path)  # ...and locks it; B's second half (tick 2) stays evictable
    held = radix.alloc(1)
    assert evicted == [(2, 2)]
    held += radix.alloc(2)  # next: C (tick 3), then A (tick 4) is still cached
    assert evicted == [(2, 2), (3, 3, 3, 3)]
    assert radix.match((1, 1, 1, 1)).length == 4
    radix.unlock(b_path)
    audit_radix(radix, held=held)


def test_evicting_a_leaf_exposes_its_parent(audit_radix):
    radix = RadixCache(2, 4)
    radix.insert((1, 1, 2, 2), radix.alloc(2))
    pages = radix.alloc(2)
    dups = radix.insert((1, 1, 3, 3), pages)
    radix.free(dups)
    held = radix.alloc(4)  # must evict both leaves, then the shared parent
    assert radix.tree_pages == 0 and radix.node_count == 0
    audit_radix(radix, held=held)


def test_budget_error_evicts_nothing():
    radix = RadixCache(2, 6)
    evicted = []
    radix.on_evict = evicted.append
    radix.insert((1, 1, 1, 1), radix.alloc(2))
    radix.insert((2, 2, 2, 2), radix.alloc(2))
    path = radix.match((1, 1, 1, 1)).path
    radix.lock(path)
    with pytest.raises(BudgetError, match="need 5 pages"):
        radix.alloc(5)  # 2 free + 2 evictable < 5
    assert evicted == [] and radix.tree_pages == 4
    assert len(radix.alloc(4)) == 4  # 2 free + B's 2
    assert [n.tokens for n in evicted] == [(2, 2, 2, 2)]


def test_insert_validates_whole_pages():
    radix = RadixCache(4, 10)
    with pytest.raises(ValueError, match="whole pages"):
        radix.insert((1, 2, 3), [0])
    with pytest.raises(ValueError, match="needs 1 pages"):
        radix.insert((1, 2, 3, 4), [0, 1])
    with pytest.raises(KeyError):
        radix.split_at((1, 2, 3, 4), 4)
