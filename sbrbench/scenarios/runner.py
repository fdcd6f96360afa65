"""The runner: sends a scenario's waves to a target, turns each Response into a result row.

Requests of one wave are independent and go concurrently when the target allows (at most
`concurrency` in flight), as soon as a slot is free, at their step's `at_s` (trace timestamps),
or at open-loop arrival times (`Arrivals`: Poisson or gamma, as vLLM's `bench serve` draws
them); the next wave is asked for once every reply of this one is in (conversations grow on
them).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from engine.errors import UserError
from sbrbench.scenarios.base import Scenario, Step
from sbrbench.targets.base import Request, Response, Target


class RunOutcome(NamedTuple):
    """rows: finished requests; errors: rows with an error; interrupted: Ctrl-C ended the run;
    aborted: why the runner stopped early on its own (consecutive failures), else None."""

    rows: int
    errors: int
    interrupted: bool
    aborted: str | None = None


class Arrivals:
    """Open-loop send times: requests arrive at `rate` per second, the gaps drawn from a gamma
    distribution of shape `burstiness` (1: a Poisson process; below 1 burstier, above 1 more
    regular) and mean 1/rate, as vLLM's `bench serve --request-rate R --burstiness B` draws
    them. The first request arrives at 0; `rate` inf sends everything at once."""

    def __init__(self, rate: float, burstiness: float = 1.0, seed: int = 0) -> None:
        if not rate > 0:
            raise UserError(f"--request-rate must be > 0, got {rate:g}")
        if not (burstiness > 0 and math.isfinite(burstiness)):
            raise UserError(f"--burstiness must be a positive number, got {burstiness:g}")
        self.rate, self.burstiness = rate, burstiness
        self.rng = random.Random(f"arrivals/{seed}")
        self._next = 0.0

    def next_at(self) -> float:
        """The next request's arrival, in seconds from the run start."""
        at = self._next
        if math.isfinite(self.rate):
            theta = 1.0 / (self.rate * self.burstiness)
            self._next += self.rng.gammavariate(self.burstiness, theta)
        return at

    def describe(self) -> dict[str, Any]:
        return {"request_rate": self.rate, "burstiness": self.burstiness,
                "process": "poisson" if self.burstiness == 1 else "gamma"}


@dataclass
class _Clock:
    t0: float = field(default_factory=time.perf_counter)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def wait_until(self, at_s: float | None) -> None:
        if at_s is not None:
            delay = at_s - self.now()
            if delay > 0:
                time.sleep(delay)


def _safe_send(target: Target, req: Request) -> Response:
    """target.send, with any exception of the target turned into a row error."""
    try:
        return target.send(req)
    except Exception as e:  # noqa: BLE001 - a failing request is data, the run goes on
        return Response(prompt_tokens=len(req.prompt_ids), error=f"{type(e).__name__}: {e}")


class Sent(NamedTuple):
    """When one request was due (None: as soon as possible), sent and finished (seconds from the
    run start), and what it measured."""

    due_s: float | None
    started_s: float
    done_s: float
    resp: Response


def make_row(i: int, step: Step, sent: Sent) -> dict[str, Any]:
    """A result row: the step's fields, then what the target measured (Response.row)."""
    req = step.request
    row: dict[str, Any] = {"i": i, **step.row}
    row.setdefault("depth", len(req.prompt_ids))
    row["session"] = req.session
    if sent.due_s is not None:
        row["due_s"] = round(sent.due_s, 6)
    row["t_s"] = round(sent.started_s, 6)
    row["done_s"] = round(sent.done_s, 6)
    row.update(sent.resp.row())
    if row.get("prompt_tokens") is None:
        row["prompt_tokens"] = len(req.prompt_ids)
    return row


class _Abort(Exception):
    """The runner's own stop (too many consecutive failures)."""


def run_scenario(
    scenario: Scenario,
    target: Target,
    on_row: Callable[[dict[str, Any]], None],
    concurrency: int = 1,
    *,
    arrivals: Arrivals | None = None,
    abort_after: int | None = None,
) -> RunOutcome:
    """Send every wave of `scenario` to `target` (after `scenario.prepare(target)`, which is
    idempotent), calling `on_row` with each finished row.

    concurrency: requests in flight at most (capped by the target's max_concurrency).
    arrivals: open-loop send times (a request whose wave is not ready by then goes when it is;
    its row keeps both, `due_s` and `t_s`); without, each request goes as soon as a slot is
    free, or at its step's `at_s` (trace timestamps). abort_after: stop after this many
    consecutive failed requests (a dead server), keeping every row. KeyboardInterrupt stops the
    run: rows already passed to `on_row` stay, and the outcome says it was interrupted.
    """
    scenario.prepare(target)
    clock = _Clock()
    conc = max(1, min(concurrency, getattr(target, "max_concurrency", 1)))
    n = rows = errors = streak = 0
    last_error = ""
    pool = ThreadPoolExecutor(conc, thread_name_prefix="sbr-send") if conc > 1 else None

    def due(step: Step) -> float | None:
        return arrivals.next_at() if arrivals is not None else step.at_s

    def send(step: Step, due_s: float | None) -> Sent:
        clock.wait_until(due_s)
        started = clock.now()
        resp = _safe_send(target, step.request)
        return Sent(due_s, started, clock.now(), resp)

    def finish(step: Step, sent: Sent, i: int) -> None:
        nonlocal rows, errors, streak, last_error
        on_row(make_row(i, step, sent))
        rows += 1
        if sent.resp.error:
            errors += 1
            streak += 1
            last_error = sent.resp.error
        else:
            streak = 0
        if step.on_done:
            step.on_done(sent.resp)
        if abort_after is not None and streak >= abort_after:
            raise _Abort(f"stopped after {streak} consecutive failed requests "
                         f"(last: {last_error})")

    try:
        for wave in scenario.waves():
            if pool is None:
                for step in wave:
                    sent = send(step, due(step))
                    finish(step, sent, n)
                    n += 1
            else:
                n = _run_wave_concurrent(pool, wave, conc, n, due, send, finish)
    except KeyboardInterrupt:
        return RunOutcome(rows, errors, True)
    except _Abort as e:
        return RunOutcome(rows, errors, False, str(e))
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    return RunOutcome(rows, errors, False)


def _run_wave_concurrent(
    pool: ThreadPoolExecutor,
    wave: Sequence[Step],
    conc: int,
    n: int,
    due: Callable[[Step], float | None],
    send: Callable[[Step, float | None], Sent],
    finish: Callable[[Step, Sent, int], None],
) -> int:
    """At most `conc` requests in flight, submitted in order; rows are recorded as requests
    complete. On an abort, the requests already in flight finish and are recorded first."""
    pending: dict[Future, tuple[int, Step]] = {}
    queue = iter(wave)
    exhausted = False
    abort: _Abort | None = None
    while True:
        while abort is None and not exhausted and len(pending) < conc:
            step = next(queue, None)
            if step is None:
                exhausted = True
                break
            pending[pool.submit(send, step, due(step))] = (n, step)
            n += 1
        if not pending:
            if abort is not None:
                raise abort
            return n
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            i, step = pending.pop(fut)
            try:
                finish(step, fut.result(), i)
            except _Abort as e:
                abort = abort or e
