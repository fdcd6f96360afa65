"""Fixtures of the server tests: the real server (tiny preset, CPU) on a free loopback port of
this process, and helpers that read SSE streams, metrics and error bodies.

The module-wide server runs with `max_queue=1` (the 503 path is reached with three requests),
`default_max_tokens=2` (requests without max_tokens stay short) and one alias name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ALIAS = "tiny-alias"


@contextmanager
def running_server(**app_options: Any) -> Iterator[str]:
    """A fresh tiny engine behind `create_app(**app_options)` on a free port; yields its URL."""
    from engine.runtime import Engine
    from engine.server import create_app, serve_in_background

    options = {"model_name": "tiny", **app_options}
    app = create_app(Engine.from_preset("tiny"), **options)
    with serve_in_background(app) as url:
        yield url


@pytest.fixture(name="start_server", scope="session")
def start_server_fixture() -> Callable[..., AbstractContextManager[str]]:
    """running_server: `with start_server(api_keys=["k"]) as url: ...`."""
    return running_server


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_server(max_queue=1, default_max_tokens=2, aliases=[ALIAS]) as url:
        yield url


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=300) as c:
        yield c
        assert c.get("/health").json()["status"] == "ok"


def sse_events(lines: Iterator[str]) -> list[Any]:
    """The `data:` payloads of an SSE stream: parsed JSON chunks, then the string "[DONE]"."""
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def scrape(c: httpx.Client, **kw: Any) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = c.get("/metrics", **kw).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """`r` is an OpenAI-style error with this status (and code); returns its `error` object."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return dict(err)


@pytest.fixture(name="sse", scope="session")
def sse_fixture() -> Callable[[Iterator[str]], list[Any]]:
    return sse_events


@pytest.fixture(name="metrics", scope="session")
def metrics_fixture() -> Callable[..., dict[tuple[str, tuple], float]]:
    return scrape


@pytest.fixture(name="api_error", scope="session")
def api_error_fixture() -> Callable[..., dict]:
    return assert_error
