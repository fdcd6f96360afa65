"""Statistics for result rows: summaries, bootstrap CI of a ratio of means, Mann-Whitney U."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

METRICS = ("ttft_s", "replay_tokens")


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


def _finite(values: Iterable[Any]) -> np.ndarray:
    out = [
        float(v)
        for v in values
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]
    return np.asarray(out, dtype=np.float64)


def summarize(values: Iterable[Any]) -> Summary | None:
    """n, mean, median, p90, p99, min, max of the numeric values (None and NaN skipped)."""
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
    """Per phase: row and error counts, and a Summary dict (or None) per metric.

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


def metric_values(rows: Sequence[dict[str, Any]], phase: str, metric: str) -> np.ndarray:
    """The finite values of `metric` over error-free rows of `phase`."""
    return _finite(
        r.get(metric) for r in rows if str(r.get("phase")) == phase and not r.get("error")
    )


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
