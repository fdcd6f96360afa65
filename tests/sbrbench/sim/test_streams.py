"""Trace streams: equal hash ids give equal tokens, replies link turns, compressed labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import ConfigError
from sbrbench import sim
from sbrbench.sim.streams import _label_tokens
from sbrbench.tracefile import TraceRecord


def _rec(line: int, ids: list[int], L: int, G: int = 10) -> TraceRecord:
    return TraceRecord(line, 0.0, L, G, tuple(ids))


def test_trace_blocks_equal_ids_equal_tokens_and_replies_link_turns() -> None:
    recs = [
        _rec(1, [0, 1, 2], 1100, 50),  # turn 1: blocks 0, 1 full, block 2 partial
        _rec(2, [0, 1, 3, 4], 1800),  # turn 2 (diverges at the partial block): continues 1
        _rec(3, [0, 5], 700),  # shares only the system block: no link
        _rec(4, [0, 1, 2], 1000),  # same blocks as 1, shorter
    ]
    st = sim.TraceStream(recs, page_size=16)
    reqs = list(st)
    p1, r1 = reqs[0].prompt, reqs[0].reply
    assert len(p1) == 1100 and len(r1) == 50
    assert reqs[1].prompt[:1150] == p1 + r1  # the next turn contains the previous reply
    assert reqs[2].prompt[:512] == p1[:512] and reqs[2].prompt[512:528] != p1[512:528]
    assert reqs[3].prompt == p1[:1000]
    assert [it.parent for it in st.items] == [-1, 0, -1, -1]
    nolink = list(sim.TraceStream(recs, page_size=16, link_replies=False))
    assert nolink[1].prompt[:1024] == p1[:1024] and nolink[1].prompt[1024:1040] != p1[1024:1040]


def test_trace_sessions_are_inferred_through_linked_replies(sim_cache, cost) -> None:
    recs = [
        _rec(1, [0, 1, 2], 1100, 100),
        _rec(2, [0, 1, 3, 4], 1800, 20),
        _rec(3, [0, 1, 3, 5, 6, 7], 2900),
    ]
    st = sim.TraceStream(recs, page_size=16)
    assert [it.parent for it in st.items] == [-1, 0, 1]
    s = sim.Simulator(sim_cache("lru", 8, kv_tokens=1 << 15).config(), cost)
    rows = [s.step(r) for r in st]
    assert [r.session for r in rows] == ["r0", "r0", "r0"]
    # turn 2 resumes from turn 1's end-of-generation snapshot (floor(1200 / 64) * 64)
    assert (rows[1].use.cached_tokens, rows[1].use.snapshot_pos) == (1200, 1152)
    assert (rows[2].use.cached_tokens, rows[2].use.snapshot_pos) == (1808, 1792)
    assert s.cm.stats()["resumable_sessions"] == 1


def test_compressed_page_tokens_decide_like_full_labels(sim_cache, cost, trace_slice) -> None:
    st = sim.load_trace(trace_slice(300))
    full = sim.ListStream(
        [
            sim.SimRequest(
                _label_tokens(it.prompt), _label_tokens(it.reply), max(1, it.output_length)
            )
            for it in st.items
        ]
    )
    base = sim_cache("lru", 8, 4096, 1 << 20, model="a3b-proxy", dtype_bytes=2)
    for v in sim.variants(["lru", "tail-pin"]):
        a = sim.run_policy(st, base, v, cost).rows
        b = sim.run_policy(full, base, v, cost).rows
        assert a == b


def test_malformed_trace_line_names_the_line(tmp_path: Path) -> None:
    good = json.dumps({"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]})
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{good}\n{good}\n{{"timestamp": 0, "input_length": 9\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:3: not valid JSON"):
        sim.load_trace(path)
    path.write_text(
        f"{good}\n"
        + json.dumps({"timestamp": 0, "input_length": 5000, "output_length": 1, "hash_ids": [0]})
        + "\n"
    )
    with pytest.raises(ConfigError, match=r":2: input_length 5000 exceeds"):
        sim.load_trace(path)
