"""The `sbrbench` command line: one Typer app, verbs registered from their own modules."""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from typer.core import TyperGroup

from engine.errors import UserError


def plain_markup(text: str) -> str:
    """Rich markup that shows `text` exactly: brackets escaped and emoji codes (":m:" in
    "s:m:L") broken, since Rich has no escape for those (an empty style tag before each colon
    splits every code across two segments)."""
    from rich.emoji import Emoji

    text = escape(text)
    if Emoji.replace(text) != text:
        text = text.replace(":", "[b][/b]:")
    return text


def _plain_help(cmd: Any) -> None:
    """Make every help text of `cmd` and of the verbs below it plain (see PlainHelpGroup)."""
    for attr in ("help", "short_help", "epilog"):
        value = getattr(cmd, attr, None)
        if isinstance(value, str):
            setattr(cmd, attr, plain_markup(value))
    for param in cmd.params:
        value = getattr(param, "help", None)
        if isinstance(value, str):
            param.help = plain_markup(value)
    for sub in (getattr(cmd, "commands", None) or {}).values():  # a group's verbs
        _plain_help(sub)


class PlainHelpGroup(TyperGroup):
    """The root command. Help texts are plain text, never markup: Typer's rich mode would eat
    "[engine]" or "[default: x]" written in a help and turn "s:m:L" into an emoji, so each time
    Typer builds the command tree (every invocation, the test runner's too) the help of every
    verb and option below it is escaped once, here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain_help(self)


app = typer.Typer(
    name="sbrbench",
    cls=PlainHelpGroup,
    help="Benchmark and explain the prefix cache of hybrid (attention + Gated DeltaNet) LLMs.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True, markup=False, emoji=False, highlight=False)


def _version(value: bool) -> None:
    if value:
        from sbrbench import __version__

        typer.echo(f"sbrbench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Benchmark and explain the prefix cache of hybrid (attention + Gated DeltaNet) LLMs."""


def _register() -> None:
    # Each verb lives in its own module so that work on one never touches another; the modules
    # import torch, scipy and the engine only inside the verbs, so --help and --version are fast.
    from sbrbench import (
        cli_bench,
        cli_compare,
        cli_decay,
        cli_generate,
        cli_run,
        cli_serve,
        cli_sim,
    )

    for mod in (cli_generate, cli_run, cli_compare, cli_decay, cli_sim, cli_serve, cli_bench):
        mod.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one red line and exit code 2."""
    try:
        app(args=argv if argv is not None else sys.argv[1:], prog_name="sbrbench",
            standalone_mode=True)
    except UserError as e:
        err_console.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
