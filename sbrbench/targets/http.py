"""`--target http`: any OpenAI-compatible server, through streaming `/v1/chat/completions`."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from engine.chat import ChatML, ChatTemplate, Message
from engine.errors import UserError
from engine.record import RequestStats
from engine.tokenizer import ByteTokenizer
from sbrbench.targets.base import Request, Response


class StreamError(Exception):
    """The server's response could not be read as an OpenAI stream (not retried)."""


class _Retryable(Exception):
    """A failure worth another attempt (connection, timeout, 429, 5xx)."""


class _Rejected(StreamError):
    """HTTP 400/422: the server refused the request body."""


# Fields we add beyond the strict OpenAI API (vLLM and SGLang accept them; api.openai.com answers
# 400 "Unrecognized request argument supplied: ignore_eos"). Dropped once, for the rest of the
# run, when a 400/422 names them; recorded in the result's target description.
_OPTIONAL_FIELDS = ("ignore_eos",)


def normalize_base_url(url: str) -> str:
    """`http://h:8000`, `http://h:8000/`, `http://h:8000/v1/` -> `http://h:8000/v1`."""
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://", url):
        raise UserError(f"--base-url must start with http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


@dataclass
class HttpTarget:
    """Any OpenAI-compatible server, through streaming `/v1/chat/completions`.

    TTFT is the time to the first non-empty content delta. `usage.prompt_tokens_details.
    cached_tokens` and an `sbr` object ({snapshot_pos, replay_tokens, new_tokens,
    logits_sha256}) are read when the server sends them.
    """

    base_url: str
    model: str | None = None
    api_key: str | None = None
    timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.5
    concurrency: int = 1
    extra_body: dict[str, Any] = field(default_factory=dict)
    kind: str = "http"

    def __post_init__(self) -> None:
        import httpx

        # the server renders the messages itself; ids of the byte-level ChatML template give
        # each row's depth where the server reports no usage
        self.template: ChatTemplate = ChatML(ByteTokenizer())

        self.base_url = normalize_base_url(self.base_url)
        if self.concurrency < 1:
            raise UserError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.retries < 0:
            raise UserError(f"--retries must be >= 0, got {self.retries}")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            limits=httpx.Limits(max_connections=self.concurrency + 2),
        )
        self._lock = threading.Lock()
        self.dropped_fields: list[str] = []
        self.server_info: dict[str, Any] = {}
        if not self.model:
            self.model = self._first_model()

    @property
    def max_concurrency(self) -> int:
        return self.concurrency

    def _first_model(self) -> str:
        import httpx

        url = f"{self.base_url}/models"
        try:
            r = self._client.get(url, timeout=self.connect_timeout_s + 10)
        except httpx.HTTPError as e:
            raise UserError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise UserError(f"{url}: HTTP {r.status_code}: {_error_message(r.text)}")
        try:
            data = r.json()["data"]
            return str(data[0]["id"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"{url}: no model listed; pass --model") from None

    def _body(self, req: Request) -> dict[str, Any]:
        body = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in req.messages],
            "max_tokens": req.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **({"ignore_eos": True} if req.ignore_eos else {}),
            # OpenAI's `user` field: the session hint servers (ours, vLLM) may key caches on
            **({"user": req.session} if req.session else {}),
            **self.extra_body,
        }
        for k in self.dropped_fields:
            body.pop(k, None)
        return body

    def send(self, req: Request) -> Response:
        body = self._body(req)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 10.0))
            try:
                return self._stream(body)
            except _Retryable as e:
                last = str(e)
            except _Rejected as e:
                named = [k for k in _OPTIONAL_FIELDS
                         if k in body and k in str(e) and k not in self.extra_body]
                if not named:
                    return Response(error=str(e))
                with self._lock:
                    self.dropped_fields.extend(k for k in named if k not in self.dropped_fields)
                body = self._body(req)
                try:  # the same attempt again, without the refused field
                    return self._stream(body)
                except _Retryable as e2:
                    last = str(e2)
                except StreamError as e2:
                    return Response(error=str(e2))
            except StreamError as e:
                return Response(error=str(e))
        return Response(error=f"{last} (after {self.retries + 1} attempts)")

    def _stream(self, body: dict[str, Any]) -> Response:
        import httpx

        url = f"{self.base_url}/chat/completions"
        t0 = time.perf_counter()
        try:
            with self._client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    msg = (
                        f"HTTP {r.status_code}: {_error_message(r.read().decode(errors='replace'))}"
                    )
                    if r.status_code == 429 or r.status_code >= 500:
                        raise _Retryable(msg)
                    if r.status_code in (400, 422):
                        raise _Rejected(msg)
                    raise StreamError(msg)
                return _read_sse(r.iter_lines(), t0)
        except httpx.TimeoutException as e:
            raise _Retryable(f"timeout: {type(e).__name__}") from None
        except httpx.TransportError as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        except httpx.HTTPError as e:
            raise StreamError(f"{type(e).__name__}: {e}") from None

    def warmup(self) -> float | None:
        """One short request before the run so the first row does not pay the server's start-up
        (it adds one small unrelated prefix to the server's cache). Seconds; None if it failed."""
        msgs = (Message("user", "Warm-up request from sbrbench; reply briefly."),)
        t0 = time.perf_counter()
        r = self.send(Request((), msgs, max_tokens=2, session="sbrbench-warmup"))
        return None if r.error else time.perf_counter() - t0

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "base_url": self.base_url,
            "model": self.model,
            "concurrency": self.concurrency,
            "retries": self.retries,
            "timeout_s": self.timeout_s,
            "tokens": "utf-8 bytes of the streamed text",
            "dropped_fields": list(self.dropped_fields),
        }

    def engine_info(self) -> dict[str, Any]:
        return {"model": self.model}

    def close(self) -> None:
        self._client.close()


def _error_message(text: str) -> str:
    """The `error.message` of an OpenAI-style error body, else the body's start."""
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:200]
        if isinstance(err, str):
            return err[:200]
    except (ValueError, AttributeError):
        pass
    return text.strip()[:200] or "(empty body)"


def _opt_int(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _read_sse(lines: Any, t0: float) -> Response:
    """Read an OpenAI chat-completions SSE stream into a Response; StreamError when malformed."""
    ttft: float | None = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    sbr: dict[str, Any] = {}
    finish: str | None = None
    done = False
    for n, line in enumerate(lines, start=1):
        if not line or line.startswith(":"):
            continue
        if line.startswith(("event:", "id:", "retry:")):
            continue
        if not line.startswith("data:"):
            raise StreamError(f"malformed SSE at line {n}: expected 'data:', got {line[:60]!r}")
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            raise StreamError(
                f"malformed SSE at line {n}: data is not JSON: {payload[:60]!r}"
            ) from None
        if not isinstance(chunk, dict):
            raise StreamError(f"malformed SSE at line {n}: data is not a JSON object")
        if chunk.get("error"):
            raise StreamError(f"server error in stream: {_error_message(json.dumps(chunk))}")
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise StreamError(f"malformed SSE at line {n}: 'choices' is not a list")
        for ch in choices:
            delta = ch.get("delta") if isinstance(ch, dict) else None
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(content)
            if isinstance(ch, dict) and ch.get("finish_reason"):
                finish = str(ch["finish_reason"])
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        if isinstance(chunk.get("sbr"), dict):
            sbr = chunk["sbr"]
    e2e = time.perf_counter() - t0
    if not done and finish is None:
        raise StreamError("stream ended before [DONE] and without a finish_reason")
    text = "".join(parts)
    details = usage.get("prompt_tokens_details")
    cached = _opt_int(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Response(
        tokens=list(text.encode("utf-8")),
        text=text,
        ttft_s=ttft,
        e2e_s=e2e,
        prompt_tokens=_opt_int(usage.get("prompt_tokens")),
        cached_tokens=cached,
        generated_tokens=_opt_int(usage.get("completion_tokens")),
        stats=_sbr_stats(sbr),
    )


def _sbr_stats(sbr: dict[str, Any]) -> RequestStats | None:
    """The engine's record from a server's `sbr` object (ours sends one), None if absent or
    incomplete."""
    if not sbr:
        return None
    try:
        return RequestStats.from_row(sbr)
    except (KeyError, TypeError, ValueError):
        return None
