"""`sbrbench run` on the real in-process engine (tiny preset, CPU): the headline and parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def test_deep_resume_forecast_strands_tail_pin_does_not(invoke, tmp_path: Path) -> None:
    out = tmp_path / "dr.json"
    code, text = invoke(
        [
            "run",
            "deep-resume",
            "--policy",
            "forecast,tail-pin",
            "--out",
            str(out),
            "--no-progress",
            *_sets(
                "depth=600",
                "cycles=2",
                "pressure=18",
                "system_tokens=64",
                "tool_max=256",
                "reply_tokens=4",
                "pressure_tokens=70",
            ),
        ]
    )
    assert code == 0, text
    a, b = tmp_path / "dr-forecast.json", tmp_path / "dr-tail-pin.json"
    for path, pol in ((a, "forecast"), (b, "tail-pin")):
        doc = json.loads(path.read_text())
        assert doc["partial"] is False and not any(r["error"] for r in doc["rows"])
        eng = doc["engine"]
        assert eng["policy"] == pol and eng["preset"] == "tiny" and eng["chunk"] == 64
        assert eng["snapshot_slots"] == 16
        assert doc["cache_stats"]["requests"] == len(doc["rows"])
        for r in doc["rows"]:
            assert r["replay_tokens"] == r["cached_tokens"] - r["snapshot_pos"]
            assert r["snapshot_pos"] % 64 == 0 and r["generated_tokens"] == len(r["tokens"])
            assert 0 < r["ttft_s"] <= r["e2e_s"]
    cmp_path = tmp_path / "cmp.json"
    code, text = invoke(["compare", str(a), str(b), "--json", str(cmp_path)])
    assert code == 0, text
    resume = json.loads(cmp_path.read_text())["phases"]["resume"]
    assert resume["replay_tokens"]["ratio"] >= 5.0
    assert resume["ttft_s"]["ci95"] is not None and resume["ttft_s"]["p_value"] is not None


def test_parity_policies_give_identical_tokens_and_digests(invoke, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    code, text = invoke(
        ["run", "parity", "--out", str(out), "--no-progress", *_sets("turns=3", "pressure=3")]
    )
    assert code == 0, text
    cmp_path = tmp_path / "cmp.json"
    code, text = invoke(
        [
            "compare",
            str(tmp_path / "p-forecast.json"),
            str(tmp_path / "p-tail-pin.json"),
            "--json",
            str(cmp_path),
        ]
    )
    assert code == 0, text
    par = json.loads(cmp_path.read_text())["parity"]
    assert par["requests"] == 15 and par["errors"] == 0
    assert par["token_match_rate"] == 1.0 and par["digest_match_rate"] == 1.0
    assert par["first_divergence"] is None
    assert par["replay_differs"] >= 1, "the policies must restore from different snapshots"


def test_parity_holds_for_adaptive_swap(invoke, tmp_path: Path) -> None:
    # swap changes which snapshots stay (the engine writes the newcomer into the swapped slot);
    # outputs must still be bitwise those of forecast
    runs = {}
    for name, extra in (("f", ["--policy", "forecast"]),
                        ("s", ["--policy", "adaptive", "--adaptive-opt", "swap=true"])):
        runs[name] = tmp_path / f"{name}.json"
        code, text = invoke(["run", "parity", "--out", str(runs[name]), "--no-progress", *extra,
                             *_sets("turns=3", "pressure=3")])
        assert code == 0, text
    cmp_path = tmp_path / "cmp.json"
    code, text = invoke(["compare", str(runs["f"]), str(runs["s"]), "--json", str(cmp_path)])
    assert code == 0, text
    par = json.loads(cmp_path.read_text())["parity"]
    assert par["requests"] == 15 and par["errors"] == 0
    assert par["token_match_rate"] == 1.0 and par["digest_match_rate"] == 1.0
    assert par["replay_differs"] >= 1, "the policies must restore from different snapshots"
    assert json.loads(runs["s"].read_text())["engine"]["policy_opts"]["swap"] is True
