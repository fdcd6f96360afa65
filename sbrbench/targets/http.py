"""`--target http`: any OpenAI-compatible server, through streaming `/v1/chat/completions`.

What it measures per request, as vLLM's `bench serve` and SGLang's `bench_serving` do: TTFT (to
the first non-empty content delta), the gap before every later content chunk (ITL), TPOT ((end
of stream - TTFT) / (output tokens - 1)) and the end-to-end latency (to the end of the stream).
Output tokens are the server's `usage.completion_tokens` (or `sbr.generated_tokens`); a server
that reports neither has its content chunks counted instead, and the row says so.

Failures: connection errors, timeouts and 5xx are retried `retries` times with exponential
backoff; 429 and 503 (an overloaded server) are retried after the server's Retry-After for as
long as the request's own timeout allows. Every row says how many attempts it took and how long
it waited; a request that still fails is a row with its error.
"""

from __future__ import annotations

import email.utils
import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from engine.chat import ChatML, ChatTemplate, Message
from engine.errors import UserError
from engine.record import RequestStats, time_per_output_token
from engine.tokenizer import ByteTokenizer
from sbrbench.targets.base import Request, Response

ONE_CHUNK = "whole reply in one chunk: TTFT is the time to the whole reply; ITL and TPOT unknown"
NO_USAGE = "no usage from the server: output tokens counted as content chunks"


class StreamError(Exception):
    """The server's response could not be read as an OpenAI stream (not retried)."""


class _Retryable(Exception):
    """A failure worth another attempt (connection, timeout, 5xx other than 503)."""


class _Overloaded(_Retryable):
    """429 or 503: the server asks to come back later (`retry_after` seconds, if it said)."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Rejected(StreamError):
    """HTTP 400/422: the server refused the request body."""


# Fields we add beyond the strict OpenAI API (vLLM and SGLang accept them; api.openai.com answers
# 400 "Unrecognized request argument supplied: ignore_eos"). Dropped once, for the rest of the
# run, when a 400/422 names them; recorded in the result's target description.
_OPTIONAL_FIELDS = ("ignore_eos",)
MAX_BACKOFF_S = 10.0


def normalize_base_url(url: str) -> str:
    """`http://h:8000`, `http://h:8000/`, `http://h:8000/v1/` -> `http://h:8000/v1`."""
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://", url):
        raise UserError(f"--base-url must start with http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


def retry_after_s(headers: Any, now: float | None = None) -> float | None:
    """Seconds a 429/503 asks to wait: `retry-after-ms`, else `Retry-After` as seconds or as an
    HTTP date; None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(when - (time.time() if now is None else now), 0.0)


@dataclass
class HttpTarget:
    """Any OpenAI-compatible server, through streaming `/v1/chat/completions`.

    `usage.prompt_tokens_details.cached_tokens` and an `sbr` object ({snapshot_pos,
    replay_tokens, new_tokens, logits_sha256, ...}) are read when the server sends them.
    max_retry_wait_s: the longest Retry-After honoured as given (longer ones, and a missing one,
    fall back to the exponential backoff). `sleep` is how waits happen (tests record them).
    """

    base_url: str
    model: str | None = None
    api_key: str | None = None
    timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.5
    max_retry_wait_s: float = 60.0
    concurrency: int = 1
    extra_body: dict[str, Any] = field(default_factory=dict)
    kind: str = "http"
    sleep: Callable[[float], None] = time.sleep

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
        listed = self._probe()
        if not self.model:
            if not listed:
                raise UserError(f"{self.base_url}/models: no model listed; pass --model")
            self.model = listed[0]

    @property
    def max_concurrency(self) -> int:
        return self.concurrency

    def _probe(self) -> list[str]:
        """GET /models before the run: an unreachable server or a refused key ends the run here,
        before any row; returns the model ids listed ([] when the server lists none)."""
        import httpx

        url = f"{self.base_url}/models"
        try:
            r = self._client.get(url, timeout=self.connect_timeout_s + 10)
        except httpx.HTTPError as e:
            raise UserError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
        if r.status_code in (401, 403):
            hint = "check --api-key" if self.api_key else "pass --api-key (or SBRBENCH_API_KEY)"
            raise UserError(f"{url}: HTTP {r.status_code}: {_error_message(r.text)}; {hint}")
        if r.status_code != 200:
            if self.model:  # a server without /models can still serve chat completions
                return []
            raise UserError(f"{url}: HTTP {r.status_code}: {_error_message(r.text)}")
        try:
            return [str(m["id"]) for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            return []

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

    def _backoff(self, failures: int) -> float:
        return min(self.backoff_s * 2 ** max(failures - 1, 0), MAX_BACKOFF_S)

    def send(self, req: Request) -> Response:
        body = self._body(req)
        attempts = failures = 0
        waited = 0.0
        while True:
            attempts += 1
            try:
                resp = self._stream(body)
                return resp._replace(attempts=attempts, retry_wait_s=waited)
            except _Overloaded as e:
                failures += 1
                ra = e.retry_after
                wait = ra if ra is not None and 0 < ra <= self.max_retry_wait_s \
                    else self._backoff(failures)
                if waited + wait > self.timeout_s:
                    return Response(error=f"{e} (gave up after {attempts} attempts and "
                                    f"{waited:.1f} s of Retry-After waits)",
                                    attempts=attempts, retry_wait_s=waited)
            except _Retryable as e:
                failures += 1
                if failures > self.retries:
                    return Response(error=f"{e} (after {attempts} attempts)",
                                    attempts=attempts, retry_wait_s=waited)
                wait = self._backoff(failures)
            except _Rejected as e:
                named = [k for k in _OPTIONAL_FIELDS
                         if k in body and k in str(e) and k not in self.extra_body]
                if not named:
                    return Response(error=str(e), attempts=attempts, retry_wait_s=waited)
                with self._lock:
                    self.dropped_fields.extend(k for k in named if k not in self.dropped_fields)
                body = self._body(req)
                attempts -= 1  # the same attempt again, without the refused field
                continue
            except StreamError as e:
                return Response(error=str(e), attempts=attempts, retry_wait_s=waited)
            self.sleep(wait)
            waited += wait

    def _stream(self, body: dict[str, Any]) -> Response:
        import httpx

        url = f"{self.base_url}/chat/completions"
        t0 = time.perf_counter()
        progress = _Progress()
        try:
            with self._client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    msg = (
                        f"HTTP {r.status_code}: {_error_message(r.read().decode(errors='replace'))}"
                    )
                    if r.status_code in (429, 503):
                        raise _Overloaded(msg, retry_after_s(r.headers))
                    if r.status_code >= 500:
                        raise _Retryable(msg)
                    if r.status_code in (400, 422):
                        raise _Rejected(msg)
                    raise StreamError(msg)
                progress.streaming = True
                return _read_sse(r.iter_lines(), t0, progress)
        except httpx.TimeoutException as e:
            raise _Retryable(f"timeout: {type(e).__name__}{progress.where()}") from None
        except httpx.TransportError as e:
            raise _Retryable(f"{type(e).__name__}: {e}{progress.where()}") from None
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
            "max_retry_wait_s": self.max_retry_wait_s,
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


class _Progress:
    """How far a stream got (for the error of a connection lost mid-stream)."""

    def __init__(self) -> None:
        self.streaming = False  # a 200 arrived: the stream had begun
        self.chunks = 0

    def where(self) -> str:
        return f" (mid-stream, after {self.chunks} content chunks)" if self.streaming else ""


def _read_sse(lines: Iterable[str], t0: float, progress: _Progress | None = None) -> Response:
    """Read an OpenAI chat-completions SSE stream into a Response; StreamError when malformed."""
    progress = progress or _Progress()
    times: list[float] = []  # perf_counter at each non-empty content delta
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
                times.append(time.perf_counter())
                progress.chunks += 1
                parts.append(content)
            if isinstance(ch, dict) and ch.get("finish_reason"):
                finish = str(ch["finish_reason"])
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        if isinstance(chunk.get("sbr"), dict):
            sbr = chunk["sbr"]
    end = time.perf_counter()
    if not done and finish is None:
        raise StreamError("stream ended before [DONE] and without a finish_reason")
    text = "".join(parts)
    details = usage.get("prompt_tokens_details")
    cached = _opt_int(details.get("cached_tokens")) if isinstance(details, dict) else None
    stats = _sbr_stats(sbr)
    reported = _opt_int(usage.get("completion_tokens"))
    if reported is None and stats is not None:
        reported = stats.generated_tokens
    warnings: list[str] = []
    out_tokens = reported if reported is not None else len(times)
    if reported is None and times:
        warnings.append(NO_USAGE)
    itl: tuple[float, ...] | None = tuple(b - a for a, b in zip(times, times[1:], strict=False))
    tpot = time_per_output_token(end - times[0], out_tokens) if times else None
    if len(times) == 1 and (out_tokens > 1 or len(text.encode("utf-8")) > 1):
        warnings.append(ONE_CHUNK)
        itl, tpot = None, None
    return Response(
        tokens=list(text.encode("utf-8")),
        text=text,
        ttft_s=times[0] - t0 if times else None,
        e2e_s=end - t0,
        prompt_tokens=_opt_int(usage.get("prompt_tokens")),
        cached_tokens=cached,
        generated_tokens=out_tokens,
        stats=stats,
        itl_s=itl,
        tpot_s=tpot,
        warnings=tuple(warnings),
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
