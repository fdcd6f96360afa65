"""The OpenAI-compatible FastAPI app over one engine: routes, error handlers, the OpenAPI schema.

A request is validated (schema.py), prepared (prepare.py), queued for the engine's one worker
thread (worker.py) and answered as one JSON object or as SSE chunks (render.py, stream.py).
Every response carries `usage.prompt_tokens_details.cached_tokens` and an `sbr` object (cache
positions, the per-phase timing split, the sampling seed) so a client can watch the prefix
cache at work.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.chat import ChatTemplate, TextStream
from engine.errors import BudgetError, UserError
from engine.server.errors import ApiError, AsciiJSONResponse, error_body, error_response
from engine.server.metrics import Metrics
from engine.server.middleware import EXEMPTABLE, ApiKeyAuth, BodyLimit
from engine.server.prepare import DEFAULT_CHAT_MAX_TOKENS, ModelNames, Prepared, Preparer
from engine.server.render import Renderer, sbr, usage
from engine.server.schema import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)
from engine.server.stream import SSEResponse, sse, watch_disconnect, with_usage_null
from engine.server.worker import EngineLike, EngineWorker, Job, Outcome, Piece, QueueFull

log = logging.getLogger("engine.server")

MAX_BODY_BYTES = 64 * 1024 * 1024


def create_app(
    engine: EngineLike,
    *,
    model_name: str,
    aliases: Sequence[str] = (),
    max_queue: int = 64,
    max_body_bytes: int = MAX_BODY_BYTES,
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS,
    api_keys: Sequence[str] = (),
    key_exempt: Sequence[str] = EXEMPTABLE,
) -> FastAPI:
    """The OpenAI-compatible app over `engine`; its worker thread starts with the app.

    aliases: more names the model answers to. api_keys: when any, /v1 needs `Authorization:
    Bearer KEY` (and /health, /metrics unless named in `key_exempt`).
    """
    if max_queue < 1:
        raise UserError(f"max_queue must be >= 1, got {max_queue}")
    if default_max_tokens < 1:
        raise UserError(f"default_max_tokens must be >= 1, got {default_max_tokens}")
    unknown = sorted(set(key_exempt) - set(EXEMPTABLE))
    if unknown:
        raise UserError(f"key_exempt: unknown endpoint {unknown[0]!r} "
                        f"(choose from {', '.join(EXEMPTABLE)})")
    worker = EngineWorker(engine, max_queue)
    metrics = Metrics(worker)
    worker.on_finish = metrics.finished
    template: ChatTemplate = engine.template
    tokenizer = engine.tokenizer
    context = int(engine.config.max_position_embeddings)
    vocab = int(tokenizer.vocab_size)
    names = ModelNames(model_name, aliases)
    prep = Preparer(tokenizer=tokenizer, template=template, context=context, vocab=vocab,
                    default_max_tokens=default_max_tokens, names=names,
                    logprobs=worker.tap.available)
    created = int(time.time())
    keys = [k for k in api_keys if k]

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
        summary="OpenAI-compatible API over the sbrbench hybrid-model engine. One request runs "
        "at a time; the others wait in a bounded queue (503 with Retry-After when it is full).",
        lifespan=lifespan,
        default_response_class=AsciiJSONResponse,
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if keys:
        app.add_middleware(ApiKeyAuth, keys=keys, exempt=key_exempt)
    app.state.worker = worker
    app.state.metrics = metrics
    app.state.template = template

    # ----------------------------------------------------------------- errors

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

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
        return error_response(ApiError(400, message, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(
            ApiError(exc.status_code, str(exc.detail), type=kind, headers=dict(exc.headers or {}))
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(
            ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")
        )

    # ----------------------------------------------------------------- running a job

    def submit(endpoint: str, p: Prepared) -> Job:
        job = Job(
            endpoint,
            p.prompt_ids,
            p.params,
            p.session,
            TextStream(tokenizer, p.stop),
            asyncio.get_running_loop(),
            logprobs=p.logprobs,
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

    async def run_job(
        request: Request,
        endpoint: str,
        p: Prepared,
        stream: bool,
        include_usage: bool,
        render: Renderer,
    ) -> Response:
        job = submit(endpoint, p)
        watcher = asyncio.create_task(watch_disconnect(request.receive, job))
        try:
            first = await job.events.get()
        finally:
            watcher.cancel()
        if first[0] == "error":
            job.cancel.set()
            raise _engine_error(first[1])
        if stream:
            return SSEResponse(stream_events(endpoint, job, first, include_usage, render), job)
        watcher = asyncio.create_task(watch_disconnect(request.receive, job))
        pieces: list[Piece] = []
        event = first
        try:
            while event[0] == "delta":
                pieces.append(event[1])
                event = await job.events.get()
        finally:
            watcher.cancel()
            job.cancel.set()  # no-op once finished; stops the engine if we were interrupted
        if event[0] == "error":
            raise _engine_error(event[1])
        out: Outcome = event[1]
        remember_reply(endpoint, p.prompt_ids, out, "".join(x.text for x in pieces))
        return AsciiJSONResponse(render.final(pieces, out, p.session))

    def remember_reply(endpoint: str, prompt_ids: list[int], out: Outcome, text: str) -> None:
        # What makes the next turn's prompt extend this one's ids (engine/chat.py).
        if endpoint == "chat" and out.reply_ids is not None:
            template.remember(prompt_ids, text, out.reply_ids)

    async def stream_events(
        endpoint: str,
        job: Job,
        first: tuple[str, Any],
        include_usage: bool,
        render: Renderer,
    ) -> AsyncIterator[bytes]:
        texts: list[str] = []
        head = render.head()
        if head is not None:
            yield sse(with_usage_null(head, include_usage))
        event = first
        while event[0] == "delta":
            texts.append(event[1].text)
            yield sse(with_usage_null(render.delta(event[1]), include_usage))
            event = await job.events.get()
        if event[0] == "error":
            yield sse(error_body(_engine_error(event[1])))  # headers are sent: report in-band
            yield sse("[DONE]")
            return
        out: Outcome = event[1]
        remember_reply(endpoint, job.prompt_ids, out, "".join(texts))
        yield sse(with_usage_null(render.finish(out, job.session), include_usage))
        if include_usage:
            yield sse({**render.base(), "choices": [], "usage": usage(out),
                       "sbr": sbr(out, job.session)})
        yield sse("[DONE]")

    # ----------------------------------------------------------------- routes

    errors_doc: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorResponse, "description": "Invalid request"},
        404: {"model": ErrorResponse, "description": "Model not found"},
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
        """Chat completion over the engine's chat template (OpenAI-compatible)."""
        p = prep.chat(req)
        render = Renderer("chat.completion", f"chatcmpl-{uuid.uuid4().hex}", p.model,
                          logprobs=p.logprobs, tokenizer=tokenizer)
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await run_job(request, "chat", p, req.stream, include, render)

    @app.post(
        "/v1/completions",
        responses={200: {"model": CompletionResponse, "content": sse_doc}, **errors_doc},
    )
    async def completions(req: CompletionRequest, request: Request) -> Response:
        """Raw text (or token-id) completion (OpenAI-compatible)."""
        p = prep.completion(req)
        render = Renderer("text_completion", f"cmpl-{uuid.uuid4().hex}", p.model, echo=p.echo,
                          logprobs=p.logprobs, tokenizer=tokenizer)
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await run_job(request, "completions", p, req.stream, include, render)

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "sbrbench",
                "root": names.primary, "max_model_len": context}

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        """The loaded model, under its name and each alias."""
        return {"object": "list", "data": [card(n) for n in names.all]}

    @app.get("/v1/models/{model_id}", response_model=ModelCard,
             responses={404: {"model": ErrorResponse, "description": "Model not found"}})
    async def model(model_id: str) -> dict[str, Any]:
        """One served model name (404 model_not_found for any other)."""
        return card(names.resolve(model_id))

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> Any:
        """Liveness: 200 while the engine worker is alive."""
        body = {
            "status": "ok" if worker.alive() else "dead",
            "model": names.primary,
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
        """Prometheus text: requests, TTFT, queue depth and wait, cache hits, replay tokens,
        evictions, pool use."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    bounds = {"vocab": vocab - 1, "context": context}
    protected = ["/health", "/metrics"]
    secured = [p for p in protected if p.lstrip("/") not in key_exempt] if keys else []
    app.openapi = lambda: _openapi(app, bounds, bool(keys), secured)  # type: ignore[method-assign]
    return app


def _engine_error(e: BaseException) -> ApiError:
    if isinstance(e, BudgetError):
        return ApiError(400, str(e), code="budget_exceeded")
    if isinstance(e, UserError):
        return ApiError(400, str(e), code="invalid_request")
    if isinstance(e, asyncio.CancelledError):
        return ApiError(499, "cancelled", code="cancelled")
    return ApiError(500, f"engine error: {type(e).__name__}: {e}", type="server_error")


def _endpoint_label(request: Request) -> str | None:
    return {"/v1/chat/completions": "chat", "/v1/completions": "completions"}.get(request.url.path)


def _openapi(app: FastAPI, bounds: dict[str, int], keyed: bool, secured: list[str]) -> dict:
    """The schema, without FastAPI's 422 (we answer 400 with OpenAI-style bodies), with this
    engine's bounds on token ids and max_tokens (the request models are static), and the bearer
    scheme on what needs the key."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    _fill_bounds(schema, bounds)
    for path, item in schema.get("paths", {}).items():
        for op in item.values():
            op.get("responses", {}).pop("422", None)
            if keyed and (path.startswith("/v1/") or path in secured):
                op["security"] = [{"bearer": []}]
                op["responses"]["401"] = {
                    "description": "Missing or wrong API key",
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                }
    components = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if keyed:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
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
