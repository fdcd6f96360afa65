"""The engine's thread: one request at a time, from a bounded queue, tokens back to the loop.

The engine runs one request at a time (no batching); requests wait in a bounded queue, and
`submit` raises QueueFull when it is full (the app answers 503 with Retry-After). Text pieces
flow from the worker to the request's coroutine through `loop.call_soon_threadsafe`; a client
that disconnects sets its job's cancel flag, which the engine sees through `on_token` returning
False.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from engine.chat import ChatTemplate, TextStream
from engine.errors import BudgetError, UserError
from engine.runtime import GenerateResult, SamplingParams
from engine.server.logprobs import LogitsTap, TokenChoice

log = logging.getLogger("engine.server")


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


class Piece(NamedTuple):
    """Reply text safe to show now, and the tokens it came from (with logprobs requested)."""

    text: str
    tokens: list[TokenChoice]


@dataclass(eq=False)
class Job:
    """One generation request on its way through the worker thread.

    logprobs: None, or how many alternatives to report per token (0: the token's own only).
    """

    endpoint: str  # metrics label: chat | completions
    prompt_ids: list[int]
    params: SamplingParams
    session: str | None
    text: TextStream
    loop: asyncio.AbstractEventLoop
    logprobs: int | None = None
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
    seed: int


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
        self.tap = LogitsTap(engine)
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
        """Seconds until a queue slot is likely free: the recent request time, times the
        requests ahead (whole seconds, as Retry-After wants them; 1 to 60)."""
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
            except Exception as e:  # a bug in the server: answer 500, keep serving
                log.exception("request failed")
                job.post("error", e)
            finally:
                self._current = None
                self.cache_stats = self._read_cache_stats()

    def _execute(self, job: Job) -> None:
        job.started = time.perf_counter()
        ignore_eos = job.params.ignore_eos
        sampled = 0  # tokens the engine sampled so far (EOS included)
        held: list[TokenChoice] = []  # tokens whose text TextStream still holds back

        def on_token(token_id: int) -> bool:
            nonlocal sampled
            if job.cancel.is_set():
                return False
            index, sampled = sampled, sampled + 1
            if token_id == self.eos_id and not ignore_eos:
                return True  # the end-of-turn marker: not part of the reply text
            if job.logprobs is not None:
                held.append(self.tap.choice(index, token_id, job.logprobs))
            delta = job.text.push(token_id)
            if delta.text:
                job.post("delta", Piece(delta.text, held[:]))
                held.clear()
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
        if tail or held:
            job.post("delta", Piece(tail, held[:]))
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
        seed = job.params.seed if job.params.seed is not None else 0
        out = Outcome(result, finish, reply_ids, job.started - job.submitted, seed)
        self.on_finish(job, out, finish)
        job.post("done", out)
