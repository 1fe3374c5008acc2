"""Entry point of the `keybrake` command: one typer app; each command in its own module."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated

import typer

from keybrake.cli import (
    _connection,
    alerts,
    audit,
    budgets,
    db,
    demo,
    events,
    issuers,
    keys,
    lint,
    reaper,
    revoke,
    serve,
    templates,
    watch,
    wrap,
)
from keybrake.cli._help import KeybrakeGroup

app = typer.Typer(
    cls=KeybrakeGroup,
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
app.add_typer(issuers.app, name="issuers")
app.command()(events.events)
app.command()(alerts.alerts)
app.command()(watch.watch)
app.command()(reaper.reaper)
app.command()(demo.demo)
app.add_typer(templates.app, name="templates")
app.command(epilog="Example: keybrake lint workflows/ --fail-on high")(lint.lint)
app.command(epilog="Example: keybrake wrap billing-agent.yaml --budget-usd 300 --diff")(wrap.wrap)
app.add_typer(db.app, name="db")


@app.callback()
def _global(
    ca_bundle: Annotated[
        Path | None,
        typer.Option(
            "--ca-bundle",
            envvar="KEYBRAKE_CA_BUNDLE",
            help="CA certificates (PEM) to check an https proxy against; default: the system's.",
        ),
    ] = None,
) -> None:
    """Dollar-capped, revocable vault keys for vendor APIs called from Argo Workflows."""
    _connection.ca_bundle = str(ca_bundle) if ca_bundle is not None else None


@app.command()
def version() -> None:
    """Print keybrake's version, then the ledger rules and database schemas it expects.

    Example: keybrake version
    """
    from keybrake.proxy.decisions import RULE_VERSION
    from keybrake.proxy.store.postgres import MIGRATIONS as POSTGRES_SCHEMA
    from keybrake.proxy.store.sqlite import MIGRATIONS as SQLITE_SCHEMA

    try:
        print(package_version("keybrake"))
    except PackageNotFoundError:
        print("unknown (not installed)")
    print(
        f"ledger rules {RULE_VERSION}; schema: SQLite {len(SQLITE_SCHEMA)}, "
        f"PostgreSQL {len(POSTGRES_SCHEMA)}"
    )


def main() -> None:
    app()
