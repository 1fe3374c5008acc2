"""The tables both stores' migrations create, stated once for both SQL dialects.

Each function renders its statements with one backend's column types (`POSTGRES_TYPES`,
`SQLITE_TYPES`); each backend's `MIGRATIONS` adds what only it does (moving data with its own
date and string functions, SQLite's table rebuild, PostgreSQL's multi-column ALTERs). The
migrations are numbered differently (PostgreSQL has three more: two now empty, and the ledger
rules' table), so the comments here name none; the backends' lists do.

Existing databases ran these statements as they were written before they were stated here: each
backend's rendered `MIGRATIONS` must stay, to the character, the text it ran (these render it
exactly), so that a database upgraded from any version and a new one end up with the same schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "LISTING_INDEXES",
    "POSTGRES_TYPES",
    "SQLITE_TYPES",
    "ColumnTypes",
    "alerts",
    "constraints",
    "first_tables",
    "issuers",
    "paid_for",
    "policy_revisions",
    "sessions",
    "spend_window",
    "vault_keys",
]


@dataclass(frozen=True, slots=True)
class ColumnTypes:
    """A backend's name for each kind of column."""

    text: str
    int32: str  # seconds, statuses, attempts
    int64: str  # micros, buckets, counts
    real: str
    bytes: str  # hashes, response bodies
    json: str
    time: str  # SQLite: text, `money.format_ts`
    id: str  # a primary key the database numbers


# Each kind of column as PostgreSQL and as SQLite name it, side by side.
_NAMES = {
    "text": ("text", "TEXT"),
    "int32": ("integer", "INTEGER"),
    "int64": ("bigint", "INTEGER"),
    "real": ("double precision", "REAL"),
    "bytes": ("bytea", "BLOB"),
    "json": ("jsonb", "TEXT"),
    "time": ("timestamptz", "TEXT"),
    "id": ("bigserial PRIMARY KEY", "INTEGER PRIMARY KEY"),
}
POSTGRES_TYPES = ColumnTypes(**{kind: names[0] for kind, names in _NAMES.items()})
SQLITE_TYPES = ColumnTypes(**{kind: names[1] for kind, names in _NAMES.items()})


def _after(columns: Sequence[str]) -> str:
    """`columns` declared after a table's last one so far, each on its own line."""
    return "".join(f",\n        {column}" for column in columns)


def vault_keys(
    t: ColumnTypes,
    *,
    table: str = "vault_keys",
    daily_cap_required: bool = True,
    added: Sequence[str] = (),
) -> str:
    """vault_keys as the first migration made it. SQLite cannot drop a column's NOT NULL: its
    spend-window migration states the table again as `table`, the daily cap optional and the
    `added` columns after, copies the keys over and renames it."""
    daily_cap = f"{t.int64} NOT NULL" if daily_cap_required else t.int64
    return f"""
    CREATE TABLE {table} (
        key_id {t.text} PRIMARY KEY,
        key_hash {t.bytes} NOT NULL UNIQUE,
        vendor {t.text} NOT NULL,
        label {t.text} NOT NULL,
        daily_cap_micros {daily_cap},
        max_per_call_micros {t.int64},
        allowed_endpoints {t.json} NOT NULL,
        metadata {t.json} NOT NULL,
        dedupe_window_s {t.int32} NOT NULL,
        created_at {t.time} NOT NULL,
        expires_at {t.time} NOT NULL,
        revoked_at {t.time}{_after(added)}
    );"""


def first_tables(t: ColumnTypes, *, audit_added: Sequence[str] = ()) -> str:
    """The first migration, but for the index of in-flight audit rows, which differs; the
    `audit_added` columns end the audit table."""
    return (
        vault_keys(t)
        + f"""
    CREATE INDEX vault_keys_label ON vault_keys (label);
    CREATE TABLE spend (
        key_id {t.text} NOT NULL,
        day {t.text} NOT NULL,
        settled_micros {t.int64} NOT NULL DEFAULT 0,
        reserved_micros {t.int64} NOT NULL DEFAULT 0,
        calls {t.int64} NOT NULL DEFAULT 0,
        cap_hits {t.int64} NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, day)
    );
    CREATE TABLE replays (
        key_id {t.text} NOT NULL,
        kind {t.text} NOT NULL,
        token {t.text} NOT NULL,
        request_hash {t.text} NOT NULL,
        created_at {t.time} NOT NULL,
        status {t.int32},
        headers {t.json},
        body {t.bytes},
        PRIMARY KEY (key_id, kind, token)
    );
    CREATE TABLE counted_objects (
        vendor {t.text} NOT NULL,
        object_id {t.text} NOT NULL,
        PRIMARY KEY (vendor, object_id)
    );
    CREATE TABLE audit (
        id {t.id},
        ts {t.time} NOT NULL,
        key_id {t.text},
        label {t.text},
        vendor {t.text} NOT NULL,
        method {t.text} NOT NULL,
        path {t.text} NOT NULL,
        status {t.int32} NOT NULL,
        decision {t.text} NOT NULL,
        reserved_micros {t.int64} NOT NULL DEFAULT 0,
        settled_micros {t.int64} NOT NULL DEFAULT 0,
        amount {t.int64},
        currency {t.text},
        vendor_request_id {t.text},
        idempotency_key {t.text},
        latency_ms {t.real},
        caller_tag {t.text}{_after(audit_added)}
    );
    CREATE INDEX audit_key ON audit (key_id, id);
    CREATE INDEX audit_label ON audit (label, id);
    CREATE INDEX audit_ts ON audit (ts);"""
    )


def spend_window(t: ColumnTypes, *, day_start_hour: str) -> str:
    """Spend moves from per-UTC-day rows to hourly buckets of a rolling 24-hour window, kept per
    owner (a key or a budget); each owner's lock and counters move to `usage_counts`. A day's
    spend lands in its last hour, so the window counts it at least as long as the day-based cap
    did: never less. Keys gain lifetime and per-caller caps and may draw on a budget (the
    backends change vault_keys each its own way, after this).

    `day_start_hour`: the bucket (hours since the epoch) a row's `day` ('YYYY-MM-DD') starts in.
    """
    return f"""
    CREATE TABLE usage_counts (
        owner_id {t.text} PRIMARY KEY,
        calls {t.int64} NOT NULL DEFAULT 0,
        cap_hits {t.int64} NOT NULL DEFAULT 0
    );
    INSERT INTO usage_counts (owner_id, calls, cap_hits)
        SELECT key_id, sum(calls), sum(cap_hits) FROM spend GROUP BY key_id;
    CREATE TABLE spend_window (
        owner_id {t.text} NOT NULL,
        bucket {t.int64} NOT NULL,
        settled_micros {t.int64} NOT NULL DEFAULT 0,
        reserved_micros {t.int64} NOT NULL DEFAULT 0,
        PRIMARY KEY (owner_id, bucket)
    );
    CREATE INDEX spend_window_bucket ON spend_window (bucket);
    INSERT INTO spend_window (owner_id, bucket, settled_micros, reserved_micros)
        SELECT key_id, {day_start_hour} + 23, settled_micros,
               reserved_micros FROM spend;
    DROP TABLE spend;
    CREATE TABLE caller_spend (
        key_id {t.text} NOT NULL,
        caller {t.text} NOT NULL,
        settled_micros {t.int64} NOT NULL DEFAULT 0,
        reserved_micros {t.int64} NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, caller)
    );
    CREATE TABLE budgets (
        budget_id {t.text} PRIMARY KEY,
        label {t.text} NOT NULL,
        daily_cap_micros {t.int64},
        total_cap_micros {t.int64},
        metadata {t.json} NOT NULL,
        created_at {t.time} NOT NULL,
        expires_at {t.time} NOT NULL,
        revoked_at {t.time}
    );
    CREATE INDEX budgets_label ON budgets (label);
    CREATE TABLE changes (
        id {t.id},
        subject_id {t.text} NOT NULL,
        field {t.text} NOT NULL,
        old {t.text},
        new {t.text},
        reason {t.text} NOT NULL,
        at {t.time} NOT NULL
    );
    CREATE INDEX changes_subject ON changes (subject_id, id);"""


def issuers(t: ColumnTypes) -> str:
    """Scoped issuers, who issued what for which namespace, the record of admin actions, and
    idempotent issuing (the backends add the issuer and namespace columns after this)."""
    return f"""
    CREATE TABLE issuers (
        issuer_id {t.text} PRIMARY KEY,
        name {t.text} NOT NULL,
        token_hash {t.bytes} UNIQUE,
        policy {t.json} NOT NULL,
        kubernetes {t.json},
        created_at {t.time} NOT NULL,
        deleted_at {t.time}
    );
    CREATE UNIQUE INDEX issuers_live_name ON issuers (name) WHERE deleted_at IS NULL;
    CREATE TABLE events (
        id {t.id},
        ts {t.time} NOT NULL,
        action {t.text} NOT NULL,
        actor {t.text} NOT NULL,
        issuer_id {t.text},
        target {t.text},
        outcome {t.text} NOT NULL,
        source {t.text},
        detail {t.json}
    );
    CREATE INDEX events_issuer ON events (issuer_id, id);
    CREATE INDEX events_target ON events (target, id);
    CREATE TABLE issue_requests (
        scope {t.text} NOT NULL,
        idempotency_key {t.text} NOT NULL,
        request_hash {t.text} NOT NULL,
        subject_id {t.text} NOT NULL,
        created_at {t.time} NOT NULL,
        PRIMARY KEY (scope, idempotency_key)
    );"""


# Listings page newest first (`continue`): walk an index instead of sorting every row.
LISTING_INDEXES = """
    CREATE INDEX vault_keys_created ON vault_keys (created_at DESC, key_id DESC);
    CREATE INDEX budgets_created ON budgets (created_at DESC, budget_id DESC);
    """


def alerts(t: ColumnTypes) -> str:
    """Threshold alerts: which are raised (until spend falls back), and the outbox."""
    return f"""
    CREATE TABLE alert_marks (
        owner_id {t.text} NOT NULL,
        mark {t.text} NOT NULL,
        PRIMARY KEY (owner_id, mark)
    );
    CREATE TABLE alert_outbox (
        delivery_id {t.text} PRIMARY KEY,
        owner_id {t.text} NOT NULL,
        mark {t.text} NOT NULL,
        payload {t.text} NOT NULL,
        created_at {t.time} NOT NULL,
        attempts {t.int32} NOT NULL DEFAULT 0,
        next_attempt_at {t.time} NOT NULL,
        claimed_until {t.time},
        delivered_at {t.time},
        last_error {t.text}
    );
    CREATE INDEX alert_outbox_due ON alert_outbox (next_attempt_at) WHERE delivered_at IS NULL;
    CREATE INDEX alert_outbox_created ON alert_outbox (created_at);
    """


def sessions(t: ColumnTypes) -> str:
    """Each key's and budget's own alert thresholds; the dashboard's sign-in sessions (the id's
    hash only), and an index to find each run's newest key or budget and whether it is live
    without reading the rows."""
    return f"""
    CREATE TABLE ui_sessions (
        session_hash {t.bytes} PRIMARY KEY,
        issuer_id {t.text},
        credential_hash {t.bytes} NOT NULL,
        created_at {t.time} NOT NULL,
        expires_at {t.time} NOT NULL
    );
    CREATE INDEX ui_sessions_expires ON ui_sessions (expires_at);
    ALTER TABLE vault_keys ADD COLUMN alert_percents {t.text};
    ALTER TABLE budgets ADD COLUMN alert_percents {t.text};
    CREATE INDEX vault_keys_label_created ON vault_keys
        (label, created_at, key_id, expires_at, revoked_at, namespace);
    CREATE INDEX budgets_label_created ON budgets
        (label, created_at, budget_id, expires_at, revoked_at, namespace);
    """


def paid_for(t: ColumnTypes) -> str:
    """The "paid for" marks name their payer (key and budget), the bucket and the amount, so only
    the same payer's confirm or capture is offset, and only within the window (re-dated to when
    the money moves). The old marks named no payer: they are dropped, so such an object's confirm
    is priced in full. (The backends give the dedupe tokens their fan-out item after this.)"""
    return f"""
    DROP TABLE counted_objects;
    CREATE TABLE paid_for (
        vendor {t.text} NOT NULL,
        object_id {t.text} NOT NULL,
        key_id {t.text} NOT NULL,
        budget_id {t.text},
        bucket {t.int64} NOT NULL,
        micros {t.int64} NOT NULL,
        PRIMARY KEY (vendor, object_id, key_id, bucket)
    );
    CREATE INDEX paid_for_bucket ON paid_for (bucket);"""


def constraints(t: ColumnTypes) -> str:
    """Constraints on a key or budget: who its calls may pay or message
    (`keybrake.proxy.constraints`, as `Constraints.as_json`); NULL: none. Its call rate, which
    the ledger reads beside the caps: `max_calls_per_minute` and `rate_mode` (enforce or
    report), copied from the constraints at issue and at each patch of them. The calls that
    reached a vendor, by owner and second (`call_rate`), and what an audited call would have
    been refused for under a report-only policy (`audit.reported`)."""
    return f"""
    ALTER TABLE vault_keys ADD COLUMN constraints {t.json};
    ALTER TABLE budgets ADD COLUMN constraints {t.json};
    ALTER TABLE vault_keys ADD COLUMN max_calls_per_minute {t.int32};
    ALTER TABLE vault_keys ADD COLUMN rate_mode {t.text};
    ALTER TABLE budgets ADD COLUMN max_calls_per_minute {t.int32};
    ALTER TABLE budgets ADD COLUMN rate_mode {t.text};
    ALTER TABLE audit ADD COLUMN reported {t.text};
    CREATE TABLE call_rate (
        owner_id {t.text} NOT NULL,
        second {t.int64} NOT NULL,
        calls {t.int32} NOT NULL,
        PRIMARY KEY (owner_id, second)
    );
    """


def policy_revisions(t: ColumnTypes) -> str:
    """Which revision of its constraints (and call rate) a key or budget holds: every patch of
    them raises it, and the reservation compares it with the one the calling replica judged
    the call against (rule 0 of `keybrake.proxy.decisions`)."""
    return f"""
    ALTER TABLE vault_keys ADD COLUMN policy_rev {t.int32} NOT NULL DEFAULT 0;
    ALTER TABLE budgets ADD COLUMN policy_rev {t.int32} NOT NULL DEFAULT 0;
    """
