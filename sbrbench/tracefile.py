"""Mooncake-format request traces: parsing, and hash ids turned into deterministic token blocks.

One JSON object a line: `timestamp` (ms), `input_length`, `output_length`, `hash_ids` (one id
per 512-token prefix block; equal ids at equal positions mean a shared prefix). The trace has no
text, so each hash id becomes a block of token ids drawn from a generator seeded by (seed, id):
equal ids give equal blocks, so prefix sharing in the trace becomes prefix sharing in the tokens.
Shared by the trace scenario and the simulator.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from engine.errors import ConfigError

TRACE_BLOCK = 512  # tokens per hash id in the Mooncake release
# The first 400 requests of the Mooncake conversation trace, shipped with the package
# (sbrbench/data/traces/README.md): the default trace of `run trace` and of the examples.
SAMPLE_TRACE = (Path(__file__).resolve().parent / "data" / "traces"
                / "mooncake-conversation-400.jsonl")


class TraceRecord(NamedTuple):
    line: int  # 1-based line number in the file
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def _int_field(obj: dict, key: str, where: str, *, minimum: int = 0) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"{where}: '{key}' must be an integer >= {minimum}, got {v!r}")
    return v


def parse_line(text: str, line: int, path: str = "<trace>") -> TraceRecord:
    """One trace line -> TraceRecord; ConfigError naming the file and line when malformed."""
    where = f"{path}:{line}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    ts = obj.get("timestamp")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts) or ts < 0:
        raise ConfigError(f"{where}: 'timestamp' must be a number >= 0, got {ts!r}")
    inp = _int_field(obj, "input_length", where, minimum=1)
    out = _int_field(obj, "output_length", where)
    ids = obj.get("hash_ids")
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in ids)
    ):
        raise ConfigError(f"{where}: 'hash_ids' must be a non-empty list of integers >= 0")
    if inp > len(ids) * TRACE_BLOCK:
        raise ConfigError(
            f"{where}: input_length {inp} exceeds {len(ids)} blocks of {TRACE_BLOCK} tokens"
        )
    return TraceRecord(line, float(ts), inp, out, tuple(ids))


def iter_trace(path: str | Path) -> Iterator[TraceRecord]:
    """Records of a JSONL trace in file order; blank lines are skipped."""
    p = Path(path)
    try:
        f = p.open(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot open trace ({e.strerror or e})") from None
    with f:
        for n, text in enumerate(f, start=1):
            if text.strip():
                yield parse_line(text, n, str(p))


def read_trace(path: str | Path, limit: int | None = None) -> list[TraceRecord]:
    """The first `limit` records (all when None or 0); ConfigError when there are none."""
    out: list[TraceRecord] = []
    for rec in iter_trace(path):
        if limit and len(out) >= limit:
            break
        out.append(rec)
    if not out:
        raise ConfigError(f"{path}: trace has no records")
    return out


def session_of(rec: TraceRecord) -> str:
    """A conversation key: the first block after the shared system prompt identifies it."""
    return f"t{rec.hash_ids[1] if len(rec.hash_ids) > 1 else rec.hash_ids[0]}"


class TraceTokens:
    """Maps hash ids to token blocks: ids in [low, vocab_size), `block_tokens` per block.

    `block_tokens` < 512 shrinks a trace for small machines while keeping its sharing structure:
    every length scales by block_tokens / 512.
    """

    def __init__(
        self, vocab_size: int, *, seed: int = 0, block_tokens: int = TRACE_BLOCK, low: int = 0
    ) -> None:
        if not 0 <= low < vocab_size:
            raise ConfigError(f"token range [{low}, {vocab_size}) is empty")
        if block_tokens < 1:
            raise ConfigError(f"block_tokens must be >= 1, got {block_tokens}")
        self.vocab_size, self.seed, self.block_tokens, self.low = (
            vocab_size,
            seed,
            block_tokens,
            low,
        )
        self._cache: dict[int, tuple[int, ...]] = {}

    def block(self, hash_id: int) -> tuple[int, ...]:
        """The token block of one hash id (same id -> same block, for a given seed and range)."""
        blk = self._cache.get(hash_id)
        if blk is None:
            rng = np.random.default_rng([self.seed, hash_id])
            blk = tuple(
                int(t) for t in rng.integers(self.low, self.vocab_size, size=self.block_tokens)
            )
            self._cache[hash_id] = blk
        return blk

    def scaled(self, n_tokens: int) -> int:
        """A trace length in this mapping's tokens (at least 1 for a non-zero length)."""
        if self.block_tokens == TRACE_BLOCK or n_tokens == 0:
            return n_tokens
        return max(1, math.ceil(n_tokens * self.block_tokens / TRACE_BLOCK))

    def prompt(self, rec: TraceRecord) -> list[int]:
        """The prompt token ids of a record: its blocks, the last one cut to input_length."""
        n = min(self.scaled(rec.input_length), len(rec.hash_ids) * self.block_tokens)
        ids: list[int] = []
        for h in rec.hash_ids:
            ids.extend(self.block(h))
            if len(ids) >= n:
                break
        return ids[:n]
