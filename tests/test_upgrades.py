"""Upgrades: a replica never enforces older rules on a database a newer build has migrated.

The order (docs/deploy.md, upgrading): the new build migrates, then the replicas roll. Meanwhile
an old replica fails closed: it refuses to start on the newer schema, its /readyz fails so it
gets no traffic, and a vendor call that still reaches it is refused without being forwarded
(SQLite: the schema changed under it; PostgreSQL: the migration replaced the ledger's functions).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from keybrake.proxy.errors import SchemaNewer
from keybrake.proxy.store import open_store
from keybrake.proxy.store.postgres import MIGRATIONS as PG_MIGRATIONS
from keybrake.proxy.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from tests.inproc import StubUpstream, app_client, issue

FORM = {"content-type": "application/x-www-form-urlencoded"}


def newer_migration_sqlite(path: Path) -> None:
    """What a newer build's migration does to the file: changes the schema, records its version."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE rules_of_a_newer_build (x INTEGER)")
        conn.execute(
            "INSERT INTO schema_version (version) VALUES (?)", (len(SQLITE_MIGRATIONS) + 1,)
        )


async def newer_migration_postgres(url: str) -> None:
    """A newer build that changes a ledger rule replaces its functions (a new signature), and
    records its version."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("DROP FUNCTION keybrake_reserve")
            await conn.execute(
                "CREATE FUNCTION keybrake_reserve(p_newer_rule text) RETURNS void "
                "LANGUAGE sql AS 'SELECT NULL'"
            )
            await conn.execute(
                "INSERT INTO schema_version (version) VALUES ($1)", len(PG_MIGRATIONS) + 1
            )
    finally:
        await conn.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_replica_refuses_to_start_on_a_newer_schema(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'up.db'}"
        if backend == "sqlite"
        else str(request.getfixturevalue("pg_url"))
    )

    async def run() -> None:
        store = open_store(url)
        await store.open()
        await store.close()
        if backend == "sqlite":
            newer_migration_sqlite(tmp_path / "up.db")
        else:
            await newer_migration_postgres(url)
        with pytest.raises(SchemaNewer, match="newer than this build's"):
            await open_store(url).open()

    asyncio.run(run())


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_running_replica_fails_closed_when_a_newer_build_migrates(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    database = tmp_path / "rolling.db"
    url = f"sqlite:///{database}" if backend == "sqlite" else str(request.getfixturevalue("pg_url"))
    stub = StubUpstream()
    with app_client(tmp_path, upstream=stub, database_url=url) as client:
        key = issue(client)["vault_key"]
        headers = {**FORM, "Authorization": f"Bearer {key}"}
        before = client.post(
            "/stripe/v1/payment_intents", content="amount=100&currency=usd", headers=headers
        )
        assert before.status_code == 200 and len(stub.sent) == 1
        assert client.get("/readyz").status_code == 200

        if backend == "sqlite":
            newer_migration_sqlite(database)
        else:
            asyncio.run(newer_migration_postgres(url))

        refused = client.post(
            "/stripe/v1/payment_intents", content="amount=200&currency=usd", headers=headers
        )
        assert refused.status_code == 503, refused.text
        assert len(stub.sent) == 1  # nothing more reached the vendor
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "newer than this build's" in ready.json()["reason"]
    if backend == "sqlite":
        assert any("newer than this build's" in r.getMessage() for r in caplog.records)
