"""trace: replay a Mooncake-format JSONL trace (shared prefixes become shared token blocks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.chat import Message
from engine.errors import ConfigError
from sbrbench.scenarios.base import Param, Scenario, Step
from sbrbench.targets.base import Request, Target
from sbrbench.tracefile import SAMPLE_TRACE, TraceRecord, TraceTokens, iter_trace, session_of

_WAVE = 64  # records materialised at a time (prompts of a full trace would not fit in memory)


def resolve_trace(path: str) -> Path:
    """A trace file: the name of one shipped with the package (sbrbench/data/traces/, e.g. the
    default "mooncake-conversation-400"), or a path."""
    if not path:
        raise ConfigError("trace: no trace file; pass --set trace=PATH")
    shipped = SAMPLE_TRACE.parent / f"{path}.jsonl"
    if "/" not in path and shipped.is_file():
        return shipped
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"trace: no such file {path!r} (give a path, or the shipped "
                          f"{SAMPLE_TRACE.stem!r})")
    return p


class Trace(Scenario):
    name = "trace"
    summary = "replay a Mooncake JSONL trace through the target"
    PARAMS = {
        "trace": Param(str, "JSONL trace: a path, or the name of a shipped one"),
        "limit": Param(int, "first N records (0 = all)", 0),
        "time_scale": Param(float, "arrival times x this factor (0 = as fast as possible)", 0),
        "block_tokens": Param(int, "tokens per 512-token trace block (shrinks the trace)", 1),
        "max_output_tokens": Param(int, "cap on generated tokens (0 = as in the trace)", 0),
        "token_low": Param(int, "smallest character code used for prompt blocks", 0, 127),
        "token_high": Param(int, "character codes are < this (printable ASCII: 32..127)", 1,
                            128),
    }

    def __init__(self, params: dict[str, Any], seed: int = 0) -> None:
        super().__init__(params, seed)
        self.path = resolve_trace(params["trace"])
        self.tokens = TraceTokens(
            params["token_high"],
            seed=seed,
            low=params["token_low"],
            block_tokens=params["block_tokens"],
        )

    @classmethod
    def check_params(cls, p: dict[str, Any], where: str) -> None:
        if p["token_low"] >= p["token_high"]:
            raise ConfigError(f"{where}: 'token_low' must be < 'token_high'")

    def prepare(self, target: Target) -> None:
        super().prepare(target)
        vocab = getattr(target, "vocab_size", None)
        if isinstance(vocab, int) and self.p["token_high"] > vocab:
            raise ConfigError(
                f"trace: token_high {self.p['token_high']} exceeds the target's vocab size {vocab}"
            )
        next(iter(self._records()))  # fail before the first request when the file is bad

    def _records(self) -> Iterator[TraceRecord]:
        limit = self.p["limit"]
        any_rec = False
        for k, rec in enumerate(iter_trace(self.path)):
            if limit and k >= limit:
                break
            any_rec = True
            yield rec
        if not any_rec:
            raise ConfigError(f"{self.path}: trace has no records")

    def expected_requests(self) -> int | None:
        return self.p["limit"] or None

    def waves(self) -> Iterator[list[Step]]:
        wave: list[Step] = []
        t0: float | None = None
        for k, rec in enumerate(self._records()):
            t0 = rec.timestamp_ms if t0 is None else t0
            wave.append(self._step(k, rec, t0))
            if len(wave) >= _WAVE:
                yield wave
                wave = []
        if wave:
            yield wave

    def _step(self, k: int, rec: TraceRecord, t0: float) -> Step:
        # a block is a run of ASCII characters: one token each with the byte-level tokenizer
        msg = Message("user", bytes(self.tokens.prompt(rec)).decode("ascii"))
        out = self.tokens.scaled(rec.output_length)
        if self.p["max_output_tokens"]:
            out = min(out, self.p["max_output_tokens"])
        scale = self.p["time_scale"]
        at = (rec.timestamp_ms - t0) / 1000.0 * scale if scale > 0 else None
        req = Request(tuple(self.template.render([msg])), (msg,), max(1, out), session_of(rec))
        return Step(
            req,
            {
                "phase": "prompt",
                "conv": session_of(rec),
                "record": k,
                "trace_line": rec.line,
                "blocks": len(rec.hash_ids),
            },
            at_s=at,
        )
