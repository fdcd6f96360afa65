"""`sbrbench sim` and `sweep` from the command line: results, options, user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.errors import UserError
from sbrbench.tracefile import SAMPLE_TRACE


def _slice(tmp_path: Path, n: int) -> None:
    """The first n requests of the shipped trace as tmp_path/slice.jsonl."""
    with SAMPLE_TRACE.open() as f, (tmp_path / "slice.jsonl").open("w") as g:
        for _ in range(n):
            g.write(f.readline())


def _invoke(args: list[str]) -> tuple[int, str]:
    from sbrbench.cli import app

    res = CliRunner().invoke(app, args, catch_exceptions=True)
    if isinstance(res.exception, UserError):
        return 2, str(res.exception)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def test_cli_sim_on_a_trace(tmp_path: Path) -> None:
    _slice(tmp_path, 200)
    out = tmp_path / "sim.json"
    code, text = _invoke(
        [
            "sim",
            "--trace",
            str(tmp_path / "slice.jsonl"),
            "--policy",
            "lru,tail-pin",
            "--snapshot-slots",
            "4",
            "--rows",
            "--out",
            str(out),
        ]
    )
    assert code == 0, text
    doc = json.loads(out.read_text())
    assert doc["schema"] == "sbrbench.sim/v1" and doc["ttft"] == "modelled"
    pols = doc["summary"]["policies"]
    assert list(pols) == ["lru", "tail-pin", "belady", "belady-gain", "opt-schedule"]
    ys = doc["summary"]["yardstick"]
    assert ys["optimum"] is not None and ys["reference_kind"] == "optimum"
    assert ys["floor"] <= ys["lp_bound"] <= ys["bound"] <= ys["optimum"]
    assert all(ys["optimum"] <= s["replay_tokens"] for s in pols.values())
    assert ys["ordered"] and ys["kv_independent"] and ys["best_simple"] in ("lru", "tail-pin")
    assert "gap" in text and "optimum" in text and "floor" in text
    for s in pols.values():
        for key in ("replay_tokens", "hit_tokens", "snapshot_hits", "evictions"):
            assert isinstance(s[key], int)
        assert s["ttft_model_s"]["mean"] > 0 and s["ttft_model_s"]["p90"] > 0
        assert s["requests"] == 200
    assert pols["belady"]["replay_vs_belady"] == 1.0
    assert len(doc["rows"]["lru"]["replay_tokens"]) == 200
    assert doc["cache"]["snapshot_slots"] == 4 and doc["costmodel"]["source"]


def test_cli_sim_warmup_counts_only_the_rest(tmp_path: Path) -> None:
    """--warmup N: the first N requests fill the cache but are not counted; the counted totals
    equal the per-request rows after N of the same run."""
    _slice(tmp_path, 200)
    out = tmp_path / "sim.json"
    args = ["sim", "--trace", str(tmp_path / "slice.jsonl"), "--policy", "lru,adaptive",
            "--snapshot-slots", "4", "--rows", "--out", str(out)]
    code, text = _invoke([*args, "--warmup", "120"])
    assert code == 0, text
    doc = json.loads(out.read_text())
    assert doc["warmup_requests"] == 120 and "first 120 not counted" in text
    for name, s in doc["summary"]["policies"].items():
        assert s["requests"] == 80 and s["warmup_requests"] == 120
        assert s["replay_tokens"] == sum(doc["rows"][name]["replay_tokens"][120:])
    assert doc["summary"]["policies"]["belady"]["replay_vs_belady"] == 1.0
    code, text = _invoke([*args, "--warmup", "200", "--force"])
    assert code == 2 and "leaves none" in text
    code, text = _invoke([*args, "--warmup", "-1", "--force"])
    assert code == 2 and "--warmup" in text


def test_cli_sim_adaptive_opt_reaches_the_policy(tmp_path: Path) -> None:
    """--adaptive-opt KEY=VALUE sets adaptive's options (recorded in the JSON, used in the run:
    admission control off refuses nothing); bad items are one-line user errors."""
    _slice(tmp_path, 200)
    out = tmp_path / "sim.json"
    args = ["sim", "--trace", str(tmp_path / "slice.jsonl"), "--policy", "lru,adaptive",
            "--snapshot-slots", "4", "--no-oracles", "--out", str(out)]
    code, text = _invoke(args)
    assert code == 0, text
    refused = json.loads(out.read_text())["summary"]["policies"]["adaptive"]["admit_refused"]
    assert refused > 0
    code, text = _invoke([*args, "--adaptive-opt", "admit_control=false",
                          "--adaptive-opt", "delta=0.1", "--force"])
    assert code == 0, text
    doc = json.loads(out.read_text())
    assert doc["policies"]["adaptive"]["opts"] == {"admit_control": False, "delta": 0.1}
    assert doc["policies"]["lru"]["opts"] == {}
    assert doc["summary"]["policies"]["adaptive"]["admit_refused"] == 0
    for bad in ("duel", "nope=1", "hazard=sometimes"):
        code, text = _invoke([*args, "--adaptive-opt", bad, "--force"])
        assert code == 2 and "--adaptive-opt" in text, (bad, text)


def test_cli_sweep_grid_and_plot(tmp_path: Path) -> None:
    _slice(tmp_path, 150)
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code, text = _invoke(
        [
            "sweep",
            "--trace",
            str(tmp_path / "slice.jsonl"),
            "--policy",
            "lru,tail-pin,marconi",
            "--slots",
            "2,6",
            "--tail-pin-k",
            "1,4",
            "--marconi-alpha",
            "0.5,2",
            "--out",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert code == 0, text
    doc = json.loads(out.read_text())
    names = {c["policy"] for c in doc["grid"]}
    assert names == {
        "lru",
        "tail-pin(k=1)",
        "tail-pin(k=4)",
        "marconi(a=0.5)",
        "marconi(a=2)",
        "belady",
        "belady-gain",
        "opt-schedule",
    }
    assert len(doc["grid"]) == 16 and doc["slots"] == [2, 6] and not doc["partial"]
    assert [y["slots"] for y in doc["yardstick"]] == [2, 6]
    for y in doc["yardstick"]:
        assert y["ordered"] and y["optimum"] is not None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _sweep(tmp_path: Path, out: Path, *extra: str) -> dict:
    code, text = _invoke(["sweep", "--trace", str(tmp_path / "a.jsonl"), "--trace",
                          str(tmp_path / "b.jsonl"), "--policy", "lru,adaptive", "--slots",
                          "2,5", "--out", str(out), *extra])
    assert code == 0, text
    return json.loads(out.read_text())


def _two_traces(tmp_path: Path) -> None:
    lines = SAMPLE_TRACE.read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:60]))
    (tmp_path / "b.jsonl").write_text("".join(lines[200:260]))


def test_cli_sweep_cells_in_parallel_give_the_same_json(tmp_path: Path) -> None:
    """Cells (trace, policy, slots) on a process pool: the same results, in the same order, as
    one after the other; only wall-clock fields differ, and the digest leaves them out."""
    from sbrbench import sim

    _two_traces(tmp_path)
    one = _sweep(tmp_path, tmp_path / "one.json")
    two = _sweep(tmp_path, tmp_path / "two.json", "--jobs", "2")
    assert one["digest"] == two["digest"] == sim.digest(two)
    assert [(c["trace"], c["slots"], c["policy"]) for c in one["grid"]] == [
        (c["trace"], c["slots"], c["policy"]) for c in two["grid"]]
    assert {c["trace"] for c in one["grid"]} == {"a", "b"}
    assert len(one["yardstick"]) == 4 and all("adaptive" in y["gap_closed"]
                                              for y in one["yardstick"])
    two["grid"][0]["replay_tokens"] += 16
    assert sim.digest(two) != one["digest"]


def test_cli_sweep_on_a_local_ray_instance(tmp_path: Path) -> None:
    _two_traces(tmp_path)
    local = _sweep(tmp_path, tmp_path / "local.json", "--optimum", "lp")
    ray = _sweep(tmp_path, tmp_path / "ray.json", "--optimum", "lp", "--backend", "ray")
    assert ray["backend"] == "ray" and ray["digest"] == local["digest"]


def test_cli_sweep_user_errors(tmp_path: Path) -> None:
    _two_traces(tmp_path)
    base = ["sweep", "--trace", str(tmp_path / "a.jsonl"), "--slots", "2"]
    for extra, word in ((["--backend", "mpi"], "--backend"), (["--jobs", "0"], "--jobs"),
                        (["--optimum", "best"], "--optimum")):
        code, text = _invoke([*base, *extra])
        assert code == 2 and word in text, (extra, text)


def test_cli_sim_user_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0}\n')
    code, text = _invoke(["sim", "--trace", str(bad), "--out", str(tmp_path / "x.json")])
    assert code == 2 and "bad.jsonl:1" in text
    code, text = _invoke(["sim", "--out", str(tmp_path / "x.json")])
    assert code == 2 and "--trace" in text
    code, text = _invoke(["sim", "--trace", str(bad), "--policy", "nope"])
    assert code == 2 and "unknown policy" in text


def test_cli_sim_on_a_scenario_reports_phases(tmp_path: Path) -> None:
    out = tmp_path / "dr.json"
    code, text = _invoke(
        [
            "sim",
            "--scenario",
            "deep-resume",
            "--set",
            "cycles=2",
            "--policy",
            "forecast,tail-pin",
            "--snapshot-slots",
            "16",
            "--out",
            str(out),
        ]
    )
    assert code == 0, text
    doc = json.loads(out.read_text())
    assert doc["stream"]["kind"] == "scenario" and doc["stream"]["scenario"] == "deep-resume"
    pols = doc["summary"]["policies"]
    assert set(pols) == {"forecast", "tail-pin", "belady", "belady-gain", "opt-schedule"}
    for s in pols.values():
        assert set(s["phases"]) == {"build", "pressure", "resume"}
        assert s["phases"]["resume"]["n"] == 2
    # the headline of the write-up: forecast strands the idle conversation, tail-pin does not
    fr = pols["forecast"]["phases"]["resume"]["replay_tokens"]
    tp = pols["tail-pin"]["phases"]["resume"]["replay_tokens"]
    assert tp * 8 <= fr


def test_run_adaptive_opt_reaches_the_policy(tmp_path: Path) -> None:
    """`run --adaptive-opt` sets the adaptive policy's options (recorded in the result); bad
    items, or the flag with an HTTP target, are one-line user errors."""
    base = ["run", "deep-resume", "--target", "sim", "--policy", "adaptive", "--no-progress",
            "--set", "depth=1200", "--set", "pressure=6", "--set", "cycles=2",
            "--snapshot-slots", "4"]
    out = tmp_path / "dr.json"
    code, text = _invoke([*base, "--adaptive-opt", "admit_control=false", "--out", str(out)])
    assert code == 0, text
    doc = json.loads(out.read_text())
    assert doc["engine"]["policy_opts"]["admit_control"] is False
    code, text = _invoke([*base, "--adaptive-opt", "nope=1", "--out", str(out)])
    assert code == 2 and "nope" in text
    code, text = _invoke(["run", "deep-resume", "--target", "http", "--base-url",
                          "http://127.0.0.1:9", "--adaptive-opt", "duel=10"])
    assert code == 2 and "--adaptive-opt" in text


def test_cli_sweep_summarises_slices_of_a_family(tmp_path: Path) -> None:
    """Slices named FAMILY@K: the summary gives each online policy's gap closed over them
    (mean, min) per pool size, next to the yardstick's totals."""
    lines = SAMPLE_TRACE.read_text().splitlines(keepends=True)
    for k in range(3):
        (tmp_path / f"fam@{k:02d}.jsonl").write_text("".join(lines[100 * k:100 * k + 100]))
    out, summ = tmp_path / "sweep.json", tmp_path / "summary.json"
    args = ["sweep", "--policy", "lru,marconi,adaptive", "--slots", "2,4", "--out", str(out),
            "--summary", str(summ)]
    for k in range(3):
        args += ["--trace", str(tmp_path / f"fam@{k:02d}.jsonl")]
    code, text = _invoke(args)
    assert code == 0, text
    doc = json.loads(summ.read_text())
    assert doc["schema"] == "sbrbench.yardstick/v1" and set(doc["families"]) == {"fam"}
    for slots in ("2", "4"):
        cell = doc["families"]["fam"][slots]
        assert cell["slices"] == 3 and cell["ordered"] and cell["kv_independent"]
        g = cell["gap_closed"]["adaptive"]
        ok = [x for x in g["per_slice"] if x is not None]
        assert g["defined"] == len(ok) and len(g["per_slice"]) == 3
        if ok:
            assert g["mean"] == pytest.approx(sum(ok) / len(ok)) and g["min"] == min(ok)
        assert cell["floor"] <= cell["bound"] <= cell["optimum"] <= min(
            cell["replay_tokens"].values())
    assert "mean / min" in text


@pytest.mark.parametrize("args, flag", [
    (["sim", "--snapshot-slots", "0"], "--snapshot-slots"),
    (["sim", "--limit", "-1"], "--limit"),
    (["sim", "--page-size", "0"], "--page-size"),
    (["sim", "--kv-budget-tokens", "0"], "--kv-budget-tokens"),
    (["sim", "--tail-pin-k", "0"], "--tail-pin-k"),
    (["sim", "--marconi-alpha", "-0.5"], "--marconi-alpha"),
    (["sim", "--solver-time", "0"], "--solver-time"),
    (["sim", "--preset", "huge"], "--preset"),
    (["sim", "--dtype", "int4"], "--dtype"),
    (["sweep", "--tail-pin-k", "8,0"], "--tail-pin-k"),
    (["sweep", "--marconi-alpha", "0.5,-1"], "--marconi-alpha"),
    (["sweep", "--slots", "0,4"], "--slots"),
    (["sweep", "--preset", "huge"], "--preset"),
    (["sweep", "--out", "OUT", "--plot", "OUT"], "different files"),
    (["calibrate", "--reps", "0"], "--reps"),
    (["calibrate", "--device", "tpu"], "--device"),
])
def test_cli_sim_flags_are_range_checked(args: list[str], flag: str, tmp_path: Path) -> None:
    """Every numeric flag of sim, sweep and calibrate has its range checked, and model flags
    their accepted values: exit 2 naming the flag, before any work (no file written)."""
    from sbrbench.cli import app

    _slice(tmp_path, 20)
    src = ["--trace", str(tmp_path / "slice.jsonl")] if args[0] != "calibrate" else []
    out = str(tmp_path / "x.json")
    res = CliRunner().invoke(app, [*(out if a == "OUT" else a for a in args), *src,
                                   *(["--out", out] if "--out" not in args else [])])
    text = str(res.exception) if isinstance(res.exception, UserError) else res.output
    assert res.exit_code == 2 or isinstance(res.exception, UserError), text
    assert flag in text, text
    assert not Path(out).exists()


def test_cli_sim_table_says_what_it_shows(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The sim table's columns name the ratio's direction and the TTFT's basis (modelled), and
    its caption keeps the bracketed best simple policy."""
    from sbrbench import cli_sim
    from sbrbench.render import make_console

    monkeypatch.setattr(cli_sim, "console", make_console(width=300))
    _slice(tmp_path, 120)
    code, text = _invoke(["sim", "--trace", str(tmp_path / "slice.jsonl"), "--policy",
                          "lru,tail-pin", "--snapshot-slots", "4", "--optimum", "lp",
                          "--out", str(tmp_path / "x.json")])
    assert code == 0, text
    flat = " ".join(text.split())
    for word in ("replay / belady", "replay / best offline", "TTFT s (modelled)",
                 "lower bound", "gap closed = (best simple ["):
        assert word in flat, (word, text)


def test_sweep_cells_label_every_scale() -> None:
    """Heat-map labels stay readable from hundreds to tens of millions of tokens; ratios are to
    the best offline reference at the same slots."""
    from sbrbench.cli_sim import metric_label, sweep_cells

    grid = [{"policy": "lru", "slots": 4, "replay_tokens": 512},
            {"policy": "belady", "slots": 4, "replay_tokens": 256},
            {"policy": "lru", "slots": 8, "replay_tokens": 16_200},
            {"policy": "belady", "slots": 8, "replay_tokens": 27_690_000}]
    names, ratio, text = sweep_cells(grid, [4, 8], "replay_tokens")
    assert names == ["lru", "belady"]
    assert text[0] == ["512\n2.00x", "16.2k\n0.00x"]
    assert text[1][1] == "27.69M\n1.00x" and ratio[0][0] == 2.0
    assert metric_label("replay_tokens") == "replay tokens (counted)"
    assert metric_label("ttft_mean") == "ttft mean s (modelled)"
