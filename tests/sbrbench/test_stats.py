"""Summaries, bootstrap CI of the ratio of means, Mann-Whitney p-values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import mannwhitneyu

from sbrbench.stats import (
    bootstrap_ratio_ci,
    compare_samples,
    mann_whitney_p,
    summarize,
    summarize_rows,
)


def test_summarize_matches_numpy_and_skips_non_numbers() -> None:
    vals = [3.0, 1.0, None, 2.0, float("nan"), 10.0, True]
    s = summarize(vals)
    x = np.array([3.0, 1.0, 2.0, 10.0])
    assert s is not None and s.n == 4
    assert s.mean == pytest.approx(x.mean())
    assert s.median == pytest.approx(np.median(x))
    assert s.p90 == pytest.approx(np.percentile(x, 90))
    assert s.p99 == pytest.approx(np.percentile(x, 99))
    assert (s.min, s.max) == (1.0, 10.0)
    assert summarize([]) is None and summarize([None]) is None


def test_summarize_rows_per_phase_excludes_errors() -> None:
    rows = [
        {"phase": "build", "ttft_s": 1.0, "replay_tokens": 0},
        {"phase": "resume", "ttft_s": 2.0, "replay_tokens": 100},
        {"phase": "resume", "ttft_s": 4.0, "replay_tokens": 300},
        {"phase": "resume", "ttft_s": None, "replay_tokens": None, "error": "boom"},
    ]
    s = summarize_rows(rows)
    assert list(s) == ["build", "resume"]
    assert s["resume"]["rows"] == 3 and s["resume"]["errors"] == 1
    assert s["resume"]["ttft_s"]["n"] == 2 and s["resume"]["ttft_s"]["mean"] == 3.0
    assert s["resume"]["replay_tokens"]["median"] == 200.0
    assert summarize_rows([{"phase": "x", "ttft_s": None}])["x"]["ttft_s"] is None


def test_ratio_ci_and_p_value_on_clearly_different_samples() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(10.0, 1.0, 40)
    b = rng.normal(2.0, 0.2, 40)
    c = compare_samples(a, b)
    assert c.ratio == pytest.approx(a.mean() / b.mean())
    assert c.ci95 is not None and c.ci95[0] < c.ratio < c.ci95[1]
    assert 4.0 < c.ci95[0] and c.ci95[1] < 6.0
    assert c.p_value is not None and c.p_value < 1e-6


def test_identical_samples_ratio_one() -> None:
    a = np.array([1.0, 2.0, 3.0, 4.0])
    c = compare_samples(a, a.copy())
    assert c.ratio == 1.0
    assert c.ci95 is not None and c.ci95[0] <= 1.0 <= c.ci95[1]
    assert c.p_value == pytest.approx(mannwhitneyu(a, a, alternative="two-sided").pvalue)


def test_degenerate_cases() -> None:
    assert bootstrap_ratio_ci(np.array([1.0]), np.array([1.0, 2.0])) is None
    # B identically zero: the ratio is unbounded, no CI; A zero too: ratio 1
    c = compare_samples([1.0, 2.0], [0.0, 0.0])
    assert c.ratio is None and c.ci95 is None
    c = compare_samples([0, 0, 0], [0, 0, 0])
    assert c.ratio == 1.0 and c.ci95 is None and c.p_value == 1.0
    # zeros in B: some resamples have B mean 0 -> an unbounded upper end, never nan
    lo, hi = bootstrap_ratio_ci(np.array([5.0, 6.0]), np.array([0.0, 1.0]), n_resamples=400)
    assert lo == 5.0 and hi == float("inf")
    assert mann_whitney_p(np.array([]), np.array([1.0])) is None
    c = compare_samples([], [1.0])
    assert c.a is None and c.ratio is None and c.p_value is None


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    a, b = np.arange(1.0, 20.0), np.arange(5.0, 30.0)
    assert bootstrap_ratio_ci(a, b, seed=3) == bootstrap_ratio_ci(a, b, seed=3)
    assert bootstrap_ratio_ci(a, b, seed=3) != bootstrap_ratio_ci(a, b, seed=4)


samples = st.lists(st.floats(0.5, 1000.0, allow_nan=False), min_size=2, max_size=30)


@settings(max_examples=40, deadline=None)
@given(a=samples, b=samples, k=st.floats(0.1, 50.0))
def test_scaling_a_scales_ratio_and_ci(a: list[float], b: list[float], k: float) -> None:
    c1 = compare_samples(a, b, n_resamples=500)
    c2 = compare_samples([k * x for x in a], b, n_resamples=500)
    assert c1.ratio is not None and c2.ratio is not None
    assert c2.ratio == pytest.approx(k * c1.ratio, rel=1e-9)
    assert c1.ci95 is not None and c2.ci95 is not None
    assert c2.ci95[0] == pytest.approx(k * c1.ci95[0], rel=1e-9)
    assert c2.ci95[1] == pytest.approx(k * c1.ci95[1], rel=1e-9)
    assert c1.ci95[0] <= c1.ci95[1]
    # Mann-Whitney is rank-based: the same as scipy's
    assert c1.p_value is not None and math.isfinite(c1.p_value)
