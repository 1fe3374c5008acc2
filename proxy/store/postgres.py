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
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from keybrake.proxy.decisions import (
    CAP_HITS,
    CUT_OFF,
    RULE_VERSION,
    Decision,
    bucket_of,
    caller_of,
    refusal_status,
    window_floor,
)
from keybrake.proxy.errors import RulesNewer, SchemaNewer, StoreUnavailable
from keybrake.proxy.store.operations import SQLStore
from keybrake.proxy.store.records import Admission, Reservation, Settlement, StoredResponse
from keybrake.proxy.store.sql import POSTGRES, Op, Refused, run_async

__all__ = ["MIGRATIONS", "PostgresStore", "ledger_sql", "migrate_connection"]

T = TypeVar("T")
log = logging.getLogger("keybrake.store")

MIGRATIONS: list[str] = [
    """
    CREATE TABLE vault_keys (
        key_id text PRIMARY KEY,
        key_hash bytea NOT NULL UNIQUE,
        vendor text NOT NULL,
        label text NOT NULL,
        daily_cap_micros bigint NOT NULL,
        max_per_call_micros bigint,
        allowed_endpoints jsonb NOT NULL,
        metadata jsonb NOT NULL,
        dedupe_window_s integer NOT NULL,
        created_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        revoked_at timestamptz
    );
    CREATE INDEX vault_keys_label ON vault_keys (label);
    CREATE TABLE spend (
        key_id text NOT NULL,
        day text NOT NULL,
        settled_micros bigint NOT NULL DEFAULT 0,
        reserved_micros bigint NOT NULL DEFAULT 0,
        calls bigint NOT NULL DEFAULT 0,
        cap_hits bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, day)
    );
    CREATE TABLE replays (
        key_id text NOT NULL,
        kind text NOT NULL,
        token text NOT NULL,
        request_hash text NOT NULL,
        created_at timestamptz NOT NULL,
        status integer,
        headers jsonb,
        body bytea,
        PRIMARY KEY (key_id, kind, token)
    );
    CREATE TABLE counted_objects (
        vendor text NOT NULL,
        object_id text NOT NULL,
        PRIMARY KEY (vendor, object_id)
    );
    CREATE TABLE audit (
        id bigserial PRIMARY KEY,
        ts timestamptz NOT NULL,
        key_id text,
        label text,
        vendor text NOT NULL,
        method text NOT NULL,
        path text NOT NULL,
        status integer NOT NULL,
        decision text NOT NULL,
        reserved_micros bigint NOT NULL DEFAULT 0,
        settled_micros bigint NOT NULL DEFAULT 0,
        amount bigint,
        currency text,
        vendor_request_id text,
        idempotency_key text,
        latency_ms double precision,
        caller_tag text,
        day text
    );
    CREATE INDEX audit_key ON audit (key_id, id);
    CREATE INDEX audit_label ON audit (label, id);
    CREATE INDEX audit_ts ON audit (ts);
    CREATE INDEX audit_in_flight ON audit (ts) WHERE decision = 'in_flight';
    """,
    # Migrations 2 and 3 replaced and tuned migration 1's request-path functions, which live in
    # ledger.sql now: on a new database there is nothing to run.
    "SELECT 1",
    "SELECT 1",
    # Spend moves from per-UTC-day rows to hourly buckets of a rolling 24-hour window, kept per
    # owner (a key or a budget); each owner's lock and counters move to `usage_counts`. A day's
    # spend lands in its last hour, so the window counts it at least as long as the day-based
    # cap did: never less. Keys gain lifetime and per-caller caps and may draw on a budget.
    """
    CREATE TABLE usage_counts (
        owner_id text PRIMARY KEY,
        calls bigint NOT NULL DEFAULT 0,
        cap_hits bigint NOT NULL DEFAULT 0
    );
    INSERT INTO usage_counts (owner_id, calls, cap_hits)
        SELECT key_id, sum(calls), sum(cap_hits) FROM spend GROUP BY key_id;
    CREATE TABLE spend_window (
        owner_id text NOT NULL,
        bucket bigint NOT NULL,
        settled_micros bigint NOT NULL DEFAULT 0,
        reserved_micros bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (owner_id, bucket)
    );
    CREATE INDEX spend_window_bucket ON spend_window (bucket);
    INSERT INTO spend_window (owner_id, bucket, settled_micros, reserved_micros)
        SELECT key_id, floor(extract(epoch FROM day::date) / 3600)::bigint + 23, settled_micros,
               reserved_micros FROM spend;
    DROP TABLE spend;
    CREATE TABLE caller_spend (
        key_id text NOT NULL,
        caller text NOT NULL,
        settled_micros bigint NOT NULL DEFAULT 0,
        reserved_micros bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, caller)
    );
    CREATE TABLE budgets (
        budget_id text PRIMARY KEY,
        label text NOT NULL,
        daily_cap_micros bigint,
        total_cap_micros bigint,
        metadata jsonb NOT NULL,
        created_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        revoked_at timestamptz
    );
    CREATE INDEX budgets_label ON budgets (label);
    CREATE TABLE changes (
        id bigserial PRIMARY KEY,
        subject_id text NOT NULL,
        field text NOT NULL,
        old text,
        new text,
        reason text NOT NULL,
        at timestamptz NOT NULL
    );
    CREATE INDEX changes_subject ON changes (subject_id, id);
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
    # 5: scoped issuers, who issued what for which namespace, the record of admin actions, and
    # idempotent issuing.
    """
    CREATE TABLE issuers (
        issuer_id text PRIMARY KEY,
        name text NOT NULL,
        token_hash bytea UNIQUE,
        policy jsonb NOT NULL,
        kubernetes jsonb,
        created_at timestamptz NOT NULL,
        deleted_at timestamptz
    );
    CREATE UNIQUE INDEX issuers_live_name ON issuers (name) WHERE deleted_at IS NULL;
    CREATE TABLE events (
        id bigserial PRIMARY KEY,
        ts timestamptz NOT NULL,
        action text NOT NULL,
        actor text NOT NULL,
        issuer_id text,
        target text,
        outcome text NOT NULL,
        source text,
        detail jsonb
    );
    CREATE INDEX events_issuer ON events (issuer_id, id);
    CREATE INDEX events_target ON events (target, id);
    CREATE TABLE issue_requests (
        scope text NOT NULL,
        idempotency_key text NOT NULL,
        request_hash text NOT NULL,
        subject_id text NOT NULL,
        created_at timestamptz NOT NULL,
        PRIMARY KEY (scope, idempotency_key)
    );
    ALTER TABLE vault_keys ADD COLUMN issuer_id text, ADD COLUMN namespace text,
        ADD COLUMN service_account text;
    CREATE INDEX vault_keys_issuer ON vault_keys (issuer_id);
    ALTER TABLE budgets ADD COLUMN issuer_id text, ADD COLUMN namespace text,
        ADD COLUMN service_account text;
    """,
    # 6: listings page newest first (`continue`): walk an index instead of sorting every row.
    """
    CREATE INDEX vault_keys_created ON vault_keys (created_at DESC, key_id DESC);
    CREATE INDEX budgets_created ON budgets (created_at DESC, budget_id DESC);
    """,
    # 7: threshold alerts: which are raised (until spend falls back), and the outbox.
    """
    CREATE TABLE alert_marks (
        owner_id text NOT NULL,
        mark text NOT NULL,
        PRIMARY KEY (owner_id, mark)
    );
    CREATE TABLE alert_outbox (
        delivery_id text PRIMARY KEY,
        owner_id text NOT NULL,
        mark text NOT NULL,
        payload text NOT NULL,
        created_at timestamptz NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at timestamptz NOT NULL,
        claimed_until timestamptz,
        delivered_at timestamptz,
        last_error text
    );
    CREATE INDEX alert_outbox_due ON alert_outbox (next_attempt_at) WHERE delivered_at IS NULL;
    CREATE INDEX alert_outbox_created ON alert_outbox (created_at);
    """,
    # 8: each key's and budget's own alert thresholds; the dashboard's sign-in sessions (the
    # id's hash only), and an index to find each run's newest key or budget and whether it is
    # live without reading the rows.
    """
    CREATE TABLE ui_sessions (
        session_hash bytea PRIMARY KEY,
        issuer_id text,
        credential_hash bytea NOT NULL,
        created_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL
    );
    CREATE INDEX ui_sessions_expires ON ui_sessions (expires_at);
    ALTER TABLE vault_keys ADD COLUMN alert_percents text;
    ALTER TABLE budgets ADD COLUMN alert_percents text;
    CREATE INDEX vault_keys_label_created ON vault_keys
        (label, created_at, key_id, expires_at, revoked_at, namespace);
    CREATE INDEX budgets_label_created ON budgets
        (label, created_at, budget_id, expires_at, revoked_at, namespace);
    """,
    # 9: "paid for" marks name their payer (key and budget), the bucket and the amount, so only
    # the same payer's confirm or capture is offset, and only within the window (re-dated to
    # when the money moves); dedupe tokens carry the fan-out item, read from each row's audit
    # row, so a retry straddling the upgrade still matches. The old marks named no payer: they
    # are dropped, so such an object's confirm is priced in full. (It also replaced the reserve
    # and settle functions, which live in ledger.sql since migration 10.)
    """
    DROP TABLE counted_objects;
    CREATE TABLE paid_for (
        vendor text NOT NULL,
        object_id text NOT NULL,
        key_id text NOT NULL,
        budget_id text,
        bucket bigint NOT NULL,
        micros bigint NOT NULL,
        PRIMARY KEY (vendor, object_id, key_id, bucket)
    );
    CREATE INDEX paid_for_bucket ON paid_for (bucket);
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
        self._durable_commits = durable_commits
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        # The request path does not go through the pool: each batcher has at most one statement
        # in flight, so it owns one connection and skips the pool's acquire and release.
        self._reserve_lane = _Lane(self._connect)
        self._settle_lane = _Lane(self._connect)
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

    def _connection_settings(self) -> dict[str, Any]:
        return {
            "command_timeout": 10,
            # Startup parameters: they hold for the connection's whole life.
            "server_settings": {
                "timezone": "UTC",
                **({} if self._durable_commits else {"synchronous_commit": "off"}),
            },
        }

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.url, timeout=10, **self._connection_settings())

    async def open(self) -> None:
        try:
            conn = await asyncpg.connect(self.url, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            await migrate_connection(conn, self.rule_version)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self.url,
            min_size=self._min_size,
            max_size=self._max_size,
            reset=_keep_session,
            **self._connection_settings(),
        )

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
                json.dumps(list(s.counts)),
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
                # Marks out of the window offset nothing (keybrake_reserve).
                await c.execute("DELETE FROM paid_for WHERE bucket < $1", before_bucket)
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
