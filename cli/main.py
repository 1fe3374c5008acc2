"""Entry point of the `keybrake` command: one typer app, each command group in its own module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="keybrake",
    help="Dollar-capped, revocable vault keys for vendor APIs called from Argo Workflows.",
    no_args_is_help=True,
    add_completion=True,
)


def _register() -> None:
    from keybrake.cli import serve, templates

    app.command()(serve.serve)
    app.add_typer(templates.app, name="templates")


def main() -> None:
    _register()
    app()
