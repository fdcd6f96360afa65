"""`sbrbench run --target http` against our own server (engine/server, tiny preset, CPU) on a
free loopback port: the cache seen through `sbr`, the field's metrics, the queue's 503s retried
after Retry-After without losing a row, and the API key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sbrbench.targets.http import ONE_CHUNK

RR = ["--set", "convs=2", "--set", "rounds=2", "--set", "first_tokens=20",
      "--set", "reply_tokens=3"]


def _run(invoke: Any, url: str, out: Path, *extra: str) -> tuple[int, str, dict]:
    code, text = invoke(["run", "round-robin", "--target", "http", "--base-url", url,
                         "--out", str(out), "--no-progress", *RR, *extra])
    return code, text, (json.loads(out.read_text()) if out.exists() else {})


def test_round_robin_over_our_server(invoke: Any, our_server: Any, tmp_path: Path) -> None:
    with our_server() as url:
        code, text, doc = _run(invoke, url, tmp_path / "rr.json", "--slo", "ttft=60s")
    assert code == 0, text
    rows = doc["rows"]
    assert len(rows) == 4 and not any(r["error"] for r in rows)
    assert all(r["cached_tokens"] > 0 for r in rows if r["round"] == 1)
    for r in rows:
        assert r["snapshot_pos"] + r["replay_tokens"] == r["cached_tokens"]
        assert r["generated_tokens"] == 3 and r["attempts"] == 1 and r["ttft_s"] > 0
        t = r["timings"]  # the engine's own split and times, from `sbr`
        assert t["prefill_s"] >= 0 and 0 < t["server_ttft_s"] < r["ttft_s"]
        # The tiny preset's random bytes are often not UTF-8: the server streams text only
        # once it decodes, so several tokens may arrive as one chunk, and the row says so.
        if r["warnings"]:
            assert r["warnings"] == [ONE_CHUNK] and r["itl_s"] is None
        else:
            assert r["tpot_s"] > 0 and len(r["itl_s"]) >= 1
    assert doc["engine"] == {"model": "tiny"} and doc["partial"] is False
    assert doc["throughput"]["completed"] == 4 and doc["throughput"]["slo_met"] == 4


def test_a_full_queue_loses_no_row(invoke: Any, our_server: Any, tmp_path: Path) -> None:
    """One request runs, one waits: at concurrency 4 the other two get 503 with Retry-After
    (at least 1 s) and come back until served."""
    with our_server(max_queue=1) as url:
        code, text, doc = _run(invoke, url, tmp_path / "q.json", "--concurrency", "4",
                               "--set", "convs=4", "--set", "rounds=1", "--no-warmup")
    assert code == 0, text
    rows = doc["rows"]
    assert len(rows) == 4 and all(r["error"] is None for r in rows)
    retried = [r for r in rows if r["attempts"] > 1]
    assert retried and all(r["retry_wait_s"] >= 1.0 for r in retried)
    assert doc["partial"] is False and doc["failed"] == 0


def test_our_server_with_a_key(invoke: Any, our_server: Any, tmp_path: Path) -> None:
    with our_server(api_keys=["sk-ours"]) as url:
        code, text, _ = _run(invoke, url, tmp_path / "n.json")
        assert code == 2 and "HTTP 401" in text and "--api-key" in text
        code, text, doc = _run(invoke, url, tmp_path / "k.json", "--api-key", "sk-ours",
                               "--set", "rounds=1")
    assert code == 0, text
    assert len(doc["rows"]) == 2 and doc["failed"] == 0
