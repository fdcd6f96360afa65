"""Statistics for result rows: summaries, run throughput and goodput under SLOs, bootstrap CI
of a ratio of means, Mann-Whitney U.

The latency metrics are the ones vLLM's `bench serve`, SGLang's `bench_serving`, guidellm and
AIPerf report, per request: TTFT (`ttft_s`), TPOT (`tpot_s`, time per output token after the
first), ITL (`itl_s`, every gap between successive tokens; summarised over all gaps of all
requests, as those tools pool them) and the end-to-end latency (`e2e_s`, their "e2el").
Throughput is per run: requests, output tokens and all tokens per second of wall time from the
first request sent to the last one finished; goodput is the requests per second that met every
SLO (vLLM's `--goodput`; a failed request meets none).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from engine.errors import UserError

LATENCY_METRICS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
METRICS = (*LATENCY_METRICS, "replay_tokens")
# --slo names (vLLM's --goodput names) -> row fields
SLO_NAMES = {"ttft": "ttft_s", "tpot": "tpot_s", "e2el": "e2e_s"}
THROUGHPUT_KEYS = ("request_throughput", "output_throughput", "total_token_throughput",
                   "goodput")


class Summary(NamedTuple):
    n: int
    mean: float
    median: float
    p90: float
    p99: float
    min: float
    max: float


class Comparison(NamedTuple):
    """A vs B on one metric. ratio = mean(A) / mean(B); None where B's mean is 0 or n < 1."""

    a: Summary | None
    b: Summary | None
    ratio: float | None
    ci95: tuple[float, float] | None
    p_value: float | None


def _numbers(values: Iterable[Any]) -> Iterable[Any]:
    """The values, with lists (a row's ITL gaps) flattened into their elements."""
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from v
        else:
            yield v


def _finite(values: Iterable[Any]) -> np.ndarray:
    out = [
        float(v)
        for v in _numbers(values)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]
    return np.asarray(out, dtype=np.float64)


def summarize(values: Iterable[Any]) -> Summary | None:
    """n, mean, median, p90, p99, min, max of the numeric values (None and NaN skipped; list
    values contribute each element)."""
    x = _finite(values)
    if x.size == 0:
        return None
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return Summary(
        int(x.size),
        float(x.mean()),
        float(p50),
        float(p90),
        float(p99),
        float(x.min()),
        float(x.max()),
    )


def summarize_rows(
    rows: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS
) -> dict[str, Any]:
    """Per phase: row and error counts, and a Summary dict (or None) per metric (ITL over every
    gap of the phase's requests).

    Rows that carry an error are counted but kept out of the metric summaries.
    """
    phases: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        phases.setdefault(str(r.get("phase", "?")), []).append(r)
    out: dict[str, Any] = {}
    for phase, prs in phases.items():
        ok = [r for r in prs if not r.get("error")]
        entry: dict[str, Any] = {"rows": len(prs), "errors": len(prs) - len(ok)}
        for m in metrics:
            s = summarize(r.get(m) for r in ok)
            entry[m] = s._asdict() if s else None
        out[phase] = entry
    return out


def metric_values(rows: Sequence[dict[str, Any]], phase: str, metric: str,
                  slo: Mapping[str, float] | None = None) -> np.ndarray:
    """The finite values of `metric` over error-free rows of `phase`; `slo_met` is 1 or 0 per
    row (failed rows included: they met no SLO), given `slo`."""
    prs = [r for r in rows if str(r.get("phase")) == phase]
    if metric == "slo_met":
        return np.asarray([float(slo_met(r, slo or {})) for r in prs], dtype=np.float64)
    return _finite(r.get(metric) for r in prs if not r.get("error"))


# ----------------------------------------------------------------------------- SLOs, throughput

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s)\s*$")


def parse_slo(text: str) -> dict[str, float]:
    """`ttft=500ms,tpot=50ms,e2el=2s` -> {"ttft_s": 0.5, "tpot_s": 0.05, "e2e_s": 2.0}; each
    limit needs its unit (ms or s)."""
    out: dict[str, float] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in SLO_NAMES:
            raise UserError(f"--slo {item.strip()!r}: expected NAME=LIMIT with NAME one of "
                            f"{', '.join(SLO_NAMES)} (e.g. ttft=500ms,tpot=50ms)")
        m = _DURATION.match(value)
        if not m:
            raise UserError(f"--slo {name}={value.strip()}: give the limit with its unit, "
                            "e.g. 500ms or 0.5s")
        seconds = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
        if not seconds > 0:
            raise UserError(f"--slo {name}: the limit must be > 0")
        out[SLO_NAMES[name]] = seconds
    if not out:
        raise UserError("--slo: no limit given (e.g. ttft=500ms,tpot=50ms)")
    return out


def slo_met(row: Mapping[str, Any], slo: Mapping[str, float]) -> bool:
    """The request succeeded and met every limit of `slo` (a reply of one token has no TPOT to
    miss; any other unknown value misses)."""
    if row.get("error"):
        return False
    for metric, limit in slo.items():
        v = row.get(metric)
        if v is None and metric == "tpot_s" and (row.get("generated_tokens") or 0) <= 1:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v <= limit:
            return False
    return True


def run_throughput(rows: Sequence[Mapping[str, Any]],
                   slo: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The run's requests (completed, failed), tokens and wall time (first request sent to the
    last finished), and per second of it: request_throughput, output_throughput,
    total_token_throughput and, given `slo`, goodput (requests that met it) with the share of
    requests that did (slo_attainment). Rates are None without timestamps."""
    ok = [r for r in rows if not r.get("error")]
    starts = _finite(r.get("t_s") for r in rows)
    ends = _finite(r.get("done_s") for r in rows)
    duration = float(ends.max() - starts.min()) if starts.size and ends.size else None
    tokens_in = int(sum(_finite(r.get("prompt_tokens") for r in ok)))
    tokens_out = int(sum(_finite(r.get("generated_tokens") for r in ok)))

    def rate(x: float) -> float | None:
        return x / duration if duration else None

    out: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(rows) - len(ok),
        "duration_s": duration,
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "request_throughput": rate(len(ok)),
        "output_throughput": rate(tokens_out),
        "total_token_throughput": rate(tokens_in + tokens_out),
        "slo": dict(slo) if slo else None,
        "slo_met": None,
        "slo_attainment": None,
        "goodput": None,
    }
    if slo:
        met = sum(slo_met(r, slo) for r in rows)
        out.update(slo_met=met, slo_attainment=met / len(rows) if rows else None,
                   goodput=rate(met))
    return out


def _ratio(a: float, b: float) -> float | None:
    if b == 0:
        return 1.0 if a == 0 else None
    return a / b


def bootstrap_ratio_ci(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap CI of mean(a)/mean(b), resampling each sample independently.

    None when either sample has fewer than 2 values or mean(b) is 0. A resample whose B mean is
    0 counts as an infinite ratio, so the upper bound may be `inf` (unbounded; null in JSON).
    """
    if a.size < 2 or b.size < 2 or b.mean() == 0:
        return None
    rng = np.random.default_rng(seed)
    ma = a[rng.integers(0, a.size, size=(n_resamples, a.size))].mean(axis=1)
    mb = b[rng.integers(0, b.size, size=(n_resamples, b.size))].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(mb == 0, np.where(ma == 0, 1.0, np.inf), ma / mb)
    ratios.sort()
    alpha = (1.0 - level) / 2.0
    # order statistics, not interpolation: interpolating next to an inf would give nan
    lo = ratios[int(np.floor(alpha * (n_resamples - 1)))]
    hi = ratios[int(np.ceil((1.0 - alpha) * (n_resamples - 1)))]
    return float(lo), float(hi)


def mann_whitney_p(a: np.ndarray, b: np.ndarray) -> float | None:
    """Two-sided Mann-Whitney U p-value (scipy); 1.0 when both samples are one equal constant."""
    if a.size == 0 or b.size == 0:
        return None
    if np.all(a == a[0]) and np.all(b == a[0]):
        return 1.0
    from scipy.stats import mannwhitneyu

    p = float(mannwhitneyu(a, b, alternative="two-sided").pvalue)
    return p if math.isfinite(p) else None


def compare_samples(
    a: Iterable[Any], b: Iterable[Any], *, n_resamples: int = 10_000, seed: int = 0
) -> Comparison:
    """Summaries, ratio of means, bootstrap ci95 of that ratio and Mann-Whitney p of A vs B."""
    xa, xb = _finite(a), _finite(b)
    sa, sb = summarize(xa), summarize(xb)
    ratio = _ratio(sa.mean, sb.mean) if sa and sb else None
    ci = bootstrap_ratio_ci(xa, xb, n_resamples=n_resamples, seed=seed)
    return Comparison(sa, sb, ratio, ci, mann_whitney_p(xa, xb))


def comparison_dict(c: Comparison) -> dict[str, Any]:
    """JSON form of a Comparison."""
    return {
        "a": c.a._asdict() if c.a else None,
        "b": c.b._asdict() if c.b else None,
        "ratio": c.ratio,
        "ci95": list(c.ci95) if c.ci95 else None,
        "p_value": c.p_value,
    }
