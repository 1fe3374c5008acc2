"""`keybrake db`: apply the schema migrations, for operators who run them apart from `serve`."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import typer

from keybrake.cli._common import EXIT_USAGE, console, fail
from keybrake.proxy.errors import ConfigError, StoreUnavailable

app = typer.Typer(help="Database schema.", no_args_is_help=True)


def upgrade_database(url: str) -> None:
    """Open the store once: opening applies pending migrations (under a lock on PostgreSQL)."""

    from keybrake.proxy.store import open_store

    async def run() -> None:
        store = open_store(url)
        await store.open()
        await store.close()

    asyncio.run(run())


@app.command(epilog="Example: KEYBRAKE_DATABASE_URL=postgresql://... keybrake db upgrade")
def upgrade(
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", envvar="KEYBRAKE_DATABASE_URL", help="Database to upgrade."),
    ] = None,
) -> None:
    """Apply pending schema migrations and load this build's ledger rules (`keybrake serve` also
    does this at start); refused when a newer build's schema or rules are there."""
    url = database_url or os.environ.get("KEYBRAKE_DATABASE_URL") or "sqlite:///keybrake.db"
    try:
        upgrade_database(url)
    except (ConfigError, StoreUnavailable) as exc:
        fail(str(exc), EXIT_USAGE)
    shown = url.split("@")[-1] if "@" in url else url
    from keybrake.proxy.decisions import RULE_VERSION

    console().print(
        f"database {shown} is at the current schema, with ledger rules {RULE_VERSION}",
        soft_wrap=True,
    )
