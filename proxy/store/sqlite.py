"""SQLite store: one writer thread that group-commits, readers on their own connections.

Writes from concurrent calls are queued to a single thread, which runs every queued operation in one
`BEGIN IMMEDIATE` transaction and commits once: no "database is locked" within a process, and one
commit per batch instead of per call. Several processes (`serve --workers N`) share the file through
SQLite's own lock. WAL with synchronous=NORMAL: a committed transaction survives `kill -9` of the
process (it is in the WAL file); only an OS crash could lose the last few.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from keybrake.proxy.decisions import (
    BUCKET,
    CUT_OFF,
    WINDOW,
    Caps,
    Decision,
    Prior,
    admit,
    bucket_of,
    bucket_start,
    caller_of,
    dead_reason,
    offset_cost,
    refusal_status,
    settle_amounts,
    window_floor,
)
from keybrake.proxy.errors import SchemaNewer, StoreUnavailable
from keybrake.proxy.money import format_ts, parse_ts
from keybrake.proxy.store.base import (
    ACTIVITY_POINTS,
    NEAR_CAP,
    Admission,
    AlertDelivery,
    AlertLevel,
    AuditFilter,
    AuditRecord,
    BudgetRecord,
    BudgetView,
    Change,
    Event,
    EventFilter,
    Issued,
    IssueRequest,
    IssuerRecord,
    KeyRecord,
    KeyView,
    MetricsSnapshot,
    Owner,
    Patch,
    Reservation,
    RunActivity,
    RunFilter,
    RunRow,
    Scope,
    Session,
    Settlement,
    StoredResponse,
    Usage,
    activity_width,
    audit_conditions,
    bucket_time,
    event_conditions,
    key_conditions,
    merge_runs,
    percents_of,
    percents_text,
    prune_conditions,
    revoked_event,
    runs_counts,
    runs_walk,
    shown,
    subject_table,
    where_clause,
)

__all__ = ["MIGRATIONS", "SQLiteStore"]

_CAP_HIT = "CASE WHEN decision LIKE '%cap_hit' THEN 1 ELSE 0 END"

T = TypeVar("T")
_PRUNE_SLICE = 10_000

MIGRATIONS: list[str] = [
    """
    CREATE TABLE vault_keys (
        key_id TEXT PRIMARY KEY,
        key_hash BLOB NOT NULL UNIQUE,
        vendor TEXT NOT NULL,
        label TEXT NOT NULL,
        daily_cap_micros INTEGER NOT NULL,
        max_per_call_micros INTEGER,
        allowed_endpoints TEXT NOT NULL,
        metadata TEXT NOT NULL,
        dedupe_window_s INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE INDEX vault_keys_label ON vault_keys (label);
    CREATE TABLE spend (
        key_id TEXT NOT NULL,
        day TEXT NOT NULL,
        settled_micros INTEGER NOT NULL DEFAULT 0,
        reserved_micros INTEGER NOT NULL DEFAULT 0,
        calls INTEGER NOT NULL DEFAULT 0,
        cap_hits INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, day)
    );
    CREATE TABLE replays (
        key_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        token TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        created_at TEXT NOT NULL,
        status INTEGER,
        headers TEXT,
        body BLOB,
        PRIMARY KEY (key_id, kind, token)
    );
    CREATE TABLE counted_objects (
        vendor TEXT NOT NULL,
        object_id TEXT NOT NULL,
        PRIMARY KEY (vendor, object_id)
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        ts TEXT NOT NULL,
        key_id TEXT,
        label TEXT,
        vendor TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        status INTEGER NOT NULL,
        decision TEXT NOT NULL,
        reserved_micros INTEGER NOT NULL DEFAULT 0,
        settled_micros INTEGER NOT NULL DEFAULT 0,
        amount INTEGER,
        currency TEXT,
        vendor_request_id TEXT,
        idempotency_key TEXT,
        latency_ms REAL,
        caller_tag TEXT
    );
    CREATE INDEX audit_key ON audit (key_id, id);
    CREATE INDEX audit_label ON audit (label, id);
    CREATE INDEX audit_ts ON audit (ts);
    CREATE INDEX audit_in_flight ON audit (decision) WHERE decision = 'in_flight';
    """,
    # Spend moves from per-UTC-day rows to hourly buckets of a rolling 24-hour window, kept per
    # owner (a key or a budget); each owner's lock and counters move to `usage_counts`. A day's
    # spend lands in its last hour, so the window counts it at least as long as the day-based
    # cap did: never less. Keys gain lifetime and per-caller caps and may draw on a budget.
    """
    CREATE TABLE usage_counts (
        owner_id TEXT PRIMARY KEY,
        calls INTEGER NOT NULL DEFAULT 0,
        cap_hits INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO usage_counts (owner_id, calls, cap_hits)
        SELECT key_id, sum(calls), sum(cap_hits) FROM spend GROUP BY key_id;
    CREATE TABLE spend_window (
        owner_id TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        settled_micros INTEGER NOT NULL DEFAULT 0,
        reserved_micros INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (owner_id, bucket)
    );
    CREATE INDEX spend_window_bucket ON spend_window (bucket);
    INSERT INTO spend_window (owner_id, bucket, settled_micros, reserved_micros)
        SELECT key_id, CAST(strftime('%s', day) AS INTEGER) / 3600 + 23, settled_micros,
               reserved_micros FROM spend;
    DROP TABLE spend;
    CREATE TABLE caller_spend (
        key_id TEXT NOT NULL,
        caller TEXT NOT NULL,
        settled_micros INTEGER NOT NULL DEFAULT 0,
        reserved_micros INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, caller)
    );
    CREATE TABLE budgets (
        budget_id TEXT PRIMARY KEY,
        label TEXT NOT NULL,
        daily_cap_micros INTEGER,
        total_cap_micros INTEGER,
        metadata TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE INDEX budgets_label ON budgets (label);
    CREATE TABLE changes (
        id INTEGER PRIMARY KEY,
        subject_id TEXT NOT NULL,
        field TEXT NOT NULL,
        old TEXT,
        new TEXT,
        reason TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE INDEX changes_subject ON changes (subject_id, id);
    CREATE TABLE vault_keys_new (
        key_id TEXT PRIMARY KEY,
        key_hash BLOB NOT NULL UNIQUE,
        vendor TEXT NOT NULL,
        label TEXT NOT NULL,
        daily_cap_micros INTEGER,
        max_per_call_micros INTEGER,
        allowed_endpoints TEXT NOT NULL,
        metadata TEXT NOT NULL,
        dedupe_window_s INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        revoked_at TEXT,
        allowed_accounts TEXT NOT NULL DEFAULT '[]',
        total_cap_micros INTEGER,
        max_per_caller_micros INTEGER,
        budget_id TEXT
    );
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
    # 3: scoped issuers, who issued what for which namespace, the record of admin actions, and
    # idempotent issuing.
    """
    CREATE TABLE issuers (
        issuer_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        token_hash BLOB UNIQUE,
        policy TEXT NOT NULL,
        kubernetes TEXT,
        created_at TEXT NOT NULL,
        deleted_at TEXT
    );
    CREATE UNIQUE INDEX issuers_live_name ON issuers (name) WHERE deleted_at IS NULL;
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        ts TEXT NOT NULL,
        action TEXT NOT NULL,
        actor TEXT NOT NULL,
        issuer_id TEXT,
        target TEXT,
        outcome TEXT NOT NULL,
        source TEXT,
        detail TEXT
    );
    CREATE INDEX events_issuer ON events (issuer_id, id);
    CREATE INDEX events_target ON events (target, id);
    CREATE TABLE issue_requests (
        scope TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        subject_id TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (scope, idempotency_key)
    );
    ALTER TABLE vault_keys ADD COLUMN issuer_id TEXT;
    ALTER TABLE vault_keys ADD COLUMN namespace TEXT;
    ALTER TABLE vault_keys ADD COLUMN service_account TEXT;
    CREATE INDEX vault_keys_issuer ON vault_keys (issuer_id);
    ALTER TABLE budgets ADD COLUMN issuer_id TEXT;
    ALTER TABLE budgets ADD COLUMN namespace TEXT;
    ALTER TABLE budgets ADD COLUMN service_account TEXT;
    """,
    # 4: listings page newest first (`continue`): walk an index instead of sorting every row.
    """
    CREATE INDEX vault_keys_created ON vault_keys (created_at DESC, key_id DESC);
    CREATE INDEX budgets_created ON budgets (created_at DESC, budget_id DESC);
    """,
    # 5: threshold alerts: which are raised (until spend falls back), and the outbox.
    """
    CREATE TABLE alert_marks (
        owner_id TEXT NOT NULL,
        mark TEXT NOT NULL,
        PRIMARY KEY (owner_id, mark)
    );
    CREATE TABLE alert_outbox (
        delivery_id TEXT PRIMARY KEY,
        owner_id TEXT NOT NULL,
        mark TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        claimed_until TEXT,
        delivered_at TEXT,
        last_error TEXT
    );
    CREATE INDEX alert_outbox_due ON alert_outbox (next_attempt_at) WHERE delivered_at IS NULL;
    CREATE INDEX alert_outbox_created ON alert_outbox (created_at);
    """,
    # 6: each key's and budget's own alert thresholds; the dashboard's sign-in sessions (the
    # id's hash only), and an index to find each run's newest key or budget and whether it is
    # live without reading the rows.
    """
    CREATE TABLE ui_sessions (
        session_hash BLOB PRIMARY KEY,
        issuer_id TEXT,
        credential_hash BLOB NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL
    );
    CREATE INDEX ui_sessions_expires ON ui_sessions (expires_at);
    ALTER TABLE vault_keys ADD COLUMN alert_percents TEXT;
    ALTER TABLE budgets ADD COLUMN alert_percents TEXT;
    CREATE INDEX vault_keys_label_created ON vault_keys
        (label, created_at, key_id, expires_at, revoked_at, namespace);
    CREATE INDEX budgets_label_created ON budgets
        (label, created_at, budget_id, expires_at, revoked_at, namespace);
    """,
    # 7: "paid for" marks name their payer (key and budget), the bucket and the amount, so only
    # the same payer's confirm or capture is offset, and only within the window. The old marks
    # named no payer: they are dropped, so such an object's confirm is priced in full. Dedupe
    # tokens gain the fan-out item (`decisions.dedupe_token`), read from each row's audit row,
    # so a retry straddling the upgrade still matches its first attempt.
    """
    DROP TABLE counted_objects;
    CREATE TABLE paid_for (
        vendor TEXT NOT NULL,
        object_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        budget_id TEXT,
        bucket INTEGER NOT NULL,
        micros INTEGER NOT NULL,
        PRIMARY KEY (vendor, object_id, key_id, bucket)
    );
    CREATE INDEX paid_for_bucket ON paid_for (bucket);
    UPDATE replays SET token = token || ':' || coalesce((
        SELECT CASE WHEN instr(a.caller_tag, '@') > 0
                    THEN substr(a.caller_tag, 1, instr(a.caller_tag, '@') - 1) ELSE '' END
          FROM audit a WHERE a.id = replays.audit_id), '')
     WHERE kind = 'dedupe';
    """,
]

_ALERT_COLUMNS = (
    "delivery_id, owner_id, mark, payload, created_at, attempts, next_attempt_at, delivered_at, "
    "last_error"
)


def _alert(row: Any) -> AlertDelivery:
    return AlertDelivery(
        delivery_id=row[0],
        owner_id=row[1],
        mark=row[2],
        payload=row[3],
        created_at=parse_ts(row[4]),
        attempts=int(row[5]),
        next_attempt_at=parse_ts(row[6]),
        delivered_at=parse_ts(row[7]) if row[7] else None,
        last_error=row[8],
    )


_KEY_COLUMNS = (
    "key_id, key_hash, vendor, label, daily_cap_micros, max_per_call_micros, allowed_endpoints, "
    "metadata, dedupe_window_s, created_at, expires_at, revoked_at, allowed_accounts, "
    "total_cap_micros, max_per_caller_micros, budget_id, issuer_id, namespace, service_account, "
    "alert_percents"
)
_BUDGET_COLUMNS = (
    "budget_id, label, daily_cap_micros, total_cap_micros, metadata, created_at, expires_at, "
    "revoked_at, issuer_id, namespace, service_account, alert_percents"
)
_ISSUER_COLUMNS = "issuer_id, name, token_hash, policy, kubernetes, created_at, deleted_at"
_EVENT_COLUMNS = "id, ts, action, actor, issuer_id, target, outcome, source, detail"
_K_KEY_COLUMNS = ", ".join("k." + c.strip() for c in _KEY_COLUMNS.split(","))
_AUDIT_COLUMNS = (
    "id, ts, key_id, label, vendor, method, path, status, decision, reserved_micros, "
    "settled_micros, amount, currency, vendor_request_id, idempotency_key, latency_ms, caller_tag, "
    "budget_id"
)


def _key_from_row(row: sqlite3.Row | tuple[Any, ...]) -> KeyRecord:
    return KeyRecord(
        key_id=row[0],
        key_hash=bytes(row[1]),
        vendor=row[2],
        label=row[3],
        daily_cap_micros=row[4],
        max_per_call_micros=row[5],
        allowed_endpoints=tuple(json.loads(row[6])),
        metadata=json.loads(row[7]),
        dedupe_window_s=row[8],
        created_at=parse_ts(row[9]),
        expires_at=parse_ts(row[10]),
        revoked_at=parse_ts(row[11]) if row[11] else None,
        allowed_accounts=tuple(json.loads(row[12])),
        total_cap_micros=row[13],
        max_per_caller_micros=row[14],
        budget_id=row[15],
        owner=_owner(row[16], row[17], row[18]),
        alert_percents=percents_of(row[19]),
    )


def _owner(issuer_id: str | None, namespace: str | None, account: str | None) -> Owner | None:
    if issuer_id is None and namespace is None and account is None:
        return None
    return Owner(issuer_id, namespace, account)


def _owner_values(owner: Owner | None) -> tuple[str | None, str | None, str | None]:
    if owner is None:
        return None, None, None
    return owner.issuer_id, owner.namespace, owner.service_account


def _issuer_from_row(row: tuple[Any, ...]) -> IssuerRecord:
    return IssuerRecord(
        issuer_id=row[0],
        name=row[1],
        token_hash=bytes(row[2]) if row[2] is not None else None,
        policy=json.loads(row[3]),
        kubernetes=json.loads(row[4]) if row[4] else None,
        created_at=parse_ts(row[5]),
        deleted_at=parse_ts(row[6]) if row[6] else None,
    )


def _event_from_row(row: tuple[Any, ...]) -> Event:
    return Event(
        id=row[0],
        ts=parse_ts(row[1]),
        action=row[2],
        actor=row[3],
        issuer_id=row[4],
        target=row[5],
        outcome=row[6],
        source=row[7],
        detail=json.loads(row[8]) if row[8] else None,
    )


def _insert_event(conn: sqlite3.Connection, event: Event) -> None:
    conn.execute(
        "INSERT INTO events (ts, action, actor, issuer_id, target, outcome, source, detail) "
        "VALUES (?,?,?,?,?,?,?,?)",
        (
            format_ts(event.ts),
            event.action,
            event.actor,
            event.issuer_id,
            event.target,
            event.outcome,
            event.source,
            json.dumps(event.detail) if event.detail is not None else None,
        ),
    )


def _claim_request(
    conn: sqlite3.Connection, request: IssueRequest | None, subject_id: str, now: datetime
) -> tuple[str, str | None]:
    """Check an idempotent issue before anything is written: ("ok" | "mismatch", the subject an
    earlier attempt issued). Nothing is written here."""
    if request is None:
        return "ok", None
    row = conn.execute(
        "SELECT request_hash, subject_id FROM issue_requests WHERE scope = ? "
        "AND idempotency_key = ?",
        (request.scope, request.key),
    ).fetchone()
    if row is None:
        return "ok", None
    if row[0] != request.request_hash:
        return "mismatch", None
    return "ok", row[1]


def _record_request(
    conn: sqlite3.Connection, request: IssueRequest | None, subject_id: str, now: datetime
) -> None:
    if request is not None:
        conn.execute(
            "INSERT INTO issue_requests (scope, idempotency_key, request_hash, subject_id, "
            "created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, idempotency_key) DO UPDATE "
            "SET subject_id = excluded.subject_id, created_at = excluded.created_at",
            (request.scope, request.key, request.request_hash, subject_id, format_ts(now)),
        )


def _revoke_subject(conn: sqlite3.Connection, subject_id: str, now: datetime) -> None:
    """Revoke a key, or a budget with every key drawing on it (an earlier issue attempt)."""
    stamp = format_ts(now)
    if subject_id.startswith("bg_"):
        conn.execute(
            "UPDATE budgets SET revoked_at = ? WHERE budget_id = ? AND revoked_at IS NULL",
            (stamp, subject_id),
        )
        conn.execute(
            "UPDATE vault_keys SET revoked_at = ? WHERE budget_id = ? AND revoked_at IS NULL",
            (stamp, subject_id),
        )
    else:
        conn.execute(
            "UPDATE vault_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
            (stamp, subject_id),
        )


def _budget_from_row(row: tuple[Any, ...]) -> BudgetRecord:
    return BudgetRecord(
        budget_id=row[0],
        label=row[1],
        daily_cap_micros=row[2],
        total_cap_micros=row[3],
        metadata=json.loads(row[4]),
        created_at=parse_ts(row[5]),
        expires_at=parse_ts(row[6]),
        revoked_at=parse_ts(row[7]) if row[7] else None,
        owner=_owner(row[8], row[9], row[10]),
        alert_percents=percents_of(row[11]),
    )


def _audit_from_row(row: tuple[Any, ...]) -> AuditRecord:
    return AuditRecord(
        id=row[0],
        ts=parse_ts(row[1]),
        key_id=row[2],
        label=row[3],
        vendor=row[4],
        method=row[5],
        path=row[6],
        status=row[7],
        decision=row[8],
        reserved_micros=row[9],
        settled_micros=row[10],
        amount=row[11],
        currency=row[12],
        vendor_request_id=row[13],
        idempotency_key=row[14],
        latency_ms=row[15],
        caller_tag=row[16],
        budget_id=row[17],
    )


def _placeholder(args: list[Any]) -> Callable[[Any], str]:
    def add(value: Any) -> str:
        args.append(format_ts(value) if isinstance(value, datetime) else value)
        return "?"

    return add


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
            results = [fn(conn) for fn, _, _ in batch]
            conn.execute("COMMIT")
        except Exception:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # One operation failed: run each alone, so only the failing one sees the error.
            for op in batch:
                self._run_alone(conn, op)
            return
        for (_, future, loop), result in zip(batch, results, strict=True):
            loop.call_soon_threadsafe(_resolve, future, result, None)

    def _run_alone(self, conn: sqlite3.Connection, op: _Op) -> None:
        fn, future, loop = op
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = fn(conn)
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = (
                exc
                if isinstance(exc, StoreUnavailable)  # already says why (e.g. SchemaNewer)
                else StoreUnavailable(f"database write failed: {exc}")
            )
            loop.call_soon_threadsafe(_resolve, future, None, error)
        else:
            loop.call_soon_threadsafe(_resolve, future, result, None)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class SQLiteStore:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._schema_cookie: int | None = None
        self._writer = _Writer(self.path)
        self._local = threading.local()

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.migrate)
        self._writer.start()

    def migrate(self) -> int:
        """Apply pending migrations; returns the schema version. Safe from several processes."""
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
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
            conn.execute("COMMIT")
            # Any later change of the schema (a newer build migrating the file) changes this.
            self._schema_cookie = conn.execute("PRAGMA schema_version").fetchone()[0]
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
        def op(c: sqlite3.Connection) -> None:
            version = c.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            if version > len(MIGRATIONS):
                raise SchemaNewer(version, len(MIGRATIONS))

        await self._read(op)

    # -- plumbing ------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            try:
                return fn(self._reader())
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"database read failed: {exc}") from exc

        return await asyncio.to_thread(run)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._writer.submit(fn)

    # -- keys ----------------------------------------------------------------------------------

    async def create_key(
        self,
        key: KeyRecord,
        event: Event,
        *,
        max_active: int | None = None,
        request: IssueRequest | None = None,
    ) -> Issued:
        def op(conn: sqlite3.Connection) -> Issued:
            # Every check before the first write: the writer shares its transaction with other
            # operations, so a refusal must leave nothing behind.
            claim, replaced = _claim_request(conn, request, key.key_id, key.created_at)
            if claim == "mismatch":
                return Issued("mismatch")
            if max_active is not None and key.owner is not None:
                active = conn.execute(
                    "SELECT count(*) FROM vault_keys WHERE issuer_id = ? AND revoked_at IS NULL "
                    "AND expires_at > ? AND key_id IS NOT ?",
                    (key.owner.issuer_id, format_ts(key.created_at), replaced),
                ).fetchone()[0]
                if active >= max_active:
                    return Issued("too_many")
            if replaced is not None:
                _revoke_subject(conn, replaced, key.created_at)
            conn.execute(
                f"INSERT INTO vault_keys ({_KEY_COLUMNS}) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    key.key_id,
                    key.key_hash,
                    key.vendor,
                    key.label,
                    key.daily_cap_micros,
                    key.max_per_call_micros,
                    json.dumps(list(key.allowed_endpoints)),
                    json.dumps(key.metadata),
                    key.dedupe_window_s,
                    format_ts(key.created_at),
                    format_ts(key.expires_at),
                    None,
                    json.dumps(list(key.allowed_accounts)),
                    key.total_cap_micros,
                    key.max_per_caller_micros,
                    key.budget_id,
                    *_owner_values(key.owner),
                    percents_text(key.alert_percents),
                ),
            )
            conn.execute("INSERT INTO usage_counts (owner_id) VALUES (?)", (key.key_id,))
            _record_request(conn, request, key.key_id, key.created_at)
            _insert_event(conn, event)
            return Issued("created", replaced)

        return await self._write(op)

    async def find_key(self, key_hash: bytes) -> KeyRecord | None:
        def op(conn: sqlite3.Connection) -> KeyRecord | None:
            row = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM vault_keys WHERE key_hash = ?", (key_hash,)
            ).fetchone()
            return _key_from_row(row) if row else None

        return await self._read(op)

    def _views(
        self, conn: sqlite3.Connection, where: str, args: list[Any], now: datetime, limit: int = 1
    ) -> list[KeyView]:
        rows = conn.execute(
            f"SELECT {_K_KEY_COLUMNS} FROM vault_keys k "
            f"WHERE {where} ORDER BY k.created_at DESC, k.key_id DESC LIMIT {int(limit)}",
            args,
        ).fetchall()
        keys = [_key_from_row(row) for row in rows]
        return [
            KeyView(
                key,
                _usage(conn, key.key_id, now),
                _changes(conn, key.key_id) if limit == 1 else (),
            )
            for key in keys
        ]

    async def get_key(self, key_id: str, now: datetime) -> KeyView | None:
        views = await self._read(lambda c: self._views(c, "k.key_id = ?", [key_id], now))
        return views[0] if views else None

    async def list_keys(
        self,
        *,
        now: datetime,
        label: str | None = None,
        vendor: str | None = None,
        status: str | None = None,
        budget_id: str | None = None,
        scope: Scope | None = None,
        namespace: str | None = None,
        limit: int = 1000,
        before: tuple[datetime, str] | None = None,
    ) -> list[KeyView]:
        args: list[Any] = []
        conditions = key_conditions(
            now=now,
            label=label,
            vendor=vendor,
            status=status,
            budget_id=budget_id,
            scope=scope,
            namespace=namespace,
            before=before,
        )
        clause = where_clause(conditions, _placeholder(args))
        return await self._read(lambda c: self._views(c, clause, args, now, limit))

    async def revoke_key(self, key_id: str, now: datetime, event: Event) -> bool | None:
        def op(conn: sqlite3.Connection) -> bool | None:
            if not conn.execute("SELECT 1 FROM vault_keys WHERE key_id = ?", (key_id,)).fetchone():
                return None
            cur = conn.execute(
                "UPDATE vault_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (format_ts(now), key_id),
            )
            _insert_event(conn, event)
            return bool(cur.rowcount)

        return await self._write(op)

    async def revoke_label(
        self,
        label: str,
        now: datetime,
        event: Event,
        *,
        namespace: str | None = None,
        workflow_uid: str | None = None,
        cluster: str | None = None,
        scope: Scope | None = None,
    ) -> tuple[list[str], list[str]]:
        def op(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
            stamp = format_ts(now)
            revoked: list[list[str]] = []
            for table, column in (("vault_keys", "key_id"), ("budgets", "budget_id")):
                args: list[Any] = []
                conditions = key_conditions(
                    now=now,
                    label=label,
                    status="active",
                    scope=scope,
                    namespace=namespace,
                    alias="t",
                )
                if workflow_uid is not None:
                    conditions.append(("json_extract(t.metadata, '$.uid') = {}", workflow_uid))
                if cluster is not None:
                    conditions.append(("json_extract(t.metadata, '$.cluster') = {}", cluster))
                where = where_clause(conditions, _placeholder(args))
                ids = [
                    row[0]
                    for row in conn.execute(f"SELECT {column} FROM {table} t WHERE {where}", args)
                ]
                conn.executemany(
                    f"UPDATE {table} SET revoked_at = ? WHERE {column} = ?",
                    [(stamp, i) for i in ids],
                )
                revoked.append(ids)
            _insert_event(conn, revoked_event(event, revoked[0], revoked[1]))
            return revoked[0], revoked[1]

        return await self._write(op)

    # -- budgets -------------------------------------------------------------------------------

    async def create_budget(
        self, budget: BudgetRecord, event: Event, *, request: IssueRequest | None = None
    ) -> Issued:
        def op(conn: sqlite3.Connection) -> Issued:
            claim, replaced = _claim_request(conn, request, budget.budget_id, budget.created_at)
            if claim == "mismatch":
                return Issued("mismatch")
            if replaced is not None:
                _revoke_subject(conn, replaced, budget.created_at)
            conn.execute(
                f"INSERT INTO budgets ({_BUDGET_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    budget.budget_id,
                    budget.label,
                    budget.daily_cap_micros,
                    budget.total_cap_micros,
                    json.dumps(budget.metadata),
                    format_ts(budget.created_at),
                    format_ts(budget.expires_at),
                    None,
                    *_owner_values(budget.owner),
                    percents_text(budget.alert_percents),
                ),
            )
            conn.execute("INSERT INTO usage_counts (owner_id) VALUES (?)", (budget.budget_id,))
            _record_request(conn, request, budget.budget_id, budget.created_at)
            _insert_event(conn, event)
            return Issued("created", replaced)

        return await self._write(op)

    def _budget_views(
        self, conn: sqlite3.Connection, where: str, args: list[Any], now: datetime, limit: int = 1
    ) -> list[BudgetView]:
        rows = conn.execute(
            f"SELECT {_BUDGET_COLUMNS} FROM budgets b WHERE {where} "
            f"ORDER BY b.created_at DESC, b.budget_id DESC LIMIT {int(limit)}",
            args,
        ).fetchall()
        views = []
        for row in rows:
            budget = _budget_from_row(row)
            keys = conn.execute(
                "SELECT key_id FROM vault_keys WHERE budget_id = ? ORDER BY created_at, key_id",
                (budget.budget_id,),
            ).fetchall()
            views.append(
                BudgetView(
                    budget,
                    _usage(conn, budget.budget_id, now),
                    tuple(k[0] for k in keys),
                    _changes(conn, budget.budget_id) if limit == 1 else (),
                )
            )
        return views

    async def get_budget(self, budget_id: str, now: datetime) -> BudgetView | None:
        views = await self._read(
            lambda c: self._budget_views(c, "b.budget_id = ?", [budget_id], now)
        )
        return views[0] if views else None

    async def list_budgets(
        self,
        *,
        now: datetime,
        label: str | None = None,
        status: str | None = None,
        scope: Scope | None = None,
        namespace: str | None = None,
        limit: int = 1000,
        before: tuple[datetime, str] | None = None,
    ) -> list[BudgetView]:
        args: list[Any] = []
        conditions = key_conditions(
            now=now,
            label=label,
            status=status,
            scope=scope,
            namespace=namespace,
            alias="b",
            before=before,
        )
        clause = where_clause(conditions, _placeholder(args))
        return await self._read(lambda c: self._budget_views(c, clause, args, now, limit))

    async def revoke_budget(self, budget_id: str, now: datetime, event: Event) -> list[str] | None:
        def op(conn: sqlite3.Connection) -> list[str] | None:
            stamp = format_ts(now)
            if not conn.execute(
                "SELECT 1 FROM budgets WHERE budget_id = ?", (budget_id,)
            ).fetchone():
                return None
            conn.execute(
                "UPDATE budgets SET revoked_at = ? WHERE budget_id = ? AND revoked_at IS NULL",
                (stamp, budget_id),
            )
            keys = [
                row[0]
                for row in conn.execute(
                    "SELECT key_id FROM vault_keys WHERE budget_id = ? AND revoked_at IS NULL",
                    (budget_id,),
                )
            ]
            conn.executemany(
                "UPDATE vault_keys SET revoked_at = ? WHERE key_id = ?", [(stamp, k) for k in keys]
            )
            _insert_event(conn, event)
            return keys

        return await self._write(op)

    async def patch(self, subject_id: str, patch: Patch, now: datetime, event: Event) -> str:
        table, column = subject_table(subject_id)

        def op(conn: sqlite3.Connection) -> str:
            fields = patch.fields()
            names = ", ".join(fields)
            row = conn.execute(
                f"SELECT revoked_at, expires_at, {names} FROM {table} WHERE {column} = ?",
                (subject_id,),
            ).fetchone()
            if row is None:
                return "unknown"
            if row[0] is not None or row[1] <= format_ts(now):
                return "not_live"
            stored = {
                name: (format_ts(value) if isinstance(value, datetime) else value)
                for name, value in fields.items()
            }
            conn.execute(
                f"UPDATE {table} SET {', '.join(f'{n} = ?' for n in stored)} WHERE {column} = ?",
                (*stored.values(), subject_id),
            )
            stamp = format_ts(now)
            conn.executemany(
                "INSERT INTO changes (subject_id, field, old, new, reason, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (subject_id, name, shown(name, old), shown(name, new), patch.reason, stamp)
                    for (name, new), old in zip(stored.items(), row[2:], strict=True)
                    if old != new
                ],
            )
            _insert_event(conn, event)
            return "patched"

        return await self._write(op)

    # -- issuers and the record of admin actions ----------------------------------------------

    async def create_issuer(self, issuer: IssuerRecord, event: Event) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO issuers ({_ISSUER_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                (
                    issuer.issuer_id,
                    issuer.name,
                    issuer.token_hash,
                    json.dumps(issuer.policy),
                    json.dumps(issuer.kubernetes) if issuer.kubernetes is not None else None,
                    format_ts(issuer.created_at),
                    None,
                ),
            )
            _insert_event(conn, event)

        await self._write(op)

    async def get_issuer(self, issuer_id: str) -> IssuerRecord | None:
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {_ISSUER_COLUMNS} FROM issuers WHERE issuer_id = ?", (issuer_id,)
            ).fetchone()
        )
        return _issuer_from_row(row) if row else None

    async def find_issuer(self, token_hash: bytes) -> IssuerRecord | None:
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {_ISSUER_COLUMNS} FROM issuers WHERE token_hash = ? "
                "AND deleted_at IS NULL",
                (token_hash,),
            ).fetchone()
        )
        return _issuer_from_row(row) if row else None

    async def list_issuers(self, *, include_deleted: bool = False) -> list[IssuerRecord]:
        where = "1 = 1" if include_deleted else "deleted_at IS NULL"
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {_ISSUER_COLUMNS} FROM issuers WHERE {where} ORDER BY created_at, name"
            ).fetchall()
        )
        return [_issuer_from_row(row) for row in rows]

    async def delete_issuer(
        self, issuer_id: str, now: datetime, event: Event, *, revoke: bool = False
    ) -> tuple[list[str], list[str]] | None:
        def op(conn: sqlite3.Connection) -> tuple[list[str], list[str]] | None:
            stamp = format_ts(now)
            cur = conn.execute(
                "UPDATE issuers SET deleted_at = ? WHERE issuer_id = ? AND deleted_at IS NULL",
                (stamp, issuer_id),
            )
            if not cur.rowcount:
                return None
            revoked: list[list[str]] = [[], []]
            if revoke:
                for index, (table, column) in enumerate(
                    (("vault_keys", "key_id"), ("budgets", "budget_id"))
                ):
                    revoked[index] = [
                        row[0]
                        for row in conn.execute(
                            f"UPDATE {table} SET revoked_at = ? WHERE issuer_id = ? "
                            f"AND revoked_at IS NULL AND expires_at > ? RETURNING {column}",
                            (stamp, issuer_id, stamp),
                        )
                    ]
            _insert_event(conn, event)
            return revoked[0], revoked[1]

        return await self._write(op)

    async def record_event(self, event: Event) -> None:
        await self._write(lambda conn: _insert_event(conn, event))

    async def events(self, query: EventFilter) -> list[Event]:
        args: list[Any] = []
        where = where_clause(event_conditions(query), _placeholder(args))
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE {where} "
            f"ORDER BY id DESC LIMIT {int(query.limit)}"
        )
        rows = await self._read(lambda c: c.execute(sql, args).fetchall())
        return [_event_from_row(row) for row in rows]

    # -- the request path ----------------------------------------------------------------------

    async def reserve(self, reservation: Reservation) -> Admission:
        def op(conn: sqlite3.Connection) -> Admission:
            # The schema this process migrated to, still: a newer build that migrated the file
            # since has rules this process does not know, so it forwards nothing (fail closed).
            if conn.execute("PRAGMA schema_version").fetchone()[0] != self._schema_cookie:
                self._check_schema(conn)
            return _reserve(conn, reservation)

        return await self._write(op)

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
        if version > len(MIGRATIONS):
            raise SchemaNewer(version, len(MIGRATIONS))
        self._schema_cookie = conn.execute("PRAGMA schema_version").fetchone()[0]

    async def settle(self, settlement: Settlement) -> None:
        await self._write(lambda conn: _settle(conn, settlement))

    async def record(self, row: AuditRecord) -> int:
        return await self._write(lambda conn: _insert_audit(conn, row))

    # -- threshold alerts ----------------------------------------------------------------------

    async def alert_levels(self, now: datetime) -> list[AlertLevel]:
        def op(conn: sqlite3.Connection) -> list[AlertLevel]:
            floor, stamp = window_floor(now), format_ts(now)
            found = []
            for table, column, vendor in (
                ("vault_keys", "key_id", "t.vendor"),
                ("budgets", "budget_id", "NULL"),
            ):
                rows = conn.execute(
                    f"SELECT t.{column}, t.label, t.namespace, {vendor}, t.daily_cap_micros, "
                    "t.total_cap_micros, t.alert_percents, "
                    "coalesce(sum(CASE WHEN w.bucket >= ? THEN w.settled_micros + "
                    "w.reserved_micros END), 0), "
                    "coalesce(sum(w.settled_micros + w.reserved_micros), 0), "
                    "coalesce(max(u.cap_hits), 0) "
                    f"FROM {table} t LEFT JOIN spend_window w ON w.owner_id = t.{column} "
                    f"LEFT JOIN usage_counts u ON u.owner_id = t.{column} "
                    "WHERE t.revoked_at IS NULL AND t.expires_at > ? "
                    "AND (t.daily_cap_micros IS NOT NULL OR t.total_cap_micros IS NOT NULL) "
                    f"GROUP BY t.{column}",
                    (floor, stamp),
                ).fetchall()
                kind = "key" if table == "vault_keys" else "budget"
                for owner, label, namespace, vend, daily, total, pct, window, life, hits in rows:
                    found.append(
                        AlertLevel(
                            owner,
                            kind,
                            label,
                            namespace,
                            vend,
                            int(window),
                            daily,
                            int(life),
                            total,
                            int(hits),
                            percents_of(pct),
                        )
                    )
            return found

        return await self._read(op)

    async def alert_marks(self) -> set[tuple[str, str]]:
        return await self._read(
            lambda conn: {
                (str(o), str(m)) for o, m in conn.execute("SELECT owner_id, mark FROM alert_marks")
            }
        )

    async def raise_alert(self, delivery: AlertDelivery) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO alert_marks (owner_id, mark) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (delivery.owner_id, delivery.mark),
            )
            if not cur.rowcount:
                return False
            conn.execute(
                "INSERT INTO alert_outbox (delivery_id, owner_id, mark, payload, created_at, "
                "next_attempt_at) VALUES (?,?,?,?,?,?)",
                (
                    delivery.delivery_id,
                    delivery.owner_id,
                    delivery.mark,
                    delivery.payload,
                    format_ts(delivery.created_at),
                    format_ts(delivery.created_at),
                ),
            )
            return True

        return await self._write(op)

    async def forget_alert_marks(self, ended_before: datetime) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cut = format_ts(ended_before)
            cur = conn.execute(
                # A lookup by id per mark: as cheap with a million live keys as with none.
                "DELETE FROM alert_marks WHERE NOT EXISTS (SELECT 1 FROM vault_keys k "
                "WHERE k.key_id = alert_marks.owner_id AND (k.revoked_at IS NULL "
                "OR k.revoked_at > ?) AND k.expires_at > ?) AND NOT EXISTS (SELECT 1 "
                "FROM budgets b WHERE b.budget_id = alert_marks.owner_id AND (b.revoked_at IS "
                "NULL OR b.revoked_at > ?) AND b.expires_at > ?)",
                (cut, cut, cut, cut),
            )
            return cur.rowcount

        return await self._write(op)

    async def rearm_alerts(self, owner_id: str, marks: list[str]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "DELETE FROM alert_marks WHERE owner_id = ? AND mark = ?",
                [(owner_id, mark) for mark in marks],
            )

        await self._write(op)

    async def claim_alerts(
        self, now: datetime, lease: timedelta, limit: int
    ) -> list[AlertDelivery]:
        def op(conn: sqlite3.Connection) -> list[AlertDelivery]:
            stamp = format_ts(now)
            rows = conn.execute(
                f"SELECT {_ALERT_COLUMNS} FROM alert_outbox WHERE delivered_at IS NULL "
                "AND next_attempt_at <= ? AND (claimed_until IS NULL OR claimed_until <= ?) "
                f"ORDER BY next_attempt_at LIMIT {int(limit)}",
                (stamp, stamp),
            ).fetchall()
            conn.executemany(
                "UPDATE alert_outbox SET claimed_until = ? WHERE delivery_id = ?",
                [(format_ts(now + lease), row[0]) for row in rows],
            )
            return [_alert(row) for row in rows]

        return await self._write(op)

    async def finish_alert(
        self,
        delivery_id: str,
        now: datetime,
        *,
        error: str | None,
        retry_at: datetime | None,
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if error is None:
                conn.execute(
                    "UPDATE alert_outbox SET attempts = attempts + 1, delivered_at = ?, "
                    "claimed_until = NULL, last_error = NULL WHERE delivery_id = ?",
                    (format_ts(now), delivery_id),
                )
            else:
                conn.execute(
                    "UPDATE alert_outbox SET attempts = attempts + 1, last_error = ?, "
                    "next_attempt_at = ?, claimed_until = NULL WHERE delivery_id = ?",
                    (error[:500], format_ts(retry_at or now), delivery_id),
                )

        await self._write(op)

    async def alert_deliveries(self, *, pending: bool, limit: int) -> list[AlertDelivery]:
        where = "WHERE delivered_at IS NULL" if pending else ""
        return await self._read(
            lambda conn: [
                _alert(row)
                for row in conn.execute(
                    f"SELECT {_ALERT_COLUMNS} FROM alert_outbox {where} "
                    f"ORDER BY created_at DESC, delivery_id DESC LIMIT {int(limit)}"
                )
            ]
        )

    async def metrics_snapshot(self, now: datetime, stale_before: datetime) -> MetricsSnapshot:
        def op(conn: sqlite3.Connection) -> MetricsSnapshot:
            floor, stamp = window_floor(now), format_ts(now)
            spend = conn.execute(
                "SELECT k.vendor, sum(w.settled_micros) FROM spend_window w "
                "JOIN vault_keys k ON k.key_id = w.owner_id WHERE w.bucket >= ? GROUP BY k.vendor",
                (floor,),
            ).fetchall()
            open_count, stale = conn.execute(
                "SELECT count(*), coalesce(sum(ts < ?), 0) FROM audit WHERE decision = 'in_flight'",
                (format_ts(stale_before),),
            ).fetchone()
            active = conn.execute(
                "SELECT count(*) FROM vault_keys WHERE revoked_at IS NULL AND expires_at > ?",
                (stamp,),
            ).fetchone()[0]
            near = conn.execute(
                "SELECT count(*) FROM (SELECT k.daily_cap_micros AS cap, "
                "sum(w.settled_micros + w.reserved_micros) AS used FROM vault_keys k "
                "JOIN spend_window w ON w.owner_id = k.key_id AND w.bucket >= ? "
                "WHERE k.revoked_at IS NULL AND k.expires_at > ? AND k.daily_cap_micros > 0 "
                "GROUP BY k.key_id) WHERE used >= cap * ?",
                (floor, stamp, NEAR_CAP),
            ).fetchone()[0]
            pending, failing = conn.execute(
                "SELECT count(*), coalesce(sum(attempts > 0), 0) FROM alert_outbox "
                "WHERE delivered_at IS NULL"
            ).fetchone()
            return MetricsSnapshot(
                {vendor: int(total) for vendor, total in spend},
                int(open_count),
                int(stale),
                int(active),
                int(near),
                int(pending),
                int(failing),
            )

        return await self._read(op)

    async def compact_spend(self, before_bucket: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            conn.execute(
                "INSERT INTO spend_window (owner_id, bucket, settled_micros, reserved_micros) "
                "SELECT owner_id, 0, sum(settled_micros), sum(reserved_micros) FROM spend_window "
                "WHERE bucket > 0 AND bucket < ? GROUP BY owner_id "
                "ON CONFLICT (owner_id, bucket) DO UPDATE SET "
                "settled_micros = settled_micros + excluded.settled_micros, "
                "reserved_micros = reserved_micros + excluded.reserved_micros",
                (before_bucket,),
            )
            # Marks out of the window offset nothing (`_paid_offset`).
            conn.execute("DELETE FROM paid_for WHERE bucket < ?", (before_bucket,))
            cur = conn.execute(
                "DELETE FROM spend_window WHERE bucket > 0 AND bucket < ?", (before_bucket,)
            )
            return int(cur.rowcount)

        return await self._write(op)

    async def sweep(self, older_than: datetime) -> int:
        return await self._write(lambda conn: _sweep(conn, older_than))

    async def forget_replays(self, older_than: datetime) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute("DELETE FROM replays WHERE created_at < ?", (format_ts(older_than),))
            # An issue step's retries come within the run; a day later the key is long gone.
            conn.execute(
                "DELETE FROM issue_requests WHERE created_at < ?", (format_ts(older_than),)
            )
            return int(cur.rowcount)

        return await self._write(op)

    async def prune_audit(self, before: datetime, now: datetime, *, dry_run: bool = False) -> int:
        args: list[Any] = []
        where = where_clause(prune_conditions(before, now - WINDOW - BUCKET), _placeholder(args))
        if dry_run:
            return int(
                await self._read(
                    lambda c: c.execute(
                        f"SELECT count(*) FROM audit WHERE {where}", args
                    ).fetchone()[0]
                )
            )
        removed = 0
        while True:
            # In slices, so the single writer keeps serving the request path in between.
            count = await self._write(
                lambda c: (
                    c.execute(
                        f"DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE {where} "
                        f"LIMIT {_PRUNE_SLICE})",
                        args,
                    ).rowcount
                )
            )
            removed += int(count)
            if count < _PRUNE_SLICE:
                return removed

    async def liveness(self, key_id: str, budget_id: str | None, now: datetime) -> Decision | None:
        def op(conn: sqlite3.Connection) -> Decision | None:
            row = conn.execute(
                "SELECT k.revoked_at, k.expires_at, b.revoked_at, b.expires_at, "
                "b.budget_id IS NOT NULL FROM vault_keys k "
                "LEFT JOIN budgets b ON b.budget_id = ? WHERE k.key_id = ?",
                (budget_id, key_id),
            ).fetchone()
            if row is None:
                return Decision.REVOKED
            budget = None
            if budget_id is not None:
                budget = (row[2] is not None, parse_ts(row[3]) if row[4] else None)
            return dead_reason(now, (row[0] is not None, parse_ts(row[1])), budget)

        return await self._read(op)

    async def audit(self, query: AuditFilter) -> list[AuditRecord]:
        args: list[Any] = []
        where = where_clause(audit_conditions(query), _placeholder(args))
        sql = (
            f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE {where} "
            f"ORDER BY id DESC LIMIT {int(query.limit)}"
        )
        rows = await self._read(lambda c: c.execute(sql, args).fetchall())
        return [_audit_from_row(row) for row in rows]

    # -- the dashboard -------------------------------------------------------------------------

    async def list_runs(self, query: RunFilter, now: datetime) -> list[RunRow]:
        walks = []
        for table in ("vault_keys", "budgets"):
            args: list[Any] = []
            sql = where_clause([runs_walk(query, now, table, "instr")], _placeholder(args))
            walks.append((sql, args))

        def read(c: sqlite3.Connection) -> list[RunRow]:
            found = [
                [(r[0], parse_ts(r[1])) for r in c.execute(sql, args).fetchall()]
                for sql, args in walks
            ]
            labels = sorted({label for walk in found for label, _ in walk})
            if not labels:
                return []
            args: list[Any] = []
            sql = where_clause([runs_counts(labels, query.scope, now)], _placeholder(args))
            counts = {
                r[0]: (parse_ts(r[1]), r[2], r[3], r[4], r[5])
                for r in c.execute(sql, args).fetchall()
            }
            return merge_runs(found, counts, query.limit)

        return await self._read(read)

    async def run_activity(
        self, label: str, scope: Scope | None, points: int = ACTIVITY_POINTS
    ) -> RunActivity:
        args: list[Any] = []
        where = where_clause(
            audit_conditions(AuditFilter(scope=scope, label=label)), _placeholder(args)
        )
        ends = [
            f"SELECT ts FROM audit WHERE {where} ORDER BY id {order} LIMIT 1"
            for order in ("ASC", "DESC")
        ]
        second = "CAST(strftime('%s', substr(ts, 1, 19)) AS INTEGER)"

        def read(c: sqlite3.Connection) -> RunActivity:
            first, last = (c.execute(sql, args).fetchone() for sql in ends)
            if first is None or last is None:
                return RunActivity([], [])
            start = int(parse_ts(first[0]).timestamp())
            width = activity_width(start, int(parse_ts(last[0]).timestamp()), points)
            buckets = (
                # Clamped: a replica's clock may put a row before the first or after the last.
                f"SELECT max(0, min({points - 1}, ({second} - {start}) / {width})) AS b, "
                "sum(settled_micros), count(*), "
                f"sum({_CAP_HIT}) FROM audit WHERE {where} GROUP BY b ORDER BY b"
            )
            per_caller = (
                f"SELECT caller_tag, sum(settled_micros), count(*), sum({_CAP_HIT}) "
                f"FROM audit WHERE {where} GROUP BY 1 ORDER BY 2 DESC, 3 DESC, 1 LIMIT 100"
            )
            seconds = [
                (bucket_time(start, width, r[0]), r[1], r[2], r[3])
                for r in c.execute(buckets, args).fetchall()
            ]
            callers = [(r[0], r[1], r[2], r[3]) for r in c.execute(per_caller, args).fetchall()]
            return RunActivity(seconds, callers)

        return await self._read(read)

    async def create_session(self, session: Session) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO ui_sessions (session_hash, issuer_id, credential_hash, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?)",
                (
                    session.session_hash,
                    session.issuer_id,
                    session.credential_hash,
                    format_ts(session.created_at),
                    format_ts(session.expires_at),
                ),
            )

        await self._write(op)

    async def find_session(self, session_hash: bytes, now: datetime) -> Session | None:
        row = await self._read(
            lambda c: c.execute(
                "SELECT issuer_id, credential_hash, created_at, expires_at FROM ui_sessions "
                "WHERE session_hash = ? AND expires_at > ?",
                (session_hash, format_ts(now)),
            ).fetchone()
        )
        if row is None:
            return None
        return Session(session_hash, row[0], row[1], parse_ts(row[2]), parse_ts(row[3]))

    async def end_session(self, session_hash: bytes) -> None:
        await self._write(
            lambda c: c.execute("DELETE FROM ui_sessions WHERE session_hash = ?", (session_hash,))
        )

    async def forget_sessions(self, now: datetime) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute("DELETE FROM ui_sessions WHERE expires_at <= ?", (format_ts(now),))
            return cur.rowcount

        return await self._write(op)


# -- the two request-path transactions, run inside the writer's shared transaction ------------


def _insert_audit(conn: sqlite3.Connection, row: AuditRecord) -> int:
    cur = conn.execute(
        "INSERT INTO audit (ts, key_id, label, vendor, method, path, status, decision, "
        "reserved_micros, settled_micros, amount, currency, vendor_request_id, idempotency_key, "
        "latency_ms, caller_tag, budget_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            format_ts(row.ts),
            row.key_id,
            row.label,
            row.vendor,
            row.method,
            row.path,
            row.status,
            row.decision,
            row.reserved_micros,
            row.settled_micros,
            row.amount,
            row.currency,
            row.vendor_request_id,
            row.idempotency_key,
            row.latency_ms,
            row.caller_tag,
            row.budget_id,
        ),
    )
    return int(cur.lastrowid or 0)


def _spent(conn: sqlite3.Connection, owner_id: str, floor: int) -> tuple[int, int]:
    """(settled + reserved in the window, and over the owner's life)."""
    row = conn.execute(
        "SELECT coalesce(sum(CASE WHEN bucket >= ? THEN settled_micros + reserved_micros END), 0), "
        "coalesce(sum(settled_micros + reserved_micros), 0) FROM spend_window WHERE owner_id = ?",
        (floor, owner_id),
    ).fetchone()
    return int(row[0]), int(row[1])


def _usage(conn: sqlite3.Connection, owner_id: str, now: datetime) -> Usage:
    floor = window_floor(now)
    row = conn.execute(
        "SELECT coalesce(sum(CASE WHEN bucket >= ? THEN settled_micros END), 0), "
        "coalesce(sum(CASE WHEN bucket >= ? THEN reserved_micros END), 0), "
        "coalesce(sum(settled_micros), 0), coalesce(sum(reserved_micros), 0) "
        "FROM spend_window WHERE owner_id = ?",
        (floor, floor, owner_id),
    ).fetchone()
    counts = conn.execute(
        "SELECT calls, cap_hits FROM usage_counts WHERE owner_id = ?", (owner_id,)
    ).fetchone()
    return Usage(
        window_start=bucket_start(floor),
        spent_micros=row[0],
        reserved_micros=row[1],
        total_micros=row[2],
        total_reserved_micros=row[3],
        calls=counts[0] if counts else 0,
        cap_hits=counts[1] if counts else 0,
    )


def _changes(conn: sqlite3.Connection, subject_id: str) -> tuple[Change, ...]:
    rows = conn.execute(
        "SELECT field, old, new, reason, at FROM changes WHERE subject_id = ? ORDER BY id",
        (subject_id,),
    ).fetchall()
    return tuple(Change(r[0], r[1], r[2], r[3], parse_ts(r[4])) for r in rows)


def _prior(
    conn: sqlite3.Connection, key_id: str, kind: str, token: str, request_hash: str
) -> Prior | None:
    row = conn.execute(
        "SELECT request_hash, created_at, status IS NOT NULL, audit_id, forwarded_key "
        "FROM replays WHERE key_id = ? AND kind = ? AND token = ?",
        (key_id, kind, token),
    ).fetchone()
    if row is None:
        return None
    unknown = False
    if not row[2]:
        # Unanswered: still running, or cut off (its audit row says so, or is gone).
        found = conn.execute("SELECT decision FROM audit WHERE id = ?", (row[3],)).fetchone()
        unknown = found is None or found[0] in CUT_OFF
    return Prior(
        audit_id=row[3] or 0,
        same_request=row[0] == request_hash,
        answered=bool(row[2]),
        outcome_unknown=unknown,
        created_at=parse_ts(row[1]),
        forwarded_key=row[4],
    )


def _stored_answer(conn: sqlite3.Connection, key_id: str, kind: str, token: str) -> StoredResponse:
    row = conn.execute(
        "SELECT status, headers, body FROM replays WHERE key_id = ? AND kind = ? AND token = ?",
        (key_id, kind, token),
    ).fetchone()
    return StoredResponse(row[0], [tuple(h) for h in json.loads(row[1])], bytes(row[2]))


def _add_spend(
    conn: sqlite3.Connection, owner_id: str, bucket: int, settled: int, reserved: int
) -> None:
    conn.execute(
        "INSERT INTO spend_window (owner_id, bucket, settled_micros, reserved_micros) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (owner_id, bucket) DO UPDATE SET "
        "settled_micros = settled_micros + excluded.settled_micros, "
        "reserved_micros = reserved_micros + excluded.reserved_micros",
        (owner_id, bucket, settled, reserved),
    )


def _add_caller_spend(
    conn: sqlite3.Connection, key_id: str, caller: str, settled: int, reserved: int
) -> None:
    conn.execute(
        "INSERT INTO caller_spend (key_id, caller, settled_micros, reserved_micros) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (key_id, caller) DO UPDATE SET "
        "settled_micros = settled_micros + excluded.settled_micros, "
        "reserved_micros = reserved_micros + excluded.reserved_micros",
        (key_id, caller, settled, reserved),
    )


def _count_call(conn: sqlite3.Connection, owner_id: str) -> None:
    # An owner's lock: other processes wait on SQLite's write lock, this one's calls run in order.
    conn.execute(
        "INSERT INTO usage_counts (owner_id, calls) VALUES (?, 1) "
        "ON CONFLICT (owner_id) DO UPDATE SET calls = calls + 1",
        (owner_id,),
    )


def _caps(
    conn: sqlite3.Connection, row: tuple[Any, ...] | None, owner_id: str, floor: int, now: datetime
) -> Caps:
    """(revoked_at, expires_at, daily, total) of a key or budget as admission reads them."""
    if row is None:
        return Caps(True, now, None, None, lambda: (0, 0))
    return Caps(
        revoked=row[0] is not None,
        expires_at=parse_ts(row[1]),
        daily=row[2],
        total=row[3],
        used=lambda: _spent(conn, owner_id, floor),
    )


def _reserve(conn: sqlite3.Connection, r: Reservation) -> Admission:
    key_id, budget_id = r.key.key_id, r.key.budget_id
    if budget_id is not None:
        _count_call(conn, budget_id)  # the budget first, then the key: one order everywhere
    _count_call(conn, key_id)
    # Revocation, expiry and caps are read here, inside the transaction, never from a cache.
    row = conn.execute(
        "SELECT revoked_at, expires_at, daily_cap_micros, total_cap_micros, max_per_call_micros, "
        "max_per_caller_micros, dedupe_window_s FROM vault_keys WHERE key_id = ?",
        (key_id,),
    ).fetchone()
    budget_row = None
    if budget_id is not None:
        budget_row = conn.execute(
            "SELECT revoked_at, expires_at, daily_cap_micros, total_cap_micros FROM budgets "
            "WHERE budget_id = ?",
            (budget_id,),
        ).fetchone()
    by_key = by_fingerprint = None
    if row is not None and r.idempotency_key:
        by_key = _prior(conn, key_id, "idempotency", r.idempotency_key, r.request_hash)
    if row is not None and r.dedupe and by_key is None:
        by_fingerprint = _prior(conn, key_id, "dedupe", r.dedupe_token, r.request_hash)
    floor = window_floor(r.now)
    bucket = bucket_of(r.now)
    paid: list[tuple[Any, ...]] = []
    cost = r.cost_micros
    if r.paid_object is not None and row is not None:
        paid = _paid_marks(conn, r, floor)
        cost = offset_cost(cost, sum(mark[3] for mark in paid))
    admitted = admit(
        now=r.now,
        key=_caps(conn, row[:4] if row else None, key_id, floor, r.now),
        budget=(
            _caps(conn, budget_row, budget_id, floor, r.now) if budget_id is not None else None
        ),
        by_key=by_key,
        by_fingerprint=by_fingerprint,
        dedupe_window=timedelta(seconds=row[6] if row else 0),
        vendor_replays=r.vendor_replays,
        cost_micros=cost,
        max_per_call_micros=row[4] if row else None,
        max_per_caller_micros=row[5] if row else None,
        caller_used=lambda: _caller_spent(conn, key_id, r.caller),
    )
    decision = admitted.decision
    forwarded = decision is Decision.FORWARDED
    tracks_caller = row is not None and row[5] is not None
    if forwarded and paid:
        _redate(conn, r, paid, bucket)
    if admitted.reserve_micros:
        if budget_id is not None:
            _add_spend(conn, budget_id, bucket, 0, admitted.reserve_micros)
        _add_spend(conn, key_id, bucket, 0, admitted.reserve_micros)
        if tracks_caller:
            _add_caller_spend(conn, key_id, r.caller, 0, admitted.reserve_micros)
    if admitted.cap_hit:
        conn.executemany(
            "UPDATE usage_counts SET cap_hits = cap_hits + 1 WHERE owner_id = ?",
            [(owner,) for owner in (key_id, budget_id) if owner is not None],
        )
    replay = None
    if admitted.replay_from is not None:
        kind = "idempotency" if admitted.replay_from is by_key else "dedupe"
        token = r.idempotency_key if admitted.replay_from is by_key else r.dedupe_token
        replay = _stored_answer(conn, key_id, kind, token or "")
    audit_id = _insert_audit(
        conn,
        AuditRecord(
            ts=r.now,
            key_id=key_id,
            label=r.key.label,
            vendor=r.vendor,
            method=r.method,
            path=r.path,
            status=replay.status if replay else refusal_status(decision),
            decision=Decision.IN_FLIGHT if forwarded else decision,
            reserved_micros=admitted.reserve_micros,
            amount=r.amount,
            currency=r.currency,
            idempotency_key=r.idempotency_key,
            caller_tag=r.caller_tag,
            budget_id=budget_id,
        ),
    )
    forward_key = admitted.forward_key or r.forward_key
    if forwarded:
        stamp = format_ts(r.now)
        tokens = []
        if r.idempotency_key:
            tokens.append(("idempotency", r.idempotency_key))
        if r.dedupe:
            tokens.append(("dedupe", r.dedupe_token))
        conn.executemany(
            "INSERT OR REPLACE INTO replays (key_id, kind, token, request_hash, created_at, "
            "audit_id, forwarded_key) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (key_id, kind, token, r.request_hash, stamp, audit_id, forward_key)
                for kind, token in tokens
            ],
        )
    return Admission(
        decision, audit_id, replay, forward_key, admitted.prior_audit_id, admitted.reserve_micros
    )


def _paid_marks(conn: sqlite3.Connection, r: Reservation, floor: int) -> list[tuple[Any, ...]]:
    """What this call's payer (its key, or any key on its budget) paid for `r.paid_object`
    within the window: (key_id, budget_id, bucket, micros) marks. Another payer's offset nothing."""
    return conn.execute(
        "SELECT key_id, budget_id, bucket, micros FROM paid_for "
        "WHERE vendor = ? AND object_id = ? AND bucket >= ? "
        "AND (key_id = ? OR (budget_id IS NOT NULL AND budget_id = ?))",
        (r.vendor, r.paid_object, floor, r.key.key_id, r.key.budget_id),
    ).fetchall()


def _redate(
    conn: sqlite3.Connection, r: Reservation, marks: list[tuple[Any, ...]], bucket: int
) -> None:
    """Move the offset marks, and the spend they stand for, to this call's bucket: the money
    moves now, so every window from now on counts it (moving spend later never lowers what a
    future window counts, and the lifetime total is unchanged)."""
    for key_id, budget_id, was, micros in marks:
        if was == bucket:
            continue
        for owner in (budget_id, key_id):
            if owner is not None:
                _add_spend(conn, owner, was, -micros, 0)
                _add_spend(conn, owner, bucket, micros, 0)
        conn.execute(
            "DELETE FROM paid_for WHERE vendor = ? AND object_id = ? AND key_id = ? AND bucket = ?",
            (r.vendor, r.paid_object, key_id, was),
        )
        _mark_paid(conn, r.vendor, r.paid_object or "", key_id, budget_id, bucket, micros)


def _mark_paid(
    conn: sqlite3.Connection,
    vendor: str,
    object_id: str,
    key_id: str,
    budget_id: str | None,
    bucket: int,
    micros: int,
) -> None:
    conn.execute(
        "INSERT INTO paid_for (vendor, object_id, key_id, budget_id, bucket, micros) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (vendor, object_id, key_id, bucket) "
        "DO UPDATE SET micros = micros + excluded.micros",
        (vendor, object_id, key_id, budget_id, bucket, micros),
    )


def _caller_spent(conn: sqlite3.Connection, key_id: str, caller: str) -> int:
    row = conn.execute(
        "SELECT settled_micros + reserved_micros FROM caller_spend WHERE key_id = ? AND caller = ?",
        (key_id, caller),
    ).fetchone()
    return int(row[0]) if row else 0


def _settle(conn: sqlite3.Connection, s: Settlement) -> None:
    outcome = (s.status, s.decision, s.settled_micros, s.vendor_request_id, s.latency_ms)
    still_in_flight = conn.execute(
        "UPDATE audit SET status = ?, decision = ?, settled_micros = ?, vendor_request_id = ?, "
        "latency_ms = ? WHERE id = ? AND decision = 'in_flight'",
        (*outcome, s.audit_id),
    ).rowcount
    if not still_in_flight:  # the sweep reconciled it meanwhile
        conn.execute(
            "UPDATE audit SET status = ?, decision = ?, settled_micros = ?, "
            "vendor_request_id = ?, latency_ms = ? WHERE id = ?",
            (*outcome, s.audit_id),
        )
    release, charge = settle_amounts(
        still_in_flight=bool(still_in_flight), reserved=s.reserved_micros, settled=s.settled_micros
    )
    if release or charge:
        if s.budget_id is not None:
            _add_spend(conn, s.budget_id, s.bucket, charge, -release)
        _add_spend(conn, s.key_id, s.bucket, charge, -release)
        if s.caller is not None:
            _add_caller_spend(conn, s.key_id, s.caller, charge, -release)
    tokens = []
    if s.idempotency_key:
        tokens.append(("idempotency", s.idempotency_key))
    if s.dedupe:
        tokens.append(("dedupe", s.dedupe_token))
    # Only the tokens this call still holds: a retry may have taken them over since.
    if s.response is not None:
        headers = json.dumps(s.response.headers)
        conn.executemany(
            "UPDATE replays SET status = ?, headers = ?, body = ? "
            "WHERE key_id = ? AND kind = ? AND token = ? AND audit_id = ?",
            [
                (s.response.status, headers, s.response.body, s.key_id, kind, token, s.audit_id)
                for kind, token in tokens
            ],
        )
    elif s.outcome_known:
        conn.executemany(
            "DELETE FROM replays WHERE key_id = ? AND kind = ? AND token = ? AND audit_id = ?",
            [(s.key_id, kind, token, s.audit_id) for kind, token in tokens],
        )
    if s.settled_micros > 0:
        for object_id in s.counts:
            _mark_paid(conn, s.vendor, object_id, s.key_id, s.budget_id, s.bucket, s.settled_micros)


def _sweep(conn: sqlite3.Connection, older_than: datetime) -> int:
    """Count reservations left by a crashed process as spent (the money may have moved)."""
    stale = conn.execute(
        "SELECT a.id, a.key_id, a.budget_id, a.ts, a.reserved_micros, a.caller_tag, "
        "k.max_per_caller_micros IS NOT NULL FROM audit a JOIN vault_keys k ON k.key_id = a.key_id "
        "WHERE a.decision = 'in_flight' AND a.ts < ? ORDER BY a.id",
        (format_ts(older_than),),
    ).fetchall()
    for audit_id, key_id, budget_id, ts, reserved, tag, tracks_caller in stale:
        bucket = bucket_of(parse_ts(ts))
        for owner in (budget_id, key_id):
            if owner is not None:
                _add_spend(conn, owner, bucket, reserved, -reserved)
        if tracks_caller:
            _add_caller_spend(conn, key_id, caller_of(tag), reserved, -reserved)
        conn.execute(
            "UPDATE audit SET decision = 'reconciled', settled_micros = reserved_micros "
            "WHERE id = ?",
            (audit_id,),
        )
    return len(stale)
