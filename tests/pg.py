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
