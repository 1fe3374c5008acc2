"""Upgrades: a replica never enforces older rules on a database a newer build has migrated.

The order (docs/deploy.md, upgrading): the new build migrates, then the replicas roll. Meanwhile
an old replica fails closed: it refuses to start on the newer schema, its /readyz fails so it
gets no traffic, and a vendor call that still reaches it is refused without being forwarded
(SQLite: the schema changed under it; PostgreSQL: the migration replaced the ledger's functions).
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from starlette.testclient import TestClient

from keybrake.proxy.decisions import RULE_VERSION
from keybrake.proxy.errors import RulesNewer, SchemaNewer
from keybrake.proxy.money import format_ts
from keybrake.proxy.store import Store, open_store
from keybrake.proxy.store.postgres import MIGRATIONS as PG_MIGRATIONS
from keybrake.proxy.store.postgres import PostgresStore
from keybrake.proxy.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from keybrake.proxy.store.sqlite import SQLiteStore
from tests.helpers import TEST_EVENT
from tests.inproc import Clock, StubUpstream, app_client, issue

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


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_retry_straddling_the_upgrade_to_fan_out_items_is_not_charged_twice(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dedupe row written before items counted held the bare fingerprint; the migration that
    brought items gives it its item from its audit row, so the pod's retry after the upgrade is
    still that call, and another item's is not."""
    from keybrake.proxy.decisions import Decision
    from keybrake.proxy.store import postgres, sqlite
    from tests.test_decision_table import NOW, key_record, reservation

    url = f"sqlite:///{tmp_path / 'items.db'}" if backend == "sqlite" else None
    url = url or str(request.getfixturevalue("pg_url"))
    module: Any = sqlite if backend == "sqlite" else postgres
    key = key_record("vk_straddle", dedupe_window=timedelta(minutes=10))

    async def run() -> None:
        with monkeypatch.context() as before:  # the schema as the build before items left it
            items = {"sqlite": 7, "postgres": 9}[backend]  # the migration that brought items
            before.setattr(module, "MIGRATIONS", module.MIGRATIONS[: items - 1])
            store = open_store(url)
            await store.open()
            await store.close()
        # The first attempt, answered, as that build recorded it: its audit row names the pod's
        # tag, and its dedupe row holds the bare fingerprint ("body"). (Written as that build's
        # columns, and its key created after the upgrade: this build writes columns that
        # build's schema lacks, and what the migration reads is the audit and dedupe rows.)
        created = NOW - timedelta(minutes=2)
        audit_id = 900_001  # beside, not in, the ids PostgreSQL's sequence hands out
        await execute(
            url,
            "INSERT INTO audit (id, ts, vendor, method, path, status, decision, key_id, label, "
            "caller_tag) VALUES (?, ?, 'stripe', 'POST', '/v1/payment_intents', 200, "
            "'forwarded', ?, ?, 'item-1@pod-a')",
            audit_id,
            format_ts(created) if backend == "sqlite" else created,
            key.key_id,
            key.label,
        )
        await execute(
            url,
            "INSERT INTO replays (key_id, kind, token, request_hash, created_at, status, headers, "
            "body, audit_id) VALUES (?, 'dedupe', 'body', 'body', ?, 200, '[]', ?, ?)",
            key.key_id,
            format_ts(created) if backend == "sqlite" else created,
            b"{}",
            audit_id,
        )

        store = open_store(url)  # the upgrade
        await store.open()
        try:
            await store.create_key(key, TEST_EVENT)
            retry = reservation(key, NOW, 3_000_000, "body", dedupe=True, tag="item-1@pod-b")
            assert (await store.reserve(retry)).decision is Decision.DEDUPLICATED
            other = reservation(key, NOW, 3_000_000, "body", dedupe=True, tag="item-2@pod-c")
            assert (await store.reserve(other)).decision is Decision.FORWARDED
        finally:
            await store.close()

    asyncio.run(run())


async def execute(url: str, sql: str, *args: Any) -> None:
    """One statement with `?` placeholders, on either backend."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.execute(sql, args)
        return
    parts = sql.split("?")
    numbered = parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], start=1))
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(numbered, *args)
    finally:
        await conn.close()


def _store_of(backend: str, url: str, rule_version: int) -> Store:
    if backend == "sqlite":
        return SQLiteStore(url.removeprefix("sqlite:///"), rule_version=rule_version)
    return PostgresStore(url, rule_version=rule_version)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_rolling_upgrade_of_the_ledger_rules(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Replicas of two builds on one database while the replicas roll: the newer build loads its
    rules; from then on the older replica forwards nothing (503, /readyz failing, a log line
    naming both versions) while the newer serves the same keys, and an older replica starting
    meanwhile refuses to start: it never loads its older rules over the newer ones."""
    url = f"sqlite:///{tmp_path / 'roll.db'}"
    if backend == "postgres":
        url = str(request.getfixturevalue("pg_url"))
    old_rules, new_rules = RULE_VERSION, RULE_VERSION + 1
    stub = StubUpstream()

    def pay(client: TestClient, key: str, amount: int) -> int:
        headers = {**FORM, "Authorization": f"Bearer {key}"}
        body = f"amount={amount}&currency=usd"
        return client.post("/stripe/v1/payment_intents", content=body, headers=headers).status_code

    old_store = _store_of(backend, url, old_rules)
    with app_client(tmp_path / "old", upstream=stub, store=old_store) as old:
        issued = issue(old)
        key = issued["vault_key"]
        assert pay(old, key, 100) == 200 and len(stub.sent) == 1

        new_store = _store_of(backend, url, new_rules)
        with app_client(tmp_path / "new", upstream=stub, store=new_store) as new:
            assert new.get("/readyz").status_code == 200

            assert pay(old, key, 200) == 503
            assert len(stub.sent) == 1  # the old replica forwarded nothing more
            ready = old.get("/readyz")
            assert ready.status_code == 503
            reason = ready.json()["reason"]
            assert f"ledger rules are version {new_rules}, newer than this build's {old_rules}" in (
                reason
            )
            assert any(reason in r.getMessage() for r in caplog.records)

            assert pay(new, key, 300) == 200 and len(stub.sent) == 2  # the same key, served

            # An old replica (re)starting during the roll refuses, and loads nothing.
            with pytest.raises(RulesNewer):
                asyncio.run(_store_of(backend, url, old_rules).open())
            assert pay(new, key, 400) == 200 and len(stub.sent) == 3
            assert new.get("/readyz").status_code == 200

    async def spent() -> int:
        store = _store_of(backend, url, new_rules)
        await store.open()
        try:
            view = await store.get_key(issued["key_id"], Clock()())
            assert view is not None
            return view.usage.spent_micros + view.usage.reserved_micros
        finally:
            await store.close()

    # Every forwarded call counted once, by one replica's rules or the other's: $1 + $3 + $4.
    assert asyncio.run(spent()) == 8_000_000


def test_loading_newer_rules_drops_every_ledger_function_of_older_builds(pg_url: str) -> None:
    """Whatever an older build left (here a reserve function of another signature), loading
    newer rules leaves only the new ledger: a replica calling an old function fails closed."""

    async def run() -> list[str]:
        await PostgresStore(pg_url).open()
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(
                "CREATE FUNCTION keybrake_reserve(p_of_an_older_build text) RETURNS void "
                "LANGUAGE sql AS 'SELECT NULL'"
            )
            await PostgresStore(pg_url, rule_version=RULE_VERSION + 1).open()
            rows = await conn.fetch(
                "SELECT p.oid::regprocedure::text AS f FROM pg_proc p "
                "WHERE p.proname = 'keybrake_reserve'"
            )
            assert await conn.fetchval("SELECT version FROM ledger_rules") == RULE_VERSION + 1
            return [r["f"] for r in rows]
        finally:
            await conn.close()

    found = asyncio.run(run())
    assert len(found) == 1 and found[0] != "keybrake_reserve(text)" and "integer" in found[0]


def test_the_ledger_sql_is_rendered_from_the_decision_module() -> None:
    from keybrake.proxy.decisions import CAP_HITS, CUT_OFF
    from keybrake.proxy.store.postgres import ledger_sql

    text = ledger_sql(7)
    assert "{{" not in text and "}}" not in text
    assert "IS DISTINCT FROM 7 THEN" in text
    assert ", ".join(f"'{d.value}'" for d in sorted(CAP_HITS)) in text
    assert ", ".join(f"'{d.value}'" for d in sorted(CUT_OFF)) in text


# Each migration as released, by its text's SHA-256 (first 16 hex digits): a database that ran
# one never runs it again, so its text must never change (`keybrake.proxy.store._schema`). A new
# migration is appended, and pinned here.
RELEASED = {
    "sqlite": """c8eb6c7ef11b3848 0236b5f688dbebab 3ab9aaacac0fc3d1 5bb75cd574f1a41a
        e9499ff006f56150 640f2c362b370193 12a83c541342c753 a708c164fe091ee4
        cc72c6d5050e8642""",
    "postgres": """46fe6edb5cd5a491 e004ebd5b5532a4b e004ebd5b5532a4b 1f2db6eae3f36c4b
        f12ebe91740a5be1 5bb75cd574f1a41a 1328485c3ba45798 06c9293afe9ee634 a6d280977daa7850
        32b3966c9b799ef9 0b43b47e8e9e8685 381bd77afb1438e0""",
}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_released_migrations_never_change(backend: str) -> None:
    import hashlib

    migrations = SQLITE_MIGRATIONS if backend == "sqlite" else PG_MIGRATIONS
    found = [hashlib.sha256(text.encode()).hexdigest()[:16] for text in migrations]
    assert found == RELEASED[backend].split()


async def _schema_of(url: str) -> list[tuple[Any, ...]]:
    """Every table's columns, every index and every function, as the database states them."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            return list(
                db.execute(
                    "SELECT type, name, tbl_name, sql FROM sqlite_master "
                    "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
                )
            )
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetch(
            "SELECT table_name, ordinal_position, column_name, data_type, is_nullable, "
            "column_default FROM information_schema.columns WHERE table_schema = 'public' "
            "ORDER BY table_name, ordinal_position"
        )
        found += await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
            "ORDER BY indexname"
        )
        found += await conn.fetch(
            "SELECT p.oid::regprocedure::text FROM pg_proc p "
            "WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1"
        )
        return [tuple(r) for r in found]
    finally:
        await conn.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_database_upgraded_to_constraints_is_a_new_one_with_its_rows(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From the schema before constraints, with a key drawing on a budget: the upgrade leaves
    both unconstrained (NULL), the request path's read still finds the key, and the schema is
    the one a new database gets."""
    from keybrake.proxy.store import postgres, sqlite
    from tests.pg import pg_database
    from tests.test_decision_table import NOW

    module: Any = sqlite if backend == "sqlite" else postgres
    stamp: Any = format_ts if backend == "sqlite" else (lambda moment: moment)

    async def run(url: str, fresh_url: str) -> None:
        with monkeypatch.context() as before:  # the build before constraints
            before.setattr(module, "MIGRATIONS", module.MIGRATIONS[:-1])
            store = open_store(url)
            await store.open()
            await store.close()
        await execute(
            url,
            "INSERT INTO budgets (budget_id, label, total_cap_micros, metadata, created_at, "
            "expires_at) VALUES ('bg_0000000000000001', 'argo/up', 5000000, '{}', ?, ?)",
            stamp(NOW),
            stamp(NOW + timedelta(hours=1)),
        )
        await execute(
            url,
            "INSERT INTO vault_keys (key_id, key_hash, vendor, label, daily_cap_micros, "
            "allowed_endpoints, metadata, dedupe_window_s, created_at, expires_at, budget_id) "
            "VALUES ('vk_up', ?, 'stripe', 'argo/up', 1000000, '[\"POST /v1/charges\"]', '{}', "
            "0, ?, ?, 'bg_0000000000000001')",
            b"up" * 16,
            stamp(NOW),
            stamp(NOW + timedelta(hours=1)),
        )
        store = open_store(url)  # the upgrade
        await store.open()
        try:
            key = await store.find_key(b"up" * 16)
            budget = await store.get_budget("bg_0000000000000001", NOW)
        finally:
            await store.close()
        assert key is not None and key.budget_id == "bg_0000000000000001"
        assert key.constraints is None and key.budget_constraints is None
        assert budget is not None and budget.budget.constraints is None
        fresh = open_store(fresh_url)
        await fresh.open()
        await fresh.close()
        assert await _schema_of(url) == await _schema_of(fresh_url)

    if backend == "sqlite":
        asyncio.run(run(f"sqlite:///{tmp_path / 'up.db'}", f"sqlite:///{tmp_path / 'new.db'}"))
        return
    with pg_database() as fresh_url:
        asyncio.run(run(str(request.getfixturevalue("pg_url")), fresh_url))
