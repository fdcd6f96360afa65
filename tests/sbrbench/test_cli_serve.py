"""`sbrbench serve`: its options reach the server (names, key, exemptions, queue), its checks
are one-line user errors."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from engine.errors import UserError
from sbrbench import cli_serve


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import engine.server  # here, not at the top: collecting this file needs no FastAPI

    got: dict[str, Any] = {}

    def fake_serve(engine: Any, **kw: Any) -> None:
        got.update(kw, engine=engine)

    monkeypatch.setattr(engine.server, "serve", fake_serve)
    return got


def _serve(args: list[str]) -> tuple[int, str, BaseException | None]:
    app = typer.Typer(pretty_exceptions_enable=False)
    cli_serve.register(app)
    app.command("other")(lambda: None)  # two commands: `serve` stays a subcommand
    res = CliRunner().invoke(app, ["serve", *args], catch_exceptions=True)
    return res.exit_code, res.output, res.exception


def test_options_reach_the_server(served: dict[str, Any]) -> None:
    code, out, exc = _serve(["--served-model-name", "qwen", "--served-model-name", "q2",
                             "--api-key", "sk-x", "--key-exempt", "health", "--max-queue", "3",
                             "--port", "0"])
    assert code == 0 and exc is None, out
    assert served["model_name"] == "tiny" and served["aliases"] == ["qwen", "q2"]
    assert served["api_keys"] == ["sk-x"] and served["key_exempt"] == ["health"]
    assert served["max_queue"] == 3 and served["host"] == "127.0.0.1"
    code, out, exc = _serve(["--port", "0", "--key-exempt", "none"])
    assert code == 0 and served["api_keys"] == [] and served["key_exempt"] == []


@pytest.mark.parametrize(
    ("args", "msg"),
    [(["--key-exempt", "docs"], "--key-exempt: unknown endpoint 'docs'"),
     (["--api-key", " "], "--api-key must not be empty")],
)
def test_bad_options_are_user_errors(served: dict[str, Any], args: list[str], msg: str) -> None:
    code, out, exc = _serve(args)
    assert isinstance(exc, UserError) and msg in str(exc) and not served


@pytest.mark.parametrize(
    ("args", "accepted"),
    [(["--max-queue", "0"], "greater than or equal to 1"),
     (["--port", "70000"], "less than or equal to 65535"),
     (["--snapshot-slots", "0"], "greater than or equal to 1"),
     (["--default-max-tokens", "0"], "greater than or equal to 1")],
)
def test_out_of_range_numbers_name_the_option_and_its_range(
        served: dict[str, Any], args: list[str], accepted: str) -> None:
    code, out, _ = _serve(args)
    text = " ".join(out.translate(str.maketrans("", "", "│╭╮╰╯─")).split())  # panel unwrapped
    assert code == 2 and f"Invalid value for '{args[0]}'" in text and accepted in text
    assert not served


def test_help_says_one_request_at_a_time() -> None:
    code, out, _ = _serve(["--help"])
    assert code == 0 and "one request at a time" in " ".join(out.split())
