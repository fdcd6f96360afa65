"""The `sbrbench` command line: one Typer app, verbs registered from their own modules."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from engine.errors import UserError

app = typer.Typer(
    name="sbrbench",
    help="Benchmark and explain the prefix cache of hybrid (attention + Gated DeltaNet) LLMs.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


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
        app(args=argv if argv is not None else sys.argv[1:], standalone_mode=True)
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
