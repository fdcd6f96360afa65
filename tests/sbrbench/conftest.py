"""Fixtures of the toolkit's tests: a deterministic fake target, a cache-only target (the
simulator's target with a microsecond cost model), our own server in this process, and the CLI
invoked as `sbrbench.cli.main` invokes it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from engine.cache.settings import CacheSettings
from engine.chat import ChatML
from engine.errors import UserError
from engine.tokenizer import ByteTokenizer
from sbrbench.costmodel import CostModel
from sbrbench.targets.base import Request, Response


def reply_tokens(prompt: tuple[int, ...], n: int) -> list[int]:
    """Deterministic 'generated' ids: a function of the prompt only (as a greedy model's)."""
    h = hashlib.sha256(bytes(t % 256 for t in prompt[-512:])).digest()
    return [97 + h[k % len(h)] % 26 for k in range(n)]


class FakeTarget:
    """Deterministic responses; optional per-request errors or exceptions, KeyboardInterrupt."""

    kind = "fake"
    template = ChatML(ByteTokenizer())

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
            tokens=toks,
            text=bytes(toks).decode(),
            ttft_s=1e-3 * (1 + n % 7),
            e2e_s=2e-3 * (1 + n % 7),
            prompt_tokens=n,
            cached_tokens=0,
            generated_tokens=len(toks),
        )

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def engine_info(self) -> dict[str, Any]:
        return {"policy": "fake", "preset": "none"}

    def close(self) -> None:
        self.closed = True


def cache_only_target(policy: str, *, slots: int = 16, k: int = 8) -> Any:
    """engine.cache decisions without a model (the simulator's target): TTFT modelled as
    (replay + new) microseconds."""
    from sbrbench.sim import SimTarget
    from sbrbench.sim.target import model_config

    opts = {"k": k} if policy == "tail-pin" else {}
    cache = CacheSettings(policy=policy, policy_opts=opts, snapshot_slots=slots,
                          snapshot_interval=0, kv_budget_tokens=16384 * 16)
    return SimTarget(cache, model_config("tiny"), CostModel(a=1e-6, b=0.0, c=0.0, restore=0.0))


@contextmanager
def our_server(**app_options: Any) -> Iterator[str]:
    """`sbrbench serve` as a library: the tiny preset's engine behind engine.server's app on a
    free loopback port of this process; yields its base URL."""
    from engine.runtime import Engine
    from engine.server import create_app, serve_in_background

    app = create_app(Engine.from_preset("tiny"), **{"model_name": "tiny", **app_options})
    with serve_in_background(app) as url:
        yield url


def cli_app() -> typer.Typer:
    """A Typer app with this issue's verbs (sbrbench.cli also imports verbs of other issues)."""
    from sbrbench import cli_compare, cli_run

    app = typer.Typer(pretty_exceptions_enable=False)
    cli_run.register(app)
    cli_compare.register(app)
    return app


def run_cli(args: list[str]) -> tuple[int, str]:
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


@pytest.fixture(name="fake_target", scope="session")
def fake_target_fixture() -> type[FakeTarget]:
    return FakeTarget


@pytest.fixture(name="cache_only_target", scope="session")
def cache_only_target_fixture() -> Any:
    return cache_only_target


@pytest.fixture(name="fake_reply", scope="session")
def fake_reply_fixture() -> Any:
    return reply_tokens


@pytest.fixture(name="our_server", scope="session")
def our_server_fixture() -> Any:
    """our_server: `with our_server(max_queue=1) as url: ...`."""
    return our_server


@pytest.fixture(name="invoke", scope="session")
def invoke_fixture() -> Any:
    """run_cli: the run and compare verbs; UserError -> (2, its message); wide tables."""
    return run_cli
