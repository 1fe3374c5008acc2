"""PostgreSQL store, for several proxy replicas sharing one database.

Each request-path operation is one round trip: a server-side function (`keybrake_reserve`,
`keybrake_settle`) runs the whole transaction; concurrent calls go as one statement per batch.
`keybrake_reserve` restates `keybrake.proxy.decisions.admit` (the decision table test holds the two
together). It first updates the key's `key_usage` row, which takes that row's lock: calls of one
key serialise there, and every statement after it sees the committed spend of the calls before, so
the window check is exact across replicas. Batches run their calls in key order, so batches that
lock several keys' rows (reserves, settles, other replicas') never wait on each other in a cycle.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import asyncpg

from keybrake.proxy.decisions import (
    BUCKET,
    WINDOW,
    Decision,
    bucket_of,
    bucket_start,
    caller_of,
    dead_reason,
    refusal_status,
    window_floor,
)
from keybrake.proxy.errors import SchemaNewer, StoreUnavailable
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

__all__ = ["MIGRATIONS", "PostgresStore"]

T = TypeVar("T")

_ALERT_COLUMNS = (
    "delivery_id, owner_id, mark, payload, created_at, attempts, next_attempt_at, delivered_at, "
    "last_error"
)


def _alert(row: Any) -> AlertDelivery:
    return AlertDelivery(
        delivery_id=row["delivery_id"],
        owner_id=row["owner_id"],
        mark=row["mark"],
        payload=row["payload"],
        created_at=row["created_at"],
        attempts=int(row["attempts"]),
        next_attempt_at=row["next_attempt_at"],
        delivered_at=row["delivered_at"],
        last_error=row["last_error"],
    )


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
    # Migrations 2 and 3 replaced and tuned migration 1's request-path functions; migration 4
    # drops those and creates their successors, so on a new database there is nothing to run.
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
    DROP FUNCTION IF EXISTS keybrake_reserve(text, text, timestamptz, bigint, text, text, boolean,
                                             text, text, text, text, bigint, text, jsonb);
    DROP FUNCTION IF EXISTS keybrake_settle(bigint, text, text, text, bigint, bigint, integer,
                                            text, text, double precision, text, text, boolean,
                                            boolean, jsonb, bytea, jsonb);

    -- An owner's (key's or budget's) lock and call count. UPDATE before INSERT: the row exists
    -- but for the first call, and an upsert that meets its row costs more than an update.
    CREATE FUNCTION keybrake_count_call(p_owner text) RETURNS void
    LANGUAGE plpgsql AS $fn$
    BEGIN
        UPDATE usage_counts SET calls = calls + 1 WHERE owner_id = p_owner;
        IF NOT FOUND THEN
            INSERT INTO usage_counts (owner_id, calls) VALUES (p_owner, 1)
                ON CONFLICT (owner_id) DO UPDATE SET calls = usage_counts.calls + 1;
        END IF;
    END
    $fn$;

    -- Adds to an owner's spend in one bucket (negative amounts release).
    CREATE FUNCTION keybrake_add_spend(p_owner text, p_bucket bigint, p_settled bigint,
                                       p_reserved bigint) RETURNS void
    LANGUAGE plpgsql AS $fn$
    BEGIN
        UPDATE spend_window SET settled_micros = settled_micros + p_settled,
                                reserved_micros = reserved_micros + p_reserved
         WHERE owner_id = p_owner AND bucket = p_bucket;
        IF NOT FOUND THEN
            INSERT INTO spend_window (owner_id, bucket, settled_micros, reserved_micros)
            VALUES (p_owner, p_bucket, p_settled, p_reserved)
            ON CONFLICT (owner_id, bucket) DO UPDATE
               SET settled_micros = spend_window.settled_micros + p_settled,
                   reserved_micros = spend_window.reserved_micros + p_reserved;
        END IF;
    END
    $fn$;

    CREATE FUNCTION keybrake_add_caller_spend(p_key_id text, p_caller text, p_settled bigint,
                                              p_reserved bigint) RETURNS void
    LANGUAGE plpgsql AS $fn$
    BEGIN
        UPDATE caller_spend SET settled_micros = settled_micros + p_settled,
                                reserved_micros = reserved_micros + p_reserved
         WHERE key_id = p_key_id AND caller = p_caller;
        IF NOT FOUND THEN
            INSERT INTO caller_spend (key_id, caller, settled_micros, reserved_micros)
            VALUES (p_key_id, p_caller, p_settled, p_reserved)
            ON CONFLICT (key_id, caller) DO UPDATE
               SET settled_micros = caller_spend.settled_micros + p_settled,
                   reserved_micros = caller_spend.reserved_micros + p_reserved;
        END IF;
    END
    $fn$;

    -- keybrake.proxy.decisions.admit, restated; tests/test_decision_table.py holds the two to
    -- one table of cases. Calls of one key (and of one budget) serialise on its usage_counts
    -- row, taken first: the budget's, then the key's.
    CREATE FUNCTION keybrake_reserve(
        p_key_id text, p_budget_id text, p_now timestamptz, p_bucket bigint, p_floor bigint,
        p_cost bigint, p_idem text, p_hash text, p_dedupe boolean, p_fwd text,
        p_replays boolean, p_caller text, p_vendor text, p_method text, p_path text,
        p_tag text, p_amount bigint, p_currency text, p_statuses jsonb
    ) RETURNS TABLE (o_decision text, o_audit_id bigint, o_status integer, o_headers jsonb,
                     o_body bytea, o_forward_key text, o_prior_audit_id bigint)
    LANGUAGE plpgsql SET enable_seqscan = off AS $fn$
    DECLARE
        k record;
        -- the budget's (scalars, not a record: a key without a budget leaves them unset)
        b_revoked timestamptz;
        b_expires timestamptz;
        b_daily bigint;
        b_total bigint;
        b_window bigint;
        b_life bigint;
        d text := 'forwarded';
        prior record;
        prior_kind text;
        prior_decision text;
        caller_used bigint;
        fwd text := p_fwd;
        prior_id bigint;
        aid bigint;
        rep_status integer;
        rep_headers jsonb;
        rep_body bytea;
    BEGIN
        IF p_budget_id IS NOT NULL THEN
            PERFORM keybrake_count_call(p_budget_id);
        END IF;
        UPDATE usage_counts SET calls = calls + 1 WHERE owner_id = p_key_id;  -- inline: hot
        IF NOT FOUND THEN
            PERFORM keybrake_count_call(p_key_id);
        END IF;
        -- The key, and what it used in the window and over its life, in one statement.
        SELECT v.revoked_at, v.expires_at, v.daily_cap_micros, v.total_cap_micros,
               v.max_per_call_micros, v.max_per_caller_micros, v.dedupe_window_s, v.label,
               w.in_window, w.in_life
          INTO k
          FROM vault_keys v,
               LATERAL (SELECT coalesce(sum(settled_micros + reserved_micros)
                                        FILTER (WHERE bucket >= p_floor), 0) AS in_window,
                               coalesce(sum(settled_micros + reserved_micros), 0) AS in_life
                          FROM spend_window WHERE owner_id = p_key_id) w
         WHERE v.key_id = p_key_id;
        IF p_budget_id IS NOT NULL THEN
            SELECT g.revoked_at, g.expires_at, g.daily_cap_micros, g.total_cap_micros,
                   w.in_window, w.in_life
              INTO b_revoked, b_expires, b_daily, b_total, b_window, b_life
              FROM budgets g,
                   LATERAL (SELECT coalesce(sum(settled_micros + reserved_micros)
                                            FILTER (WHERE bucket >= p_floor), 0) AS in_window,
                                   coalesce(sum(settled_micros + reserved_micros), 0) AS in_life
                              FROM spend_window WHERE owner_id = p_budget_id) w
             WHERE g.budget_id = p_budget_id;
        END IF;
        IF k.expires_at IS NULL OR k.revoked_at IS NOT NULL THEN
            d := 'revoked';
        ELSIF k.expires_at <= p_now THEN
            d := 'expired';
        ELSIF p_budget_id IS NOT NULL AND (b_expires IS NULL OR b_revoked IS NOT NULL) THEN
            d := 'budget_revoked';
        ELSIF p_budget_id IS NOT NULL AND b_expires <= p_now THEN
            d := 'budget_expired';
        ELSE
            IF p_idem IS NOT NULL THEN
                SELECT request_hash, created_at, status, headers, body, audit_id, forwarded_key
                  INTO prior FROM replays
                 WHERE key_id = p_key_id AND kind = 'idempotency' AND token = p_idem;
                IF FOUND THEN
                    prior_kind := 'idempotency';
                    IF prior.request_hash <> p_hash THEN
                        d := 'idempotency_mismatch';
                    END IF;
                END IF;
            END IF;
            IF prior_kind IS NULL AND p_dedupe THEN
                SELECT request_hash, created_at, status, headers, body, audit_id, forwarded_key
                  INTO prior FROM replays
                 WHERE key_id = p_key_id AND kind = 'dedupe' AND token = p_hash;
                IF FOUND AND prior.created_at >= p_now - make_interval(secs => k.dedupe_window_s)
                THEN
                    prior_kind := 'dedupe';
                END IF;
            END IF;
            IF d = 'forwarded' AND prior_kind IS NOT NULL THEN
                IF prior.status IS NOT NULL THEN
                    d := CASE WHEN prior_kind = 'idempotency' THEN 'replayed'
                              ELSE 'deduplicated' END;
                    rep_status := prior.status;
                    rep_headers := prior.headers;
                    rep_body := prior.body;
                ELSE
                    SELECT decision INTO prior_decision FROM audit WHERE id = prior.audit_id;
                    IF FOUND AND prior_decision NOT IN ('reconciled', 'upstream_error',
                                                        'vendor_busy') THEN
                        d := 'in_progress';
                    ELSIF NOT p_replays OR prior.forwarded_key IS NULL THEN
                        d := 'outcome_unknown';
                        prior_id := prior.audit_id;
                    ELSE
                        fwd := prior.forwarded_key;
                    END IF;
                END IF;
            END IF;
            IF d = 'forwarded' AND k.max_per_call_micros IS NOT NULL
               AND p_cost > k.max_per_call_micros THEN
                d := 'per_call_cap_hit';
            ELSIF d = 'forwarded' AND p_cost > 0 THEN
                IF k.max_per_caller_micros IS NOT NULL THEN
                    SELECT settled_micros + reserved_micros INTO caller_used FROM caller_spend
                     WHERE key_id = p_key_id AND caller = p_caller;
                END IF;
                IF k.max_per_caller_micros IS NOT NULL
                   AND coalesce(caller_used, 0) + p_cost > k.max_per_caller_micros THEN
                    d := 'caller_cap_hit';
                ELSIF k.daily_cap_micros IS NOT NULL
                      AND k.in_window + p_cost > k.daily_cap_micros THEN
                    d := 'cap_hit';
                ELSIF k.total_cap_micros IS NOT NULL
                      AND k.in_life + p_cost > k.total_cap_micros THEN
                    d := 'total_cap_hit';
                ELSIF p_budget_id IS NOT NULL
                      AND ((b_daily IS NOT NULL AND b_window + p_cost > b_daily)
                        OR (b_total IS NOT NULL AND b_life + p_cost > b_total)) THEN
                    d := 'budget_cap_hit';
                ELSE
                    IF p_budget_id IS NOT NULL THEN
                        PERFORM keybrake_add_spend(p_budget_id, p_bucket, 0, p_cost);
                    END IF;
                    UPDATE spend_window SET reserved_micros = reserved_micros + p_cost
                     WHERE owner_id = p_key_id AND bucket = p_bucket;  -- inline: hot
                    IF NOT FOUND THEN
                        PERFORM keybrake_add_spend(p_key_id, p_bucket, 0, p_cost);
                    END IF;
                    IF k.max_per_caller_micros IS NOT NULL THEN
                        PERFORM keybrake_add_caller_spend(p_key_id, p_caller, 0, p_cost);
                    END IF;
                END IF;
            END IF;
        END IF;
        IF d IN ('per_call_cap_hit', 'caller_cap_hit', 'cap_hit', 'total_cap_hit',
                 'budget_cap_hit') THEN
            UPDATE usage_counts SET cap_hits = cap_hits + 1
             WHERE owner_id IN (p_key_id, p_budget_id);
        END IF;
        INSERT INTO audit (ts, key_id, label, vendor, method, path, status, decision,
                           reserved_micros, amount, currency, idempotency_key, caller_tag,
                           budget_id)
        VALUES (p_now, p_key_id, k.label, p_vendor, p_method, p_path,
                coalesce(rep_status, (p_statuses ->> d)::integer, 0),
                CASE WHEN d = 'forwarded' THEN 'in_flight' ELSE d END,
                CASE WHEN d = 'forwarded' THEN p_cost ELSE 0 END,
                p_amount, p_currency, p_idem, p_tag, p_budget_id)
        RETURNING id INTO aid;
        IF d = 'forwarded' AND (p_idem IS NOT NULL OR p_dedupe) THEN
            INSERT INTO replays (key_id, kind, token, request_hash, created_at, audit_id,
                                 forwarded_key)
            SELECT p_key_id, t.kind, t.token, p_hash, p_now, aid, fwd
              FROM (VALUES ('idempotency', p_idem), ('dedupe', p_hash)) AS t (kind, token)
             WHERE (t.kind = 'idempotency' AND p_idem IS NOT NULL)
                OR (t.kind = 'dedupe' AND p_dedupe)
            ON CONFLICT (key_id, kind, token) DO UPDATE
               SET request_hash = EXCLUDED.request_hash, created_at = EXCLUDED.created_at,
                   status = NULL, headers = NULL, body = NULL, audit_id = EXCLUDED.audit_id,
                   forwarded_key = EXCLUDED.forwarded_key;
        END IF;
        RETURN QUERY SELECT d, aid, rep_status, rep_headers, rep_body, fwd, prior_id;
    END
    $fn$;

    CREATE FUNCTION keybrake_settle(
        p_audit_id bigint, p_key_id text, p_budget_id text, p_caller text, p_bucket bigint,
        p_vendor text, p_reserved bigint, p_settled bigint, p_status integer, p_decision text,
        p_request_id text, p_latency double precision, p_idem text, p_hash text,
        p_dedupe boolean, p_keep boolean, p_known boolean, p_headers jsonb, p_body bytea,
        p_counts jsonb
    ) RETURNS void
    LANGUAGE plpgsql SET enable_seqscan = off AS $fn$
    DECLARE
        was text;
        release bigint := p_reserved;
        charge bigint := p_settled;
    BEGIN
        -- The audit row by its primary key (a lookup through the partial in-flight index read
        -- every dead entry it held until vacuum, and slowed down as they piled up).
        SELECT decision INTO was FROM audit WHERE id = p_audit_id FOR UPDATE;
        UPDATE audit SET status = p_status, decision = p_decision, settled_micros = p_settled,
                         vendor_request_id = p_request_id, latency_ms = p_latency
         WHERE id = p_audit_id;
        IF was IS DISTINCT FROM 'in_flight' THEN
            -- A sweep already counted this reservation as spent: correct it to the outcome.
            release := 0;
            charge := p_settled - p_reserved;
        END IF;
        IF release <> 0 OR charge <> 0 THEN
            IF p_budget_id IS NOT NULL THEN
                PERFORM keybrake_add_spend(p_budget_id, p_bucket, charge, -release);
            END IF;
            UPDATE spend_window SET settled_micros = settled_micros + charge,
                                    reserved_micros = reserved_micros - release
             WHERE owner_id = p_key_id AND bucket = p_bucket;  -- inline: hot
            IF NOT FOUND THEN
                PERFORM keybrake_add_spend(p_key_id, p_bucket, charge, -release);
            END IF;
            IF p_caller IS NOT NULL THEN
                PERFORM keybrake_add_caller_spend(p_key_id, p_caller, charge, -release);
            END IF;
        END IF;
        -- Only the tokens this call still holds: a retry may have taken them over since.
        IF p_idem IS NULL AND NOT p_dedupe THEN
            NULL;  -- it holds none
        ELSIF p_keep THEN
            UPDATE replays SET status = p_status, headers = p_headers, body = p_body
             WHERE key_id = p_key_id AND audit_id = p_audit_id
               AND ((kind = 'idempotency' AND token = p_idem)
                    OR (p_dedupe AND kind = 'dedupe' AND token = p_hash));
        ELSIF p_known THEN
            DELETE FROM replays
             WHERE key_id = p_key_id AND audit_id = p_audit_id
               AND ((kind = 'idempotency' AND token = p_idem)
                    OR (p_dedupe AND kind = 'dedupe' AND token = p_hash));
        END IF;
        IF p_counts IS NOT NULL AND jsonb_array_length(p_counts) > 0 THEN
            INSERT INTO counted_objects (vendor, object_id)
            SELECT p_vendor, jsonb_array_elements_text(p_counts) ON CONFLICT DO NOTHING;
        END IF;
    END
    $fn$;
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
    # are dropped, so such an object's confirm is priced in full. The reserve and settle
    # functions change signature, so a replica of an older build calling the old ones fails
    # closed (503) instead of enforcing the old rules.
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
    DROP FUNCTION keybrake_reserve(text, text, timestamptz, bigint, bigint, bigint, text, text,
                                   boolean, text, boolean, text, text, text, text, text, bigint,
                                   text, jsonb);
    DROP FUNCTION keybrake_settle(bigint, text, text, text, bigint, text, bigint, bigint,
                                  integer, text, text, double precision, text, text, boolean,
                                  boolean, boolean, jsonb, bytea, jsonb);

    -- Moves a payer's marks on an object within the window, and the spend they stand for, to
    -- this call's bucket: the money moves now, so every window from now on counts it.
    CREATE FUNCTION keybrake_redate(p_vendor text, p_object text, p_key_id text,
                                    p_budget_id text, p_floor bigint, p_bucket bigint)
    RETURNS void LANGUAGE plpgsql AS $fn$
    DECLARE
        m record;
    BEGIN
        FOR m IN DELETE FROM paid_for
                  WHERE vendor = p_vendor AND object_id = p_object AND bucket >= p_floor
                    AND bucket <> p_bucket
                    AND (key_id = p_key_id OR (budget_id IS NOT NULL AND budget_id = p_budget_id))
              RETURNING key_id, budget_id, bucket, micros
        LOOP
            IF m.budget_id IS NOT NULL THEN
                PERFORM keybrake_add_spend(m.budget_id, m.bucket, -m.micros, 0);
                PERFORM keybrake_add_spend(m.budget_id, p_bucket, m.micros, 0);
            END IF;
            PERFORM keybrake_add_spend(m.key_id, m.bucket, -m.micros, 0);
            PERFORM keybrake_add_spend(m.key_id, p_bucket, m.micros, 0);
            INSERT INTO paid_for (vendor, object_id, key_id, budget_id, bucket, micros)
            VALUES (p_vendor, p_object, m.key_id, m.budget_id, p_bucket, m.micros)
            ON CONFLICT (vendor, object_id, key_id, bucket)
            DO UPDATE SET micros = paid_for.micros + EXCLUDED.micros;
        END LOOP;
    END
    $fn$;

    -- keybrake.proxy.decisions.admit, restated; tests/test_decision_table.py holds the two to
    -- one table of cases. Calls of one key (and of one budget) serialise on its usage_counts
    -- row, taken first: the budget's, then the key's.
    CREATE FUNCTION keybrake_reserve(
        p_key_id text, p_budget_id text, p_now timestamptz, p_bucket bigint, p_floor bigint,
        p_cost bigint, p_idem text, p_hash text, p_dedupe boolean, p_fwd text,
        p_replays boolean, p_caller text, p_vendor text, p_method text, p_path text,
        p_tag text, p_amount bigint, p_currency text, p_dedupe_token text, p_paid_object text,
        p_statuses jsonb
    ) RETURNS TABLE (o_decision text, o_audit_id bigint, o_status integer, o_headers jsonb,
                     o_body bytea, o_forward_key text, o_prior_audit_id bigint,
                     o_reserved bigint)
    LANGUAGE plpgsql SET enable_seqscan = off AS $fn$
    DECLARE
        k record;
        -- the budget's (scalars, not a record: a key without a budget leaves them unset)
        b_revoked timestamptz;
        b_expires timestamptz;
        b_daily bigint;
        b_total bigint;
        b_window bigint;
        b_life bigint;
        d text := 'forwarded';
        prior record;
        prior_kind text;
        prior_decision text;
        caller_used bigint;
        fwd text := p_fwd;
        prior_id bigint;
        aid bigint;
        rep_status integer;
        rep_headers jsonb;
        rep_body bytea;
        paid bigint := 0;
        cost bigint := p_cost;
    BEGIN
        IF p_budget_id IS NOT NULL THEN
            PERFORM keybrake_count_call(p_budget_id);
        END IF;
        UPDATE usage_counts SET calls = calls + 1 WHERE owner_id = p_key_id;  -- inline: hot
        IF NOT FOUND THEN
            PERFORM keybrake_count_call(p_key_id);
        END IF;
        -- The key, and what it used in the window and over its life, in one statement.
        SELECT v.revoked_at, v.expires_at, v.daily_cap_micros, v.total_cap_micros,
               v.max_per_call_micros, v.max_per_caller_micros, v.dedupe_window_s, v.label,
               w.in_window, w.in_life
          INTO k
          FROM vault_keys v,
               LATERAL (SELECT coalesce(sum(settled_micros + reserved_micros)
                                        FILTER (WHERE bucket >= p_floor), 0) AS in_window,
                               coalesce(sum(settled_micros + reserved_micros), 0) AS in_life
                          FROM spend_window WHERE owner_id = p_key_id) w
         WHERE v.key_id = p_key_id;
        IF p_budget_id IS NOT NULL THEN
            SELECT g.revoked_at, g.expires_at, g.daily_cap_micros, g.total_cap_micros,
                   w.in_window, w.in_life
              INTO b_revoked, b_expires, b_daily, b_total, b_window, b_life
              FROM budgets g,
                   LATERAL (SELECT coalesce(sum(settled_micros + reserved_micros)
                                            FILTER (WHERE bucket >= p_floor), 0) AS in_window,
                                   coalesce(sum(settled_micros + reserved_micros), 0) AS in_life
                              FROM spend_window WHERE owner_id = p_budget_id) w
             WHERE g.budget_id = p_budget_id;
        END IF;
        IF k.expires_at IS NULL OR k.revoked_at IS NOT NULL THEN
            d := 'revoked';
        ELSIF k.expires_at <= p_now THEN
            d := 'expired';
        ELSIF p_budget_id IS NOT NULL AND (b_expires IS NULL OR b_revoked IS NOT NULL) THEN
            d := 'budget_revoked';
        ELSIF p_budget_id IS NOT NULL AND b_expires <= p_now THEN
            d := 'budget_expired';
        ELSE
            IF p_idem IS NOT NULL THEN
                SELECT request_hash, created_at, status, headers, body, audit_id, forwarded_key
                  INTO prior FROM replays
                 WHERE key_id = p_key_id AND kind = 'idempotency' AND token = p_idem;
                IF FOUND THEN
                    prior_kind := 'idempotency';
                    IF prior.request_hash <> p_hash THEN
                        d := 'idempotency_mismatch';
                    END IF;
                END IF;
            END IF;
            IF prior_kind IS NULL AND p_dedupe THEN
                SELECT request_hash, created_at, status, headers, body, audit_id, forwarded_key
                  INTO prior FROM replays
                 WHERE key_id = p_key_id AND kind = 'dedupe' AND token = p_dedupe_token;
                IF FOUND AND prior.created_at >= p_now - make_interval(secs => k.dedupe_window_s)
                THEN
                    prior_kind := 'dedupe';
                END IF;
            END IF;
            IF p_paid_object IS NOT NULL THEN
                -- What this call's payer (the key, or a key on its budget) paid for the object
                -- within the window offsets its cost.
                SELECT coalesce(sum(micros), 0) INTO paid FROM paid_for
                 WHERE vendor = p_vendor AND object_id = p_paid_object AND bucket >= p_floor
                   AND (key_id = p_key_id OR (budget_id IS NOT NULL AND budget_id = p_budget_id));
                cost := greatest(0, p_cost - paid);
            END IF;
            IF d = 'forwarded' AND prior_kind IS NOT NULL THEN
                IF prior.status IS NOT NULL THEN
                    d := CASE WHEN prior_kind = 'idempotency' THEN 'replayed'
                              ELSE 'deduplicated' END;
                    rep_status := prior.status;
                    rep_headers := prior.headers;
                    rep_body := prior.body;
                ELSE
                    SELECT decision INTO prior_decision FROM audit WHERE id = prior.audit_id;
                    IF FOUND AND prior_decision NOT IN ('reconciled', 'upstream_error',
                                                        'vendor_busy') THEN
                        d := 'in_progress';
                    ELSIF NOT p_replays OR prior.forwarded_key IS NULL THEN
                        d := 'outcome_unknown';
                        prior_id := prior.audit_id;
                    ELSE
                        fwd := prior.forwarded_key;
                    END IF;
                END IF;
            END IF;
            IF d = 'forwarded' AND k.max_per_call_micros IS NOT NULL
               AND cost > k.max_per_call_micros THEN
                d := 'per_call_cap_hit';
            ELSIF d = 'forwarded' AND cost > 0 THEN
                IF k.max_per_caller_micros IS NOT NULL THEN
                    SELECT settled_micros + reserved_micros INTO caller_used FROM caller_spend
                     WHERE key_id = p_key_id AND caller = p_caller;
                END IF;
                IF k.max_per_caller_micros IS NOT NULL
                   AND coalesce(caller_used, 0) + cost > k.max_per_caller_micros THEN
                    d := 'caller_cap_hit';
                ELSIF k.daily_cap_micros IS NOT NULL
                      AND k.in_window + cost > k.daily_cap_micros THEN
                    d := 'cap_hit';
                ELSIF k.total_cap_micros IS NOT NULL
                      AND k.in_life + cost > k.total_cap_micros THEN
                    d := 'total_cap_hit';
                ELSIF p_budget_id IS NOT NULL
                      AND ((b_daily IS NOT NULL AND b_window + cost > b_daily)
                        OR (b_total IS NOT NULL AND b_life + cost > b_total)) THEN
                    d := 'budget_cap_hit';
                ELSE
                    IF p_budget_id IS NOT NULL THEN
                        PERFORM keybrake_add_spend(p_budget_id, p_bucket, 0, cost);
                    END IF;
                    UPDATE spend_window SET reserved_micros = reserved_micros + cost
                     WHERE owner_id = p_key_id AND bucket = p_bucket;  -- inline: hot
                    IF NOT FOUND THEN
                        PERFORM keybrake_add_spend(p_key_id, p_bucket, 0, cost);
                    END IF;
                    IF k.max_per_caller_micros IS NOT NULL THEN
                        PERFORM keybrake_add_caller_spend(p_key_id, p_caller, 0, cost);
                    END IF;
                END IF;
            END IF;
        END IF;
        IF d = 'forwarded' AND paid > 0 THEN
            PERFORM keybrake_redate(p_vendor, p_paid_object, p_key_id, p_budget_id, p_floor,
                                    p_bucket);
        END IF;
        IF d IN ('per_call_cap_hit', 'caller_cap_hit', 'cap_hit', 'total_cap_hit',
                 'budget_cap_hit') THEN
            UPDATE usage_counts SET cap_hits = cap_hits + 1
             WHERE owner_id IN (p_key_id, p_budget_id);
        END IF;
        INSERT INTO audit (ts, key_id, label, vendor, method, path, status, decision,
                           reserved_micros, amount, currency, idempotency_key, caller_tag,
                           budget_id)
        VALUES (p_now, p_key_id, k.label, p_vendor, p_method, p_path,
                coalesce(rep_status, (p_statuses ->> d)::integer, 0),
                CASE WHEN d = 'forwarded' THEN 'in_flight' ELSE d END,
                CASE WHEN d = 'forwarded' THEN cost ELSE 0 END,
                p_amount, p_currency, p_idem, p_tag, p_budget_id)
        RETURNING id INTO aid;
        IF d = 'forwarded' AND (p_idem IS NOT NULL OR p_dedupe) THEN
            INSERT INTO replays (key_id, kind, token, request_hash, created_at, audit_id,
                                 forwarded_key)
            SELECT p_key_id, t.kind, t.token, p_hash, p_now, aid, fwd
              FROM (VALUES ('idempotency', p_idem), ('dedupe', p_dedupe_token)) AS t (kind, token)
             WHERE (t.kind = 'idempotency' AND p_idem IS NOT NULL)
                OR (t.kind = 'dedupe' AND p_dedupe)
            ON CONFLICT (key_id, kind, token) DO UPDATE
               SET request_hash = EXCLUDED.request_hash, created_at = EXCLUDED.created_at,
                   status = NULL, headers = NULL, body = NULL, audit_id = EXCLUDED.audit_id,
                   forwarded_key = EXCLUDED.forwarded_key;
        END IF;
        RETURN QUERY SELECT d, aid, rep_status, rep_headers, rep_body, fwd, prior_id,
                            CASE WHEN d = 'forwarded' THEN cost ELSE 0::bigint END;
    END
    $fn$;

    CREATE FUNCTION keybrake_settle(
        p_audit_id bigint, p_key_id text, p_budget_id text, p_caller text, p_bucket bigint,
        p_vendor text, p_reserved bigint, p_settled bigint, p_status integer, p_decision text,
        p_request_id text, p_latency double precision, p_idem text, p_hash text,
        p_dedupe boolean, p_keep boolean, p_known boolean, p_headers jsonb, p_body bytea,
        p_counts jsonb, p_dedupe_token text
    ) RETURNS void
    LANGUAGE plpgsql SET enable_seqscan = off AS $fn$
    DECLARE
        was text;
        release bigint := p_reserved;
        charge bigint := p_settled;
    BEGIN
        -- The audit row by its primary key (a lookup through the partial in-flight index read
        -- every dead entry it held until vacuum, and slowed down as they piled up).
        SELECT decision INTO was FROM audit WHERE id = p_audit_id FOR UPDATE;
        UPDATE audit SET status = p_status, decision = p_decision, settled_micros = p_settled,
                         vendor_request_id = p_request_id, latency_ms = p_latency
         WHERE id = p_audit_id;
        IF was IS DISTINCT FROM 'in_flight' THEN
            -- A sweep already counted this reservation as spent: correct it to the outcome.
            release := 0;
            charge := p_settled - p_reserved;
        END IF;
        IF release <> 0 OR charge <> 0 THEN
            IF p_budget_id IS NOT NULL THEN
                PERFORM keybrake_add_spend(p_budget_id, p_bucket, charge, -release);
            END IF;
            UPDATE spend_window SET settled_micros = settled_micros + charge,
                                    reserved_micros = reserved_micros - release
             WHERE owner_id = p_key_id AND bucket = p_bucket;  -- inline: hot
            IF NOT FOUND THEN
                PERFORM keybrake_add_spend(p_key_id, p_bucket, charge, -release);
            END IF;
            IF p_caller IS NOT NULL THEN
                PERFORM keybrake_add_caller_spend(p_key_id, p_caller, charge, -release);
            END IF;
        END IF;
        -- Only the tokens this call still holds: a retry may have taken them over since.
        IF p_idem IS NULL AND NOT p_dedupe THEN
            NULL;  -- it holds none
        ELSIF p_keep THEN
            UPDATE replays SET status = p_status, headers = p_headers, body = p_body
             WHERE key_id = p_key_id AND audit_id = p_audit_id
               AND ((kind = 'idempotency' AND token = p_idem)
                    OR (p_dedupe AND kind = 'dedupe' AND token = p_dedupe_token));
        ELSIF p_known THEN
            DELETE FROM replays
             WHERE key_id = p_key_id AND audit_id = p_audit_id
               AND ((kind = 'idempotency' AND token = p_idem)
                    OR (p_dedupe AND kind = 'dedupe' AND token = p_dedupe_token));
        END IF;
        -- Each object this call paid for is marked paid by its key and budget, for the settled
        -- amount in its bucket (see keybrake_reserve's offset).
        IF p_settled > 0 AND p_counts IS NOT NULL AND jsonb_array_length(p_counts) > 0 THEN
            INSERT INTO paid_for (vendor, object_id, key_id, budget_id, bucket, micros)
            SELECT DISTINCT p_vendor, o, p_key_id, p_budget_id, p_bucket, p_settled
              FROM jsonb_array_elements_text(p_counts) AS o
            ON CONFLICT (vendor, object_id, key_id, bucket)
            DO UPDATE SET micros = paid_for.micros + EXCLUDED.micros;
        END IF;
    END
    $fn$;
    """,
]

# Concurrent calls are grouped: one statement runs a whole batch, in order, in one transaction,
# so a burst costs one round trip and one commit per batch instead of per call.
_RESERVE_ONE = (
    "SELECT * FROM keybrake_reserve("
    "$1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21)"
)
_SETTLE_ONE = (
    "SELECT keybrake_settle("
    "$1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21)"
)
_RESERVE_MANY = """
SELECT r.* FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[], $5::bigint[],
                       $6::bigint[], $7::text[], $8::text[], $9::boolean[], $10::text[],
                       $11::boolean[], $12::text[], $13::text[], $14::text[], $15::text[],
                       $16::text[], $17::bigint[], $18::text[], $19::text[], $20::text[])
       WITH ORDINALITY AS a(key_id, budget_id, now, bucket, floor, cost, idem, hash, dedupe, fwd,
                            replays, caller, vendor, method, path, tag, amount, currency,
                            dedupe_token, paid_object, n)
CROSS JOIN LATERAL keybrake_reserve(a.key_id, a.budget_id, a.now, a.bucket, a.floor, a.cost,
                                    a.idem, a.hash, a.dedupe, a.fwd, a.replays, a.caller,
                                    a.vendor, a.method, a.path, a.tag, a.amount, a.currency,
                                    a.dedupe_token, a.paid_object, $21::jsonb) r
ORDER BY a.n
"""
_SETTLE_MANY = """
SELECT keybrake_settle(a.audit_id, a.key_id, a.budget_id, a.caller, a.bucket, a.vendor,
                       a.reserved, a.settled, a.status, a.decision, a.request_id, a.latency,
                       a.idem, a.hash, a.dedupe, a.keep, a.known, a.headers, a.body, a.counts,
                       a.dedupe_token)
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[],
            $7::bigint[], $8::bigint[], $9::integer[], $10::text[], $11::text[],
            $12::double precision[], $13::text[], $14::text[], $15::boolean[], $16::boolean[],
            $17::boolean[], $18::jsonb[], $19::bytea[], $20::jsonb[], $21::text[])
     WITH ORDINALITY AS a(audit_id, key_id, budget_id, caller, bucket, vendor, reserved, settled,
                          status, decision, request_id, latency, idem, hash, dedupe, keep, known,
                          headers, body, counts, dedupe_token, n)
ORDER BY a.n
"""
_STATUSES = json.dumps({decision: refusal_status(decision) for decision in Decision})
_DECISIONS = {decision.value: decision for decision in Decision}  # faster than Decision(text)
_KEY_COLUMNS = (
    "k.key_id, k.key_hash, k.vendor, k.label, k.daily_cap_micros, k.max_per_call_micros, "
    "k.allowed_endpoints, k.metadata, k.dedupe_window_s, k.created_at, k.expires_at, "
    "k.revoked_at, k.allowed_accounts, k.total_cap_micros, k.max_per_caller_micros, k.budget_id, "
    "k.issuer_id, k.namespace, k.service_account, k.alert_percents"
)
_BUDGET_COLUMNS = (
    "b.budget_id, b.label, b.daily_cap_micros, b.total_cap_micros, b.metadata, b.created_at, "
    "b.expires_at, b.revoked_at, b.issuer_id, b.namespace, b.service_account, b.alert_percents"
)
_ISSUER_COLUMNS = "issuer_id, name, token_hash, policy, kubernetes, created_at, deleted_at"
_EVENT_COLUMNS = "id, ts, action, actor, issuer_id, target, outcome, source, detail"
_AUDIT_COLUMNS = (
    "id, ts, key_id, label, vendor, method, path, status, decision, reserved_micros, "
    "settled_micros, amount, currency, vendor_request_id, idempotency_key, latency_ms, caller_tag, "
    "budget_id"
)
# What a key's or budget's view adds to its row: its spend ($1 is the window's floor), counters.
_USAGE_COLUMNS = (
    "u.calls, u.cap_hits, w.window_settled, w.window_reserved, w.total_settled, w.total_reserved"
)
_USAGE_JOIN = (
    "LEFT JOIN usage_counts u ON u.owner_id = {owner} "
    "CROSS JOIN LATERAL (SELECT "
    "coalesce(sum(settled_micros) FILTER (WHERE bucket >= $1), 0) AS window_settled, "
    "coalesce(sum(reserved_micros) FILTER (WHERE bucket >= $1), 0) AS window_reserved, "
    "coalesce(sum(settled_micros), 0) AS total_settled, "
    "coalesce(sum(reserved_micros), 0) AS total_reserved "
    "FROM spend_window WHERE owner_id = {owner}) w"
)


def _usage(row: asyncpg.Record, floor: int) -> Usage:
    return Usage(
        window_start=bucket_start(floor),
        spent_micros=int(row["window_settled"]),
        reserved_micros=int(row["window_reserved"]),
        total_micros=int(row["total_settled"]),
        total_reserved_micros=int(row["total_reserved"]),
        calls=row["calls"] or 0,
        cap_hits=row["cap_hits"] or 0,
    )


async def _changes(c: asyncpg.Connection, subject_id: str) -> tuple[Change, ...]:
    rows = await c.fetch(
        "SELECT field, old, new, reason, at FROM changes WHERE subject_id = $1 ORDER BY id",
        subject_id,
    )
    return tuple(Change(r["field"], r["old"], r["new"], r["reason"], r["at"]) for r in rows)


class _Refused(Exception):
    """Raised inside a transaction to roll it back and answer `issued` instead."""

    def __init__(self, issued: Issued) -> None:
        super().__init__(issued.outcome)
        self.issued = issued


# Any advisory-lock number will do, as long as every replica uses the same one.
_MIGRATION_LOCK = 0x6B657962
_PRUNE_SLICE = 10_000


def _key(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        key_hash=bytes(row["key_hash"]),
        vendor=row["vendor"],
        label=row["label"],
        daily_cap_micros=row["daily_cap_micros"],
        max_per_call_micros=row["max_per_call_micros"],
        allowed_endpoints=tuple(json.loads(row["allowed_endpoints"])),
        metadata=json.loads(row["metadata"]),
        dedupe_window_s=row["dedupe_window_s"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        allowed_accounts=tuple(json.loads(row["allowed_accounts"])),
        total_cap_micros=row["total_cap_micros"],
        max_per_caller_micros=row["max_per_caller_micros"],
        budget_id=row["budget_id"],
        owner=_owner(row),
        alert_percents=percents_of(row["alert_percents"]),
    )


def _owner(row: asyncpg.Record) -> Owner | None:
    values = row["issuer_id"], row["namespace"], row["service_account"]
    return None if values == (None, None, None) else Owner(*values)


def _owner_values(owner: Owner | None) -> tuple[str | None, str | None, str | None]:
    if owner is None:
        return None, None, None
    return owner.issuer_id, owner.namespace, owner.service_account


def _issuer(row: asyncpg.Record) -> IssuerRecord:
    return IssuerRecord(
        issuer_id=row["issuer_id"],
        name=row["name"],
        token_hash=bytes(row["token_hash"]) if row["token_hash"] is not None else None,
        policy=json.loads(row["policy"]),
        kubernetes=json.loads(row["kubernetes"]) if row["kubernetes"] else None,
        created_at=row["created_at"],
        deleted_at=row["deleted_at"],
    )


def _event(row: asyncpg.Record) -> Event:
    return Event(
        id=row["id"],
        ts=row["ts"],
        action=row["action"],
        actor=row["actor"],
        issuer_id=row["issuer_id"],
        target=row["target"],
        outcome=row["outcome"],
        source=row["source"],
        detail=json.loads(row["detail"]) if row["detail"] else None,
    )


async def _insert_event(c: asyncpg.Connection, event: Event) -> None:
    await c.execute(
        "INSERT INTO events (ts, action, actor, issuer_id, target, outcome, source, detail) "
        "VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
        event.ts,
        event.action,
        event.actor,
        event.issuer_id,
        event.target,
        event.outcome,
        event.source,
        json.dumps(event.detail) if event.detail is not None else None,
    )


async def _claim_request(
    c: asyncpg.Connection, request: IssueRequest | None
) -> tuple[str, str | None]:
    """Lock and check an idempotent issue: ("ok" | "mismatch", the earlier attempt's subject)."""
    if request is None:
        return "ok", None
    # Take the idempotency key's lock first (an empty row if it is new), so that two attempts
    # racing with the same key run one after the other.
    await c.execute(
        "INSERT INTO issue_requests (scope, idempotency_key, request_hash, subject_id, "
        "created_at) VALUES ($1, $2, $3, '', now()) ON CONFLICT DO NOTHING",
        request.scope,
        request.key,
        request.request_hash,
    )
    row = await c.fetchrow(
        "SELECT request_hash, subject_id FROM issue_requests WHERE scope = $1 "
        "AND idempotency_key = $2 FOR UPDATE",
        request.scope,
        request.key,
    )
    if row["request_hash"] != request.request_hash:
        return "mismatch", None
    return "ok", row["subject_id"] or None


async def _record_request(
    c: asyncpg.Connection, request: IssueRequest | None, subject_id: str, now: datetime
) -> None:
    if request is not None:
        await c.execute(
            "UPDATE issue_requests SET subject_id = $3, created_at = $4 WHERE scope = $1 "
            "AND idempotency_key = $2",
            request.scope,
            request.key,
            subject_id,
            now,
        )


async def _revoke_subject(c: asyncpg.Connection, subject_id: str, now: datetime) -> None:
    """Revoke a key, or a budget with every key drawing on it (an earlier issue attempt)."""
    if subject_id.startswith("bg_"):
        await c.execute(
            "UPDATE budgets SET revoked_at = $1 WHERE budget_id = $2 AND revoked_at IS NULL",
            now,
            subject_id,
        )
        await c.execute(
            "UPDATE vault_keys SET revoked_at = $1 WHERE budget_id = $2 AND revoked_at IS NULL",
            now,
            subject_id,
        )
    else:
        await c.execute(
            "UPDATE vault_keys SET revoked_at = $1 WHERE key_id = $2 AND revoked_at IS NULL",
            now,
            subject_id,
        )


def _budget(row: asyncpg.Record) -> BudgetRecord:
    return BudgetRecord(
        budget_id=row["budget_id"],
        label=row["label"],
        daily_cap_micros=row["daily_cap_micros"],
        total_cap_micros=row["total_cap_micros"],
        metadata=json.loads(row["metadata"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        owner=_owner(row),
        alert_percents=percents_of(row["alert_percents"]),
    )


def _audit(row: asyncpg.Record) -> AuditRecord:
    return AuditRecord(
        id=row["id"],
        ts=row["ts"],
        key_id=row["key_id"],
        label=row["label"],
        vendor=row["vendor"],
        method=row["method"],
        path=row["path"],
        status=row["status"],
        decision=row["decision"],
        reserved_micros=row["reserved_micros"],
        settled_micros=row["settled_micros"],
        amount=row["amount"],
        currency=row["currency"],
        vendor_request_id=row["vendor_request_id"],
        idempotency_key=row["idempotency_key"],
        latency_ms=row["latency_ms"],
        caller_tag=row["caller_tag"],
        budget_id=row["budget_id"],
    )


def _placeholder(args: list[Any], first: int) -> Callable[[Any], str]:
    def add(value: Any) -> str:
        args.append(value)
        return f"${first + len(args) - 1}"

    return add


async def migrate_connection(conn: asyncpg.Connection) -> int:
    """Apply pending migrations under an advisory lock, so replicas starting together are safe."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        version = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
        if version > len(MIGRATIONS):
            raise SchemaNewer(version, len(MIGRATIONS))
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await conn.execute(script)
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", number)
    return len(MIGRATIONS)


class PostgresStore:
    def __init__(
        self, url: str, *, min_size: int = 2, max_size: int = 20, durable_commits: bool = True
    ) -> None:
        self.url = url
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
                extra=(_STATUSES,),
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
        extra: tuple[Any, ...] = (),
    ) -> Callable[[list[tuple[Any, ...]]], Awaitable[list[Any]]]:
        async def run(batch: list[tuple[Any, ...]]) -> list[Any]:
            if len(batch) == 1:  # a quiet proxy: call the function itself, no arrays to unnest

                async def op(c: asyncpg.Connection) -> list[Any]:
                    return [await c.fetchrow(one, *batch[0], *extra)]

                return await self._run(op, lane)
            # A batch locks its keys' (and budgets') rows in the order it runs them. Run in one
            # global order, a budget's calls together, each call taking its budget's rows
            # before its key's (calls of one key keep their own order), so a reserve batch and
            # a settle batch, or two replicas' batches, never wait on each other in a cycle.
            order = sorted(range(len(batch)), key=lambda i: lock_order(batch[i]))
            columns = [list(column) for column in zip(*(batch[i] for i in order), strict=True)]

            async def many_op(c: asyncpg.Connection) -> list[Any]:
                return list(await c.fetch(many, *columns, *extra))

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
            await migrate_connection(conn)
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
        version = await self._run(lambda c: c.fetchval("SELECT max(version) FROM schema_version"))
        if version is not None and version > len(MIGRATIONS):
            raise SchemaNewer(version, len(MIGRATIONS))

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

    # -- keys ----------------------------------------------------------------------------------

    async def create_key(
        self,
        key: KeyRecord,
        event: Event,
        *,
        max_active: int | None = None,
        request: IssueRequest | None = None,
    ) -> Issued:
        async def op(c: asyncpg.Connection) -> Issued:
            async with c.transaction():
                claim, replaced = await _claim_request(c, request)
                if claim == "mismatch":
                    return Issued("mismatch")
                if max_active is not None and key.owner is not None:
                    # The issuer's row is its lock: its issues run one after the other, so the
                    # count is exact however many replicas race.
                    await c.execute(
                        "SELECT 1 FROM issuers WHERE issuer_id = $1 FOR UPDATE",
                        key.owner.issuer_id,
                    )
                    active = await c.fetchval(
                        "SELECT count(*) FROM vault_keys WHERE issuer_id = $1 "
                        "AND revoked_at IS NULL AND expires_at > $2 "
                        "AND key_id IS DISTINCT FROM $3",
                        key.owner.issuer_id,
                        key.created_at,
                        replaced,
                    )
                    if active >= max_active:
                        # Leaves nothing: the transaction rolls back with the exception.
                        raise _Refused(Issued("too_many"))
                if replaced is not None:
                    await _revoke_subject(c, replaced, key.created_at)
                await c.execute(
                    "INSERT INTO vault_keys (key_id, key_hash, vendor, label, daily_cap_micros, "
                    "max_per_call_micros, allowed_endpoints, metadata, dedupe_window_s, "
                    "created_at, expires_at, allowed_accounts, total_cap_micros, "
                    "max_per_caller_micros, budget_id, issuer_id, namespace, service_account, "
                    "alert_percents) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,"
                    "$16,$17,$18,$19)",
                    key.key_id,
                    key.key_hash,
                    key.vendor,
                    key.label,
                    key.daily_cap_micros,
                    key.max_per_call_micros,
                    json.dumps(list(key.allowed_endpoints)),
                    json.dumps(key.metadata),
                    key.dedupe_window_s,
                    key.created_at,
                    key.expires_at,
                    json.dumps(list(key.allowed_accounts)),
                    key.total_cap_micros,
                    key.max_per_caller_micros,
                    key.budget_id,
                    *_owner_values(key.owner),
                    percents_text(key.alert_percents),
                )
                await c.execute("INSERT INTO usage_counts (owner_id) VALUES ($1)", key.key_id)
                await _record_request(c, request, key.key_id, key.created_at)
                await _insert_event(c, event)
            return Issued("created", replaced)

        try:
            return await self._run(op)
        except _Refused as refused:
            return refused.issued

    async def find_key(self, key_hash: bytes) -> KeyRecord | None:
        row = await self._run(
            lambda c: c.fetchrow(
                f"SELECT {_KEY_COLUMNS} FROM vault_keys k WHERE k.key_hash = $1", key_hash
            )
        )
        return _key(row) if row else None

    async def _views(self, where: str, args: list[Any], now: datetime, limit: int) -> list[KeyView]:
        floor = window_floor(now)
        sql = (
            f"SELECT {_KEY_COLUMNS}, {_USAGE_COLUMNS} FROM vault_keys k "
            f"{_USAGE_JOIN.format(owner='k.key_id')} "
            f"WHERE {where} ORDER BY k.created_at DESC, k.key_id DESC LIMIT {int(limit)}"
        )

        async def op(c: asyncpg.Connection) -> list[KeyView]:
            rows = await c.fetch(sql, floor, *args)
            views = []
            for row in rows:
                changes = await _changes(c, row["key_id"]) if limit == 1 else ()
                views.append(KeyView(_key(row), _usage(row, floor), changes))
            return views

        return await self._run(op)

    async def get_key(self, key_id: str, now: datetime) -> KeyView | None:
        views = await self._views("k.key_id = $2", [key_id], now, 1)
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
        clause = where_clause(conditions, _placeholder(args, first=2))  # $1 is the window floor
        return await self._views(clause, args, now, limit)

    async def revoke_key(self, key_id: str, now: datetime, event: Event) -> bool | None:
        async def op(c: asyncpg.Connection) -> bool | None:
            async with c.transaction():
                exists = await c.fetchval(
                    "SELECT true FROM vault_keys WHERE key_id = $1 FOR UPDATE", key_id
                )
                if not exists:
                    return None
                done = await c.fetchval(
                    "UPDATE vault_keys SET revoked_at = $1 WHERE key_id = $2 "
                    "AND revoked_at IS NULL RETURNING true",
                    now,
                    key_id,
                )
                await _insert_event(c, event)
            return bool(done)

        return await self._run(op)

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
        async def op(c: asyncpg.Connection) -> tuple[list[str], list[str]]:
            revoked: list[list[str]] = []
            async with c.transaction():
                for table, column in (("vault_keys", "key_id"), ("budgets", "budget_id")):
                    args: list[Any] = []  # $1 is the revocation time
                    conditions = key_conditions(
                        now=now,
                        label=label,
                        status="active",
                        scope=scope,
                        namespace=namespace,
                        alias="t",
                    )
                    if workflow_uid is not None:
                        conditions.append(("t.metadata ->> 'uid' = {}", workflow_uid))
                    if cluster is not None:
                        conditions.append(("t.metadata ->> 'cluster' = {}", cluster))
                    where = where_clause(conditions, _placeholder(args, first=2))
                    rows = await c.fetch(
                        f"UPDATE {table} t SET revoked_at = $1 WHERE {where} RETURNING {column}",
                        now,
                        *args,
                    )
                    revoked.append([r[column] for r in rows])
                await _insert_event(c, revoked_event(event, revoked[0], revoked[1]))
            return revoked[0], revoked[1]

        return await self._run(op)

    # -- budgets -------------------------------------------------------------------------------

    async def create_budget(
        self, budget: BudgetRecord, event: Event, *, request: IssueRequest | None = None
    ) -> Issued:
        async def op(c: asyncpg.Connection) -> Issued:
            async with c.transaction():
                claim, replaced = await _claim_request(c, request)
                if claim == "mismatch":
                    return Issued("mismatch")
                if replaced is not None:
                    await _revoke_subject(c, replaced, budget.created_at)
                await c.execute(
                    "INSERT INTO budgets (budget_id, label, daily_cap_micros, total_cap_micros, "
                    "metadata, created_at, expires_at, issuer_id, namespace, service_account, "
                    "alert_percents) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)",
                    budget.budget_id,
                    budget.label,
                    budget.daily_cap_micros,
                    budget.total_cap_micros,
                    json.dumps(budget.metadata),
                    budget.created_at,
                    budget.expires_at,
                    *_owner_values(budget.owner),
                    percents_text(budget.alert_percents),
                )
                await c.execute("INSERT INTO usage_counts (owner_id) VALUES ($1)", budget.budget_id)
                await _record_request(c, request, budget.budget_id, budget.created_at)
                await _insert_event(c, event)
            return Issued("created", replaced)

        return await self._run(op)

    async def _budget_views(
        self, where: str, args: list[Any], now: datetime, limit: int
    ) -> list[BudgetView]:
        floor = window_floor(now)
        sql = (
            f"SELECT {_BUDGET_COLUMNS}, {_USAGE_COLUMNS}, "
            "(SELECT coalesce(array_agg(key_id ORDER BY created_at, key_id), '{}') "
            " FROM vault_keys WHERE budget_id = b.budget_id) AS key_ids "
            f"FROM budgets b {_USAGE_JOIN.format(owner='b.budget_id')} "
            f"WHERE {where} ORDER BY b.created_at DESC, b.budget_id DESC LIMIT {int(limit)}"
        )

        async def op(c: asyncpg.Connection) -> list[BudgetView]:
            rows = await c.fetch(sql, floor, *args)
            views = []
            for row in rows:
                changes = await _changes(c, row["budget_id"]) if limit == 1 else ()
                views.append(
                    BudgetView(_budget(row), _usage(row, floor), tuple(row["key_ids"]), changes)
                )
            return views

        return await self._run(op)

    async def get_budget(self, budget_id: str, now: datetime) -> BudgetView | None:
        views = await self._budget_views("b.budget_id = $2", [budget_id], now, 1)
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
        clause = where_clause(conditions, _placeholder(args, first=2))
        return await self._budget_views(clause, args, now, limit)

    async def revoke_budget(self, budget_id: str, now: datetime, event: Event) -> list[str] | None:
        async def op(c: asyncpg.Connection) -> list[str] | None:
            async with c.transaction():
                exists = await c.fetchval(
                    "SELECT true FROM budgets WHERE budget_id = $1 FOR UPDATE", budget_id
                )
                if not exists:
                    return None
                await c.execute(
                    "UPDATE budgets SET revoked_at = $1 WHERE budget_id = $2 "
                    "AND revoked_at IS NULL",
                    now,
                    budget_id,
                )
                rows = await c.fetch(
                    "UPDATE vault_keys SET revoked_at = $1 WHERE budget_id = $2 "
                    "AND revoked_at IS NULL RETURNING key_id",
                    now,
                    budget_id,
                )
                await _insert_event(c, event)
            return [r["key_id"] for r in rows]

        return await self._run(op)

    async def patch(self, subject_id: str, patch: Patch, now: datetime, event: Event) -> str:
        table, column = subject_table(subject_id)
        fields = patch.fields()

        async def op(c: asyncpg.Connection) -> str:
            async with c.transaction():
                row = await c.fetchrow(
                    f"SELECT revoked_at, expires_at, {', '.join(fields)} FROM {table} "
                    f"WHERE {column} = $1 FOR UPDATE",
                    subject_id,
                )
                if row is None:
                    return "unknown"
                if row["revoked_at"] is not None or row["expires_at"] <= now:
                    return "not_live"
                sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=2))
                await c.execute(
                    f"UPDATE {table} SET {sets} WHERE {column} = $1",
                    subject_id,
                    *fields.values(),
                )
                await c.executemany(
                    "INSERT INTO changes (subject_id, field, old, new, reason, at) "
                    "VALUES ($1, $2, $3, $4, $5, $6)",
                    [
                        (
                            subject_id,
                            name,
                            shown(name, row[name]),
                            shown(name, new),
                            patch.reason,
                            now,
                        )
                        for name, new in fields.items()
                        if row[name] != new
                    ],
                )
                await _insert_event(c, event)
            return "patched"

        return await self._run(op)

    # -- issuers and the record of admin actions ----------------------------------------------

    async def create_issuer(self, issuer: IssuerRecord, event: Event) -> None:
        async def op(c: asyncpg.Connection) -> None:
            async with c.transaction():
                await c.execute(
                    f"INSERT INTO issuers ({_ISSUER_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,NULL)",
                    issuer.issuer_id,
                    issuer.name,
                    issuer.token_hash,
                    json.dumps(issuer.policy),
                    json.dumps(issuer.kubernetes) if issuer.kubernetes is not None else None,
                    issuer.created_at,
                )
                await _insert_event(c, event)

        await self._run(op)

    async def get_issuer(self, issuer_id: str) -> IssuerRecord | None:
        row = await self._run(
            lambda c: c.fetchrow(
                f"SELECT {_ISSUER_COLUMNS} FROM issuers WHERE issuer_id = $1", issuer_id
            )
        )
        return _issuer(row) if row else None

    async def find_issuer(self, token_hash: bytes) -> IssuerRecord | None:
        row = await self._run(
            lambda c: c.fetchrow(
                f"SELECT {_ISSUER_COLUMNS} FROM issuers WHERE token_hash = $1 "
                "AND deleted_at IS NULL",
                token_hash,
            )
        )
        return _issuer(row) if row else None

    async def list_issuers(self, *, include_deleted: bool = False) -> list[IssuerRecord]:
        where = "true" if include_deleted else "deleted_at IS NULL"
        rows = await self._run(
            lambda c: c.fetch(
                f"SELECT {_ISSUER_COLUMNS} FROM issuers WHERE {where} ORDER BY created_at, name"
            )
        )
        return [_issuer(row) for row in rows]

    async def delete_issuer(
        self, issuer_id: str, now: datetime, event: Event, *, revoke: bool = False
    ) -> tuple[list[str], list[str]] | None:
        async def op(c: asyncpg.Connection) -> tuple[list[str], list[str]] | None:
            async with c.transaction():
                done = await c.fetchval(
                    "UPDATE issuers SET deleted_at = $1 WHERE issuer_id = $2 "
                    "AND deleted_at IS NULL RETURNING true",
                    now,
                    issuer_id,
                )
                if not done:
                    return None
                revoked: list[list[str]] = [[], []]
                if revoke:
                    for index, (table, column) in enumerate(
                        (("vault_keys", "key_id"), ("budgets", "budget_id"))
                    ):
                        rows = await c.fetch(
                            f"UPDATE {table} SET revoked_at = $1 WHERE issuer_id = $2 "
                            f"AND revoked_at IS NULL AND expires_at > $1 RETURNING {column}",
                            now,
                            issuer_id,
                        )
                        revoked[index] = [r[column] for r in rows]
                await _insert_event(c, event)
            return revoked[0], revoked[1]

        return await self._run(op)

    async def record_event(self, event: Event) -> None:
        await self._run(lambda c: _insert_event(c, event))

    async def events(self, query: EventFilter) -> list[Event]:
        args: list[Any] = []
        where = where_clause(event_conditions(query), _placeholder(args, first=1))
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE {where} "
            f"ORDER BY id DESC LIMIT {int(query.limit)}"
        )
        rows = await self._run(lambda c: c.fetch(sql, *args))
        return [_event(row) for row in rows]

    # -- the request path ----------------------------------------------------------------------

    async def reserve(self, r: Reservation) -> Admission:
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
            )
        )
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

    async def record(self, row: AuditRecord) -> int:
        audit_id = await self._run(
            lambda c: c.fetchval(
                "INSERT INTO audit (ts, key_id, label, vendor, method, path, status, decision, "
                "reserved_micros, settled_micros, amount, currency, vendor_request_id, "
                "idempotency_key, latency_ms, caller_tag, budget_id) VALUES "
                "($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17) RETURNING id",
                row.ts,
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
            )
        )
        return int(audit_id)

    # -- threshold alerts ----------------------------------------------------------------------

    async def alert_levels(self, now: datetime) -> list[AlertLevel]:
        async def op(c: asyncpg.Connection) -> list[AlertLevel]:
            found = []
            for table, column, vendor in (
                ("vault_keys", "key_id", "t.vendor"),
                ("budgets", "budget_id", "NULL"),
            ):
                rows = await c.fetch(
                    f"SELECT t.{column} AS owner, t.label, t.namespace, {vendor} AS vendor, "
                    "t.daily_cap_micros, t.total_cap_micros, t.alert_percents, "
                    "coalesce(sum(w.settled_micros + w.reserved_micros) "
                    "FILTER (WHERE w.bucket >= $1), 0) AS window_used, "
                    "coalesce(sum(w.settled_micros + w.reserved_micros), 0) AS life_used, "
                    "coalesce(max(u.cap_hits), 0) AS hits "
                    f"FROM {table} t LEFT JOIN spend_window w ON w.owner_id = t.{column} "
                    f"LEFT JOIN usage_counts u ON u.owner_id = t.{column} "
                    "WHERE t.revoked_at IS NULL AND t.expires_at > $2 "
                    "AND (t.daily_cap_micros IS NOT NULL OR t.total_cap_micros IS NOT NULL) "
                    f"GROUP BY t.{column}",
                    window_floor(now),
                    now,
                )
                kind = "key" if table == "vault_keys" else "budget"
                found += [
                    AlertLevel(
                        owner_id=row["owner"],
                        kind=kind,
                        label=row["label"],
                        namespace=row["namespace"],
                        vendor=row["vendor"],
                        window_micros=int(row["window_used"]),
                        daily_cap_micros=row["daily_cap_micros"],
                        life_micros=int(row["life_used"]),
                        total_cap_micros=row["total_cap_micros"],
                        cap_hits=int(row["hits"]),
                        percents=percents_of(row["alert_percents"]),
                    )
                    for row in rows
                ]
            return found

        return await self._run(op)

    async def alert_marks(self) -> set[tuple[str, str]]:
        async def op(c: asyncpg.Connection) -> set[tuple[str, str]]:
            rows = await c.fetch("SELECT owner_id, mark FROM alert_marks")
            return {(row["owner_id"], row["mark"]) for row in rows}

        return await self._run(op)

    async def raise_alert(self, delivery: AlertDelivery) -> bool:
        async def op(c: asyncpg.Connection) -> bool:
            async with c.transaction():
                marked = await c.fetchval(
                    "INSERT INTO alert_marks (owner_id, mark) VALUES ($1, $2) "
                    "ON CONFLICT DO NOTHING RETURNING true",
                    delivery.owner_id,
                    delivery.mark,
                )
                if not marked:
                    return False
                await c.execute(
                    "INSERT INTO alert_outbox (delivery_id, owner_id, mark, payload, created_at, "
                    "next_attempt_at) VALUES ($1, $2, $3, $4, $5, $5)",
                    delivery.delivery_id,
                    delivery.owner_id,
                    delivery.mark,
                    delivery.payload,
                    delivery.created_at,
                )
                return True

        return await self._run(op)

    async def forget_alert_marks(self, ended_before: datetime) -> int:
        status: str = await self._run(
            lambda c: c.execute(
                # A lookup by id per mark: as cheap with a million live keys as with none.
                "DELETE FROM alert_marks WHERE NOT EXISTS (SELECT 1 FROM vault_keys k "
                "WHERE k.key_id = alert_marks.owner_id AND (k.revoked_at IS NULL "
                "OR k.revoked_at > $1) AND k.expires_at > $1) AND NOT EXISTS (SELECT 1 "
                "FROM budgets b WHERE b.budget_id = alert_marks.owner_id AND (b.revoked_at IS "
                "NULL OR b.revoked_at > $1) AND b.expires_at > $1)",
                ended_before,
            )
        )
        return int(status.split()[-1])

    async def rearm_alerts(self, owner_id: str, marks: list[str]) -> None:
        async def op(c: asyncpg.Connection) -> None:
            await c.execute(
                "DELETE FROM alert_marks WHERE owner_id = $1 AND mark = ANY($2::text[])",
                owner_id,
                marks,
            )

        await self._run(op)

    async def claim_alerts(
        self, now: datetime, lease: timedelta, limit: int
    ) -> list[AlertDelivery]:
        async def op(c: asyncpg.Connection) -> list[AlertDelivery]:
            rows = await c.fetch(
                "UPDATE alert_outbox SET claimed_until = $2 WHERE delivery_id IN ("
                "SELECT delivery_id FROM alert_outbox WHERE delivered_at IS NULL "
                "AND next_attempt_at <= $1 AND (claimed_until IS NULL OR claimed_until <= $1) "
                f"ORDER BY next_attempt_at LIMIT {int(limit)} FOR UPDATE SKIP LOCKED) "
                f"RETURNING {_ALERT_COLUMNS}",
                now,
                now + lease,
            )
            return [_alert(row) for row in rows]

        return await self._run(op)

    async def finish_alert(
        self,
        delivery_id: str,
        now: datetime,
        *,
        error: str | None,
        retry_at: datetime | None,
    ) -> None:
        async def op(c: asyncpg.Connection) -> None:
            if error is None:
                await c.execute(
                    "UPDATE alert_outbox SET attempts = attempts + 1, delivered_at = $2, "
                    "claimed_until = NULL, last_error = NULL WHERE delivery_id = $1",
                    delivery_id,
                    now,
                )
            else:
                await c.execute(
                    "UPDATE alert_outbox SET attempts = attempts + 1, last_error = $2, "
                    "next_attempt_at = $3, claimed_until = NULL WHERE delivery_id = $1",
                    delivery_id,
                    error[:500],
                    retry_at or now,
                )

        await self._run(op)

    async def alert_deliveries(self, *, pending: bool, limit: int) -> list[AlertDelivery]:
        where = "WHERE delivered_at IS NULL" if pending else ""

        async def op(c: asyncpg.Connection) -> list[AlertDelivery]:
            rows = await c.fetch(
                f"SELECT {_ALERT_COLUMNS} FROM alert_outbox {where} "
                f"ORDER BY created_at DESC, delivery_id DESC LIMIT {int(limit)}"
            )
            return [_alert(row) for row in rows]

        return await self._run(op)

    async def metrics_snapshot(self, now: datetime, stale_before: datetime) -> MetricsSnapshot:
        async def op(c: asyncpg.Connection) -> MetricsSnapshot:
            floor = window_floor(now)
            spend = await c.fetch(
                "SELECT k.vendor, sum(w.settled_micros) AS total FROM spend_window w "
                "JOIN vault_keys k ON k.key_id = w.owner_id WHERE w.bucket >= $1 "
                "GROUP BY k.vendor",
                floor,
            )
            reservations = await c.fetchrow(
                "SELECT count(*) AS open, count(*) FILTER (WHERE ts < $1) AS stale FROM audit "
                "WHERE decision = 'in_flight'",
                stale_before,
            )
            active = await c.fetchval(
                "SELECT count(*) FROM vault_keys WHERE revoked_at IS NULL AND expires_at > $1", now
            )
            near = await c.fetchval(
                "SELECT count(*) FROM (SELECT k.daily_cap_micros AS cap, "
                "sum(w.settled_micros + w.reserved_micros) AS used FROM vault_keys k "
                "JOIN spend_window w ON w.owner_id = k.key_id AND w.bucket >= $1 "
                "WHERE k.revoked_at IS NULL AND k.expires_at > $2 AND k.daily_cap_micros > 0 "
                "GROUP BY k.key_id, k.daily_cap_micros) AS u WHERE used >= cap * $3::float8",
                floor,
                now,
                NEAR_CAP,
            )
            alerts = await c.fetchrow(
                "SELECT count(*) AS pending, count(*) FILTER (WHERE attempts > 0) AS failing "
                "FROM alert_outbox WHERE delivered_at IS NULL"
            )
            return MetricsSnapshot(
                {row["vendor"]: int(row["total"]) for row in spend},
                int(reservations["open"]),
                int(reservations["stale"]),
                int(active),
                int(near),
                int(alerts["pending"]),
                int(alerts["failing"]),
            )

        return await self._run(op)

    async def forget_replays(self, older_than: datetime) -> int:
        async def op(c: asyncpg.Connection) -> str:
            result: str = await c.execute("DELETE FROM replays WHERE created_at < $1", older_than)
            # An issue step's retries come within the run; a day later the key is long gone.
            await c.execute("DELETE FROM issue_requests WHERE created_at < $1", older_than)
            return result

        return int((await self._run(op)).split()[-1])

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

    async def prune_audit(self, before: datetime, now: datetime, *, dry_run: bool = False) -> int:
        args: list[Any] = []
        where = where_clause(
            prune_conditions(before, now - WINDOW - BUCKET), _placeholder(args, first=1)
        )
        if dry_run:
            counted = await self._run(
                lambda c: c.fetchval(f"SELECT count(*) FROM audit WHERE {where}", *args)
            )
            return int(counted)
        removed = 0
        while True:
            result = await self._run(
                lambda c: c.execute(
                    f"DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE {where} "
                    f"LIMIT {_PRUNE_SLICE})",
                    *args,
                )
            )
            count = int(result.split()[-1])
            removed += count
            if count < _PRUNE_SLICE:
                return removed

    async def liveness(self, key_id: str, budget_id: str | None, now: datetime) -> Decision | None:
        row = await self._run(
            lambda c: c.fetchrow(
                "SELECT k.revoked_at AS k_revoked, k.expires_at AS k_expires, "
                "b.revoked_at AS b_revoked, b.expires_at AS b_expires FROM vault_keys k "
                "LEFT JOIN budgets b ON b.budget_id = $2 WHERE k.key_id = $1",
                key_id,
                budget_id,
            )
        )
        if row is None:
            return Decision.REVOKED
        budget = None
        if budget_id is not None:
            budget = (row["b_revoked"] is not None, row["b_expires"])
        return dead_reason(now, (row["k_revoked"] is not None, row["k_expires"]), budget)

    async def audit(self, query: AuditFilter) -> list[AuditRecord]:
        args: list[Any] = []
        where = where_clause(audit_conditions(query), _placeholder(args, first=1))
        sql = (
            f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE {where} "
            f"ORDER BY id DESC LIMIT {int(query.limit)}"
        )
        rows = await self._run(lambda c: c.fetch(sql, *args))
        return [_audit(row) for row in rows]

    # -- the dashboard -------------------------------------------------------------------------

    async def list_runs(self, query: RunFilter, now: datetime) -> list[RunRow]:
        walks = []
        for table in ("vault_keys", "budgets"):
            args: list[Any] = []
            walk = runs_walk(query, now, table, "strpos", collate=' COLLATE "C"')
            sql = where_clause([walk], _placeholder(args, first=1))
            walks.append((sql, args))

        async def read(c: asyncpg.Connection) -> list[RunRow]:
            found = [[(r[0], r[1]) for r in await c.fetch(sql, *args)] for sql, args in walks]
            labels = sorted({label for walk in found for label, _ in walk})
            if not labels:
                return []
            args: list[Any] = []
            sql = where_clause([runs_counts(labels, query.scope, now)], _placeholder(args, first=1))
            counts = {r[0]: (r[1], r[2], r[3], r[4], r[5]) for r in await c.fetch(sql, *args)}
            return merge_runs(found, counts, query.limit)

        return await self._run(read)

    async def run_activity(
        self, label: str, scope: Scope | None, points: int = ACTIVITY_POINTS
    ) -> RunActivity:
        args: list[Any] = []
        where = where_clause(
            audit_conditions(AuditFilter(scope=scope, label=label)), _placeholder(args, first=1)
        )
        ends = [
            f"SELECT ts FROM audit WHERE {where} ORDER BY id {order} LIMIT 1"
            for order in ("ASC", "DESC")
        ]
        hit = "CASE WHEN decision LIKE '%cap_hit' THEN 1 ELSE 0 END"

        async def read(c: asyncpg.Connection) -> RunActivity:
            first, last = [await c.fetchval(sql, *args) for sql in ends]
            if first is None or last is None:
                return RunActivity([], [])
            start = int(first.timestamp())
            width = activity_width(start, int(last.timestamp()), points)
            buckets = (
                # Clamped: a replica's clock may put a row before the first or after the last.
                f"SELECT greatest(0, least({points - 1}, "
                f"(floor(extract(epoch FROM ts))::bigint - {start}) / {width})) AS b, "
                f"sum(settled_micros)::bigint, count(*)::int, sum({hit})::int "
                f"FROM audit WHERE {where} GROUP BY b ORDER BY b"
            )
            per_caller = (
                "SELECT caller_tag, sum(settled_micros)::bigint, count(*)::int, "
                f"sum({hit})::int FROM audit WHERE {where} "
                "GROUP BY 1 ORDER BY 2 DESC, 3 DESC, 1 LIMIT 100"
            )
            seconds = [
                (bucket_time(start, width, r[0]), r[1], r[2], r[3])
                for r in await c.fetch(buckets, *args)
            ]
            callers = [(r[0], r[1], r[2], r[3]) for r in await c.fetch(per_caller, *args)]
            return RunActivity(seconds, callers)

        return await self._run(read)

    async def create_session(self, session: Session) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO ui_sessions (session_hash, issuer_id, credential_hash, created_at, "
                "expires_at) VALUES ($1, $2, $3, $4, $5)",
                session.session_hash,
                session.issuer_id,
                session.credential_hash,
                session.created_at,
                session.expires_at,
            )
        )

    async def find_session(self, session_hash: bytes, now: datetime) -> Session | None:
        row = await self._run(
            lambda c: c.fetchrow(
                "SELECT issuer_id, credential_hash, created_at, expires_at FROM ui_sessions "
                "WHERE session_hash = $1 AND expires_at > $2",
                session_hash,
                now,
            )
        )
        if row is None:
            return None
        return Session(session_hash, row[0], bytes(row[1]), row[2], row[3])

    async def end_session(self, session_hash: bytes) -> None:
        await self._run(
            lambda c: c.execute("DELETE FROM ui_sessions WHERE session_hash = $1", session_hash)
        )

    async def forget_sessions(self, now: datetime) -> int:
        status: str = await self._run(
            lambda c: c.execute("DELETE FROM ui_sessions WHERE expires_at <= $1", now)
        )
        return int(status.split()[-1])


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
