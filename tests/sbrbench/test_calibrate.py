"""sbrbench.calibrate: the fit (per position and in windows), calibration points, and
calibration on the tiny engine with its refit from the stored points."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from engine.errors import UserError
from sbrbench import calibrate as cal
from sbrbench import costmodel as cm
from sbrbench.calibrate import CalibPoint, Sample
from sbrbench.costmodel import CostModel


def test_fit_recovers_known_coefficients() -> None:
    true = CostModel(a=1.5e-4, b=2e-9, c=0.02, restore=0.004)
    rnd = random.Random(0)
    samples = []
    for _ in range(12):
        L = rnd.randrange(256, 8192)
        s = rnd.choice([0, rnd.randrange(0, L // 64) * 64])
        m = rnd.randrange(s, L - 16) // 16 * 16
        y = true.ttft(s, m, L)
        samples.append(Sample(CalibPoint(s, max(m, s), L), y, [y], 0.001))
    coef, stats = cal.fit(samples)
    for k in ("a", "b", "c", "restore"):
        assert coef[k] == pytest.approx(getattr(true, k), rel=1e-3, abs=1e-6), k
    assert stats["max_rel_err"] < 1e-3 and coef["decode"] == pytest.approx(0.001)


def test_fit_needs_points() -> None:
    with pytest.raises(UserError, match="at least 4"):
        cal.fit([Sample(CalibPoint(0, 0, 100), 0.1, [0.1], None)])


@pytest.mark.parametrize(
    "bad", [CalibPoint(64, 32, 100), CalibPoint(10, 10, 100), CalibPoint(0, 96, 100)]
)
def test_bad_calibration_points(bad: CalibPoint) -> None:
    with pytest.raises(UserError, match="calibration point"):
        cal.check_point(bad)


def test_calibrate_tiny_engine_controls_restore_and_replay(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sbrbench.cli import app

    out = tmp_path / "cm.json"
    res = CliRunner().invoke(
        app,
        [
            "calibrate",
            "--preset",
            "tiny",
            "--reps",
            "1",
            "--points",
            "0:0:96,0:0:200,0:128:200,64:64:200,64:128:200",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["schema"] == "sbrbench.costmodel/v1" and doc["source"] == "fit:engine"
    pts = doc["meta"]["points"]
    assert [(p["s"], p["m"], p["L"]) for p in pts] == [
        (0, 0, 96),
        (0, 0, 200),
        (0, 128, 200),
        (64, 64, 200),
        (64, 128, 200),
    ]
    assert all(p["ttft_s"] > 0 for p in pts) and doc["meta"]["fit"]["n"] == 5
    assert min(doc[k] for k in ("a", "b", "c", "restore")) >= 0
    # The stored points refit without an engine: per position reproduces the same numbers, and a
    # window is fitted when asked; both need --out, and --window needs --refit.
    again = tmp_path / "again.json"
    res = CliRunner().invoke(app, ["calibrate", "--refit", str(out), "--window", "0",
                                   "--out", str(again)])
    assert res.exit_code == 0, res.output
    src, ref = cm.load(out), cm.load(again)
    if src.window == 0:
        assert ref.coefficients() == pytest.approx(src.coefficients())
    assert ref.window == 0 and ref.meta["refit_of"]
    res = CliRunner().invoke(app, ["calibrate", "--refit", str(out), "--window", "64",
                                   "--out", str(again)])
    assert isinstance(res.exception, UserError) and "--force" in str(res.exception)
    assert cm.load(again).window == 0  # an existing fit is never replaced without --force
    res = CliRunner().invoke(app, ["calibrate", "--refit", str(out), "--window", "64",
                                   "--out", str(again), "--force"])
    assert res.exit_code == 0 and cm.load(again).window == 64
    res = CliRunner().invoke(app, ["calibrate", "--refit", str(out)])
    assert isinstance(res.exception, UserError) and "--out" in str(res.exception)
    res = CliRunner().invoke(app, ["calibrate", "--window", "64"])
    assert isinstance(res.exception, UserError) and "--refit" in str(res.exception)


def test_windowed_fit_recovers_a_windowed_engine() -> None:
    """Timings made by a windowed model are fitted exactly with its window, and the best-fit
    choice picks the window over per-position."""
    truth = CostModel(a=3e-5, b=5e-10, c=0.003, restore=0.0, window=2048)
    pts = [CalibPoint(s, m, L) for s, m, L in [(0, 0, 1024), (0, 0, 4096), (0, 0, 8192),
                                               (0, 0, 16384), (0, 3568, 4096), (2048, 2048, 4096),
                                               (4096, 4096, 8192), (8192, 8192, 16384)]]
    samples = [Sample(p, truth.ttft(*p), [truth.ttft(*p)], None) for p in pts]
    coef, stats, win = cal.best_fit(samples, 2048)
    assert win == 2048 and stats["max_rel_err"] < 1e-6
    assert coef["a"] == pytest.approx(3e-5, rel=1e-4)
    assert coef["c"] == pytest.approx(0.003, rel=1e-3)
    assert stats["alternatives"]["per_position"]["max_rel_err"] > 0.05
