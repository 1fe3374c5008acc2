"""A PostgreSQL database of its own for each test, on the server at 127.0.0.1:5432."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import pytest

ADMIN_URL = os.environ.get("KEYBRAKE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _admin(sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(ADMIN_URL, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@contextmanager
def pg_database() -> Iterator[str]:
    """Create a uniquely named database and yield its URL; drop it afterwards."""
    name = "keybrake_test_" + uuid.uuid4().hex[:12]
    try:
        _admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("KEYBRAKE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here (KEYBRAKE_REQUIRE_POSTGRES=1) but: {exc}")
        pytest.skip(f"no PostgreSQL server at {ADMIN_URL}: {exc}")
    base = ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Rows out of every table the migrations made (the foreign keys' triggers off meanwhile) and the
# id sequences back at their start: milliseconds, where a new database to create, migrate and
# drop takes most of a second per test.
_EMPTY = """
DO $$
DECLARE t record;
BEGIN
  SET LOCAL session_replication_role = replica;
  FOR t IN SELECT tablename FROM pg_tables
           WHERE schemaname = 'public'
             AND tablename NOT IN ('schema_version', 'ledger_rules') LOOP
    EXECUTE format('DELETE FROM public.%I', t.tablename);
  END LOOP;
  FOR t IN SELECT sequencename FROM pg_sequences WHERE schemaname = 'public' LOOP
    EXECUTE format('ALTER SEQUENCE public.%I RESTART', t.sequencename);
  END LOOP;
END $$
"""


def empty_database(url: str) -> None:
    """Make a database of the suite's as a new one is: every table the migrations made emptied
    (but the schema's and the ledger rules' versions), their id sequences restarted, no
    connection of an earlier test left."""

    async def empty() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            async with conn.transaction():
                await conn.execute(_EMPTY)
        finally:
            await conn.close()

    asyncio.run(empty())
