"""SQLite store: one writer thread that group-commits, readers on their own connections.

Writes from concurrent calls are queued to a single thread, which runs every queued operation in one
`BEGIN IMMEDIATE` transaction and commits once: no "database is locked" within a process, and one
commit per batch instead of per call. Several processes (`serve --workers N`) share the file through
SQLite's own lock. WAL with synchronous=NORMAL: a committed transaction survives `kill -9` of the
process (it is in the WAL file); only an OS crash could lose the last few.

The operations are `keybrake.proxy.store.operations`'; the ledger is `sqlite_ledger`'s. The ledger's
rule version (`decisions.RULE_VERSION`) is the file's `user_version`: a build never lowers it, and
one that finds it higher than its own forwards nothing.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from keybrake.proxy.decisions import RULE_VERSION
from keybrake.proxy.errors import RulesNewer, SchemaNewer, StoreUnavailable
from keybrake.proxy.store import _schema, sqlite_ledger
from keybrake.proxy.store.operations import SQLStore
from keybrake.proxy.store.records import Admission, Reservation, Settlement
from keybrake.proxy.store.sql import SQLITE, Op, Refused, run_sync

__all__ = ["MIGRATIONS", "SQLiteStore"]

T = TypeVar("T")

# The tables both backends have are stated once, in `_schema`; these add what only SQLite does.
_TYPES = _schema.SQLITE_TYPES

MIGRATIONS: list[str] = [
    # 1: the first tables.
    _schema.first_tables(_TYPES)
    + """
    CREATE INDEX audit_in_flight ON audit (decision) WHERE decision = 'in_flight';
    """,
    # 2: spend in hourly buckets of a rolling window, budgets, and keys' new caps. SQLite cannot
    # drop a NOT NULL: vault_keys is rebuilt, with a daily cap a key may leave out.
    _schema.spend_window(_TYPES, day_start_hour="CAST(strftime('%s', day) AS INTEGER) / 3600")
    + _schema.vault_keys(
        _TYPES,
        table="vault_keys_new",
        daily_cap_required=False,
        added=(
            "allowed_accounts TEXT NOT NULL DEFAULT '[]'",
            "total_cap_micros INTEGER",
            "max_per_caller_micros INTEGER",
            "budget_id TEXT",
        ),
    )
    + """
    INSERT INTO vault_keys_new (key_id, key_hash, vendor, label, daily_cap_micros,
            max_per_call_micros, allowed_endpoints, metadata, dedupe_window_s, created_at,
            expires_at, revoked_at)
        SELECT key_id, key_hash, vendor, label, daily_cap_micros, max_per_call_micros,
               allowed_endpoints, metadata, dedupe_window_s, created_at, expires_at, revoked_at
          FROM vault_keys;
    DROP TABLE vault_keys;
    ALTER TABLE vault_keys_new RENAME TO vault_keys;
    CREATE INDEX vault_keys_label ON vault_keys (label);
    CREATE INDEX vault_keys_budget ON vault_keys (budget_id);
    ALTER TABLE replays ADD COLUMN audit_id INTEGER;
    ALTER TABLE replays ADD COLUMN forwarded_key TEXT;
    ALTER TABLE audit ADD COLUMN budget_id TEXT;
    CREATE INDEX audit_budget ON audit (budget_id, id);
    """,
    # 3: scoped issuers, and what each key and budget was issued for.
    _schema.issuers(_TYPES)
    + """
    ALTER TABLE vault_keys ADD COLUMN issuer_id TEXT;
    ALTER TABLE vault_keys ADD COLUMN namespace TEXT;
    ALTER TABLE vault_keys ADD COLUMN service_account TEXT;
    CREATE INDEX vault_keys_issuer ON vault_keys (issuer_id);
    ALTER TABLE budgets ADD COLUMN issuer_id TEXT;
    ALTER TABLE budgets ADD COLUMN namespace TEXT;
    ALTER TABLE budgets ADD COLUMN service_account TEXT;
    """,
    # 4: listings page newest first.
    _schema.LISTING_INDEXES,
    # 5: threshold alerts.
    _schema.alerts(_TYPES),
    # 6: alert thresholds of their own, dashboard sessions, runs' newest keys and budgets.
    _schema.sessions(_TYPES),
    # 7: "paid for" marks name their payer. Dedupe tokens gain the fan-out item
    # (`decisions.dedupe_token`), read from each row's audit row, so a retry straddling the
    # upgrade still matches its first attempt.
    _schema.paid_for(_TYPES)
    + """
    UPDATE replays SET token = token || ':' || coalesce((
        SELECT CASE WHEN instr(a.caller_tag, '@') > 0
                    THEN substr(a.caller_tag, 1, instr(a.caller_tag, '@') - 1) ELSE '' END
          FROM audit a WHERE a.id = replays.audit_id), '')
     WHERE kind = 'dedupe';
    """,
    # 8: constraints on keys and budgets.
    _schema.constraints(_TYPES),
    # 9: the revision of a key's or budget's constraints, which patches change.
    _schema.policy_revisions(_TYPES),
]


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


_Op = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class _Writer:
    """A thread owning the only write connection; runs queued operations in shared transactions."""

    MAX_BATCH = 512

    def __init__(self, path: str) -> None:
        self._path = path
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name="keybrake-sqlite-writer", daemon=True
        )
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # Counts the write transactions begun: what ran in one saw the same schema (the writer
        # holds the database's write lock from BEGIN IMMEDIATE to COMMIT).
        self.transaction = 0

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise StoreUnavailable(f"cannot open SQLite database {self._path}: {self._error}")

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, future, loop))
        return future

    def _run(self) -> None:
        try:
            conn = _connect(self._path)
        except sqlite3.Error as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._run_batch(conn, batch)
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            self.transaction += 1
            results = [fn(conn) for fn, _, _ in batch]
            conn.execute("COMMIT")
        except Exception:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # One operation failed: run each alone, so only the failing one sees the error, and
            # hand each back as it commits (a rare path: one wake-up each is no cost here).
            for op in batch:
                _hand_back([self._run_alone(conn, op)])
            return
        _hand_back(
            [
                (future, loop, result, None)
                for (_, future, loop), result in zip(batch, results, strict=True)
            ]
        )

    def _run_alone(self, conn: sqlite3.Connection, op: _Op) -> _Outcome:
        fn, future, loop = op
        try:
            conn.execute("BEGIN IMMEDIATE")
            self.transaction += 1
            result = fn(conn)
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # The database's own errors mean it cannot take the write (fail closed: 503); any
            # other exception is a bug in the operation and stays one (logged, 500).
            error: BaseException = (
                StoreUnavailable(f"database write failed: {exc}")
                if isinstance(exc, sqlite3.Error)
                else exc
            )
            return future, loop, None, error
        return future, loop, result, None


# A finished operation: its future, the loop awaiting it, and its result or error.
_Outcome = tuple["asyncio.Future[Any]", asyncio.AbstractEventLoop, Any, BaseException | None]


def _hand_back(outcomes: list[_Outcome]) -> None:
    """Resolve a batch's futures with one wake-up of each loop awaiting them, not one each: a
    wake-up is a write to the loop's self-pipe, a system call, which costs more than the rest
    of resolving a future."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[1], []).append(outcome)
    for loop, resolved in by_loop.items():
        loop.call_soon_threadsafe(_resolve_all, resolved)


def _resolve_all(outcomes: list[_Outcome]) -> None:
    for future, _, result, error in outcomes:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class SQLiteStore(SQLStore):
    dialect = SQLITE

    def __init__(self, path: str | Path, *, rule_version: int = RULE_VERSION) -> None:
        self.path = str(path)
        self.rule_version = rule_version
        self._schema_cookie: int | None = None
        self._versions_read = -1  # the writer's transaction that last read the versions
        self._writer = _Writer(self.path)
        self._local = threading.local()

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.migrate)
        self._writer.start()

    def migrate(self) -> int:
        """Apply pending migrations and record this build's rule version; returns the schema
        version. Safe from several processes."""
        try:
            conn = _connect(self.path)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite database {self.path}: {exc}") from exc
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            version = row[0] or 0
            if version > len(MIGRATIONS):
                raise SchemaNewer(version, len(MIGRATIONS))
            rules = conn.execute("PRAGMA user_version").fetchone()[0]
            if rules > self.rule_version:
                raise RulesNewer(rules, self.rule_version)
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
            if rules < self.rule_version:
                conn.execute(f"PRAGMA user_version = {int(self.rule_version)}")
            # Any later change of the schema (a newer build migrating the file) changes this. Read
            # before COMMIT, under the write lock: after it, another process could migrate first.
            self._schema_cookie = conn.execute("PRAGMA schema_version").fetchone()[0]
            conn.execute("COMMIT")
            return len(MIGRATIONS)
        except (sqlite3.Error, SchemaNewer) as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, SchemaNewer):
                raise
            raise StoreUnavailable(f"cannot migrate SQLite database {self.path}: {exc}") from exc
        finally:
            conn.close()

    async def close(self) -> None:
        await asyncio.to_thread(self._writer.stop)

    async def ping(self) -> None:
        await self._read_with(self._check_versions)

    def _check_versions(self, conn: sqlite3.Connection) -> None:
        """Refuse a file a newer build has migrated, or loaded newer rules into."""
        version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
        if version > len(MIGRATIONS):
            raise SchemaNewer(version, len(MIGRATIONS))
        rules = conn.execute("PRAGMA user_version").fetchone()[0]
        if rules > self.rule_version:
            raise RulesNewer(rules, self.rule_version)

    # -- the drivers ---------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
        return conn

    async def _read_with(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            try:
                return fn(self._reader())
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"database read failed: {exc}") from exc

        return await asyncio.to_thread(run)

    async def _read(self, make: Callable[[], Op[T]]) -> T:
        return await self._read_with(lambda conn: run_sync(conn, make()))

    async def _write(self, make: Callable[[], Op[T]]) -> T:
        return await self._writer.submit(lambda conn: _alone(conn, make))

    # -- the ledger ----------------------------------------------------------------------------

    async def reserve(self, reservation: Reservation) -> Admission:
        def op(conn: sqlite3.Connection) -> Admission:
            # The schema and rules this process started with, still: a newer build that migrated
            # the file since has rules this process does not know, so it forwards nothing.
            # Two header reads (a SELECT of both pragmas costs twice as much), once per write
            # transaction: the reservations batched in one saw the same file.
            writer = self._writer
            if self._versions_read != writer.transaction:
                cookie = conn.execute("PRAGMA schema_version").fetchone()[0]
                rules = conn.execute("PRAGMA user_version").fetchone()[0]
                if cookie != self._schema_cookie or rules != self.rule_version:
                    self._check_versions(conn)
                    self._schema_cookie = cookie
                self._versions_read = writer.transaction
            return sqlite_ledger.reserve(conn, reservation)

        return await self._writer.submit(op)

    async def settle(self, settlement: Settlement) -> None:
        await self._writer.submit(lambda conn: sqlite_ledger.settle(conn, settlement))

    async def sweep(self, older_than: datetime) -> int:
        return await self._writer.submit(lambda conn: sqlite_ledger.sweep(conn, older_than))

    async def compact_spend(self, before_bucket: int) -> int:
        return await self._writer.submit(
            lambda conn: sqlite_ledger.compact_spend(conn, before_bucket)
        )


def _alone(conn: sqlite3.Connection, make: Callable[[], Op[T]]) -> T:
    """One operation inside the writer's shared transaction, undone alone if it refuses."""
    conn.execute("SAVEPOINT operation")
    try:
        result = run_sync(conn, make())
    except Refused as refused:
        conn.execute("ROLLBACK TO operation")
        conn.execute("RELEASE operation")
        answer: T = refused.result
        return answer
    conn.execute("RELEASE operation")
    return result
