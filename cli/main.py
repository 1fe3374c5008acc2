"""Entry point of the `keybrake` command: one typer app; each command in its own module."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import typer

from keybrake.cli import audit, budgets, db, demo, keys, revoke, serve, templates, watch

app = typer.Typer(
    name="keybrake",
    help="Dollar-capped, revocable vault keys for vendor APIs called from Argo Workflows.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

app.command(epilog="Example: keybrake serve --host 0.0.0.0 --port 8080 --workers 2")(serve.serve)
app.add_typer(keys.app, name="keys")
app.add_typer(budgets.app, name="budgets")
app.command()(revoke.revoke)
app.add_typer(audit.app, name="audit")
app.command()(watch.watch)
app.command()(demo.demo)
app.add_typer(templates.app, name="templates")
app.add_typer(db.app, name="db")


@app.command()
def version() -> None:
    """Print keybrake's version.

    Example: keybrake version
    """
    try:
        print(package_version("keybrake"))
    except PackageNotFoundError:
        print("unknown (not installed)")


def main() -> None:
    app()
