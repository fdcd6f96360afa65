"""CLI verbs of this module (placeholder until its issue lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("decay", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _placeholder() -> None:
        """Not built yet."""
        typer.secho("sbrbench decay: not built yet", fg="red", err=True)
        raise typer.Exit(2)
