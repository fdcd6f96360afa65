"""OpenAI-compatible HTTP server over one `Engine` (FastAPI + uvicorn).

One worker thread owns the engine and runs one request at a time; requests wait in a bounded
queue (503 + Retry-After when it is full). Tokens flow from the worker to the request's
coroutine through `loop.call_soon_threadsafe`; a client that disconnects sets its job's cancel
flag, which the engine sees through `on_token` returning False. Every response carries
`usage.prompt_tokens_details.cached_tokens` and an `sbr` object (cache positions and the
per-phase timing split) so a client can watch the prefix cache at work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from engine.chat import ChatTemplate, Message, TextStream, encode_text
from engine.errors import BudgetError, UserError
from engine.record import CACHE_FIELDS, TIMING_FIELDS
from engine.runtime import GenerateResult, SamplingParams

log = logging.getLogger("engine.server")

MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_CHAT_MAX_TOKENS = 256  # OpenAI's chat default is "the rest of the context"; too slow here
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
MIN_TOP_P = 1e-6  # smaller top_p means greedy
CACHE_COUNTERS = frozenset(
    {  # monotonic keys of Engine.cache_stats(); the rest are gauges
        "requests",
        "hits",
        "misses",
        "cold",
        "rejected",
        "admits",
        "admit_refused",
        "hit_tokens",
        "replay_tokens",
        "kv_evicted_pages",
    }
)


class EngineLike(Protocol):
    """What the server needs from `engine.runtime.Engine`."""

    tokenizer: Any
    config: Any
    template: ChatTemplate

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        session: str | None = None,
        on_token: Callable[[int], bool] | None = None,
    ) -> GenerateResult: ...

    def cache_stats(self) -> dict: ...


# --------------------------------------------------------------------------- request schema


class _Strict(BaseModel):
    # Unknown OpenAI fields (frequency_penalty, tools, ...) are accepted and ignored, as most
    # OpenAI-compatible servers do, so that stock clients work unchanged.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


def _integral(v: Any) -> Any:
    # JSON Schema counts 3.0 as an integer; strict pydantic would not.
    return int(v) if isinstance(v, float) and v.is_integer() else v


_Integral = BeforeValidator(_integral)  # after the constraints, so the schema shows them
# Bounds known only once the engine is: `_openapi` fills them in (and the handlers check them).
_VOCAB_BOUND = {"x-bound": "vocab"}
_CONTEXT_BOUND = {"x-bound": "context"}
MaxTokens = Annotated[int, Field(ge=1, json_schema_extra=_CONTEXT_BOUND), _Integral]
OnlyOne = Annotated[int, Field(ge=1, le=1), _Integral]
Seed = Annotated[int, Field(ge=-(2**53), le=2**53), _Integral]  # bounds exact as JSON doubles


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


TokenId = Annotated[int, Field(ge=0, json_schema_extra=_VOCAB_BOUND), _Integral]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class _SamplingRequest(_Strict):
    model: str | None = None
    max_tokens: MaxTokens | None = Field(None, description="Tokens to generate at most.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = Field(
        None, description="Up to 16 stop strings; the reply ends before the first match."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(
        None,
        description="Session hint: requests with one `user` are one "
        "conversation for the snapshot cache.",
    )
    n: OnlyOne | None = Field(None, description="Only 1 is supported.")
    ignore_eos: bool = Field(False, description="Extension (vLLM): keep generating past EOS.")


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: MaxTokens | None = None


class CompletionRequest(_SamplingRequest):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | TokenIds
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=1)]
    ) = Field(..., description="Text or token ids; a batch of exactly one is accepted too.")
    echo: bool = Field(False, description="Prepend the prompt's text to the completion.")
    logprobs: None = None
    best_of: OnlyOne | None = None
    suffix: None = None


# --------------------------------------------------------------------------- response schema


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


# The `sbr` object's schema, derived from the engine's per-request record (engine/record.py).
_TIMING_FIELDS: dict[str, Any] = {k: (float, ...) for k in ("queue_s", *TIMING_FIELDS)}
SbrTiming = create_model("SbrTiming", **_TIMING_FIELDS)
_SBR_FIELDS: dict[str, Any] = {
    **{k: (int, ...) for k in CACHE_FIELDS},
    "generated_tokens": (int, ...),
    "logits_sha256": (str, ...),
    "session": (str | None, ...),
    "timing": (SbrTiming, ...),
}
if TYPE_CHECKING:
    SbrInfo = BaseModel
else:
    SbrInfo = create_model(
        "SbrInfo",
        __doc__="The cache at work: what was matched, restored, replayed and newly computed.",
        **_SBR_FIELDS)


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sbr: SbrInfo


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    sbr: SbrInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    model: str
    queue_depth: int
    busy: bool


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


class AsciiJSONResponse(JSONResponse):
    """Compact JSON with non-ASCII escaped, like the SSE chunks: encoding never fails, whatever
    text a reply or an echoed `user`/prompt holds."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode("ascii")


def _error_body(err: ApiError) -> dict:
    return {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }


def _error_response(err: ApiError) -> JSONResponse:
    return AsciiJSONResponse(_error_body(err), status_code=err.status, headers=err.headers)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuses request bodies over `max_bytes`: 413 when Content-Length says so up front; a
    streamed body that runs past the limit fails its parse (400). Both with OpenAI-style bodies
    (FastAPI's own limit answers the first case in plain text)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            err = ApiError(
                413, f"the request body is over {self.max_bytes} bytes", code="body_too_large"
            )
            await _error_response(err)(scope, receive, send)
            return
        seen = 0

        async def limited() -> AsgiMessage:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(f"the request body is over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


# --------------------------------------------------------------------------- the worker


@dataclass(eq=False)
class Job:
    """One generation request on its way through the worker thread."""

    endpoint: str  # metrics label: chat | completions
    prompt_ids: list[int]
    params: SamplingParams
    session: str | None
    text: TextStream
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    stop_hit: bool = False

    def post(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel.set()


@dataclass
class Outcome:
    """What the worker reports when a job ends."""

    result: GenerateResult
    finish_reason: str
    reply_ids: list[int] | None
    queue_s: float


class QueueFull(Exception):
    pass


class EngineWorker:
    """The thread that owns the engine: runs queued jobs one at a time."""

    def __init__(
        self,
        engine: EngineLike,
        max_queue: int,
        on_finish: Callable[[Job, Outcome | None, str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.on_finish = on_finish or (lambda job, out, outcome: None)
        self.eos_id: int | None = engine.tokenizer.eos_id
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._current: Job | None = None
        self._thread: threading.Thread | None = None
        self.e2e_ema = 1.0
        self.cache_stats: dict = self._read_cache_stats()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def busy(self) -> bool:
        return self._current is not None

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._current is not None:
            self._current.cancel.set()
        self._q.put(None)
        thread.join(timeout)

    def submit(self, job: Job) -> None:
        self.start()
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull
            self._waiting += 1
        self._q.put(job)

    def retry_after_s(self) -> int:
        return max(1, min(60, math.ceil(self.e2e_ema * (self._waiting + 1))))

    def _read_cache_stats(self) -> dict:
        try:
            return dict(self.engine.cache_stats())
        except Exception:  # a stats bug must not take the server down
            log.exception("cache_stats() failed")
            return {}

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
            if job.cancel.is_set():
                self.on_finish(job, None, "cancelled")
                job.post("error", asyncio.CancelledError())
                continue
            self._current = job
            try:
                self._execute(job)
            except Exception as e:  # a bug in this file: answer 500, keep serving
                log.exception("request failed")
                job.post("error", e)
            finally:
                self._current = None
                self.cache_stats = self._read_cache_stats()

    def _execute(self, job: Job) -> None:
        job.started = time.perf_counter()
        ignore_eos = job.params.ignore_eos

        def on_token(token_id: int) -> bool:
            if job.cancel.is_set():
                return False
            if token_id == self.eos_id and not ignore_eos:
                return True  # the end-of-turn marker: not part of the reply text
            delta = job.text.push(token_id)
            if delta.text:
                job.post("delta", delta.text)
            if delta.stopped:
                job.stop_hit = True
                return False
            return True

        try:
            result = self.engine.generate(
                job.prompt_ids, job.params, session=job.session, on_token=on_token
            )
        except Exception as e:  # the engine stays usable after user errors; bugs are logged
            if not isinstance(e, UserError):
                log.exception("generate() failed")
            self.on_finish(job, None, "budget" if isinstance(e, BudgetError) else "error")
            job.post("error", e)
            return
        tail = job.text.finish()
        if tail:
            job.post("delta", tail)
        if job.stop_hit:
            finish, reply_ids = "stop", job.text.reply_ids()
        elif job.cancel.is_set():
            finish, reply_ids = "cancelled", None
        else:
            finish = {"eos": "stop", "stop_id": "stop"}.get(
                result.finish_reason, result.finish_reason
            )
            reply_ids = list(job.text.ids)
        e2e = time.perf_counter() - job.started
        self.e2e_ema = 0.8 * self.e2e_ema + 0.2 * e2e
        out = Outcome(result, finish, reply_ids, job.started - job.submitted)
        self.on_finish(job, out, finish)
        job.post("done", out)


# --------------------------------------------------------------------------- metrics


class CacheCollector:
    """Exports the engine's cache counters (as of the last finished request) on each scrape."""

    def __init__(self, worker: EngineWorker) -> None:
        self.worker = worker

    def collect(self) -> Iterable[Any]:
        stats = self.worker.cache_stats
        evictions = CounterMetricFamily(
            "sbr_snapshot_evictions", "Snapshot evictions by reason.", labels=["reason"]
        )
        for key, value in sorted(stats.items()):
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if key.startswith("evictions_"):
                evictions.add_metric([key.removeprefix("evictions_")], value)
            elif key in CACHE_COUNTERS:
                yield CounterMetricFamily(
                    f"sbr_cache_{key}", f"Engine cache counter {key}.", value=value
                )
            else:
                yield GaugeMetricFamily(
                    f"sbr_cache_{key}", f"Engine cache gauge {key}.", value=value
                )
        yield evictions


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (no process-global state)."""

    def __init__(self, worker: EngineWorker) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "sbr_requests",
            "Requests by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.ttft = Histogram(
            "sbr_ttft_seconds",
            "Engine time to first token.",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.queue_wait = Histogram(
            "sbr_queue_seconds",
            "Time spent waiting for the engine.",
            registry=r,
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
        )
        self.e2e = Histogram(
            "sbr_e2e_seconds",
            "Engine end-to-end time per request.",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.replay_hist = Histogram(
            "sbr_replay_tokens",
            "Replay distance m - s per request.",
            registry=r,
            buckets=(0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768),
        )
        self.tokens = Counter(
            "sbr_tokens",
            "Tokens by kind: prompt, cached, replay, new, generated.",
            ["kind"],
            registry=r,
        )
        Gauge("sbr_queue_depth", "Requests waiting for the engine.", registry=r).set_function(
            lambda: worker.waiting
        )
        Gauge("sbr_busy", "1 while the engine runs a request.", registry=r).set_function(
            lambda: int(worker.busy)
        )
        r.register(CacheCollector(worker))

    def finished(self, job: Job, out: Outcome | None, outcome: str) -> None:
        """Called by the worker thread when a job ends (prometheus_client is thread-safe)."""
        self.requests.labels(job.endpoint, outcome).inc()
        if out is not None:
            self.observe(out)

    def observe(self, out: Outcome) -> None:
        st = out.result.stats
        s = st.cache
        self.ttft.observe(st.timing.ttft_s)
        self.e2e.observe(st.timing.e2e_s)
        self.queue_wait.observe(out.queue_s)
        self.replay_hist.observe(s.replay_tokens)
        for kind, n in (
            ("prompt", s.prompt_tokens),
            ("cached", s.cached_tokens),
            ("replay", s.replay_tokens),
            ("new", s.new_tokens),
            ("generated", st.generated_tokens),
        ):
            self.tokens.labels(kind).inc(n)


# --------------------------------------------------------------------------- helpers


def _usage(out: Outcome) -> dict:
    st = out.result.stats
    n = st.cache.prompt_tokens
    return {
        "prompt_tokens": n,
        "completion_tokens": st.generated_tokens,
        "total_tokens": n + st.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": st.cache.cached_tokens},
    }


def _sbr(out: Outcome, session: str | None) -> dict:
    """The `sbr` object: the engine's record (engine/record.py), the session, the queue wait."""
    st = out.result.stats
    return {
        **st.cache._asdict(),
        "generated_tokens": st.generated_tokens,
        "logits_sha256": st.logits_sha256,
        "session": session,
        "timing": {"queue_s": out.queue_s, **st.timing._asdict()},
    }


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _message_text(m: ChatMessage) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    return "".join(part.text for part in m.content)


def _stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    return tuple(s for s in stops if s)


async def _watch_disconnect(receive: Receive, job: Job) -> None:
    """Cancel `job` when the client goes away (the request body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            return


class SSEResponse(StreamingResponse):
    """Server-sent events that cancel their job when the client disconnects, whatever the ASGI
    spec version (Starlette's StreamingResponse stops listening for disconnects at 2.4)."""

    def __init__(self, body: AsyncIterator[bytes], job: Job) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    await send(
                        {
                            "type": "http.response.start",
                            "status": self.status_code,
                            "headers": self.raw_headers,
                        }
                    )
                    async for chunk in self.body_iterator:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    tg.cancel_scope.cancel()

                async def listen() -> None:
                    await _watch_disconnect(receive, self.job)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(listen)
        except* OSError:
            pass  # the client went away mid-send (how ASGI 2.4 servers report it)
        finally:
            self.job.cancel.set()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


# --------------------------------------------------------------------------- the app


@dataclass
class _Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    session: str | None
    echo: str = ""  # completions: text shown before the reply


def create_app(
    engine: EngineLike,
    *,
    model_name: str,
    max_queue: int = 64,
    max_body_bytes: int = MAX_BODY_BYTES,
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS,
) -> FastAPI:
    """The OpenAI-compatible app over `engine`; its worker thread starts with the app."""
    if max_queue < 1:
        raise UserError(f"max_queue must be >= 1, got {max_queue}")
    if default_max_tokens < 1:
        raise UserError(f"default_max_tokens must be >= 1, got {default_max_tokens}")
    worker = EngineWorker(engine, max_queue)
    metrics = Metrics(worker)
    worker.on_finish = metrics.finished
    template: ChatTemplate = engine.template
    tokenizer = engine.tokenizer
    context = int(engine.config.max_position_embeddings)
    vocab = int(tokenizer.vocab_size)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(worker.stop)

    app = FastAPI(
        title="sbrbench engine server",
        version="0.1.0",
        summary="OpenAI-compatible API over the sbrbench hybrid-model engine.",
        lifespan=lifespan,
        default_response_class=AsciiJSONResponse,
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.worker = worker
    app.state.metrics = metrics
    app.state.template = template

    # ----------------------------------------------------------------- errors

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            message, param, code = f"invalid JSON body: {detail}", None, "invalid_json"
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more)"
            param, code = ".".join(loc) or None, "invalid_value"
        endpoint = _endpoint_label(request)
        if endpoint:
            metrics.requests.labels(endpoint, "invalid").inc()
        return _error_response(ApiError(400, message, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error_response(
            ApiError(exc.status_code, str(exc.detail), type=kind, headers=dict(exc.headers or {}))
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _error_response(
            ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")
        )

    # ----------------------------------------------------------------- request preparation

    def sampling(
        req: _SamplingRequest, prompt_len: int, max_tokens: int | None, default: int, param: str
    ) -> SamplingParams:
        room = context - prompt_len
        if max_tokens is None:
            if room < 1:
                raise ApiError(
                    400,
                    f"this model's maximum context length is {context} tokens; "
                    f"the prompt has {prompt_len}",
                    param=param,
                    code="context_length_exceeded",
                )
            max_tokens = min(default, room)
        elif prompt_len + max_tokens > context:
            raise ApiError(
                400,
                f"this model's maximum context length is {context} tokens; the prompt has "
                f"{prompt_len} and max_tokens is {max_tokens} ({prompt_len + max_tokens} total)",
                param=param,
                code="context_length_exceeded",
            )
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p < MIN_TOP_P:  # keeps the top token only; below float32 resolution it keeps none
            temperature, top_p = 0.0, 1.0
        return SamplingParams(
            temperature=temperature,
            top_p=top_p,
            seed=req.seed,
            max_tokens=max_tokens,
            ignore_eos=req.ignore_eos,
        )

    def prepare_chat(req: ChatCompletionRequest) -> _Prepared:
        messages = [Message(m.role, _message_text(m)) for m in req.messages]
        prompt_ids = template.render(messages)
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = sampling(req, len(prompt_ids), max_tokens, default_max_tokens, "messages")
        return _Prepared(prompt_ids, params, _stop_list(req.stop), req.user)

    def prepare_completion(req: CompletionRequest) -> _Prepared:
        prompt: Any = req.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one (the schema allows no more)
        if isinstance(prompt, str):
            prompt_ids = encode_text(tokenizer, prompt)
        else:
            prompt_ids = [int(t) for t in prompt]
            if any(not 0 <= t < vocab for t in prompt_ids):
                raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        params = sampling(
            req,
            len(prompt_ids),
            req.max_tokens,
            min(DEFAULT_COMPLETION_MAX_TOKENS, default_max_tokens),
            "prompt",
        )
        echo = (
            ""
            if not req.echo
            else prompt
            if isinstance(prompt, str)
            else tokenizer.decode(prompt_ids)
        )
        return _Prepared(prompt_ids, params, _stop_list(req.stop), req.user, echo)

    def submit(endpoint: str, p: _Prepared) -> Job:
        job = Job(
            endpoint,
            p.prompt_ids,
            p.params,
            p.session,
            TextStream(tokenizer, p.stop),
            asyncio.get_running_loop(),
        )
        try:
            worker.submit(job)
        except QueueFull:
            metrics.requests.labels(endpoint, "rejected").inc()
            raise ApiError(
                503,
                f"the server is busy: {worker.waiting} requests are queued",
                type="server_overloaded",
                code="queue_full",
                headers={"Retry-After": str(worker.retry_after_s())},
            ) from None
        return job

    def engine_error(e: BaseException) -> ApiError:
        if isinstance(e, BudgetError):
            return ApiError(400, str(e), code="budget_exceeded")
        if isinstance(e, UserError):
            return ApiError(400, str(e), code="invalid_request")
        if isinstance(e, asyncio.CancelledError):
            return ApiError(499, "cancelled", code="cancelled")
        return ApiError(500, f"engine error: {type(e).__name__}: {e}", type="server_error")

    # ----------------------------------------------------------------- running a job

    async def run_job(
        request: Request,
        endpoint: str,
        p: _Prepared,
        stream: bool,
        include_usage: bool,
        render: _Renderer,
    ) -> Response:
        job = submit(endpoint, p)
        watcher = asyncio.create_task(_watch_disconnect(request.receive, job))
        try:
            first = await job.events.get()
        finally:
            watcher.cancel()
        if first[0] == "error":
            job.cancel.set()
            raise engine_error(first[1])
        if stream:
            return SSEResponse(
                stream_events(endpoint, job, first, p.session, include_usage, render), job
            )
        watcher = asyncio.create_task(_watch_disconnect(request.receive, job))
        pieces: list[str] = []
        event = first
        try:
            while event[0] == "delta":
                pieces.append(event[1])
                event = await job.events.get()
        finally:
            watcher.cancel()
            job.cancel.set()  # no-op once finished; stops the engine if we were interrupted
        if event[0] == "error":
            raise engine_error(event[1])
        out: Outcome = event[1]
        text = "".join(pieces)
        remember_reply(endpoint, p.prompt_ids, out, text)
        return AsciiJSONResponse(render.final(text, out, p.session))

    def remember_reply(endpoint: str, prompt_ids: list[int], out: Outcome, text: str) -> None:
        # What makes the next turn's prompt extend this one's ids (engine/chat.py).
        if endpoint == "chat" and out.reply_ids is not None:
            template.remember(prompt_ids, text, out.reply_ids)

    async def stream_events(
        endpoint: str,
        job: Job,
        first: tuple[str, Any],
        session: str | None,
        include_usage: bool,
        render: _Renderer,
    ) -> AsyncIterator[bytes]:
        pieces: list[str] = []
        head = render.head()
        if head is not None:
            yield _sse(_with_usage_null(head, include_usage))
        event = first
        while event[0] == "delta":
            pieces.append(event[1])
            yield _sse(_with_usage_null(render.delta(event[1]), include_usage))
            event = await job.events.get()
        if event[0] == "error":
            yield _sse(_error_body(engine_error(event[1])))  # headers are sent: report in-band
            yield _sse("[DONE]")
            return
        out: Outcome = event[1]
        remember_reply(endpoint, job.prompt_ids, out, "".join(pieces))
        last = render.finish(out, session)
        yield _sse(_with_usage_null(last, include_usage))
        if include_usage:
            yield _sse(
                {**render.base(), "choices": [], "usage": _usage(out), "sbr": _sbr(out, session)}
            )
        yield _sse("[DONE]")

    # ----------------------------------------------------------------- routes

    errors_doc: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorResponse, "description": "Invalid request"},
        413: {"model": ErrorResponse, "description": "Request body too large"},
        503: {"model": ErrorResponse, "description": "Queue full; see Retry-After"},
    }
    sse_event = {  # OpenAPI < 3.2: an event stream's `schema` describes one event
        "type": "object",
        "properties": {
            "event": {"type": "string"},
            "data": {"type": "string", "description": "A JSON chunk, or [DONE]."},
        },
        "required": ["data"],
    }
    sse_doc = {"text/event-stream": {"schema": sse_event}}

    @app.post(
        "/v1/chat/completions",
        responses={200: {"model": ChatCompletionResponse, "content": sse_doc}, **errors_doc},
    )
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion over the prefix-stable chat template (OpenAI-compatible)."""
        p = prepare_chat(req)
        render = _Renderer("chat.completion", f"chatcmpl-{uuid.uuid4().hex}", model_name)
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await run_job(request, "chat", p, req.stream, include, render)

    @app.post(
        "/v1/completions",
        responses={200: {"model": CompletionResponse, "content": sse_doc}, **errors_doc},
    )
    async def completions(req: CompletionRequest, request: Request) -> Response:
        """Raw text (or token-id) completion (OpenAI-compatible)."""
        p = prepare_completion(req)
        render = _Renderer("text_completion", f"cmpl-{uuid.uuid4().hex}", model_name, p.echo)
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await run_job(request, "completions", p, req.stream, include, render)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict:
        """The one model this server runs."""
        card = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "sbrbench",
            "max_model_len": context,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> Any:
        """Liveness: 200 while the engine worker is alive."""
        body = {
            "status": "ok" if worker.alive() else "dead",
            "model": model_name,
            "queue_depth": worker.waiting,
            "busy": worker.busy,
        }
        return AsciiJSONResponse(body, status_code=200 if worker.alive() else 503)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus() -> Response:
        """Prometheus text: requests, TTFT, cache hits, replay tokens, evictions, pool use."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    bounds = {"vocab": vocab - 1, "context": context}
    app.openapi = lambda: _openapi(app, bounds)  # type: ignore[method-assign]
    return app


def _endpoint_label(request: Request) -> str | None:
    return {"/v1/chat/completions": "chat", "/v1/completions": "completions"}.get(request.url.path)


def _with_usage_null(chunk: dict, include_usage: bool) -> dict:
    return {**chunk, "usage": None} if include_usage else chunk


class _Renderer:
    """Builds the OpenAI response objects of one request (chat or text completion)."""

    def __init__(
        self,
        kind: Literal["chat.completion", "text_completion"],
        rid: str,
        model: str,
        echo: str = "",
    ) -> None:
        self.kind, self.rid, self.model, self.echo = kind, rid, model, echo
        self.created = int(time.time())
        self.chat = kind == "chat.completion"

    def base(self) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def head(self) -> dict | None:
        if not self.chat:
            return self.delta(self.echo) if self.echo else None
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return {**self.base(), "choices": [choice]}

    def delta(self, text: str) -> dict:
        if self.chat:
            choice = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": None,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return {**self.base(), "choices": [choice]}

    def finish(self, out: Outcome, session: str | None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": out.finish_reason}
        return {**self.base(), "choices": [choice], "sbr": _sbr(out, session)}

    def final(self, text: str, out: Outcome, session: str | None) -> dict:
        if self.chat:
            choice: dict = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": out.finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": self.echo + text,
                "logprobs": None,
                "finish_reason": out.finish_reason,
            }
        return {
            "id": self.rid,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": _usage(out),
            "sbr": _sbr(out, session),
        }


def _openapi(app: FastAPI, bounds: dict[str, int]) -> dict:
    """The schema, without FastAPI's 422 (we answer 400 with OpenAI-style bodies), with this
    engine's bounds on token ids and max_tokens (the request models are static)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    _fill_bounds(schema, bounds)
    for item in schema.get("paths", {}).values():
        for op in item.values():
            op.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    app.openapi_schema = schema
    return schema


def _fill_bounds(node: Any, bounds: dict[str, int]) -> None:
    if isinstance(node, dict):
        if "x-bound" in node:
            node["maximum"] = bounds[node.pop("x-bound")]
        for v in node.values():
            _fill_bounds(v, bounds)
    elif isinstance(node, list):
        for v in node:
            _fill_bounds(v, bounds)


def serve(
    engine: EngineLike,
    *,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_queue: int = 64,
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS,
    log_level: str = "info",
) -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    app = create_app(
        engine, model_name=model_name, max_queue=max_queue, default_max_tokens=default_max_tokens
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
