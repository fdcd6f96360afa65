"""HttpTarget and `sbrbench run --target http` against a peer server that misbehaves on purpose
(tests/sbrbench/targets/conftest.py): every case ends with the right exit code, `partial` flag,
error rows and warnings, and no finished row is lost."""

from __future__ import annotations

import email.utils
import json
import socket
import statistics
from pathlib import Path
from typing import Any

import pytest

from engine.chat import Message
from engine.errors import UserError
from sbrbench.targets.base import Request
from sbrbench.targets.http import (
    NO_USAGE,
    ONE_CHUNK,
    HttpTarget,
    normalize_base_url,
    retry_after_s,
)

REQ = Request(
    (1, 2, 3),
    (
        Message("system", "be brief"),
        Message("user", "hi"),
        Message("user", "[tool output]\nls: 3 files"),
    ),
    max_tokens=4,
    session="s",
)


def _target(url: str, model: str = "good", **kw: Any) -> HttpTarget:
    """A target whose waits are recorded in `.waits` instead of slept."""
    waits: list[float] = []
    kw.setdefault("retries", 2)
    kw.setdefault("timeout_s", 10)
    t = HttpTarget(url, model=model, backoff_s=0.5, sleep=waits.append, **kw)
    t.waits = waits  # type: ignore[attr-defined]
    return t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- one request


def test_good_stream_reads_ttft_usage_and_sbr(peer: Any) -> None:
    t = _target(peer.url)
    r = t.send(REQ)
    assert r.error is None and r.text == "Hello" and r.warnings == ()
    assert r.ttft_s is not None and r.e2e_s is not None and r.ttft_s <= r.e2e_s
    assert (r.prompt_tokens, r.cached_tokens, r.generated_tokens) == (40, 32, 2)
    assert r.itl_s is not None and len(r.itl_s) == 1 and r.tpot_s is not None
    assert r.attempts == 1 and r.retry_wait_s == 0.0
    assert r.stats is not None
    u = r.stats.cache
    assert (u.snapshot_pos, u.replay_tokens, u.new_tokens, r.stats.logits_sha256) == \
        (20, 12, 8, "ab")
    assert r.tokens == list(b"Hello") and r.stats.timing.replay_s == 0.5
    body = peer.bodies[-1]
    assert body["user"] == "s" and body["temperature"] == 0.0
    assert body["stream"] is True and body["max_tokens"] == 4 and body["ignore_eos"] is True
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert body["messages"][2]["content"].endswith("ls: 3 files")
    t.close()


def test_measured_ttft_and_itl_match_the_peers_known_delays(peer: Any) -> None:
    """The peer waits TTFT_S before its first token and ITL_S between tokens. Tolerances: the
    measured TTFT cannot be below the peer's delay and may exceed it by scheduling and loopback
    time, up to 0.15 s on a loaded CI machine; one gap may shrink when the chunk before it was
    read late, so the mean gap and the TPOT are checked within -20% / +0.05 s of ITL_S."""
    r = _target(peer.url, "paced").send(REQ)
    assert r.error is None and r.generated_tokens == peer.PACED_TOKENS
    assert r.ttft_s is not None and peer.TTFT_S <= r.ttft_s <= peer.TTFT_S + 0.15
    assert r.itl_s is not None and len(r.itl_s) == peer.PACED_TOKENS - 1
    assert all(g >= 0 for g in r.itl_s)
    lo, hi = 0.8 * peer.ITL_S, peer.ITL_S + 0.05
    assert lo <= statistics.fmean(r.itl_s) <= hi
    assert r.tpot_s is not None and lo <= r.tpot_s <= hi
    assert r.e2e_s is not None and r.e2e_s >= peer.TTFT_S + (peer.PACED_TOKENS - 1) * peer.ITL_S


def test_no_usage_counts_chunks_and_says_so(peer: Any) -> None:
    r = _target(peer.url, "nousage").send(REQ)
    assert r.error is None and r.text == "Hello" and r.generated_tokens == 3
    assert r.warnings == (NO_USAGE,) and r.itl_s is not None and len(r.itl_s) == 2


def test_whole_reply_in_one_chunk_warns_and_leaves_itl_tpot_unknown(peer: Any) -> None:
    r = _target(peer.url, "onechunk").send(REQ)
    assert r.error is None and r.text == "Hello world" and r.generated_tokens == 5
    assert r.warnings == (ONE_CHUNK,) and r.itl_s is None and r.tpot_s is None
    assert r.ttft_s is not None and r.e2e_s is not None


@pytest.mark.parametrize(
    ("mode", "msg"),
    [
        ("malformed", "malformed SSE at line 3: data is not JSON"),
        ("garbage", "malformed SSE at line 1: expected 'data:'"),
        ("nodone", "stream ended before [DONE]"),
        ("errchunk", "server error in stream: oom"),
        ("err400", "HTTP 400: bad messages"),
    ],
)
def test_broken_streams_give_a_row_error_without_retry(peer: Any, mode: str, msg: str) -> None:
    r = _target(peer.url, mode).send(REQ)
    assert r.error is not None and msg in r.error, r.error
    assert peer.attempts[mode] == 1 and r.attempts == 1


def test_server_errors_are_retried_with_backoff_then_recorded(peer: Any) -> None:
    t = _target(peer.url, "err500")
    r = t.send(REQ)
    assert r.error == "HTTP 500: engine exploded (after 3 attempts)"
    assert peer.attempts["err500"] == 3 and r.attempts == 3
    assert t.waits == [0.5, 1.0] and r.retry_wait_s == 1.5  # type: ignore[attr-defined]


def test_503_retry_after_is_honoured(peer: Any) -> None:
    peer.retry_after = "2"
    t = _target(peer.url, "busy")
    r = t.send(REQ)
    assert r.error is None and r.text == "xy" and r.attempts == 3
    assert t.waits == [2.0, 2.0] and r.retry_wait_s == 4.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("header", "ms", "waits"),
    [("", None, [0.5, 1.0]), ("120", None, [0.5, 1.0]), ("1", "30", [0.03, 0.03])],
    ids=["no-retry-after-backs-off", "over-the-cap-backs-off", "retry-after-ms-first"],
)
def test_503_without_a_usable_retry_after(peer: Any, header: str, ms: str | None,
                                          waits: list[float]) -> None:
    peer.retry_after, peer.retry_after_ms = header, ms
    t = _target(peer.url, "busy")
    assert t.send(REQ).error is None
    assert t.waits == pytest.approx(waits)  # type: ignore[attr-defined]


def test_overload_retries_stop_at_the_request_timeout(peer: Any) -> None:
    peer.retry_after = "2"
    r = _target(peer.url, "busy", timeout_s=3).send(REQ)
    assert r.error is not None and "HTTP 503: queue full (gave up after 2 attempts" in r.error
    assert r.attempts == 2 and r.retry_wait_s == 2.0


def test_retry_after_header_forms() -> None:
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after": "1", "retry-after-ms": "250"}) == 0.25
    when = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert retry_after_s({"retry-after": when}, now=1_000_000.0) == pytest.approx(30.0)
    assert retry_after_s({"retry-after": "soon"}) is None and retry_after_s({}) is None


def test_connection_cut_mid_stream_is_retried(peer: Any) -> None:
    r = _target(peer.url, "cut").send(REQ)
    assert r.error is None and r.text == "ab" and r.attempts == 2
    r = _target(peer.url, "cut", retries=0).send(REQ._replace(session="other"))
    assert r.error is not None and "mid-stream, after 1 content chunks" in r.error


def test_model_defaults_to_the_first_listed(peer: Any) -> None:
    peer.models = ["first-model", "second"]
    assert HttpTarget(peer.url).model == "first-model"
    assert HttpTarget(peer.url + "/v1/").model == "first-model"
    peer.models = []
    with pytest.raises(UserError, match="no model listed; pass --model"):
        HttpTarget(peer.url)


def test_unreachable_server_is_a_user_error_even_with_a_model() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    for model in (None, "m"):
        with pytest.raises(UserError, match="cannot reach"):
            HttpTarget(url, model=model, connect_timeout_s=2)


def test_refused_key_is_a_user_error_before_the_run(peer: Any) -> None:
    peer.keys = ["sk-right"]
    with pytest.raises(UserError, match=r"HTTP 401: Incorrect API key provided; pass --api-key"):
        HttpTarget(peer.url, model="good")
    with pytest.raises(UserError, match="check --api-key"):
        HttpTarget(peer.url, model="good", api_key="sk-wrong")
    assert HttpTarget(peer.url, model="good", api_key="sk-right").send(REQ).error is None


def test_base_url_normalisation() -> None:
    assert normalize_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    with pytest.raises(UserError):
        normalize_base_url("h:8000")


def test_a_strict_server_refusing_ignore_eos_is_served_without_it(peer: Any) -> None:
    """A 400 naming a field we add (ignore_eos) drops it for the rest of the run, once; a 400
    naming nothing we add stays a row error."""
    t = _target(peer.url, model="strict")
    r1 = t.send(REQ)
    r2 = t.send(REQ)
    assert r1.error is None and r2.error is None and r1.text == "ok" and r1.attempts == 1
    assert t.dropped_fields == ["ignore_eos"] and t.describe()["dropped_fields"] == ["ignore_eos"]
    assert peer.attempts["strict"] == 3  # refused once, then two plain requests
    assert "ignore_eos" in peer.bodies[0] and all("ignore_eos" not in b for b in peer.bodies[1:])
    bad = _target(peer.url, model="err400").send(REQ)
    assert bad.error is not None and "bad messages" in bad.error and peer.attempts["err400"] == 1


# ----------------------------------------------------------------------------- whole runs

RR = ["--set", "convs=2", "--set", "rounds=2", "--set", "first_tokens=20",
      "--set", "reply_tokens=2"]


def _run(invoke: Any, url: str, model: str, out: Path, *extra: str,
         sets: list[str] = RR) -> tuple[int, str, dict]:
    code, text = invoke(["run", "round-robin", "--target", "http", "--base-url", url,
                         "--model", model, "--out", str(out), "--no-progress", *sets, *extra])
    doc = json.loads(out.read_text()) if out.exists() else {}
    return code, text, doc


def test_failed_requests_make_the_run_partial_and_exit_1(invoke: Any, peer: Any,
                                                         tmp_path: Path) -> None:
    code, text, doc = _run(invoke, peer.url, "malformed", tmp_path / "rr.json",
                           "--concurrency", "2")
    assert code == 1, text
    assert doc["partial"] is True and doc["failed"] == 4 and doc["requests"] == 4
    assert len(doc["rows"]) == 4 and all("malformed SSE" in r["error"] for r in doc["rows"])
    assert doc["target"]["kind"] == "http" and doc["target"]["model"] == "malformed"
    assert doc["summary"]["round"]["errors"] == 4 and doc["throughput"]["failed"] == 4
    assert "4 of 4 requests failed" in text and "--allow-failures 0" in text
    code, text, doc = _run(invoke, peer.url, "malformed", tmp_path / "rr2.json",
                           "--allow-failures", "1")
    assert code == 0, text
    assert doc["partial"] is True and doc["failed"] == 4  # tolerated, still said


def test_good_run_has_the_metrics_and_exits_0(invoke: Any, peer: Any, tmp_path: Path) -> None:
    code, text, doc = _run(invoke, peer.url + "/v1", "good", tmp_path / "p.json",
                           "--slo", "ttft=10s,tpot=10s", "--policy", "tail-pin")
    assert code == 0, text
    assert doc["partial"] is False and doc["failed"] == 0 and doc["warnings"] == {}
    row = doc["rows"][0]
    assert row["cached_tokens"] == 32 and row["replay_tokens"] == 12 and row["attempts"] == 1
    assert row["ttft_s"] > 0 and row["tpot_s"] is not None and len(row["itl_s"]) == 1
    assert row["t_s"] <= row["done_s"] and "due_s" not in row
    assert doc["engine"] == {"model": "good", "policy": "tail-pin", "policy_declared": True}
    assert doc["warmup_s"] is not None and peer.bodies[0]["user"] == "sbrbench-warmup"
    tp = doc["throughput"]
    assert tp["completed"] == 4 and tp["output_tokens"] == 8 and tp["slo_met"] == 4
    assert tp["request_throughput"] > 0 and tp["goodput"] == tp["request_throughput"]
    for name in ("TTFT ms", "TPOT ms", "ITL ms", "E2EL ms", "goodput req/s", "output tok/s"):
        assert name in text
    # the second turn sends the first reply back as the assistant message
    second = [b for b in peer.bodies if len(b["messages"]) > 2][0]
    assert {"role": "assistant", "content": "Hello"} in second["messages"]


@pytest.mark.parametrize(("model", "warning"), [("nousage", NO_USAGE), ("onechunk", ONE_CHUNK)])
def test_replies_that_hide_their_timing_warn(invoke: Any, peer: Any, tmp_path: Path,
                                             model: str, warning: str) -> None:
    code, text, doc = _run(invoke, peer.url, model, tmp_path / "w.json")
    assert code == 0, text
    assert doc["partial"] is False and doc["warnings"] == {warning: 4}
    assert all(r["warnings"] == [warning] for r in doc["rows"])
    assert f"warning: 4 of 4 rows: {warning}" in " ".join(text.split())


def test_overloaded_peer_loses_no_row(invoke: Any, peer: Any, tmp_path: Path) -> None:
    peer.retry_after_ms = "20"  # keep the test quick: retry-after-ms wins over Retry-After
    code, text, doc = _run(invoke, peer.url, "busy", tmp_path / "b.json", "--concurrency", "2")
    assert code == 0, text
    assert doc["partial"] is False and len(doc["rows"]) == 4
    assert all(r["error"] is None and r["attempts"] == 3 for r in doc["rows"])
    assert all(r["retry_wait_s"] == pytest.approx(0.04) for r in doc["rows"])


def test_server_killed_mid_run_keeps_finished_rows_and_fails(invoke: Any, peer: Any,
                                                             tmp_path: Path) -> None:
    peer.die_after(3)  # the warm-up and two rows, then a stream cut and nothing listening
    sets = RR[:2] + ["--set", "rounds=3"] + RR[4:]
    code, text, doc = _run(invoke, peer.url, "good", tmp_path / "k.json", "--retries", "0",
                           sets=sets)
    assert code == 1, text
    assert doc["partial"] is True and doc["requests"] == 6 and doc["failed"] == 4
    ok, bad = doc["rows"][:2], doc["rows"][2:]
    assert all(r["error"] is None and r["tokens"] == list(b"Hello") for r in ok)
    assert "mid-stream, after 0 content chunks" in bad[0]["error"]
    # nothing listens any more (or a kept-alive connection is closed unanswered)
    errs = [r["error"] for r in bad[1:]]
    assert all(e.startswith(("ConnectError", "RemoteProtocolError", "ReadError", "WriteError"))
               for e in errs), errs

    peer2_out = tmp_path / "k2.json"
    code, text, doc = _run(invoke, f"http://127.0.0.1:{_free_port()}", "good", peer2_out)
    assert code == 2 and "cannot reach" in text and not peer2_out.exists()


def test_abort_after_consecutive_failures(invoke: Any, peer: Any, tmp_path: Path) -> None:
    peer.die_after(3)
    sets = RR[:2] + ["--set", "rounds=4"] + RR[4:]
    code, text, doc = _run(invoke, peer.url, "good", tmp_path / "a.json", "--retries", "0",
                           "--abort-after", "2", sets=sets)
    assert code == 1, text
    assert doc["partial"] is True and len(doc["rows"]) == 4 and doc["failed"] == 2
    assert doc["stopped"].startswith("stopped after 2 consecutive failed requests")


def test_key_refused_at_start_or_revoked_mid_run(invoke: Any, peer: Any, tmp_path: Path) -> None:
    peer.keys = ["sk-k"]
    out = tmp_path / "u.json"
    code, text, _ = _run(invoke, peer.url, "good", out)
    assert code == 2 and "HTTP 401" in text and "--api-key" in text and not out.exists()
    peer.revoke_after(3)
    code, text, doc = _run(invoke, peer.url, "good", out, "--api-key", "sk-k")
    assert code == 1, text
    assert [r["error"] is None for r in doc["rows"]] == [True, True, False, False]
    assert all("HTTP 401" in r["error"] and r["attempts"] == 1 for r in doc["rows"][2:])
    assert doc["partial"] is True and doc["failed"] == 2
