"""`sbrbench compare`, `report` and `plot` on hand-made result, decay and other files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sbrbench.cli_compare import build_report, parity_report


def _result(path: Path, scenario: str, rows: list[dict], policy: str = "lru", **kw) -> Path:
    doc = {
        "schema": "sbrbench.result/v1",
        "scenario": scenario,
        "label": policy,
        "engine": {"policy": policy, "preset": "tiny"},
        "env": {"gpu": None},
        "target": {"kind": "engine"},
        "rows": rows,
        "summary": {},
        "partial": False,
        **kw,
    }
    from sbrbench.stats import summarize_rows

    doc["summary"] = summarize_rows(rows)
    path.write_text(json.dumps(doc))
    return path


def _resume_rows(ttfts: list[float], replays: list[int]) -> list[dict]:
    return [
        {
            "i": k,
            "phase": "resume",
            "cycle": k,
            "depth": 1000 + k,
            "ttft_s": t,
            "replay_tokens": r,
            "error": None,
        }
        for k, (t, r) in enumerate(zip(ttfts, replays, strict=True))
    ]


def test_compare_ratio_ci_and_p(invoke, tmp_path: Path) -> None:
    a = _result(
        tmp_path / "a.json",
        "deep-resume",
        _resume_rows([2.0, 2.2, 1.9, 2.1, 2.0], [3000, 3100, 3000, 3200, 3100]),
        "forecast",
    )
    b = _result(
        tmp_path / "b.json",
        "deep-resume",
        _resume_rows([0.2, 0.25, 0.2, 0.22, 0.21], [40, 16, 32, 48, 0]),
        "tail-pin",
    )
    out = tmp_path / "cmp.json"
    code, text = invoke(["compare", str(a), str(b), "--json", str(out)])
    assert code == 0, text
    doc = json.loads(out.read_text())
    assert doc["schema"] == "sbrbench.compare/v1" and doc["scenario"] == "deep-resume"
    rep = doc["phases"]["resume"]["replay_tokens"]
    assert rep["ratio"] == pytest.approx(15400 / 136)
    assert rep["ci95"][0] > 40 and rep["p_value"] < 0.05
    ttft = doc["phases"]["resume"]["ttft_s"]
    assert ttft["ratio"] == pytest.approx(10.2 / 1.08) and ttft["a"]["n"] == 5
    assert doc["a"]["policy"] == "forecast" and doc["b"]["policy"] == "tail-pin"
    assert "A/B" in text and "ci95" in text and "resume" in text
    assert doc["parity"] is None


def test_compare_user_errors(invoke, tmp_path: Path) -> None:
    a = _result(tmp_path / "a.json", "deep-resume", _resume_rows([1.0], [1]))
    rr = _result(tmp_path / "rr.json", "round-robin", _resume_rows([1.0], [1]))
    empty_rows = _result(tmp_path / "e.json", "deep-resume", [])
    (tmp_path / "corrupt.json").write_text('{"schema": "sbrbench.result/v1", "rows": [')
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "decay.json").write_text(json.dumps({"schema": "sbrbench.decay/v1", "summary": {}}))
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    cases = [
        (rr, "cannot compare a deep-resume result with a round-robin result"),
        (tmp_path / "corrupt.json", "corrupt.json: not valid JSON (line 1"),
        (tmp_path / "empty.json", "empty.json: empty file"),
        (tmp_path / "missing.json", "missing.json: no such file"),
        (empty_rows, "e.json: result has no rows"),
        (tmp_path / "decay.json", "cannot compare a result file"),
        (tmp_path / "other.json", "cannot compare a result file"),
    ]
    for b, msg in cases:
        code, text = invoke(["compare", str(a), str(b)])
        assert code == 2 and msg in text, (b, text)
        assert "\n" not in text.strip()


def test_compare_pools_repetitions(invoke, tmp_path: Path) -> None:
    """a1,a2 vs b1,b2: rows pooled per side (n adds up, the ratio is of pooled means); pooling
    different policies or parity files is refused."""
    a1 = _result(tmp_path / "a1.json", "deep-resume", _resume_rows([2.0, 2.2], [3000, 3100]),
                 "forecast")
    a2 = _result(tmp_path / "a2.json", "deep-resume", _resume_rows([1.8, 2.0], [3000, 2900]),
                 "forecast")
    b1 = _result(tmp_path / "b1.json", "deep-resume", _resume_rows([0.2, 0.3], [40, 16]),
                 "tail-pin")
    b2 = _result(tmp_path / "b2.json", "deep-resume", _resume_rows([0.25, 0.25], [32, 0]),
                 "tail-pin")
    out = tmp_path / "cmp.json"
    code, text = invoke(["compare", f"{a1},{a2}", f"{b1},{b2}", "--json", str(out)])
    assert code == 0, text
    doc = json.loads(out.read_text())
    ttft = doc["phases"]["resume"]["ttft_s"]
    assert ttft["a"]["n"] == 4 and ttft["b"]["n"] == 4
    assert ttft["ratio"] == pytest.approx(8.0 / 1.0)
    assert doc["a"]["files"] == 2 and doc["a"]["path"] == f"{a1},{a2}" and "pooled" in text
    code, text = invoke(["compare", f"{a1},{b1}", str(b2)])
    assert code == 2 and "repetitions only" in text
    p1 = _result(tmp_path / "p1.json", "parity", _resume_rows([0.1], [0]))
    p2 = _result(tmp_path / "p2.json", "parity", _resume_rows([0.1], [0]))
    code, text = invoke(["compare", f"{p1},{p2}", str(p1)])
    assert code == 2 and "request by request" in text


def _served_rows(ttft: float, tpot: float, n: int, span: float) -> list[dict]:
    """n requests of 8 output tokens, ITL gaps all `tpot`, spread evenly over `span` seconds."""
    step = span / n
    return [{"i": k, "phase": "round", "round": k, "ttft_s": ttft * (1 + 0.01 * k),
             "tpot_s": tpot, "itl_s": [tpot] * 7, "e2e_s": ttft + 7 * tpot,
             "replay_tokens": 0, "t_s": k * step, "done_s": (k + 1) * step,
             "prompt_tokens": 100, "generated_tokens": 8, "error": None} for k in range(n)]


def test_compare_latency_metrics_throughput_and_goodput(invoke, tmp_path: Path) -> None:
    slo = {"ttft_s": 0.3}
    a1 = _result(tmp_path / "a1.json", "round-robin", _served_rows(0.2, 0.02, 10, 5.0),
                 "adaptive", slo=slo)
    a2 = _result(tmp_path / "a2.json", "round-robin", _served_rows(0.2, 0.02, 10, 4.0),
                 "adaptive", slo=slo)
    b1 = _result(tmp_path / "b1.json", "round-robin", _served_rows(0.4, 0.04, 10, 10.0),
                 "forecast", slo=slo)
    b2 = _result(tmp_path / "b2.json", "round-robin", _served_rows(0.4, 0.04, 10, 8.0),
                 "forecast", slo=slo)
    out = tmp_path / "cmp.json"
    code, text = invoke(["compare", str(a1), str(b1), "--json", str(out)])
    assert code == 0, text
    doc = json.loads(out.read_text())
    ph = doc["phases"]["round"]
    assert ph["tpot_s"]["ratio"] == pytest.approx(0.5) and ph["itl_s"]["a"]["n"] == 70
    assert ph["e2e_s"]["ratio"] == pytest.approx(0.34 / 0.68)
    assert ph["slo_met"]["a"]["mean"] == 1.0 and ph["slo_met"]["b"]["mean"] == 0.0
    assert doc["slo"] == slo and doc["slo_note"] is None
    tp = doc["throughput"]
    assert tp["request_throughput"]["ratio"] == pytest.approx(2.0)
    assert tp["output_throughput"]["ratio"] == pytest.approx(2.0)
    assert tp["goodput"]["a"]["mean"] == pytest.approx(2.0) and tp["goodput"]["ratio"] is None
    assert tp["request_throughput"]["ci95"] is None  # one run a side
    for name in ("TTFT ms", "TPOT ms", "ITL ms", "E2EL ms", "SLO met", "requests/s"):
        assert name in text
    # repetitions pooled: one throughput per run, so a ci95 of the ratio of means
    code, text = invoke(["compare", f"{a1},{a2}", f"{b1},{b2}", "--json", str(out), "--force",
                         "--slo", "ttft=500ms"])
    assert code == 0, text
    doc = json.loads(out.read_text())
    tp = doc["throughput"]["request_throughput"]
    assert tp["a"]["n"] == 2 and tp["ratio"] == pytest.approx(2.25 / 1.125)
    assert tp["ci95"] is not None and tp["ci95"][0] <= tp["ratio"] <= tp["ci95"][1]
    assert doc["slo"] == {"ttft_s": 0.5} and doc["phases"]["round"]["slo_met"]["ratio"] == 1.0


def test_compare_notes_different_slos_and_failed_requests(invoke, tmp_path: Path) -> None:
    rows = _served_rows(0.2, 0.02, 4, 2.0)
    rows[1] = {**rows[1], "error": "HTTP 503"}
    a = _result(tmp_path / "a.json", "round-robin", rows, slo={"ttft_s": 0.3}, partial=True,
                failed=1)
    b = _result(tmp_path / "b.json", "round-robin", _served_rows(0.2, 0.02, 4, 2.0),
                slo={"ttft_s": 0.1})
    code, text = invoke(["compare", str(a), str(b)])
    assert code == 0, text
    assert "different SLOs" in text and "partial (1 failed requests)" in " ".join(text.split())


def _parity_rows(tokens: list[list[int]], digests: list[str], replays: list[int]) -> list[dict]:
    return [
        {
            "i": k,
            "phase": "prompt",
            "ttft_s": 0.1,
            "replay_tokens": r,
            "tokens": t,
            "logits_sha256": d,
            "error": None,
        }
        for k, (t, d, r) in enumerate(zip(tokens, digests, replays, strict=True))
    ]


def test_parity_report_match_and_first_divergence() -> None:
    a = _parity_rows([[1, 2, 3], [4, 5], [6, 7, 8], [9]], ["a", "b", "c", "d"], [0, 10, 20, 0])
    same = parity_report(a, a)
    assert same["token_match_rate"] == 1.0 and same["digest_match_rate"] == 1.0
    assert same["first_divergence"] is None and same["replay_differs"] == 0
    b = _parity_rows([[1, 2, 3], [4, 5], [6, 9, 8], [9, 1]], ["a", "b", "x", "d"], [0, 0, 20, 5])
    rep = parity_report(a, b)
    assert rep["requests"] == 4 and rep["token_match_rate"] == 0.5
    assert rep["digest_match_rate"] == 0.75 and rep["first_digest_divergence"] == 2
    assert rep["first_divergence"] == {"request": 2, "token": 1}
    assert rep["replay_differs"] == 2
    b[1]["error"] = "boom"
    assert parity_report(a, b[:3])["errors"] == 1 and parity_report(a, b[:3])["only_in_a"] == 1


def test_parity_rows_say_match_or_divergence_per_request() -> None:
    from sbrbench.cli_compare import parity_rows

    a = _parity_rows([[1, 2, 3], [4, 5], [6, 7, 8]], ["a", "b", "c"], [0, 10, 20])
    b = _parity_rows([[1, 2, 3], [4, 5], [6, 9, 8]], ["a", "x", "c"], [0, 0, 20])
    b[0]["error"] = "boom"
    rows = parity_rows(a, b)
    assert [(r.request, r.match, r.first_token) for r in rows] == \
        [(0, None, None), (1, False, None), (2, False, 1)]  # failed; digest differs; token 1
    assert [r.digest_match for r in rows] == [True, False, True]
    assert (rows[1].replay_a, rows[1].replay_b) == (10, 0)


def test_plot_of_parity_files_shows_parity_per_request(invoke, tmp_path: Path,
                                                       monkeypatch) -> None:
    from sbrbench import render

    a = _result(tmp_path / "a.json", "parity", _parity_rows([[1], [2]], ["a", "b"], [0, 64]),
                "forecast")
    b = _result(tmp_path / "b.json", "parity", _parity_rows([[1], [3]], ["a", "c"], [0, 16]),
                "tail-pin")
    drawn: list[int] = []
    real = render.plot_parity

    def spy(docs, out):  # type: ignore[no-untyped-def]
        drawn.append(len(docs))
        return real(docs, out)

    monkeypatch.setattr(render, "plot_parity", spy)
    png = tmp_path / "p.png"
    code, text = invoke(["plot", str(a), str(b), "--out", str(png)])
    assert code == 0, text
    assert drawn == [2] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_parity_files(invoke, tmp_path: Path) -> None:
    rows = _parity_rows([[1, 2], [3]], ["a", "b"], [0, 64])
    a = _result(tmp_path / "a.json", "parity", rows, "forecast")
    rows_b = _parity_rows([[1, 2], [3]], ["a", "b"], [0, 16])
    b = _result(tmp_path / "b.json", "parity", rows_b, "tail-pin")
    out = tmp_path / "c.json"
    code, text = invoke(["compare", str(a), str(b), "--json", str(out)])
    assert code == 0, text
    par = json.loads(out.read_text())["parity"]
    assert par["token_match_rate"] == 1.0 and par["digest_match_rate"] == 1.0
    assert par["replay_differs"] == 1
    assert "100.0%" in text


def test_compare_decay_files(invoke, tmp_path: Path) -> None:
    def decay(path: Path, med: float, cos: float) -> Path:
        path.write_text(
            json.dumps(
                {
                    "schema": "sbrbench.decay/v1",
                    "heads": [{"layer": 0, "head": 0, "horizon_tokens": med}],
                    "summary": {
                        "median_horizon_tokens": med,
                        "p90_horizon_tokens": 4 * med,
                        "share_over_8192": 0.12,
                        "note": "text is skipped",
                    },
                    "window": {"256": {"mean_cos": cos, "p10_cos": cos - 0.1}},
                }
            )
        )
        return path

    a, b = decay(tmp_path / "a.json", 163.0, 0.9), decay(tmp_path / "b.json", 326.0, 0.8)
    out = tmp_path / "c.json"
    code, text = invoke(["compare", str(a), str(b), "--json", str(out)])
    assert code == 0, text
    doc = json.loads(out.read_text())
    assert doc["kind"] == "decay"
    assert doc["summary"]["median_horizon_tokens"] == {"a": 163.0, "b": 326.0, "ratio": 0.5}
    assert "note" not in doc["summary"]
    assert doc["window"]["256"]["a"]["mean_cos"] == 0.9
    assert "window tau=256" in text


def test_report_indexes_every_kind(invoke, tmp_path: Path) -> None:
    _result(
        tmp_path / "dr.json",
        "deep-resume",
        _resume_rows([1.5, 2.5], [300, 500]),
        "forecast",
        env={"gpu": "NVIDIA H100 80GB HBM3"},
    )
    sub = tmp_path / "gpu" / "deep"
    sub.mkdir(parents=True)
    _result(
        sub / "rr.json",
        "round-robin",
        [{"i": 0, "phase": "round", "ttft_s": 0.5, "replay_tokens": 0}],
        "tail-pin",
        partial=True,
    )
    (tmp_path / "decay.json").write_text(
        json.dumps(
            {
                "schema": "sbrbench.decay/v1",
                "preset": "tiny",
                "summary": {
                    "median_horizon_tokens": 163,
                    "p90_horizon_tokens": 900,
                    "share_over_8192": 0.12,
                },
            }
        )
    )
    (tmp_path / "sim.json").write_text(
        json.dumps({"schema": "sbrbench.sim/v1", "summary": {"replay_vs_belady": 1.7}})
    )
    (tmp_path / "sim2.json").write_text(
        json.dumps(
            {
                "schema": "sbrbench.sim/v1",
                "summary": {
                    "policies": {
                        "lru": {"replay_tokens": 900, "replay_vs_belady": 3.0},
                        "belady": {"replay_tokens": 300, "replay_vs_belady": 1.0},
                    }
                },
            }
        )
    )
    (tmp_path / "junk.json").write_text("{")
    (tmp_path / "notours.json").write_text("{}")
    code, text = invoke(["report", str(tmp_path)])
    assert code == 0, text
    md = (tmp_path / "README.md").read_text()
    assert (
        "| [dr.json](dr.json) | result | deep-resume | engine | forecast | tiny | NVIDIA H100" in md
    )
    assert "resume: TTFT mean 2 s" in md and "replay mean 400 tok" in md
    assert "[gpu/deep/rr.json](gpu/deep/rr.json) (partial)" in md and "round: TTFT" in md
    assert "median horizon 163 tok" in md and "share > 8192: 0.12" in md
    assert "replay_vs_belady 1.7" in md and "multiple of classic Belady's: lru 3x, belady 1x" in md
    assert "junk.json" in md.split("Not indexed")[1] and "notours.json" in md
    text, count, skipped = build_report(tmp_path)
    assert count == 5 and len(skipped) == 2
    code, text = invoke(["report", str(tmp_path / "nope")])
    assert code == 2 and "not a directory" in text


def test_plot_writes_a_png(invoke, tmp_path: Path) -> None:
    a = _result(
        tmp_path / "a.json", "deep-resume", _resume_rows([2.0, 2.1], [3000, 3100]), "forecast"
    )
    b = _result(tmp_path / "b.json", "deep-resume", _resume_rows([0.2, 0.3], [30, 10]), "tail-pin")
    png = tmp_path / "p.png"
    code, text = invoke(["plot", str(a), str(b), "--out", str(png)])
    assert code == 0, text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rr = _result(
        tmp_path / "rr.json",
        "round-robin",
        [
            {
                "i": k,
                "phase": "round",
                "round": k // 2,
                "depth": 100 * k,
                "ttft_s": 0.1,
                "replay_tokens": 0,
            }
            for k in range(6)
        ],
    )
    code, text = invoke(["plot", str(rr), "--out", str(tmp_path / "rr.png")])
    assert code == 0 and (tmp_path / "rr.png").stat().st_size > 1000
    code, text = invoke(["plot", str(tmp_path / "missing.json")])
    assert code == 2 and "no such file" in text


def test_report_headline_of_bench_files() -> None:
    from sbrbench.cli_compare import headline

    kernels = {"schema": "sbrbench.bench/v1", "bench": "kernels", "env": {"gdn_config": "split"},
               "rows": [], "speedups": [{"T": 8192, "H": 16, "fla_over_ours": 1.5},
                                        {"T": 8192, "H": 32, "fla_over_ours": 9.0}]}
    assert headline(kernels) == "gdn split: fla/ours T=8192 1.5"
    prefill = {"schema": "sbrbench.bench/v1", "bench": "prefill", "env": {},
               "rows": [{"kernel": "prefill", "window": 4096, "tokens": 16384, "mfu": 0.305},
                        {"kernel": "replay_window", "window": 4096, "ms": 90.0}]}
    assert headline(prefill) == "MFU E=4096 L=16384 30.5%"
    prefill["env"] = {"gdn_config": "split2", "attention": "cudnn-pieces"}
    assert headline(prefill) == "gdn split2, attention cudnn-pieces: MFU E=4096 L=16384 30.5%"
    assert headline({"schema": "sbrbench.bench/v1", "bench": "prefill", "rows": []}) == "-"
