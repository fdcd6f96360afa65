"""Request streams the simulator replays: Mooncake traces as token-label sequences (replies linked
into the next turn) and recorded scenario runs.

A stream can be iterated any number of times (one pass per policy) and yields `SimRequest`s.
Labels are not vocabulary ids: the simulator needs only their equality (docs/SIMULATOR.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from engine.errors import ConfigError


class SimRequest(NamedTuple):
    prompt: tuple[int, ...]
    reply: tuple[int, ...]  # the generated tokens (cached with the prompt after the request)
    max_tokens: int  # the engine allocates KV pages for prompt + max_tokens
    session: str | None = None  # None: the cache infers it from the matched prefix
    phase: str = ""  # scenario phase, for per-phase summaries



class Stream(Protocol):
    """A request stream that can be replayed any number of times (one pass per policy)."""

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[SimRequest]: ...
    def describe(self) -> dict[str, Any]: ...


@dataclass
class ListStream:
    """Requests held in memory (scenario recordings, tests)."""

    requests: list[SimRequest]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[SimRequest]:
        return iter(self.requests)

    def describe(self) -> dict[str, Any]:
        return dict(self.info)


_Runs = list[tuple[int, int]]  # (first label, count): labels first, first + 1, ... in order
_REPLY_BASE = 1 << 44  # reply labels live above every block label (hash id * 512 + offset)
_REPLY_STRIDE = 1 << 21


def _take(runs: _Runs, lo: int, hi: int) -> _Runs:
    """The runs covering positions [lo, hi) of the sequence `runs` spells."""
    out: _Runs = []
    pos = 0
    for a, n in runs:
        if pos >= hi:
            break
        b0, b1 = max(lo, pos), min(hi, pos + n)
        if b0 < b1:
            out.append((a + b0 - pos, b1 - b0))
        pos += n
    return out


def _label_tokens(runs: _Runs) -> tuple[int, ...]:
    """The sequence `runs` spells, one label per position (the uncompressed reference)."""
    return tuple(itertools.chain.from_iterable(range(a, a + n) for a, n in runs))


def _page_tokens(runs: _Runs, page: int) -> tuple[int, ...]:
    """The sequence `runs` spells, compressed for speed: in each page, the label of its first
    position at offset 0 and of its last at offset page - 1, the small int `offset` between.

    Whole pages compare equal iff their first and last labels do: exact for `TraceStream`, where a
    label names one source position and a block's runs are fixed by its hash-id prefix. The radix
    tree compares whole pages only, and the shared small ints make most element compares identity
    checks (CPython caches them), which is most of the simulator's time on long prompts.
    """
    import numpy as np

    counts = np.fromiter((n for _, n in runs), dtype=np.int64, count=len(runs))
    firsts = np.fromiter((a for a, _ in runs), dtype=np.int64, count=len(runs))
    starts = np.zeros(len(runs), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    n = int(counts.sum())
    z: list[int] = list(range(page)) * (n // page + 1)
    del z[n:]
    for off, cut in ((0, n), (page - 1, n)):
        p = np.arange(off, cut, page, dtype=np.int64)
        if p.size:
            k = np.searchsorted(starts, p, side="right") - 1
            z[off::page] = (firsts[k] + (p - starts[k])).tolist()
    return tuple(z)


class TraceItem(NamedTuple):
    prompt: _Runs
    reply: _Runs
    output_length: int
    line: int
    parent: int  # index of the request whose reply this one continues, -1 if none


class TraceStream:
    """A Mooncake trace as token-label sequences, with replies linked into the next turn.

    Block k of a request is a run of 512 labels fixed by its hash-id prefix `hash_ids[:k+1]`
    (first request to show that prefix defines it): equal hash ids at equal positions give equal
    tokens, as the trace says. A reply is `output_length` labels unique to its request. With
    `link_replies`, a request whose hash ids extend request j's full blocks and diverge exactly at
    j's last (partial) block is j's next turn: its new blocks start with j's prompt tail and reply,
    so the cache matches through j's reply as it would in a real conversation (and infers the
    session from j's end-of-sequence marker). `min_link_blocks` (default 2) keeps a shared system
    block alone from linking unrelated requests. Labels are not vocabulary ids: the simulator needs
    only their equality.
    """

    def __init__(
        self,
        records: Sequence[Any],
        *,
        page_size: int = 16,
        link_replies: bool = True,
        min_link_blocks: int = 2,
        block: int = 512,
        path: str | None = None,
    ) -> None:
        self.page_size = page_size
        self.block = block
        self.link_replies = link_replies
        self.min_link_blocks = min_link_blocks
        self.path = path
        self.items: list[TraceItem] = []
        self.linked = 0
        self._build(records)

    def _build(self, records: Sequence[Any]) -> None:
        B = self.block
        block_runs: dict[int, _Runs] = {}  # hash of hash_ids[:k+1] -> runs of block k
        full_owner: dict[int, tuple[int, int]] = {}  # hash of hash_ids[:n-1] -> (request, last id)
        full_runs: dict[int, _Runs] = {}
        for i, rec in enumerate(records):
            H, L, G = rec.hash_ids, rec.input_length, rec.output_length
            if G >= _REPLY_STRIDE:
                raise ConfigError(f"trace line {rec.line}: output_length {G} is too large")
            chain = []
            h = 0
            for x in H:
                h = hash((h, x))
                chain.append(h)
            parent, pfull = -1, 0
            if self.link_replies:
                for k in range(len(H) - 1, self.min_link_blocks - 1, -1):
                    own = full_owner.get(chain[k - 1])
                    if own is not None and own[1] != H[k]:
                        parent = own[0]
                        pfull = sum(n for _, n in full_runs[parent])
                        break
            prompt: _Runs = []
            for k, x in enumerate(H):
                lo, hi = k * B, min((k + 1) * B, L)
                if hi <= lo:
                    break
                runs = block_runs.get(chain[k])
                have = sum(n for _, n in runs) if runs is not None else 0
                if runs is None or have < hi - lo:
                    new = list(runs) if runs is not None else []
                    start = lo + have
                    if parent >= 0 and start < pfull:
                        cut = min(hi, pfull)
                        new += _take(full_runs[parent], start, cut)
                        start = cut
                    if start < hi:
                        new.append((x * B + start - lo, hi - start))
                    block_runs[chain[k]] = runs = new
                prompt += _take(runs, 0, hi - lo)
            reply: _Runs = [(_REPLY_BASE + i * _REPLY_STRIDE, max(1, G))]  # the engine makes >= 1
            if len(H) - 1 >= self.min_link_blocks:
                full_owner[chain[len(H) - 2]] = (i, H[-1])
                full_runs[i] = prompt + reply
            self.linked += parent >= 0
            self.items.append(TraceItem(prompt, reply, G, rec.line, parent))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[SimRequest]:
        for it in self.items:
            full = _page_tokens(it.prompt + it.reply, self.page_size)
            L = len(full) - it.reply[0][1]
            yield SimRequest(full[:L], full[L:], max(1, it.output_length))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "trace",
            "path": self.path,
            "records": len(self.items),
            "block_tokens": self.block,
            "page_size": self.page_size,
            "link_replies": self.link_replies,
            "min_link_blocks": self.min_link_blocks,
            "linked_requests": self.linked,
            "sessions": "inferred by the cache from matched prefixes",
        }


def load_trace(path: str | Path, limit: int | None = None, **kw: Any) -> TraceStream:
    """Read a Mooncake JSONL trace (sbrbench.tracefile) into a TraceStream."""
    from sbrbench.tracefile import read_trace

    return TraceStream(read_trace(path, limit or None), path=str(path), **kw)

