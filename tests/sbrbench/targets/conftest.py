"""A small OpenAI-style peer server that misbehaves on purpose (127.0.0.1, a free port).

Its behaviour is chosen by the request's model name: `good` (usage and an `sbr` object),
`nousage`, `onechunk` (the whole reply in one chunk), `busy` (503 with Retry-After until the
request's third attempt), `cut` (the connection dies mid-stream on a request's first attempt),
`strict` (refuses `ignore_eos`), `paced` (known delays: TTFT_S before the first token, ITL_S
between tokens), and a few broken streams. `Peer.die_after(n)` kills the whole server after n
chat requests (what a SIGKILL does to a client: the stream is cut, then nothing listens);
`Peer.keys` turns on a bearer key, `Peer.revoke_after(n)` refuses every request after n.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

TTFT_S = 0.2  # `paced`: seconds before the first content chunk
ITL_S = 0.05  # `paced`: seconds between content chunks
PACED_TOKENS = 6

USAGE = {"prompt_tokens": 40, "completion_tokens": 2,
         "prompt_tokens_details": {"cached_tokens": 32}}
# the `sbr` object as our server sends it (engine/record.py)
SBR = {"prompt_tokens": 40, "cached_tokens": 32, "snapshot_pos": 20, "replay_tokens": 12,
       "new_tokens": 8, "generated_tokens": 2, "logits_sha256": "ab", "session": "s",
       "seed": 5,
       "timing": {"queue_s": 0.0, "match_s": 0.0, "restore_s": 0.0, "replay_s": 0.5,
                  "prefill_s": 0.1, "ttft_s": 0.6, "decode_s": 0.1, "finalize_s": 0.0,
                  "e2e_s": 0.7}}


def chunk(content: str | None = None, finish: str | None = None, **extra: object) -> bytes:
    delta = {} if content is None else {"content": content}
    body = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n".encode()


def data(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


DONE = b"data: [DONE]\n\n"
STREAMS: dict[str, list[bytes]] = {
    "good": [b": keep-alive\n\n", chunk(""), chunk("Hel"), chunk("lo"), chunk(finish="stop"),
             data({"choices": [], "usage": USAGE, "sbr": SBR}), DONE],
    "nousage": [chunk("He"), chunk("l"), chunk("lo"), chunk(finish="stop"), DONE],
    "onechunk": [chunk("Hello world"), chunk(finish="stop"),
                 data({"choices": [], "usage": {**USAGE, "completion_tokens": 5}}), DONE],
    "strict": [chunk("ok"), chunk(finish="stop"), DONE],
    "busy": [chunk("x"), chunk("y"), chunk(finish="length"), DONE],
    "cut": [chunk("a"), chunk("b"), chunk(finish="length"), DONE],
    "malformed": [chunk("Hi"), b"data: {this is not json\n\n", DONE],
    "garbage": [b"HTTP/1.1 nonsense\n\n"],
    "nodone": [chunk("Hi")],
    "errchunk": [chunk("a"), b'data: {"error": {"message": "oom"}}\n\n'],
}


class Peer:
    """The peer's state: what it received, how often, and how it should behave."""

    TTFT_S, ITL_S, PACED_TOKENS = TTFT_S, ITL_S, PACED_TOKENS

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.attempts: dict[str, int] = {}
        self.models = ["good"]
        self.keys: list[str] = []
        self.retry_after = "1"  # `busy`: the Retry-After header ("" = none)
        self.retry_after_ms: str | None = None
        self.lock = threading.Lock()
        self.chat_requests = 0
        self.die_at: int | None = None
        self.revoke_at: int | None = None
        self.httpd: ThreadingHTTPServer | None = None
        self.url = ""

    def die_after(self, n: int) -> None:
        """Request n + 1 has its stream cut, then the server stops listening."""
        self.die_at = n + 1

    def revoke_after(self, n: int) -> None:
        """From chat request n + 1 on, every request gets 401 (the key was revoked)."""
        self.revoke_at = n + 1

    def kill(self) -> None:
        if self.httpd is not None:
            httpd, self.httpd = self.httpd, None
            threading.Thread(target=lambda: (httpd.shutdown(), httpd.server_close())).start()


def _handler(peer: Peer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked streams, as uvicorn and vLLM send them

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            if not peer.keys:
                return True
            if self.headers.get("Authorization") in {f"Bearer {k}" for k in peer.keys}:
                return True
            self._send(401, b'{"error": {"message": "Incorrect API key provided", '
                       b'"type": "invalid_request_error", "code": "invalid_api_key"}}')
            return False

        def _dead(self) -> bool:
            # a killed server answers nothing on connections it had kept alive either
            if peer.httpd is None:
                self.close_connection = True
                return True
            return False

        def do_GET(self) -> None:
            if self._dead() or not self._authorized():
                return
            if self.path == "/v1/models":
                models = [{"id": m, "object": "model"} for m in peer.models]
                self._send(200, json.dumps({"object": "list", "data": models}).encode())
            else:
                self._send(404, b'{"error": {"message": "not found"}}')

        def _chunk(self, part: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.flush()

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self._dead() or not self._authorized():
                return
            mode = body["model"]
            key = f"{mode}/{body.get('user')}/{len(body['messages'])}"
            with peer.lock:
                peer.bodies.append(body)
                peer.attempts[mode] = peer.attempts.get(mode, 0) + 1
                peer.attempts[key] = attempt = peer.attempts.get(key, 0) + 1
                peer.chat_requests += 1
                dying = peer.die_at is not None and peer.chat_requests >= peer.die_at
                revoked = peer.revoke_at is not None and peer.chat_requests >= peer.revoke_at
            if revoked:
                self._send(401, b'{"error": {"message": "Incorrect API key provided", '
                           b'"type": "invalid_request_error", "code": "invalid_api_key"}}')
                return
            if mode == "err500":
                self._send(500, b'{"error": {"message": "engine exploded"}}')
                return
            if mode == "err400":
                self._send(400, b'{"error": {"message": "bad messages"}}')
                return
            if mode == "strict" and "ignore_eos" in body:  # api.openai.com's answer
                self._send(400, b'{"error": {"message": "Unrecognized request argument '
                           b'supplied: ignore_eos", "type": "invalid_request_error"}}')
                return
            if mode == "busy" and attempt < 3:
                headers = {"Retry-After": peer.retry_after} if peer.retry_after else {}
                if peer.retry_after_ms is not None:
                    headers["retry-after-ms"] = peer.retry_after_ms
                self._send(503, b'{"error": {"message": "queue full"}}', headers)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if mode == "paced":
                time.sleep(TTFT_S)
                for k in range(PACED_TOKENS):
                    if k:
                        time.sleep(ITL_S)
                    self._chunk(chunk(f"t{k}"))
                usage = {**USAGE, "completion_tokens": PACED_TOKENS}
                for part in (chunk(finish="length"), data({"choices": [], "usage": usage}), DONE):
                    self._chunk(part)
                self.wfile.write(b"0\r\n\r\n")
                return
            stream = STREAMS["good" if mode.startswith("good") else mode]
            if dying or (mode == "cut" and attempt == 1):
                self._chunk(stream[0])  # one chunk, then the connection dies
                if dying:
                    peer.kill()
                self.close_connection = True
                return
            for part in stream:
                self._chunk(part)
            self.wfile.write(b"0\r\n\r\n")

    return Handler


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(p))
    httpd.daemon_threads = True
    p.httpd = httpd
    p.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield p
    p.kill()
