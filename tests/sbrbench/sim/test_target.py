"""`--target sim`: rows of the engine's shape with modelled timings, and the recorded stream."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cache.settings import CacheSettings
from sbrbench import sim
from sbrbench.costmodel import CostModel
from sbrbench.targets.base import Request


def test_sim_target_rows_and_replay_of_its_stream() -> None:
    tgt = sim.SimTarget.build(cache=CacheSettings(
        policy="tail-pin", policy_opts={"k": 2}, snapshot_slots=3, snapshot_interval=128))
    rnd = random.Random(0)
    conv = [rnd.randrange(32, 127) for _ in range(300)]
    resps = []
    for _ in range(4):
        resp = tgt.send(Request(tuple(conv), max_tokens=8, session="c"))
        resps.append(resp)
        conv = conv + resp.tokens + [rnd.randrange(32, 127) for _ in range(70)]
    last = resps[-1].stats
    assert last is not None and last.cache.cached_tokens > 0 and last.cache.snapshot_pos > 0
    assert all(r.ttft_s and r.stats and len(r.tokens) == 8 for r in resps)
    t = last.timing
    assert t.ttft_s == pytest.approx(t.match_s + t.restore_s + t.replay_s + t.prefill_s,
                                     rel=1e-12)
    assert t.e2e_s == pytest.approx(t.ttft_s + t.decode_s, rel=1e-12)
    d = tgt.describe()
    assert d["kind"] == "sim" and d["ttft"] == "modelled" and "source" in d["costmodel"]
    # replaying the recorded stream under the same policy gives the same decisions
    s = sim.Simulator(tgt.cfg, tgt.cost)
    again = [s.step(r) for r in tgt.requests]
    assert [r.use for r in again] == [r.stats.cache for r in resps if r.stats]
    bad = tgt.send(Request((1, 2, 999), max_tokens=2))
    assert bad.error and "vocabulary" in bad.error
    assert len(tgt.requests) == 4  # the refused request is not part of the stream


def test_run_scenario_with_target_sim(tmp_path: Path) -> None:
    from sbrbench.cli import app

    out = tmp_path / "dr.json"
    res = CliRunner().invoke(
        app,
        [
            "run",
            "deep-resume",
            "--target",
            "sim",
            "--policy",
            "forecast",
            "--no-progress",
            "--set",
            "depth=1200",
            "--set",
            "pressure=6",
            "--set",
            "cycles=2",
            "--snapshot-slots",
            "4",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["target"]["kind"] == "sim" and doc["target"]["ttft"] == "modelled"
    assert doc["engine"]["policy"] == "forecast" and doc["engine"]["device"] == "sim"
    resume = [r for r in doc["rows"] if r["phase"] == "resume"]
    assert len(resume) == 2 and all(r["cached_tokens"] > 0 for r in resume)
    keys = {
        "phase",
        "ttft_s",
        "e2e_s",
        "prompt_tokens",
        "cached_tokens",
        "snapshot_pos",
        "replay_tokens",
        "new_tokens",
        "tokens",
        "timings",
    }
    assert all(keys <= set(r) for r in doc["rows"])
    # `calibrate --check` models each row from (snapshot_pos, cached, prompt): given the sim's
    # own cost model it must reproduce the modelled TTFT of every phase exactly.
    from sbrbench import calibrate as cal

    c = doc["target"]["costmodel"]
    model = CostModel(a=c["a"], b=c["b"], c=c["c"], restore=c["restore"],
                      window=int(c.get("window", 0)))
    rows = cal.validate(model, [out])
    assert {r["phase"] for r in rows} == {"build", "pressure", "resume"}
    assert all(r["ratio"] == pytest.approx(1.0, rel=1e-9) for r in rows)
    assert cal.validate(CostModel(a=2 * c["a"], b=2 * c["b"], c=2 * c["c"],
                                 restore=2 * c["restore"], window=int(c.get("window", 0))),
                       [out])[0]["ratio"] == pytest.approx(2.0, rel=1e-9)
