"""Test doubles for the scenario runners: a trivial fake target and a cache-only target.

`CacheOnlyTarget` drives `engine.cache.CacheManager` in the same call sequence as
`engine.runtime.Engine` (begin, alloc, insert + admit at the prompt's grid positions, insert +
admit the reply's end grid position, finish), without a model: replay numbers in milliseconds.
"""

from __future__ import annotations

import hashlib
from typing import Any

import typer
from typer.testing import CliRunner

from engine.errors import UserError
from sbrbench.targets import Request, Response

CHUNK = 64


def reply_tokens(prompt: tuple[int, ...], n: int) -> list[int]:
    """Deterministic 'generated' ids: a function of the prompt only (as a greedy model's)."""
    h = hashlib.sha256(bytes(t % 256 for t in prompt[-512:])).digest()
    return [97 + h[k % len(h)] % 26 for k in range(n)]


class FakeTarget:
    """Deterministic responses; optional per-request errors or exceptions, KeyboardInterrupt."""

    kind = "fake"

    def __init__(
        self,
        *,
        fail: set[int] = frozenset(),
        raise_on: set[int] = frozenset(),
        interrupt_after: int | None = None,
        concurrency: int = 1,
    ) -> None:
        self.fail, self.raise_on, self.interrupt_after = set(fail), set(raise_on), interrupt_after
        self.max_concurrency = concurrency
        self.sent: list[Request] = []
        self.closed = False

    def send(self, req: Request) -> Response:
        k = len(self.sent)
        self.sent.append(req)
        if self.interrupt_after is not None and k >= self.interrupt_after:
            raise KeyboardInterrupt
        if k in self.raise_on:
            raise RuntimeError(f"boom at request {k}")
        if k in self.fail:
            return Response(error=f"fake failure at request {k}")
        toks = reply_tokens(req.prompt_ids, req.max_tokens)
        n = len(req.prompt_ids)
        return Response(
            ttft_s=1e-3 * (1 + n % 7),
            e2e_s=2e-3 * (1 + n % 7),
            prompt_tokens=n,
            cached_tokens=0,
            snapshot_pos=0,
            replay_tokens=n % 13,
            new_tokens=n,
            tokens=toks,
            text=bytes(toks).decode(),
            generated_tokens=len(toks),
            logits_sha256=hashlib.sha256(bytes(toks)).hexdigest(),
        )

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def engine_info(self) -> dict[str, Any]:
        return {"policy": "fake", "preset": "none"}

    def close(self) -> None:
        self.closed = True


class CacheOnlyTarget:
    """engine.cache decisions without a model; TTFT modelled as (replay + new) microseconds."""

    kind = "cache-only"
    max_concurrency = 1

    def __init__(
        self,
        policy: str,
        *,
        slots: int = 16,
        k: int = 8,
        page_size: int = 16,
        kv_pages: int = 16384,
        snapshot_interval: int = 0,
    ) -> None:
        from engine.cache.manager import CacheConfig, CacheManager

        opts = {"k": k} if policy == "tail-pin" else {}
        self.cm = CacheManager(
            CacheConfig(
                page_size=page_size,
                chunk=CHUNK,
                kv_pages=kv_pages,
                snapshot_slots=slots,
                snapshot_bytes=1,
                snapshot_interval=snapshot_interval,
                policy=policy,
                policy_opts=opts,
            )
        )
        self.policy = policy

    def send(self, req: Request) -> Response:
        cm, ps = self.cm, self.cm.cfg.page_size
        prompt = list(req.prompt_ids)
        L = len(prompt)
        plan = cm.begin(prompt, req.session)
        m, s = plan.matched, plan.restore_pos
        out = reply_tokens(req.prompt_ids, req.max_tokens)
        n_max = L + len(out)
        pages = plan.kv_pages + cm.alloc_pages(-(-n_max // ps) - m // ps, plan)
        pages = cm.insert(plan, prompt[: L // ps * ps], pages)
        g0 = L // CHUNK * CHUNK
        for pos in plan.admit_positions:
            cm.admit(plan, prompt, pos)
        full = prompt + out
        end = len(full) // CHUNK * CHUNK
        cm.insert(plan, full[: len(full) // ps * ps], pages)
        if end > g0:
            cm.admit(plan, full, end)
        cm.finish(plan, full)
        digest = hashlib.sha256(bytes(t % 256 for t in full)).hexdigest()
        return Response(
            ttft_s=(m - s + L - m) * 1e-6,
            e2e_s=(m - s + n_max - m) * 1e-6,
            prompt_tokens=L,
            cached_tokens=m,
            snapshot_pos=s,
            replay_tokens=m - s,
            new_tokens=L - m,
            tokens=out,
            text=bytes(out).decode(),
            generated_tokens=len(out),
            logits_sha256=digest,
        )

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def engine_info(self) -> dict[str, Any]:
        return {"policy": self.policy}

    def cache_stats(self) -> dict[str, Any]:
        return self.cm.stats()

    def close(self) -> None:
        pass


def cli_app() -> typer.Typer:
    """A Typer app with this issue's verbs (sbrbench.cli also imports verbs of other issues)."""
    from sbrbench import cli_compare, cli_run

    app = typer.Typer(pretty_exceptions_enable=False)
    cli_run.register(app)
    cli_compare.register(app)
    return app


def invoke(args: list[str]) -> tuple[int, str]:
    """Run the CLI like `sbrbench.cli.main`: UserError -> (2, its message). Wide tables."""
    from rich.console import Console

    from sbrbench import cli_compare, cli_run

    saved = cli_run.console, cli_compare.console
    cli_run.console = cli_compare.console = Console(width=200)
    try:
        res = CliRunner().invoke(cli_app(), args, catch_exceptions=True)
    finally:
        cli_run.console, cli_compare.console = saved
    if isinstance(res.exception, UserError):
        return 2, str(res.exception)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output
