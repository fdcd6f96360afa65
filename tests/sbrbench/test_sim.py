"""Simulator: same cache decisions as the engine, Belady's oracle, trace synthesis, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.config import preset
from engine.errors import ConfigError, UserError
from sbrbench import sim
from sbrbench.costmodel import CostModel
from sbrbench.targets import CacheSpec, Request
from sbrbench.tracefile import TraceRecord

SHARED_TRACE = Path(__file__).resolve().parents[3] / "shared/data/mooncake_conversation_trace.jsonl"
COST = CostModel(a=1e-4, b=1e-8, c=1e-3, restore=1e-3, decode=1e-3)
TINY = preset("tiny")


def _cfg(
    policy: str = "lru", slots: int = 2, interval: int = 0, kv_tokens: int = 1 << 16, **opts: object
) -> sim.CacheConfig:
    return sim.cache_config(
        sim.SimCacheArgs(
            policy=policy,
            policy_opts=dict(opts),
            snapshot_slots=slots,
            snapshot_interval=interval,
            kv_budget_tokens=kv_tokens,
        ),
        TINY,
    )


# ----------------------------------------------------------------------------- engine parity


@pytest.mark.parametrize("policy", ["lru", "forecast", "tail-pin", "two-tier", "marconi"])
def test_cache_config_is_the_engines(policy: str) -> None:
    from engine.runtime import Engine, EngineCacheArgs

    spec = CacheSpec(policy=policy, snapshot_slots=5, snapshot_interval=128, kv_budget_tokens=4096)
    kw = dict(
        policy=policy,
        policy_opts=spec.policy_opts(),
        snapshot_slots=5,
        snapshot_interval=128,
        kv_budget_tokens=4096,
    )
    eng = Engine.from_preset("tiny", cache=EngineCacheArgs(**kw))  # type: ignore[arg-type]
    assert sim.cache_config(sim.SimCacheArgs(**kw), TINY, "float32") == eng.cm.cfg  # type: ignore[arg-type]
    assert sim.cache_config(sim.args_from_spec(spec), TINY) == eng.cm.cfg


KV_TOKENS = 512  # small enough that the KV pool evicts (and drops snapshots with it)


def _engine_stream(policy: str, opts: dict[str, object]) -> tuple[list[tuple], list, dict]:
    """Multi-turn conversations interleaved with one-shot pressure, through the tiny engine."""
    from engine.runtime import Engine, EngineCacheArgs, SamplingParams

    eng = Engine.from_preset(
        "tiny",
        cache=EngineCacheArgs(
            policy=policy,
            policy_opts=opts,
            snapshot_slots=3,
            snapshot_interval=128,
            kv_budget_tokens=KV_TOKENS,
        ),
    )
    rnd = random.Random(3)
    convs = [[rnd.randrange(256) for _ in range(rnd.randrange(70, 140))] for _ in range(2)]
    sent, decided = [], []

    def send(prompt: list[int], max_tokens: int) -> list[int]:
        r = eng.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        st = r.stats
        sent.append(sim.SimRequest(tuple(prompt), tuple(r.tokens), max_tokens))
        decided.append((st.cached_tokens, st.snapshot_pos, st.replay_tokens))
        return r.tokens

    for turn in range(3):
        for c in range(2):
            reply = send(convs[c], 10)
            convs[c] = convs[c] + reply + [rnd.randrange(256) for _ in range(rnd.randrange(20, 70))]
            if turn % 2 == 1:  # one-shot pressure between turns
                send([rnd.randrange(256) for _ in range(rnd.randrange(70, 140))], 4)
    return decided, sent, eng.cache_stats()


@pytest.mark.parametrize(
    ("policy", "opts"),
    [
        ("lru", {}),
        ("forecast", {}),
        ("tail-pin", {"k": 1}),
        ("two-tier", {}),
        ("marconi", {}),
        ("adaptive", {}),
    ],
)
def test_simulator_decides_exactly_as_the_engine(policy: str, opts: dict[str, object]) -> None:
    engine_rows, stream, engine_stats = _engine_stream(policy, opts)
    cfg = sim.cache_config(
        sim.SimCacheArgs(
            policy=policy,
            policy_opts=opts,
            snapshot_slots=3,
            snapshot_interval=128,
            kv_budget_tokens=KV_TOKENS,
        ),
        TINY,
    )
    s = sim.Simulator(cfg, COST)
    sim_rows = [
        (r.cached_tokens, r.snapshot_pos, r.replay_tokens) for r in (s.step(req) for req in stream)
    ]
    assert sim_rows == engine_rows
    st = s.cm.stats()
    for key in (
        "hits",
        "misses",
        "admits",
        "admit_refused",
        "evictions_policy",
        "evictions_kv",
        "kv_evicted_pages",
        "pages_in_use",
        "sessions",
        "resumable_sessions",
    ):
        assert st[key] == engine_stats[key], key
    # the stream exercises the decisions it is meant to check
    assert any(r[1] > 0 for r in engine_rows) and any(r[2] > 0 for r in engine_rows)
    assert st["evictions_policy"] > 0 and st["kv_evicted_pages"] > 0


# ----------------------------------------------------------------------------- Belady


def _seq(seed: int, n: int) -> tuple[int, ...]:
    rnd = random.Random(seed)
    return tuple(rnd.randrange(1000) for _ in range(n))


def _run(stream: sim.ListStream, policy: str, slots: int = 2) -> tuple[list[sim.SimRow], object]:
    cfg = _cfg(policy, slots)
    run = sim.run_policy(stream, cfg, sim.PolicyVariant(policy, policy, {}), COST, model=TINY)
    return run.rows, run


def _req(prompt: tuple[int, ...]) -> sim.SimRequest:
    return sim.SimRequest(prompt, (7,), 1)


def test_belady_evicts_the_snapshot_never_used_again() -> None:
    A, B, C = _seq(1, 130), _seq(2, 130), _seq(3, 130)
    # each of A, B, C leaves one snapshot (at 128); only A is resumed later
    stream = sim.ListStream([_req(A), _req(B), _req(C), _req(A + _seq(4, 40))])
    bel, _ = _run(stream, "belady")
    lru, _ = _run(stream, "lru")
    assert bel[3].snapshot_pos == 128 and bel[3].replay_tokens == 0
    assert lru[3].snapshot_pos == 0 and lru[3].replay_tokens == 128  # LRU dropped A first


def test_belady_evicts_the_farthest_next_use() -> None:
    A, B, C = _seq(1, 130), _seq(2, 130), _seq(3, 130)
    stream = sim.ListStream(
        [_req(A), _req(B), _req(C), _req(B + _seq(5, 30)), _req(A + _seq(6, 30))]
    )
    rows, run = _run(stream, "belady")
    # at C's admission both A (next use: request 4) and B (request 3) are live: A goes
    assert rows[3].snapshot_pos == 128 and rows[4].snapshot_pos == 0
    assert run.stats["evictions_policy"] >= 1


def test_belady_next_use_needs_the_whole_prefix_within_the_matchable_part() -> None:
    A = _seq(1, 130)
    other = A[:64] + _seq(9, 100)  # shares only A's first chunk: cannot resume at 128
    exact = A[:128]  # extends A to 128 but leaves nothing to compute past it: cap = 112
    stream = sim.ListStream([_req(A), _req(other), _req(exact), _req(A + (1,))])
    fut = sim.FutureIndex(stream, _cfg("belady", 4))
    cfg = _cfg("belady", 4)._replace(policy_opts={"next_use": fut.next_use})
    s = sim.Simulator(cfg, COST, on_admit=fut.on_admit)
    fut.now = 0
    s.step(stream.requests[0])
    entry = next(e for e in s.cm.index.entries.values() if e.pos == 128)
    assert fut.next_use(entry, 0) == 3
    fut.now = 3
    assert fut.next_use(entry, 3) == float("inf")  # memo moves past a use


def test_offline_references_beat_recency_on_a_trace_slice(tmp_path: Path) -> None:
    stream = _trace_slice(tmp_path, 400)
    base = sim.cache_config(
        sim.SimCacheArgs(snapshot_slots=8, kv_budget_tokens=1 << 22),
        preset("a3b-proxy"),
        "bfloat16",
    )
    fut = sim.FutureIndex(stream, base)
    replay = {}
    for v in sim.with_belady(sim.variants(["lru", "forecast", "marconi"])):
        run = sim.run_policy(stream, base, v, COST, model=preset("a3b-proxy"), future=fut)
        replay[v.name] = run.summary()["replay_tokens"]
    assert replay["belady"] < min(replay["lru"], replay["forecast"])
    # classic Belady ignores how much a use saves: the gain-aware oracle does better here
    assert replay["belady-gain"] < min(replay.values()) + 1
    assert replay["belady-gain"] < replay["belady"]


# ----------------------------------------------------------------------------- traces


def _rec(line: int, ids: list[int], L: int, G: int = 10) -> TraceRecord:
    return TraceRecord(line, 0.0, L, G, tuple(ids))


def test_trace_blocks_equal_ids_equal_tokens_and_replies_link_turns() -> None:
    recs = [
        _rec(1, [0, 1, 2], 1100, 50),  # turn 1: blocks 0, 1 full, block 2 partial
        _rec(2, [0, 1, 3, 4], 1800),  # turn 2 (diverges at the partial block): continues 1
        _rec(3, [0, 5], 700),  # shares only the system block: no link
        _rec(4, [0, 1, 2], 1000),  # same blocks as 1, shorter
    ]
    st = sim.TraceStream(recs, page_size=16)
    reqs = list(st)
    p1, r1 = reqs[0].prompt, reqs[0].reply
    assert len(p1) == 1100 and len(r1) == 50
    assert reqs[1].prompt[:1150] == p1 + r1  # the next turn contains the previous reply
    assert reqs[2].prompt[:512] == p1[:512] and reqs[2].prompt[512:528] != p1[512:528]
    assert reqs[3].prompt == p1[:1000]
    assert [it.parent for it in st.items] == [-1, 0, -1, -1]
    nolink = list(sim.TraceStream(recs, page_size=16, link_replies=False))
    assert nolink[1].prompt[:1024] == p1[:1024] and nolink[1].prompt[1024:1040] != p1[1024:1040]


def test_trace_sessions_are_inferred_through_linked_replies() -> None:
    recs = [
        _rec(1, [0, 1, 2], 1100, 100),
        _rec(2, [0, 1, 3, 4], 1800, 20),
        _rec(3, [0, 1, 3, 5, 6, 7], 2900),
    ]
    st = sim.TraceStream(recs, page_size=16)
    assert [it.parent for it in st.items] == [-1, 0, 1]
    s = sim.Simulator(_cfg("lru", 8, kv_tokens=1 << 15), COST)
    rows = [s.step(r) for r in st]
    assert [r.session for r in rows] == ["r0", "r0", "r0"]
    # turn 2 resumes from turn 1's end-of-generation snapshot (floor(1200 / 64) * 64)
    assert (rows[1].cached_tokens, rows[1].snapshot_pos) == (1200, 1152)
    assert (rows[2].cached_tokens, rows[2].snapshot_pos) == (1808, 1792)
    assert s.cm.stats()["resumable_sessions"] == 1


def _trace_slice(tmp_path: Path, n: int) -> sim.TraceStream:
    if not SHARED_TRACE.is_file():
        pytest.skip("shared Mooncake trace not present")
    path = tmp_path / "slice.jsonl"
    with SHARED_TRACE.open() as f, path.open("w") as g:
        for _ in range(n):
            g.write(f.readline())
    return sim.load_trace(path)


def test_compressed_page_tokens_decide_like_full_labels(tmp_path: Path) -> None:
    st = _trace_slice(tmp_path, 300)
    full = sim.ListStream(
        [
            sim.SimRequest(
                sim._label_tokens(it.prompt), sim._label_tokens(it.reply), max(1, it.output_length)
            )
            for it in st.items
        ]
    )
    base = sim.cache_config(
        sim.SimCacheArgs(snapshot_slots=8, kv_budget_tokens=1 << 20),
        preset("a3b-proxy"),
        "bfloat16",
    )
    for v in sim.variants(["lru", "tail-pin"]):
        a = sim.run_policy(st, base, v, COST).rows
        b = sim.run_policy(full, base, v, COST).rows
        assert a == b


def test_malformed_trace_line_names_the_line(tmp_path: Path) -> None:
    good = json.dumps({"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]})
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{good}\n{good}\n{{"timestamp": 0, "input_length": 9\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:3: not valid JSON"):
        sim.load_trace(path)
    path.write_text(
        f"{good}\n"
        + json.dumps({"timestamp": 0, "input_length": 5000, "output_length": 1, "hash_ids": [0]})
        + "\n"
    )
    with pytest.raises(ConfigError, match=r":2: input_length 5000 exceeds"):
        sim.load_trace(path)


# ----------------------------------------------------------------------------- sim target


def test_sim_target_rows_and_replay_of_its_stream() -> None:
    tgt = sim.SimTarget.build(
        spec=CacheSpec(policy="tail-pin", tail_pin_k=2, snapshot_slots=3, snapshot_interval=128)
    )
    rnd = random.Random(0)
    conv = [rnd.randrange(32, 127) for _ in range(300)]
    resps = []
    for _ in range(4):
        resp = tgt.send(Request(tuple(conv), max_tokens=8, session="c"))
        resps.append(resp)
        conv = conv + resp.tokens + [rnd.randrange(32, 127) for _ in range(70)]
    assert resps[-1].cached_tokens > 0 and resps[-1].snapshot_pos > 0
    assert all(r.ttft_s and r.timings and len(r.tokens) == 8 for r in resps)
    t = resps[-1].timings
    assert (
        t is not None
        and abs(
            sum(t[k] for k in ("restore_s", "replay_s", "prefill_s", "overhead_s"))
            - resps[-1].ttft_s
        )
        < 1e-12
    )
    d = tgt.describe()
    assert d["kind"] == "sim" and d["ttft"] == "modelled" and "source" in d["costmodel"]
    # replaying the recorded stream under the same policy gives the same decisions
    s = sim.Simulator(tgt.cfg, tgt.cost)
    again = [s.step(r) for r in tgt.requests]
    assert [(r.cached_tokens, r.snapshot_pos) for r in again] == [
        (r.cached_tokens, r.snapshot_pos) for r in resps
    ]
    bad = tgt.send(Request((1, 2, 999), max_tokens=2))
    assert bad.error and "vocabulary" in bad.error


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
    from sbrbench import costmodel as cm

    c = doc["target"]["costmodel"]
    model = CostModel(a=c["a"], b=c["b"], c=c["c"], restore=c["restore"],
                      window=int(c.get("window", 0)))
    rows = cm.validate(model, [out])
    assert {r["phase"] for r in rows} == {"build", "pressure", "resume"}
    assert all(r["ratio"] == pytest.approx(1.0, rel=1e-9) for r in rows)
    assert cm.validate(CostModel(a=2 * c["a"], b=2 * c["b"], c=2 * c["c"],
                                 restore=2 * c["restore"], window=int(c.get("window", 0))),
                       [out])[0]["ratio"] == pytest.approx(2.0, rel=1e-9)


# ----------------------------------------------------------------------------- CLI


def _invoke(args: list[str]) -> tuple[int, str]:
    from sbrbench.cli import app

    res = CliRunner().invoke(app, args, catch_exceptions=True)
    if isinstance(res.exception, UserError):
        return 2, str(res.exception)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def test_cli_sim_on_a_trace(tmp_path: Path) -> None:
    _trace_slice(tmp_path, 200)
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
    assert list(pols) == ["lru", "tail-pin", "belady", "belady-gain"]
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
    _trace_slice(tmp_path, 200)
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
    code, text = _invoke([*args, "--warmup", "200"])
    assert code == 2 and "leaves none" in text
    code, text = _invoke([*args, "--warmup", "-1"])
    assert code == 2 and "--warmup" in text


def test_cli_sim_adaptive_opt_reaches_the_policy(tmp_path: Path) -> None:
    """--adaptive-opt KEY=VALUE sets adaptive's options (recorded in the JSON, used in the run:
    admission control off refuses nothing); bad items are one-line user errors."""
    _trace_slice(tmp_path, 200)
    out = tmp_path / "sim.json"
    args = ["sim", "--trace", str(tmp_path / "slice.jsonl"), "--policy", "lru,adaptive",
            "--snapshot-slots", "4", "--no-oracles", "--out", str(out)]
    code, text = _invoke(args)
    assert code == 0, text
    refused = json.loads(out.read_text())["summary"]["policies"]["adaptive"]["admit_refused"]
    assert refused > 0
    code, text = _invoke([*args, "--adaptive-opt", "admit_control=false",
                          "--adaptive-opt", "hazard=empirical"])
    assert code == 0, text
    doc = json.loads(out.read_text())
    assert doc["policies"]["adaptive"]["opts"] == {"admit_control": False, "hazard": "empirical"}
    assert doc["policies"]["lru"]["opts"] == {}
    assert doc["summary"]["policies"]["adaptive"]["admit_refused"] == 0
    for bad in ("duel", "nope=1", "hazard=sometimes"):
        code, text = _invoke([*args, "--adaptive-opt", bad])
        assert code == 2, (bad, text)


def test_cli_sweep_grid_and_plot(tmp_path: Path) -> None:
    _trace_slice(tmp_path, 150)
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
    }
    assert len(doc["grid"]) == 14 and doc["slots"] == [2, 6] and not doc["partial"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert set(pols) == {"forecast", "tail-pin", "belady", "belady-gain"}
    for s in pols.values():
        assert set(s["phases"]) == {"build", "pressure", "resume"}
        assert s["phases"]["resume"]["n"] == 2
    # the headline of the write-up: forecast strands the idle conversation, tail-pin does not
    fr = pols["forecast"]["phases"]["resume"]["replay_tokens"]
    tp = pols["tail-pin"]["phases"]["resume"]["replay_tokens"]
    assert tp * 8 <= fr


def test_branch_admission_reaches_the_manager_and_the_oracle(tmp_path: Path) -> None:
    stream = _trace_slice(tmp_path, 200)
    a3b = preset("a3b-proxy")
    args = sim.SimCacheArgs(snapshot_slots=8, kv_budget_tokens=1 << 22)
    on_cfg = sim.cache_config(args, a3b, "bfloat16")  # the default
    off_cfg = sim.cache_config(args, a3b, "bfloat16", branch_admission=False)
    assert on_cfg.branch_admission
    bel = sim.ORACLES["belady"]
    on = sim.run_policy(stream, on_cfg, bel, COST).summary()
    off = sim.run_policy(stream, off_cfg, bel, COST).summary()
    # every request shares the 512-token system block: a snapshot there is a branch point
    assert on["snapshot_hits"] > off["snapshot_hits"] + 100
    assert on["replay_tokens"] < off["replay_tokens"]


def test_bypass_reference_refuses_a_newcomer_never_used_again() -> None:
    A, B = _seq(1, 130), _seq(2, 130)
    stream = sim.ListStream([_req(A), _req(B), _req(A + _seq(4, 40))])
    cfg = _cfg("belady", 1)
    plain = sim.run_policy(stream, cfg, sim.ORACLES["belady-gain"], COST)
    bypass = sim.run_policy(stream, cfg, sim.variants(["belady-gain-bypass"])[0], COST)
    assert plain.rows[2].snapshot_pos == 0  # B pushed A out of the single slot
    assert bypass.rows[2].snapshot_pos == 128 and bypass.stats["admit_refused"] >= 1




def test_belady_knows_the_next_use_of_a_branch_point_snapshot() -> None:
    S = _seq(10, 256)
    A, B, C = S + _seq(11, 100), S + _seq(12, 100), S + _seq(13, 100)
    stream = sim.ListStream([_req(A), _req(B), _req(C)])
    # B branches off A at 256 (admitted there, then at its own 320): with two slots belady must
    # keep the branch snapshot, used by C, over A's 320, never used again (a tie at 'never'
    # would evict the shallower, the branch snapshot)
    run = sim.run_policy(stream, _cfg("lru", 2), sim.ORACLES["belady"], COST)
    assert [r.snapshot_pos for r in run.rows] == [0, 0, 256]
    off = sim.run_policy(stream, _cfg("lru", 2)._replace(branch_admission=False),
                         sim.ORACLES["belady"], COST)
    assert off.rows[2].snapshot_pos == 0  # no snapshot at the branch point without it


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
