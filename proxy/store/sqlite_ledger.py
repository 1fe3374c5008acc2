"""SQLite's ledger: reserve, settle and sweep, each run inside the writer's shared transaction.

The rules are `keybrake.proxy.decisions.admit`'s; this module reads what they need (the key's and
its budget's rows, earlier attempts, spend in the window) and writes what they decide (spend,
counters, replay tokens, "paid for" marks, the audit row). SQLite's write lock, held by the one
writer thread for a whole batch, makes each call's read-decide-write exact across processes.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta
from typing import Any

from keybrake.proxy.decisions import (
    CUT_OFF,
    Caps,
    Decision,
    Prior,
    Rate,
    admit,
    bucket_of,
    bucket_start_second,
    caller_of,
    offset_cost,
    rate_floor,
    refusal_status,
    report_note,
    settle_amounts,
    window_floor,
)
from keybrake.proxy.money import format_ts, parse_ts
from keybrake.proxy.store.operations import INSERT_AUDIT, audit_values
from keybrake.proxy.store.records import (
    Admission,
    AuditRecord,
    Reservation,
    Settlement,
    StoredResponse,
)
from keybrake.proxy.store.sql import compiled

__all__ = ["compact_spend", "reserve", "settle", "sweep"]


# The request path's audit insert, bound by position: `operations.insert_audit`'s statement
# without its per-call generator and parameter names (a third of the reservation's own work).
_INSERT_AUDIT, _ = compiled("sqlite", INSERT_AUDIT)


def _insert_audit(conn: sqlite3.Connection, row: AuditRecord) -> int:
    values = list(audit_values(row))
    values[0] = format_ts(row.ts)
    return int(conn.execute(_INSERT_AUDIT, values).lastrowid or 0)


def _spent(conn: sqlite3.Connection, owner_id: str, floor: int) -> tuple[int, int]:
    """(settled + reserved in the window, and over the owner's life)."""
    row = conn.execute(
        "SELECT coalesce(sum(CASE WHEN bucket >= ? THEN settled_micros + reserved_micros END), 0), "
        "coalesce(sum(settled_micros + reserved_micros), 0) FROM spend_window WHERE owner_id = ?",
        (floor, owner_id),
    ).fetchone()
    return int(row[0]), int(row[1])


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


def _rate(
    conn: sqlite3.Connection, owner_id: str | None, limit: int | None, mode: str | None, now: int
) -> list[Rate]:
    """A key's or budget's call rate, when it has one (`decisions.Rate`)."""
    if owner_id is None or limit is None:
        return []

    def calls() -> list[tuple[int, int]]:
        found = conn.execute(
            "SELECT second, calls FROM call_rate WHERE owner_id = ? AND second >= ? "
            "ORDER BY second",
            (owner_id, rate_floor(now)),
        ).fetchall()
        return [(int(second), int(count)) for second, count in found]

    return [Rate(limit, mode == "report", calls)]


def count_calls(conn: sqlite3.Connection, owners: list[str], now: int) -> None:
    """One more call at a vendor for each owner whose rate counts it, in this second."""
    conn.executemany(
        "INSERT INTO call_rate (owner_id, second, calls) VALUES (?, ?, 1) "
        "ON CONFLICT (owner_id, second) DO UPDATE SET calls = calls + 1",
        [(owner, now) for owner in owners],
    )


def _caps(
    conn: sqlite3.Connection,
    row: tuple[Any, ...] | None,
    owner_id: str,
    floor: int,
    now: datetime,
    judged_rev: int,
) -> Caps:
    """(revoked_at, expires_at, daily, total, policy_rev) of a key or budget as admission reads
    them; `judged_rev`: the policy revision the call was judged against."""
    if row is None:
        return Caps(True, now, None, None, lambda: (0, 0))
    return Caps(
        revoked=row[0] is not None,
        expires_at=parse_ts(row[1]),
        daily=row[2],
        total=row[3],
        used=lambda: _spent(conn, owner_id, floor),
        stale=row[4] != judged_rev,
    )


def reserve(conn: sqlite3.Connection, r: Reservation) -> Admission:
    key_id, budget_id = r.key.key_id, r.key.budget_id
    # Revocation, expiry and caps are read here, inside the transaction, never from a cache.
    row = conn.execute(
        "SELECT revoked_at, expires_at, daily_cap_micros, total_cap_micros, policy_rev, "
        "max_per_call_micros, max_per_caller_micros, dedupe_window_s, max_calls_per_minute, "
        "rate_mode FROM vault_keys WHERE key_id = ?",
        (key_id,),
    ).fetchone()
    budget_row = None
    if budget_id is not None:
        budget_row = conn.execute(
            "SELECT revoked_at, expires_at, daily_cap_micros, total_cap_micros, policy_rev, "
            "max_calls_per_minute, rate_mode FROM budgets WHERE budget_id = ?",
            (budget_id,),
        ).fetchone()
    second = r.rate_second
    rates = []
    if row is not None:
        rates += _rate(conn, key_id, row[8], row[9], second)
    if budget_row is not None:
        rates += _rate(conn, budget_id, budget_row[5], budget_row[6], second)
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
        key=_caps(conn, row, key_id, floor, r.now, r.key.policy_rev),
        budget=(
            _caps(conn, budget_row, budget_id, floor, r.now, r.key.budget_policy_rev)
            if budget_id is not None
            else None
        ),
        by_key=by_key,
        by_fingerprint=by_fingerprint,
        dedupe_window=timedelta(seconds=row[7] if row else 0),
        vendor_replays=r.vendor_replays,
        cost_micros=cost,
        max_per_call_micros=row[5] if row else None,
        max_per_caller_micros=row[6] if row else None,
        caller_used=lambda: _caller_spent(conn, key_id, r.caller),
        rates=rates,
    )
    decision = admitted.decision
    if decision is Decision.POLICY_CHANGED:
        return Admission(decision, 0)  # nothing written: the call is judged again
    # Counted once decided (other processes wait on SQLite's write lock, held since BEGIN).
    if budget_id is not None:
        _count_call(conn, budget_id)  # the budget first, then the key: one order everywhere
    _count_call(conn, key_id)
    forwarded = decision is Decision.FORWARDED
    if forwarded and rates:
        limited = [key_id] if row is not None and row[8] is not None else []
        if budget_row is not None and budget_row[5] is not None and budget_id is not None:
            limited.append(budget_id)
        count_calls(conn, limited, second)
    reported = report_note(r.report, admitted.reported)
    tracks_caller = row is not None and row[6] is not None
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
            reported=reported,
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
        decision,
        audit_id,
        replay,
        forward_key,
        admitted.prior_audit_id,
        admitted.reserve_micros,
        admitted.retry_after,
        reported,
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


def settle(conn: sqlite3.Connection, s: Settlement) -> None:
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
    if not tokens:
        pass  # it holds none
    elif s.response is not None:
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


def sweep(conn: sqlite3.Connection, older_than: datetime) -> int:
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


def compact_spend(conn: sqlite3.Connection, before_bucket: int) -> int:
    """Fold spend older than `before_bucket` into each owner's bucket 0 (its lifetime total):
    the window never reads it again, and the table stays small."""
    conn.execute(
        "INSERT INTO spend_window (owner_id, bucket, settled_micros, reserved_micros) "
        "SELECT owner_id, 0, sum(settled_micros), sum(reserved_micros) FROM spend_window "
        "WHERE bucket > 0 AND bucket < ? GROUP BY owner_id "
        "ON CONFLICT (owner_id, bucket) DO UPDATE SET "
        "settled_micros = settled_micros + excluded.settled_micros, "
        "reserved_micros = reserved_micros + excluded.reserved_micros",
        (before_bucket,),
    )
    # Marks out of the window offset nothing (`_paid_marks`); calls older than a rate's window
    # count against none (`decisions.RATE_SECONDS`).
    conn.execute("DELETE FROM paid_for WHERE bucket < ?", (before_bucket,))
    conn.execute("DELETE FROM call_rate WHERE second < ?", (bucket_start_second(before_bucket),))
    cur = conn.execute("DELETE FROM spend_window WHERE bucket > 0 AND bucket < ?", (before_bucket,))
    return int(cur.rowcount)
