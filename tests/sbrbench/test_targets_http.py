"""HttpTarget against a local stub OpenAI server (127.0.0.1, free port): good and broken streams."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from engine.chat import Message
from engine.errors import UserError
from sbrbench.targets.base import Request
from sbrbench.targets.http import HttpTarget, normalize_base_url


def _chunk(content: str | None = None, finish: str | None = None, **extra: object) -> bytes:
    delta = {} if content is None else {"content": content}
    body = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n".encode()


USAGE = {"prompt_tokens": 40, "completion_tokens": 2,
         "prompt_tokens_details": {"cached_tokens": 32}}
# the `sbr` object as our server sends it (engine/record.py)
SBR = {"prompt_tokens": 40, "cached_tokens": 32, "snapshot_pos": 20, "replay_tokens": 12,
       "new_tokens": 8, "generated_tokens": 2, "logits_sha256": "ab", "session": "s",
       "timing": {"queue_s": 0.0, "match_s": 0.0, "restore_s": 0.0, "replay_s": 0.5,
                  "prefill_s": 0.1, "ttft_s": 0.6, "decode_s": 0.1, "finalize_s": 0.0,
                  "e2e_s": 0.7}}


class Stub(BaseHTTPRequestHandler):
    """Behaviour chosen by the request's model name."""

    attempts: dict[str, int] = {}
    bodies: list[dict] = []
    models: list[str] = ["good"]

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            data = [{"id": m, "object": "model"} for m in self.models]
            self._send(200, json.dumps({"object": "list", "data": data}).encode())
        else:
            self._send(404, b'{"error": {"message": "not found"}}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Stub.bodies.append(body)
        mode = body["model"]
        Stub.attempts[mode] = Stub.attempts.get(mode, 0) + 1
        if mode == "err500":
            self._send(500, b'{"error": {"message": "engine exploded"}}')
            return
        if mode == "err400":
            self._send(400, b'{"error": {"message": "bad messages"}}')
            return
        if mode == "strict" and "ignore_eos" in body:  # api.openai.com's answer
            self._send(400, b'{"error": {"message": "Unrecognized request argument supplied: '
                       b'ignore_eos", "type": "invalid_request_error"}}')
            return
        if mode == "flaky" and Stub.attempts[mode] % 2 == 1:
            self._send(503, b"busy")
            return
        stream = {
            "good": [
                b": keep-alive\n\n",
                _chunk(""),
                _chunk("Hel"),
                _chunk("lo"),
                _chunk(finish="stop"),
                f"data: {json.dumps({'choices': [], 'usage': USAGE, 'sbr': SBR})}\n\n".encode(),
                b"data: [DONE]\n\n",
            ],
            "flaky": [_chunk("x"), _chunk(finish="length"), b"data: [DONE]\n\n"],
            "strict": [_chunk("ok"), _chunk(finish="stop"), b"data: [DONE]\n\n"],
            "malformed": [_chunk("Hi"), b"data: {this is not json\n\n", b"data: [DONE]\n\n"],
            "garbage": [b"HTTP/1.1 nonsense\n\n"],
            "nodone": [_chunk("Hi")],
            "errchunk": [_chunk("a"), b'data: {"error": {"message": "oom"}}\n\n'],
        }[mode]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for part in stream:
            self.wfile.write(part)
            self.wfile.flush()


@pytest.fixture
def server() -> Iterator[str]:
    Stub.attempts, Stub.bodies, Stub.models = {}, [], ["good"]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


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


def _target(url: str, model: str = "good", **kw: object) -> HttpTarget:
    return HttpTarget(url, model=model, retries=2, backoff_s=0.0, timeout_s=10, **kw)


def test_good_stream_reads_ttft_usage_and_sbr(server: str) -> None:
    t = _target(server)
    r = t.send(REQ)
    assert r.error is None and r.text == "Hello"
    assert r.ttft_s is not None and r.e2e_s is not None and r.ttft_s <= r.e2e_s
    assert (r.prompt_tokens, r.cached_tokens, r.generated_tokens) == (40, 32, 2)
    assert r.stats is not None
    u = r.stats.cache
    assert (u.snapshot_pos, u.replay_tokens, u.new_tokens, r.stats.logits_sha256) == \
        (20, 12, 8, "ab")
    assert r.tokens == list(b"Hello") and r.stats.timing.replay_s == 0.5
    body = Stub.bodies[-1]
    assert body["user"] == "s" and body["temperature"] == 0.0
    assert body["stream"] is True and body["max_tokens"] == 4 and body["ignore_eos"] is True
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert body["messages"][2]["content"].endswith("ls: 3 files")
    t.close()


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
def test_broken_streams_give_a_row_error_without_retry(server: str, mode: str, msg: str) -> None:
    r = _target(server, mode).send(REQ)
    assert r.error is not None and msg in r.error, r.error
    assert Stub.attempts[mode] == 1


def test_server_errors_are_retried_then_recorded(server: str) -> None:
    r = _target(server, "err500").send(REQ)
    assert r.error == "HTTP 500: engine exploded (after 3 attempts)"
    assert Stub.attempts["err500"] == 3
    r = _target(server, "flaky").send(REQ)
    assert r.error is None and r.text == "x" and Stub.attempts["flaky"] == 2


def test_model_defaults_to_the_first_listed(server: str) -> None:
    Stub.models = ["first-model", "second"]
    assert HttpTarget(server).model == "first-model"
    assert HttpTarget(server + "/v1/").model == "first-model"
    Stub.models = []
    with pytest.raises(UserError, match="no model listed; pass --model"):
        HttpTarget(server)


def test_unreachable_server_is_a_user_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="cannot reach"):
        HttpTarget(f"http://127.0.0.1:{port}", connect_timeout_s=2)


def test_base_url_normalisation_and_messages() -> None:
    assert normalize_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    with pytest.raises(UserError):
        normalize_base_url("h:8000")


def test_run_against_malformed_stream_records_errors_and_finishes(invoke,
    server: str, tmp_path: Path
) -> None:
    out = tmp_path / "rr.json"
    code, text = invoke(
        [
            "run",
            "round-robin",
            "--target",
            "http",
            "--base-url",
            server,
            "--model",
            "malformed",
            "--out",
            str(out),
            "--no-progress",
            "--concurrency",
            "2",
            "--set",
            "convs=2",
            "--set",
            "rounds=2",
            "--set",
            "first_tokens=20",
            "--set",
            "reply_tokens=2",
        ]
    )
    assert code == 0, text
    doc = json.loads(out.read_text())
    assert doc["partial"] is False and len(doc["rows"]) == 4
    assert all("malformed SSE" in r["error"] for r in doc["rows"])
    assert doc["target"]["kind"] == "http" and doc["target"]["model"] == "malformed"
    assert doc["summary"]["round"]["errors"] == 4
    assert "4 of 4 requests failed" in text


def test_run_against_good_server(invoke, server: str, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    code, text = invoke(
        [
            "run",
            "parity",
            "--target",
            "http",
            "--base-url",
            server + "/v1",
            "--out",
            str(out),
            "--no-progress",
            "--policy",
            "tail-pin",
            "--set",
            "convs=1",
            "--set",
            "turns=2",
            "--set",
            "pressure=1",
            "--set",
            "first_tokens=20",
        ]
    )
    assert code == 0, text
    doc = json.loads(out.read_text())
    assert [r["error"] for r in doc["rows"]] == [None] * 4
    assert doc["rows"][0]["cached_tokens"] == 32 and doc["rows"][0]["replay_tokens"] == 12
    assert doc["engine"] == {"model": "good", "policy": "tail-pin", "policy_declared": True}
    assert doc["warmup_s"] is not None and Stub.bodies[0]["user"] == "sbrbench-warmup"
    # the second turn sends the first reply back as the assistant message
    second = [b for b in Stub.bodies if len(b["messages"]) > 2][0]
    assert {"role": "assistant", "content": "Hello"} in second["messages"]


def test_a_strict_server_refusing_ignore_eos_is_served_without_it(server: str) -> None:
    """A 400 naming a field we add (ignore_eos) drops it for the rest of the run, once; a 400
    naming nothing we add stays a row error."""
    t = _target(server, model="strict")
    r1 = t.send(REQ)
    r2 = t.send(REQ)
    assert r1.error is None and r2.error is None and r1.text == "ok"
    assert t.dropped_fields == ["ignore_eos"] and t.describe()["dropped_fields"] == ["ignore_eos"]
    assert Stub.attempts["strict"] == 3  # refused once, then two plain requests
    assert "ignore_eos" in Stub.bodies[0] and all("ignore_eos" not in b for b in Stub.bodies[1:])
    bad = _target(server, model="err400").send(REQ)
    assert bad.error is not None and "bad messages" in bad.error and Stub.attempts["err400"] == 1
