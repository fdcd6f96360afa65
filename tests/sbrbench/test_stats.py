"""Summaries, bootstrap CI of the ratio of means, Mann-Whitney p-values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import mannwhitneyu

from engine.errors import UserError
from sbrbench.stats import (
    bootstrap_ratio_ci,
    compare_samples,
    mann_whitney_p,
    metric_values,
    parse_slo,
    run_throughput,
    slo_met,
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


# ----------------------------------------------------------------------------- SLOs, throughput


def test_parse_slo_needs_names_and_units() -> None:
    assert parse_slo("ttft=500ms, tpot=0.05s,e2el=2s") == {"ttft_s": 0.5, "tpot_s": 0.05,
                                                         "e2e_s": 2.0}
    assert parse_slo("TTFT=1e3ms") == {"ttft_s": 1.0}
    for bad, msg in (("ttft=500", "with its unit"), ("itl=5ms", "NAME one of"),
                     ("ttft", "NAME one of"), ("ttft=0ms", "must be > 0"), (",", "no limit")):
        with pytest.raises(UserError, match=msg):
            parse_slo(bad)


def test_slo_met_per_request() -> None:
    slo = {"ttft_s": 0.5, "tpot_s": 0.05}
    assert slo_met({"ttft_s": 0.4, "tpot_s": 0.05, "generated_tokens": 9}, slo)
    assert not slo_met({"ttft_s": 0.6, "tpot_s": 0.01, "generated_tokens": 9}, slo)
    assert not slo_met({"ttft_s": 0.1, "tpot_s": 0.01, "error": "boom"}, slo)
    # a one-token reply has no TPOT to miss; an unknown TPOT of a longer one misses
    assert slo_met({"ttft_s": 0.1, "tpot_s": None, "generated_tokens": 1}, slo)
    assert not slo_met({"ttft_s": 0.1, "tpot_s": None, "generated_tokens": 5}, slo)


def test_run_throughput_and_goodput() -> None:
    rows = [
        {"t_s": 0.0, "done_s": 1.0, "prompt_tokens": 100, "generated_tokens": 10,
         "ttft_s": 0.2, "tpot_s": 0.01},
        {"t_s": 0.5, "done_s": 2.0, "prompt_tokens": 50, "generated_tokens": 20,
         "ttft_s": 0.9, "tpot_s": 0.01},
        {"t_s": 1.0, "done_s": 4.0, "prompt_tokens": 70, "generated_tokens": 0,
         "ttft_s": None, "error": "HTTP 503"},
    ]
    tp = run_throughput(rows, {"ttft_s": 0.5})
    assert tp["duration_s"] == 4.0 and (tp["completed"], tp["failed"]) == (2, 1)
    assert (tp["input_tokens"], tp["output_tokens"]) == (150, 30)
    assert tp["request_throughput"] == 0.5 and tp["output_throughput"] == 7.5
    assert tp["total_token_throughput"] == 45.0
    assert tp["slo_met"] == 1 and tp["goodput"] == 0.25 and tp["slo_attainment"] == 1 / 3
    plain = run_throughput(rows)
    assert plain["goodput"] is None and plain["slo"] is None
    old = run_throughput([{"ttft_s": 1.0}])  # rows without timestamps: no rates
    assert old["duration_s"] is None and old["request_throughput"] is None


def test_itl_summaries_pool_every_gap() -> None:
    rows = [{"phase": "p", "ttft_s": 1.0, "itl_s": [0.1, 0.3]},
            {"phase": "p", "ttft_s": 2.0, "itl_s": [0.2]},
            {"phase": "p", "ttft_s": 3.0, "itl_s": None},
            {"phase": "p", "ttft_s": 9.0, "itl_s": [5.0], "error": "x"}]
    s = summarize_rows(rows)["p"]
    assert s["itl_s"]["n"] == 3 and s["itl_s"]["mean"] == pytest.approx(0.2)
    assert s["ttft_s"]["n"] == 3 and s["tpot_s"] is None
    assert list(metric_values(rows, "p", "itl_s")) == [0.1, 0.3, 0.2]
    met = metric_values(rows, "p", "slo_met", {"ttft_s": 1.5})
    assert list(met) == [1.0, 0.0, 0.0, 0.0]
