"""The load bench's seed (months of use: many keys, a long audit log) is SQL written against the
schema it fills, and it runs only in `make bench`: held here to the current schema of both
backends, so a migration that renames a table cannot break the bench unnoticed."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg

from tests.bench.run import seed

TABLES = ("vault_keys", "usage_counts", "spend_window", "audit")


def test_the_bench_seeds_a_sqlite_database(tmp_path: Path) -> None:
    path = tmp_path / "seeded.db"
    seed(f"sqlite:///{path}", keys=3, audit_rows=5)
    conn = sqlite3.connect(path)
    try:
        counts = [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES]
    finally:
        conn.close()
    assert counts == [3, 3, 3, 5]


def test_the_bench_seeds_a_postgres_database(pg_url: str) -> None:
    async def counts(url: str) -> list[int]:
        conn = await asyncpg.connect(url)
        try:
            return [await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES]
        finally:
            await conn.close()

    seed(pg_url, keys=3, audit_rows=5)
    assert asyncio.run(counts(pg_url)) == [3, 3, 3, 5]
