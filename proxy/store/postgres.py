"""PostgreSQL store, for several proxy replicas sharing one database.

The operations are `keybrake.proxy.store.operations`', run on a pool of asyncpg connections. The
ledger is server-side: each request-path operation is one round trip to a function of
`ledger.sql` (`keybrake_reserve`, `keybrake_settle`), and concurrent calls go as one statement per
batch. `keybrake_reserve` restates `keybrake.proxy.decisions.admit` (the decision table test holds
the two together). It first updates the key's `usage_counts` row, which takes that row's lock:
calls of one key serialise there, and every statement after it sees the committed spend of the
calls before, so the window check is exact across replicas. Batches run their calls in key order,
so batches that lock several keys' rows (reserves, settles, other replicas') never wait on each
other in a cycle.

`ledger_rules` holds the version of the rules the functions enforce (`decisions.RULE_VERSION`). A
build loads its functions only over an older version, and refuses vendor calls when the
database's is newer (`RulesNewer`); the functions themselves refuse a caller of another version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from keybrake.proxy.decisions import (
    CAP_HITS,
    CUT_OFF,
    RATE_NOTE,
    RATE_SECONDS,
    RULE_VERSION,
    Decision,
    bucket_of,
    bucket_start_second,
    caller_of,
    refusal_status,
    window_floor,
)
from keybrake.proxy.errors import RulesNewer, SchemaNewer, StoreUnavailable
from keybrake.proxy.store import _schema
from keybrake.proxy.store.operations import SQLStore
from keybrake.proxy.store.records import Admission, Reservation, Settlement, StoredResponse
from keybrake.proxy.store.sql import POSTGRES, Op, Refused, run_async

__all__ = ["MIGRATIONS", "PostgresStore", "ledger_sql", "migrate_connection"]

T = TypeVar("T")
log = logging.getLogger("keybrake.store")

# The tables both backends have are stated once, in `_schema`; these add what only PostgreSQL does.
_TYPES = _schema.POSTGRES_TYPES

MIGRATIONS: list[str] = [
    # 1: the first tables. Audit rows also kept their UTC day (migration 4 drops it).
    _schema.first_tables(_TYPES, audit_added=("day text",))
    + """
    CREATE INDEX audit_in_flight ON audit (ts) WHERE decision = 'in_flight';
    """,
    # Migrations 2 and 3 replaced and tuned migration 1's request-path functions, which live in
    # ledger.sql now: on a new database there is nothing to run.
    "SELECT 1",
    "SELECT 1",
    # 4: spend in hourly buckets of a rolling window, budgets, and keys' new caps.
    _schema.spend_window(
        _TYPES, day_start_hour="floor(extract(epoch FROM day::date) / 3600)::bigint"
    )
    + """
    ALTER TABLE vault_keys
        ALTER COLUMN daily_cap_micros DROP NOT NULL,
        ADD COLUMN allowed_accounts jsonb NOT NULL DEFAULT '[]',
        ADD COLUMN total_cap_micros bigint,
        ADD COLUMN max_per_caller_micros bigint,
        ADD COLUMN budget_id text;
    CREATE INDEX vault_keys_budget ON vault_keys (budget_id);
    ALTER TABLE replays ADD COLUMN audit_id bigint, ADD COLUMN forwarded_key text;
    ALTER TABLE audit DROP COLUMN day, ADD COLUMN budget_id text;
    CREATE INDEX audit_budget ON audit (budget_id, id);
    """,
    # 5: scoped issuers, and what each key and budget was issued for.
    _schema.issuers(_TYPES)
    + """
    ALTER TABLE vault_keys ADD COLUMN issuer_id text, ADD COLUMN namespace text,
        ADD COLUMN service_account text;
    CREATE INDEX vault_keys_issuer ON vault_keys (issuer_id);
    ALTER TABLE budgets ADD COLUMN issuer_id text, ADD COLUMN namespace text,
        ADD COLUMN service_account text;
    """,
    # 6: listings page newest first.
    _schema.LISTING_INDEXES,
    # 7: threshold alerts.
    _schema.alerts(_TYPES),
    # 8: alert thresholds of their own, dashboard sessions, runs' newest keys and budgets.
    _schema.sessions(_TYPES),
    # 9: "paid for" marks name their payer. Dedupe tokens carry the fan-out item, read from each
    # row's audit row, so a retry straddling the upgrade still matches. (It also replaced the
    # reserve and settle functions, which live in ledger.sql since migration 10.)
    _schema.paid_for(_TYPES)
    + """
    UPDATE replays r SET token = r.token || ':' || coalesce((
        SELECT CASE WHEN strpos(a.caller_tag, '@') > 0 THEN split_part(a.caller_tag, '@', 1)
                    ELSE '' END
          FROM audit a WHERE a.id = r.audit_id), '')
     WHERE r.kind = 'dedupe';
    """,
    # 10: the ledger's functions leave the migrations for ledger.sql, loaded with the version of
    # the rules they enforce (`ledger_rules`); the functions the migrations above made are
    # dropped when it is first loaded. 0: loaded by no build yet.
    """
    CREATE TABLE ledger_rules (version integer NOT NULL);
    INSERT INTO ledger_rules (version) VALUES (0);
    """,
    # 11: constraints on keys and budgets.
    _schema.constraints(_TYPES),
    # 12: the revision of a key's or budget's constraints, which patches change.
    _schema.policy_revisions(_TYPES),
]


# The ledger functions' parameters, named once: the functions' signatures are rendered from these
# (each `p_` + name), and so are the statements that call them, one call or a batch.
RESERVE_PARAMETERS = (
    ("key_id", "text"),
    ("budget_id", "text"),
    ("now", "timestamptz"),
    ("bucket", "bigint"),
    ("floor", "bigint"),
    ("cost", "bigint"),
    ("idem", "text"),
    ("hash", "text"),
    ("dedupe", "boolean"),
    ("fwd", "text"),
    ("replays", "boolean"),
    ("caller", "text"),
    ("vendor", "text"),
    ("method", "text"),
    ("path", "text"),
    ("tag", "text"),
    ("amount", "bigint"),
    ("currency", "text"),
    ("dedupe_token", "text"),
    ("paid_object", "text"),
    ("rules", "integer"),
    ("second", "bigint"),
    ("report", "text"),
    ("key_rev", "integer"),
    ("budget_rev", "integer"),
)
SETTLE_PARAMETERS = (
    ("audit_id", "bigint"),
    ("key_id", "text"),
    ("budget_id", "text"),
    ("caller", "text"),
    ("bucket", "bigint"),
    ("vendor", "text"),
    ("reserved", "bigint"),
    ("settled", "bigint"),
    ("status", "integer"),
    ("decision", "text"),
    ("request_id", "text"),
    ("latency", "double precision"),
    ("idem", "text"),
    ("hash", "text"),
    ("dedupe", "boolean"),
    ("keep", "boolean"),
    ("known", "boolean"),
    ("headers", "jsonb"),
    ("body", "bytea"),
    ("counts", "jsonb"),
    ("dedupe_token", "text"),
)


def _calls(function: str, parameters: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    """The statement calling `function` once, and the one calling it for a batch of calls (one
    array per parameter, unnested in order, so a burst costs one round trip and one commit)."""
    named = ", ".join(f"p_{name} => ${n}" for n, (name, _) in enumerate(parameters, start=1))
    arrays = ", ".join(f"${n}::{kind}[]" for n, (_, kind) in enumerate(parameters, start=1))
    columns = ", ".join(name for name, _ in parameters)
    lateral = ", ".join(f"p_{name} => a.{name}" for name, _ in parameters)
    one = f"SELECT * FROM {function}({named})"
    many = (
        f"SELECT r.* FROM unnest({arrays}) WITH ORDINALITY AS a({columns}, n) "
        f"CROSS JOIN LATERAL {function}({lateral}) r ORDER BY a.n"
    )
    return one, many


_RESERVE_ONE, _RESERVE_MANY = _calls("keybrake_reserve", RESERVE_PARAMETERS)
_SETTLE_ONE, _SETTLE_MANY = _calls("keybrake_settle", SETTLE_PARAMETERS)
_DECISIONS = {decision.value: decision for decision in Decision}  # faster than Decision(text)


def _quoted(decisions: frozenset[Decision]) -> str:
    return ", ".join(f"'{d.value}'" for d in sorted(decisions))


def ledger_sql(rule_version: int = RULE_VERSION) -> str:
    """ledger.sql with its names filled in from the decision module."""
    statuses = " ".join(f"WHEN '{d.value}' THEN {refusal_status(d)}" for d in Decision)
    values = {
        "reserve_parameters": ", ".join(f"p_{n} {kind}" for n, kind in RESERVE_PARAMETERS),
        "settle_parameters": ", ".join(f"p_{n} {kind}" for n, kind in SETTLE_PARAMETERS),
        "rule_version": str(int(rule_version)),
        "cut_off": _quoted(CUT_OFF),
        "cap_hits": _quoted(CAP_HITS),
        "rate_seconds": str(RATE_SECONDS),
        "rate_note": RATE_NOTE.replace("'", "''"),
        "status_of_d": f"CASE d {statuses} ELSE 0 END",
    }
    text = Path(__file__).with_name("ledger.sql").read_text()
    return re.sub(r"\{\{ (\w+) \}\}", lambda m: values[m.group(1)], text)


# Any advisory-lock number will do, as long as every replica uses the same one.
_MIGRATION_LOCK = 0x6B657962

# What a replica of another rule version gets from `keybrake_reserve`, and what a caller of a
# function a newer build replaced gets (undefined function).
_OTHER_RULES = {"KB001", "42883"}


async def migrate_connection(conn: asyncpg.Connection, rule_version: int = RULE_VERSION) -> int:
    """Apply pending migrations, then load the ledger if the database's rules are older than this
    build's, all under an advisory lock, so replicas starting together are safe."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        version = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
        if version > len(MIGRATIONS):
            raise SchemaNewer(version, len(MIGRATIONS))
        rules = await _loaded_rules(conn)
        if rules > rule_version:
            raise RulesNewer(rules, rule_version)
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await conn.execute(script)
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", number)
        if rules < rule_version and await _has_rules(conn):
            # Every function an earlier build made goes, whatever its signature: a replica still
            # calling one then fails closed instead of enforcing rules that no longer hold.
            await conn.execute(_DROP_LEDGER)
            await conn.execute(ledger_sql(rule_version))
            await conn.execute("DELETE FROM ledger_rules")
            await conn.execute("INSERT INTO ledger_rules (version) VALUES ($1)", rule_version)
    return len(MIGRATIONS)


async def _has_rules(conn: asyncpg.Connection) -> bool:
    """Whether the schema records rule versions (migration 10 on)."""
    return bool(await conn.fetchval("SELECT to_regclass('ledger_rules') IS NOT NULL"))


async def _loaded_rules(conn: asyncpg.Connection) -> int:
    """The version of the rules loaded into the database; 0 for none (or no record of it)."""
    if not await _has_rules(conn):
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM ledger_rules"))


_DROP_LEDGER = """
DO $$
DECLARE f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
            WHERE p.pronamespace = current_schema()::regnamespace
              AND p.proname LIKE 'keybrake\\_%' LOOP
    EXECUTE 'DROP FUNCTION ' || f;
  END LOOP;
END $$
"""


class PostgresStore(SQLStore):
    dialect = POSTGRES

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 20,
        durable_commits: bool = True,
        rule_version: int = RULE_VERSION,
    ) -> None:
        self.url = url
        self.rule_version = rule_version
        self._connections = _Connections(url, durable_commits, min_size, max_size)
        self._pool: asyncpg.Pool | None = None
        # The request path does not go through the pool: each batcher has at most one statement
        # in flight, so it owns one connection and skips the pool's acquire and release.
        self._reserve_lane = _Lane(self._connections.connect)
        self._settle_lane = _Lane(self._connections.connect)
        self._reservations = _Batcher(
            self._run_many(
                self._reserve_lane,
                _RESERVE_ONE,
                _RESERVE_MANY,
                lock_order=lambda a: (a[1] or a[0], a[0]),  # (budget or key, key)
            )
        )
        self._settlements = _Batcher(
            self._run_many(
                self._settle_lane,
                _SETTLE_ONE,
                _SETTLE_MANY,
                lock_order=lambda a: (a[2] or a[1], a[1]),
            )
        )

    def _run_many(
        self,
        lane: _Lane,
        one: str,
        many: str,
        *,
        lock_order: Callable[[tuple[Any, ...]], tuple[str, str]],
    ) -> Callable[[list[tuple[Any, ...]]], Awaitable[list[Any]]]:
        async def run(batch: list[tuple[Any, ...]]) -> list[Any]:
            if len(batch) == 1:  # a quiet proxy: call the function itself, no arrays to unnest

                async def op(c: asyncpg.Connection) -> list[Any]:
                    return [await c.fetchrow(one, *batch[0])]

                return await self._run(op, lane)
            # A batch locks its keys' (and budgets') rows in the order it runs them. Run in one
            # global order, a budget's calls together, each call taking its budget's rows
            # before its key's (calls of one key keep their own order), so a reserve batch and
            # a settle batch, or two replicas' batches, never wait on each other in a cycle.
            order = sorted(range(len(batch)), key=lambda i: lock_order(batch[i]))
            columns = [list(column) for column in zip(*(batch[i] for i in order), strict=True)]

            async def many_op(c: asyncpg.Connection) -> list[Any]:
                return list(await c.fetch(many, *columns))

            results = await self._run(many_op, lane)
            out: list[Any] = [None] * len(batch)
            for position, result in zip(order, results, strict=True):
                out[position] = result
            return out

        return run

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            conn = await asyncpg.connect(self.url, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            await migrate_connection(conn, self.rule_version)
        finally:
            await conn.close()
        self._pool = await self._connections.pool()

    async def close(self) -> None:
        await self._reserve_lane.close()
        await self._settle_lane.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def ping(self) -> None:
        await self._run(self._check_versions)

    async def _check_versions(self, c: asyncpg.Connection) -> None:
        """Refuse a database a newer build has migrated, or loaded newer rules into."""
        version = await c.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
        if version > len(MIGRATIONS):
            raise SchemaNewer(version, len(MIGRATIONS))
        rules = await _loaded_rules(c)
        if rules > self.rule_version:
            raise RulesNewer(rules, self.rule_version)

    # -- the drivers ---------------------------------------------------------------------------

    async def _run(
        self, fn: Callable[[asyncpg.Connection], Awaitable[T]], lane: _Lane | None = None
    ) -> T:
        if self._pool is None:
            raise StoreUnavailable("the PostgreSQL pool is not open")
        try:
            if lane is not None:
                return await lane.run(fn)
            async with self._pool.acquire(timeout=10) as conn:
                return await fn(conn)
        except (
            OSError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            # What asyncpg raises for a call on a connection the server has just closed.
            asyncpg.InternalClientError,
        ) as exc:
            raise StoreUnavailable(f"database call failed: {type(exc).__name__}: {exc}") from exc

    async def _read(self, make: Callable[[], Op[T]]) -> T:
        return await self._run(lambda c: run_async(c, make()))

    async def _write(self, make: Callable[[], Op[T]]) -> T:
        async def op(c: asyncpg.Connection) -> T:
            async with c.transaction():
                return await run_async(c, make())

        try:
            return await self._run(op)
        except Refused as refused:  # the transaction rolled back with it
            answer: T = refused.result
            return answer

    # -- the ledger ----------------------------------------------------------------------------

    async def reserve(self, r: Reservation) -> Admission:
        try:
            row: asyncpg.Record = await self._reservations.submit(
                (
                    r.key.key_id,
                    r.key.budget_id,
                    r.now,
                    bucket_of(r.now),
                    window_floor(r.now),
                    r.cost_micros,
                    r.idempotency_key,
                    r.request_hash,
                    r.dedupe,
                    r.forward_key,
                    r.vendor_replays,
                    r.caller,
                    r.vendor,
                    r.method,
                    r.path,
                    r.caller_tag,
                    r.amount,
                    r.currency,
                    r.dedupe_token if r.dedupe else None,
                    r.paid_object,
                    self.rule_version,
                    r.rate_second,
                    r.report,
                    r.key.policy_rev,
                    r.key.budget_policy_rev,
                )
            )
        except StoreUnavailable as exc:
            cause = exc.__cause__
            if getattr(cause, "sqlstate", None) in _OTHER_RULES:
                # Another build's ledger is loaded: say which, and forward nothing.
                await self.ping()
            raise
        replay = None
        if row["o_status"] is not None:
            headers = [tuple(h) for h in json.loads(row["o_headers"])]
            replay = StoredResponse(row["o_status"], headers, bytes(row["o_body"]))
        return Admission(
            _DECISIONS[row["o_decision"]],
            row["o_audit_id"],
            replay,
            row["o_forward_key"],
            row["o_prior_audit_id"],
            row["o_reserved"],
            row["o_retry_after"],
            row["o_reported"],
        )

    async def settle(self, s: Settlement) -> None:
        response = s.response
        await self._settlements.submit(
            (
                s.audit_id,
                s.key_id,
                s.budget_id,
                s.caller,
                s.bucket,
                s.vendor,
                s.reserved_micros,
                s.settled_micros,
                s.status,
                s.decision,
                s.vendor_request_id,
                s.latency_ms,
                s.idempotency_key,
                s.request_hash,
                s.dedupe,
                response is not None,
                s.outcome_known,
                json.dumps(response.headers) if response else None,
                response.body if response else None,
                json.dumps(list(s.counts)) if s.counts else "[]",
                s.dedupe_token,
            )
        )

    async def sweep(self, older_than: datetime) -> int:
        async def op(c: asyncpg.Connection) -> int:
            stale = await c.fetch(
                "SELECT a.id FROM audit a WHERE a.decision = 'in_flight' AND a.ts < $1 "
                "ORDER BY a.id",
                older_than,
            )
            swept = 0
            for audit_id in (row["id"] for row in stale):
                # One transaction a call, taking its rows in the request path's order (budget,
                # then key): a sweep never deadlocks with a batch.
                async with c.transaction():
                    row = await c.fetchrow(
                        "UPDATE audit a SET decision = 'reconciled', "
                        "settled_micros = reserved_micros FROM vault_keys k "
                        "WHERE a.id = $1 AND a.decision = 'in_flight' AND k.key_id = a.key_id "
                        "RETURNING a.key_id, a.budget_id, a.ts, a.reserved_micros, a.caller_tag, "
                        "k.max_per_caller_micros IS NOT NULL AS tracks_caller",
                        audit_id,
                    )
                    if row is None:  # settled meanwhile
                        continue
                    reserved, bucket = row["reserved_micros"], bucket_of(row["ts"])
                    for owner in (row["budget_id"], row["key_id"]):
                        if owner is not None:
                            await c.execute(
                                "SELECT keybrake_add_spend($1, $2, $3, $4)",
                                owner,
                                bucket,
                                reserved,
                                -reserved,
                            )
                    if row["tracks_caller"]:
                        await c.execute(
                            "SELECT keybrake_add_caller_spend($1, $2, $3, $4)",
                            row["key_id"],
                            caller_of(row["caller_tag"]),
                            reserved,
                            -reserved,
                        )
                    swept += 1
            return swept

        return await self._run(op)

    async def compact_spend(self, before_bucket: int) -> int:
        async def op(c: asyncpg.Connection) -> int:
            async with c.transaction():
                # Marks out of the window offset nothing (keybrake_reserve); calls older than a
                # rate's window count against none.
                await c.execute("DELETE FROM paid_for WHERE bucket < $1", before_bucket)
                await c.execute(
                    "DELETE FROM call_rate WHERE second < $1", bucket_start_second(before_bucket)
                )
                moved = await c.fetch(
                    "DELETE FROM spend_window WHERE bucket > 0 AND bucket < $1 "
                    "RETURNING owner_id, settled_micros, reserved_micros",
                    before_bucket,
                )
                totals: dict[str, tuple[int, int]] = {}
                for row in moved:
                    settled, reserved = totals.get(row["owner_id"], (0, 0))
                    totals[row["owner_id"]] = (
                        settled + row["settled_micros"],
                        reserved + row["reserved_micros"],
                    )
                for owner, (settled, reserved) in sorted(totals.items()):
                    await c.execute(
                        "SELECT keybrake_add_spend($1, 0, $2, $3)", owner, settled, reserved
                    )
            return len(moved)

        return await self._run(op)


@dataclass(frozen=True, slots=True)
class _Connections:
    """How the store's connections are made, the pool's and the request path's own (`_Lane`)."""

    url: str
    durable_commits: bool
    min_size: int  # the pool's
    max_size: int

    def _settings(self) -> dict[str, Any]:
        return {
            "command_timeout": 10,
            # Startup parameters: they hold for the connection's whole life.
            "server_settings": {
                "timezone": "UTC",
                **({} if self.durable_commits else {"synchronous_commit": "off"}),
            },
        }

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.url, timeout=10, **self._settings())

    async def pool(self) -> asyncpg.Pool:
        return await asyncpg.create_pool(
            self.url,
            min_size=self.min_size,
            max_size=self.max_size,
            reset=_keep_session,
            **self._settings(),
        )


class _Batcher:
    """Runs calls submitted concurrently as batches: while one batch is at the database, new calls
    queue up and go together in the next. An idle proxy sends a call at once (no timer)."""

    MAX_BATCH = 256

    def __init__(self, run: Callable[[list[tuple[Any, ...]]], Awaitable[list[Any]]]) -> None:
        self._run = run
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flushing = False

    async def submit(self, args: tuple[Any, ...]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((args, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self.MAX_BATCH]
                del self._pending[: self.MAX_BATCH]
                try:
                    results = await self._run([args for args, _ in batch])
                except Exception as exc:  # every call of a failed batch fails the same way
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._flushing = False


class _Lane:
    """One connection for one caller that never overlaps its own statements (a `_Batcher`).
    It connects on first use, and again after anything but an SQL error, so a database restart
    or a cut connection heals on the next call."""

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        self._connect = connect
        self._conn: asyncpg.Connection | None = None

    async def run(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._connect()
        try:
            return await fn(self._conn)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.AdminShutdownError):
                await self.close()
            raise
        except BaseException:
            # A timeout or a broken socket leaves the connection in an unknown state.
            await self.close()
            raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What the pool runs when a connection comes back, instead of asyncpg's default reset query
    (`RESET ALL`, `UNLISTEN *`, ...): a round trip per use, measured at about a third of a
    millisecond per call, for state this store never leaves behind (no LISTEN, cursors, session
    locks or SETs; open transactions are still rolled back by asyncpg itself)."""
