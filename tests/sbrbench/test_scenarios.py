"""Scenario definitions (TOML + --set), conversations, the runner and `sbrbench run`."""

from __future__ import annotations

import json
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import pytest

from engine.errors import ConfigError, UserError
from sbrbench import cli_run
from sbrbench.scenarios import (
    SCENARIOS,
    Arrivals,
    apply_sets,
    load_config,
    make_scenario,
    run_scenario,
    shipped_file,
)
from sbrbench.scenarios.base import TOOL_PREFIX
from sbrbench.stats import metric_values

# A small Mooncake-format trace of our own, so the tests need nothing outside the repo.
_TRACE = Path(tempfile.mkdtemp(prefix="sbr-trace-")) / "mini.jsonl"
_TRACE.write_text("".join(
    json.dumps({"timestamp": i * 10, "input_length": 16 + 8 * i, "output_length": 2,
                "hash_ids": list(range(2 + i))}) + "\n" for i in range(6)))

SMALL = {
    "deep-resume": [
        "depth=600",
        "system_tokens=32",
        "pressure=3",
        "pressure_tokens=70",
        "cycles=2",
        "reply_tokens=4",
    ],
    "round-robin": ["convs=3", "rounds=2", "first_tokens=40", "reply_tokens=4"],
    "parity": ["convs=2", "turns=2", "first_tokens=40", "pressure=2", "reply_tokens=4"],
    "trace": ["limit=5", "block_tokens=8", f"trace={_TRACE}"],
}


def _write_toml(tmp_path: Path, name: str, edit) -> Path:
    doc = tomllib.loads(shipped_file(name).read_text())
    edit(doc)
    lines = [f'scenario = "{doc.pop("scenario")}"']
    if "description" in doc:
        lines.append(f"description = {json.dumps(doc.pop('description'))}")
    for key, value in doc.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for table, body in doc.items():
        if isinstance(body, dict):
            lines.append(f"[{table}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in body.items()]
    p = tmp_path / f"{name}.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


# ----------------------------------------------------------------------------- TOML


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_shipped_scenarios_load_and_match_the_declared_params(name: str) -> None:
    cfg = load_config(name)
    assert set(cfg.params) == set(SCENARIOS[name].PARAMS)
    assert cfg.engine["snapshot_slots"] >= 1
    assert make_scenario(cfg, 0).expected_requests() != 0


def test_deep_resume_default_pool_is_16_slots() -> None:
    assert load_config("deep-resume").engine["snapshot_slots"] == 16


@pytest.mark.parametrize(
    ("edit", "msg"),
    [
        (lambda d: d["params"].pop("depth"), "missing key 'depth'"),
        (lambda d: d["params"].update(depht=3), "unknown key 'depht'"),
        (lambda d: d["params"].update(depth="3000"), "'depth' must be an integer"),
        (lambda d: d["params"].update(depth=30.5), "'depth' must be an integer"),
        (lambda d: d["params"].update(cycles=-1), "'cycles' must be >= 1"),
        (lambda d: d["params"].update(pressure=-3), "'pressure' must be >= 0"),
        (lambda d: d["params"].update(tool_share=1.5), "'tool_share' must be <= 1"),
        (lambda d: d["params"].update(user_min=500), "'user_min' (500) is larger than"),
        (lambda d: d["engine"].update(snapshot_slots=True), "'snapshot_slots' must be an integer"),
        (lambda d: d["engine"].update(kv_budget_tokens=0), "'kv_budget_tokens' must be >= 1"),
        (lambda d: d["params"].pop("cycles"), "missing key 'cycles'"),
        (lambda d: d.pop("engine"), "missing table [engine]"),
        (lambda d: d.update(scenario="parity"), "'scenario' must be 'deep-resume'"),
        (lambda d: d.update(extra=1), "unknown key 'extra'"),
    ],
)
def test_toml_validation_errors(tmp_path: Path, edit, msg: str) -> None:
    p = _write_toml(tmp_path, "deep-resume", edit)
    with pytest.raises(ConfigError) as e:
        load_config("deep-resume", p)
    assert msg in str(e.value) and str(p) in str(e.value)
    assert "\n" not in str(e.value)


def test_toml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("scenario = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config("deep-resume", p)
    with pytest.raises(ConfigError, match="no such scenario file"):
        load_config("deep-resume", tmp_path / "nope.toml")
    with pytest.raises(UserError, match="unknown scenario 'deep'"):
        load_config("deep")


def test_set_overrides_are_typed_and_checked() -> None:
    cfg = load_config(
        "deep-resume",
        sets=["depth=24_000", "tool_share=0.25", "engine.snapshot_slots=8", "engine.policy=lru"],
    )
    assert cfg.params["depth"] == 24000 and cfg.params["tool_share"] == 0.25
    assert cfg.engine["snapshot_slots"] == 8 and cfg.engine["policy"] == "lru"
    rr = load_config("round-robin", sets=["shared_system=false"])
    assert rr.params["shared_system"] is False
    cases = [
        ("depht=3", "--set depht: unknown key for deep-resume"),
        ("depth=deep", "--set depth: expected an integer, got 'deep'"),
        ("depth=-5", "'depth' must be >= 1"),
        ("engine.slots=3", "--set engine.slots: unknown key"),
        ("depth", "expected KEY=VALUE"),
        ("user_min=999", "'user_min' (999) is larger than 'user_max'"),
    ]
    for item, msg in cases:
        with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            apply_sets(load_config("deep-resume"), [item])
    with pytest.raises(UserError, match="expected true or false"):
        apply_sets(rr, ["shared_system=maybe"])


# ----------------------------------------------------------------------------- conversations


def _all_requests(fake_target, name: str, seed: int = 0) -> list:
    target = fake_target()
    run_scenario(make_scenario(load_config(name, sets=SMALL[name]), seed), target, lambda r: None)
    return target.sent


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenarios_are_deterministic_from_the_seed(fake_target, name: str) -> None:
    a, b = _all_requests(fake_target, name, 1), _all_requests(fake_target, name, 1)
    assert [r.prompt_ids for r in a] == [r.prompt_ids for r in b]
    if name != "trace":
        other = _all_requests(fake_target, name, 2)
        assert [r.prompt_ids for r in a] != [r.prompt_ids for r in other]
    vocab = fake_target.template.tokenizer.vocab_size
    assert all(0 <= t < vocab for r in a for t in r.prompt_ids)


def test_each_turn_extends_the_previous_prompt_and_reply(fake_target, fake_reply) -> None:
    sent = [r for r in _all_requests(fake_target, "deep-resume") if r.session == "deep-0"]
    assert len(sent) >= 4
    for prev, cur in zip(sent, sent[1:], strict=False):
        grown = prev.prompt_ids + tuple(fake_reply(prev.prompt_ids, prev.max_tokens))
        assert cur.prompt_ids[: len(grown)] == grown
        assert len(cur.messages) > len(prev.messages)
    roles = {t.role for r in sent for t in r.messages}
    assert roles == {"system", "user", "assistant"}
    # tool outputs travel as marked user messages, the same on every target
    assert any(t.content.startswith(TOOL_PREFIX) for r in sent for t in r.messages)


def test_deep_resume_phases_and_depth(fake_target) -> None:
    cfg = load_config("deep-resume", sets=SMALL["deep-resume"])
    rows: list[dict] = []
    run_scenario(make_scenario(cfg, 0), fake_target(), rows.append)
    phases = [r["phase"] for r in rows]
    builds = [r for r in rows if r["phase"] == "build"]
    assert builds[-1]["depth"] >= 600 and all(r["depth"] < 600 for r in builds[:-1])
    assert phases.count("pressure") == 6 and phases.count("resume") == 2
    assert [r["cycle"] for r in rows if r["phase"] == "resume"] == [0, 1]
    assert [r["i"] for r in rows] == list(range(len(rows)))


# ----------------------------------------------------------------------------- the runner


def test_target_errors_and_exceptions_become_row_errors(fake_target) -> None:
    cfg = load_config("round-robin", sets=SMALL["round-robin"])
    rows: list[dict] = []
    out = run_scenario(make_scenario(cfg, 0), fake_target(fail={1}, raise_on={3}), rows.append)
    assert out.rows == 6 and out.errors == 2 and not out.interrupted
    assert rows[1]["error"] == "fake failure at request 1"
    assert rows[3]["error"] == "RuntimeError: boom at request 3"
    assert all(r["error"] is None for k, r in enumerate(rows) if k not in (1, 3))


def test_concurrent_waves_record_every_row(fake_target) -> None:
    cfg = load_config("round-robin", sets=["convs=5", "rounds=3", "first_tokens=30"])
    rows: list[dict] = []
    out = run_scenario(make_scenario(cfg, 0), fake_target(concurrency=3), rows.append,
                       concurrency=3)
    assert out.rows == 15 and sorted(r["i"] for r in rows) == list(range(15))
    # conversations still grow in order: every round-2 prompt is longer than its round-0 one
    by = {(r["conv"], r["round"]): r["depth"] for r in rows}
    assert all(by[(c, 2)] > by[(c, 0)] for c in range(5))


def test_rows_say_when_each_request_was_sent_and_finished(fake_target) -> None:
    cfg = load_config("round-robin", sets=SMALL["round-robin"])
    rows: list[dict] = []
    run_scenario(make_scenario(cfg, 0), fake_target(), rows.append)
    assert all(0 <= r["t_s"] <= r["done_s"] for r in rows) and "due_s" not in rows[0]
    assert all(a["done_s"] <= b["t_s"] for a, b in zip(rows, rows[1:], strict=False))
    assert all(r["tpot_s"] is None and r["itl_s"] is None for r in rows)  # the fake has neither


def test_arrivals_are_poisson_or_gamma_at_the_rate() -> None:
    """Deterministic draws (seeded): mean gap 1/rate; coefficient of variation 1/sqrt(shape)
    (1 for Poisson), each within 5% over 4000 gaps (about 3 standard errors)."""
    for burstiness in (1.0, 0.25, 4.0):
        arr = Arrivals(8.0, burstiness, seed=3)
        times = [arr.next_at() for _ in range(4001)]
        assert times[0] == 0.0
        gaps = np.diff(times)
        assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(burstiness ** -0.5, rel=0.05)
    assert [Arrivals(float("inf")).next_at() for _ in range(3)] == [0.0, 0.0, 0.0]
    a, b = Arrivals(2.0, seed=1), Arrivals(2.0, seed=1)
    assert [a.next_at() for _ in range(5)] == [b.next_at() for _ in range(5)]
    for bad in ((0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, float("inf"))):
        with pytest.raises(UserError):
            Arrivals(*bad)


@pytest.mark.parametrize("conc", [1, 3])
def test_open_loop_requests_go_no_earlier_than_they_are_due(fake_target, conc: int) -> None:
    cfg = load_config("round-robin", sets=["convs=4", "rounds=2", "first_tokens=30"])
    rows: list[dict] = []
    out = run_scenario(make_scenario(cfg, 0), fake_target(concurrency=conc), rows.append,
                       concurrency=conc, arrivals=Arrivals(400.0, seed=0))
    assert out.rows == 8
    rows.sort(key=lambda r: r["i"])
    due = [r["due_s"] for r in rows]
    assert due == sorted(due) and due[0] == 0.0 and len(set(due)) == 8
    assert all(r["t_s"] >= r["due_s"] for r in rows)


@pytest.mark.parametrize("conc", [1, 3])
def test_consecutive_failures_stop_the_run_keeping_every_row(fake_target, conc: int) -> None:
    cfg = load_config("round-robin", sets=["convs=4", "rounds=3", "first_tokens=30"])
    rows: list[dict] = []
    target = fake_target(fail=set(range(2, 100)), concurrency=conc)
    out = run_scenario(make_scenario(cfg, 0), target, rows.append, concurrency=conc,
                       abort_after=3)
    assert out.aborted is not None and "3 consecutive failed requests" in out.aborted
    assert "fake failure at request" in out.aborted and not out.interrupted
    # what was in flight when the third failure came back finishes and is recorded too
    assert out.rows == len(rows) == len(target.sent) and 5 <= out.rows < 12
    rows.sort(key=lambda r: r["i"])
    assert [r["error"] is None for r in rows[:3]] == [True, True, False]


def test_deep_resume_headline_forecast_strands_tail_pin_does_not(cache_only_target) -> None:
    """The CPU default on engine.cache decisions: resume replay >= 5x lower with tail-pin."""
    cfg = load_config("deep-resume")
    means = {}
    for pol in ("forecast", "tail-pin"):
        rows: list[dict] = []
        t = cache_only_target(pol, slots=cfg.engine["snapshot_slots"], k=cfg.engine["tail_pin_k"])
        run_scenario(make_scenario(cfg, 0), t, rows.append)
        means[pol] = metric_values(rows, "resume", "replay_tokens").mean()
    assert means["forecast"] >= 5 * max(means["tail-pin"], 1.0)


def test_parity_stream_makes_policies_choose_differently(cache_only_target) -> None:
    cfg = load_config("parity")
    runs = {}
    for pol in ("forecast", "tail-pin"):
        rows: list[dict] = []
        t = cache_only_target(pol, slots=cfg.engine["snapshot_slots"], k=cfg.engine["tail_pin_k"])
        run_scenario(make_scenario(cfg, 0), t, rows.append)
        runs[pol] = rows
    diff = sum(
        a["replay_tokens"] != b["replay_tokens"]
        for a, b in zip(runs["forecast"], runs["tail-pin"], strict=True)
    )
    assert diff >= 3


# ----------------------------------------------------------------------------- `sbrbench run`


@pytest.fixture
def fake_targets(fake_target, monkeypatch):
    made: list = []
    opts: dict = {}

    def make(args, cache):
        t = fake_target(**opts)
        t.engine_info = lambda: {"policy": cache.policy, "preset": "none"}  # type: ignore
        made.append(t)
        return t

    monkeypatch.setattr(cli_run, "make_target", make)
    return made, opts


def test_run_cli_two_policies_writes_siblings_and_compares(invoke, tmp_path: Path,
                                                          fake_targets) -> None:
    made, _ = fake_targets
    out = tmp_path / "rr.json"
    code, text = invoke(
        [
            "run",
            "round-robin",
            "--policy",
            "forecast,tail-pin",
            "--out",
            str(out),
            "--no-progress",
            *sum((["--set", s] for s in SMALL["round-robin"]), []),
        ]
    )
    assert code == 0, text
    for pol in ("forecast", "tail-pin"):
        doc = json.loads((tmp_path / f"rr-{pol}.json").read_text())
        assert doc["partial"] is False and len(doc["rows"]) == 6
        assert doc["engine"]["policy"] == pol and doc["params"]["convs"] == 3
        assert doc["params"]["seed"] == 0 and doc["env"]["python"]
        assert doc["summary"]["round"]["ttft_s"]["n"] == 6
    assert "A/B" in text and "ci95" in text and len(made) == 2 and all(t.closed for t in made)


def test_interrupted_run_keeps_finished_rows_as_partial(invoke, tmp_path: Path,
                                                        fake_targets) -> None:
    _, opts = fake_targets
    opts["interrupt_after"] = 4
    out = tmp_path / "dr.json"
    code, text = invoke(
        [
            "run",
            "deep-resume",
            "--policy",
            "forecast",
            "--out",
            str(out),
            "--no-progress",
            *sum((["--set", s] for s in SMALL["deep-resume"]), []),
        ]
    )
    assert code == 130
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and doc["stopped"] == "interrupted"
    assert [r["i"] for r in doc["rows"]] == [0, 1, 2, 3]
    assert sum(s["ttft_s"]["n"] for s in doc["summary"].values()) == 4


def test_run_cli_user_errors(invoke, tmp_path: Path, fake_targets) -> None:
    cases = [
        (["run", "nope"], "unknown scenario 'nope'"),
        (["run", "parity", "--set", "turns=x"], "--set turns: expected an integer"),
        (["run", "parity", "--target", "ftp"], "--target must be one of"),
        (["run", "parity", "--policy", "lru,lru"], "listed twice"),
        (["run", "parity", "--policy", "nosuch"], "unknown policy 'nosuch'"),
        (["run", "parity", "--snapshot-budget", "lots"], "cannot read size 'lots'"),
        (["run", "parity", "--target", "http"], "--target http needs --base-url"),
        (
            ["run", "parity", "--target", "http", "--base-url", "http://x", "--policy", "a,b"],
            "needs --target engine or sim",
        ),
        (["run", "trace", "--set", "trace=/nonexistent.jsonl"], "no such file"),
        (["run", "parity", "--slo", "ttft=5"], "give the limit with its unit"),
        (["run", "parity", "--slo", "latency=5ms"], "NAME one of ttft, tpot, e2el"),
        (["run", "parity", "--request-rate", "0"], "--request-rate must be > 0"),
        (["run", "parity", "--request-rate", "2", "--burstiness", "0"], "--burstiness must be"),
        (["run", "trace", "--set", f"trace={_TRACE}", "--set", "time_scale=1",
          "--request-rate", "5"], "replaces the trace's own timestamps"),
    ]
    for args, msg in cases:
        code, text = invoke([*args, "--out", str(tmp_path / "x.json"), "--no-progress"])
        assert code == 2 and msg in text, (args, text)


def test_run_cli_open_loop_with_slo_records_load_and_goodput(invoke, tmp_path: Path,
                                                            fake_targets) -> None:
    out = tmp_path / "rr.json"
    code, text = invoke(["run", "round-robin", "--policy", "lru", "--out", str(out),
                         "--no-progress", "--request-rate", "500", "--burstiness", "2",
                         "--slo", "ttft=3ms,e2el=1s",
                         *sum((["--set", s] for s in SMALL["round-robin"]), [])])
    assert code == 0, text
    doc = json.loads(out.read_text())
    assert doc["load"] == {"max_concurrency": 1, "request_rate": 500.0, "burstiness": 2.0,
                           "abort_after": 10}
    assert doc["slo"] == {"ttft_s": 0.003, "e2e_s": 1.0}
    assert all("due_s" in r for r in doc["rows"])
    # the fake's TTFT is 1-7 ms (n % 7): only requests under 3 ms met the SLO
    met = sum(r["ttft_s"] <= 0.003 for r in doc["rows"])
    assert doc["throughput"]["slo_met"] == met and 0 < met < 6
    assert doc["throughput"]["goodput"] == pytest.approx(
        met / doc["throughput"]["duration_s"])
    assert "goodput req/s" in text and "SLO met" in text


def test_run_cli_failures_exit_1_unless_allowed(invoke, tmp_path: Path, fake_targets) -> None:
    _, opts = fake_targets
    opts["fail"] = {2}
    base = ["run", "round-robin", "--policy", "lru", "--no-progress",
            *sum((["--set", s] for s in SMALL["round-robin"]), [])]
    code, text = invoke([*base, "--out", str(tmp_path / "a.json")])
    assert code == 1 and "1 of 6 requests failed" in text
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["partial"] is True and doc["failed"] == 1 and len(doc["rows"]) == 6
    assert doc["rows"][2]["error"] == "fake failure at request 2"
    code, text = invoke([*base, "--out", str(tmp_path / "b.json"), "--allow-failures", "0.2"])
    assert code == 0, text


def test_error_mid_run_keeps_rows_and_says_why(invoke, tmp_path: Path, fake_targets) -> None:
    trace = tmp_path / "t.jsonl"
    good = '{"timestamp": %d, "input_length": 700, "output_length": 3, "hash_ids": [0, %d]}'
    lines = [good % (k, k + 1) for k in range(69)] + ["{broken"]
    trace.write_text("\n".join(lines) + "\n")
    out = tmp_path / "tr.json"
    code, text = invoke(
        [
            "run",
            "trace",
            "--policy",
            "lru",
            "--out",
            str(out),
            "--no-progress",
            "--set",
            f"trace={trace}",
            "--set",
            "limit=0",
            "--set",
            "block_tokens=8",
        ]
    )
    assert code == 2 and "t.jsonl:70: not valid JSON" in text
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and "t.jsonl:70" in doc["stopped"]
    assert len(doc["rows"]) == 64  # the first wave was sent before the bad line was read
    assert doc["rows"][5]["conv"] == "t6" and doc["rows"][5]["trace_line"] == 6
