"""The per-request record: what the prefix cache did for a request and how long each phase took.

One definition for every producer and consumer: the engine's `GenerateResult.stats`, the
simulator's rows, the server's `sbr` object (its schema is derived from these fields) and the
result JSON rows (`RequestStats.row`).
"""

from __future__ import annotations

from typing import Any, NamedTuple


class CacheUse(NamedTuple):
    """What the cache did: ``cached_tokens`` (m) matched, restored at ``snapshot_pos`` (s),
    ``replay_tokens`` = m - s recomputed to rebuild the recurrent state, ``new_tokens`` = L - m."""

    prompt_tokens: int
    cached_tokens: int
    snapshot_pos: int
    replay_tokens: int
    new_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, matched: int, restore_pos: int) -> CacheUse:
        return cls(prompt_tokens, matched, restore_pos, matched - restore_pos,
                   prompt_tokens - matched)


class Timing(NamedTuple):
    """Seconds per phase of one request (wall time; on CUDA after a device synchronise).

    match_s: match, page allocation and the KV gather; restore_s: the snapshot copy; replay_s /
    prefill_s: windows over [s, m) / [m, L); ttft_s: from arrival to the first token; decode_s:
    the other tokens; finalize_s: the reply's canonical KV and snapshot; e2e_s: the whole request.
    """

    match_s: float
    restore_s: float
    replay_s: float
    prefill_s: float
    ttft_s: float
    decode_s: float
    finalize_s: float
    e2e_s: float


CACHE_FIELDS: tuple[str, ...] = CacheUse._fields
TIMING_FIELDS: tuple[str, ...] = Timing._fields
# the timing fields a result row keeps at the top level; the rest go under "timings"
HEADLINE_TIMES = ("ttft_s", "e2e_s")


def time_per_output_token(after_first_s: float, output_tokens: int) -> float | None:
    """TPOT as vLLM, SGLang and guidellm define it: the time from the first token to the last
    over the tokens after the first; None for a reply of fewer than two tokens."""
    return after_first_s / (output_tokens - 1) if output_tokens >= 2 else None


class RequestStats(NamedTuple):
    """One request: the cache's part, the reply's length, a digest of the first token's logits
    (None where no model ran), and the phase timings."""

    cache: CacheUse
    generated_tokens: int
    logits_sha256: str | None
    timing: Timing

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (decode_s spans first token to last)."""
        return time_per_output_token(self.timing.decode_s, self.generated_tokens)

    def row(self) -> dict[str, Any]:
        """The result-row fields: cache fields, generated_tokens, logits_sha256, ttft_s, e2e_s,
        tpot_s, and the other phases under "timings"."""
        t = self.timing._asdict()
        return {
            **self.cache._asdict(),
            "generated_tokens": self.generated_tokens,
            "logits_sha256": self.logits_sha256,
            **{k: t[k] for k in HEADLINE_TIMES},
            "tpot_s": self.tpot_s,
            "timings": {k: v for k, v in t.items() if k not in HEADLINE_TIMES},
        }

    @classmethod
    def from_row(cls, d: dict[str, Any]) -> RequestStats:
        """Inverse of `row` (also reads the server's `sbr` object, whose timing is nested)."""
        timing = dict(d.get("timings") or d.get("timing") or {})
        for k in HEADLINE_TIMES:
            if k in d and k not in timing:
                timing[k] = d[k]
        return cls(
            CacheUse(*(int(d[k]) for k in CACHE_FIELDS)),
            int(d["generated_tokens"]),
            d.get("logits_sha256"),
            Timing(*(float(timing[k]) for k in TIMING_FIELDS)),
        )
