"""Every store operation but the ledger, written once for SQLite and PostgreSQL.

Each operation is a generator of queries (`keybrake.proxy.store.sql`); `@reads` and `@writes` turn
it into the async method the `Store` protocol names, run by the backend's driver: `_read` without a
transaction, `_write` in one (with its rows locked where the SQL says `FOR UPDATE`). Rows are read
by column name. The ledger (reserve, settle, sweep, compacting spend) is each backend's own:
SQLite's in Python around `keybrake.proxy.decisions.admit`, PostgreSQL's in server-side functions.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Concatenate, Generic, NamedTuple, ParamSpec, TypeVar

from keybrake.proxy.constraints import Constraints
from keybrake.proxy.decisions import (
    BUCKET,
    WINDOW,
    Decision,
    Rate,
    bucket_start,
    dead_reason,
    over_rate,
    rate_floor,
    second_of,
)
from keybrake.proxy.decisions import window_floor as _window_floor
from keybrake.proxy.store.records import (
    ACTIVITY_POINTS,
    NEAR_CAP,
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
    Listing,
    MetricsSnapshot,
    Owner,
    Patch,
    RunActivity,
    RunFilter,
    RunRow,
    Scope,
    Session,
    Usage,
    activity_width,
    bucket_time,
    merge_runs,
    percents_of,
    percents_text,
    revoked_event,
    shown,
    subject_table,
)
from keybrake.proxy.store.sql import (
    CAP_HIT_SQL,
    Dialect,
    Op,
    Refused,
    Where,
    execute,
    execute_many,
    inserted_id,
    moment,
    row,
    rows,
    value,
)

__all__ = ["AUDIT_COLUMNS", "INSERT_AUDIT", "SQLStore", "audit_values", "insert_audit"]

S = TypeVar("S", bound="SQLStore")
P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R")  # a key's or budget's record
V = TypeVar("V")  # its view

# The most audit rows one write deletes: the writer serves the request path in between.
PRUNE_SLICE = 10_000


def reads(
    fn: Callable[Concatenate[S, P], Op[T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    return _operation(fn, write=False)


def writes(
    fn: Callable[Concatenate[S, P], Op[T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    return _operation(fn, write=True)


def _operation(
    fn: Callable[Concatenate[S, P], Op[T]], *, write: bool
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """`fn` as the async method the backend runs: with `_write` (in a transaction) or `_read`."""

    async def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        def make() -> Op[T]:
            return fn(self, *args, **kwargs)

        return await (self._write(make) if write else self._read(make))

    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


class SQLStore:
    """The shared operations; a backend sets `dialect` and implements `_read` and `_write`,
    which run a fresh operation from the factory they are given (a batch that fails is retried
    one operation at a time)."""

    dialect: Dialect

    async def _read(self, make: Callable[[], Op[T]]) -> T:
        raise NotImplementedError

    async def _write(self, make: Callable[[], Op[T]]) -> T:
        raise NotImplementedError

    # -- keys and budgets ----------------------------------------------------------------------
    # Issued, read, listed and revoked alike: `_KEYS` and `_BUDGETS` say where the two differ.

    @writes
    def create_key(
        self,
        key: KeyRecord,
        event: Event,
        *,
        max_active: int | None = None,
        request: IssueRequest | None = None,
    ) -> Op[Issued]:
        claim, replaced = yield from _claim_request(request, key.created_at)
        if claim == "mismatch":
            return Issued("mismatch")
        if max_active is not None and key.owner is not None:
            # The issuer's row is its lock: its issues run one after the other, so the count is
            # exact however many replicas race.
            yield row(
                "SELECT 1 FROM issuers WHERE issuer_id = :issuer FOR UPDATE",
                issuer=key.owner.issuer_id,
            )
            active = yield value(
                "SELECT count(*) FROM vault_keys WHERE issuer_id = :issuer "
                "AND revoked_at IS NULL AND expires_at > :now AND key_id <> :replaced",
                issuer=key.owner.issuer_id,
                now=key.created_at,
                replaced=replaced or "",
            )
            if int(active) >= max_active:
                raise Refused(Issued("too_many"))
        return (yield from _issue(_KEYS, key, replaced, request, event))

    @writes
    def create_budget(
        self, budget: BudgetRecord, event: Event, *, request: IssueRequest | None = None
    ) -> Op[Issued]:
        claim, replaced = yield from _claim_request(request, budget.created_at)
        if claim == "mismatch":
            return Issued("mismatch")
        return (yield from _issue(_BUDGETS, budget, replaced, request, event))

    @reads
    def find_key(self, key_hash: bytes) -> Op[KeyRecord | None]:
        """The key a vault key names, with its budget's constraints (the request path's read)."""
        found = yield row(
            "SELECT k.*, b.constraints AS budget_constraints, b.policy_rev AS budget_policy_rev "
            "FROM vault_keys k LEFT JOIN budgets b ON b.budget_id = k.budget_id "
            "WHERE k.key_hash = :hash",
            hash=key_hash,
        )
        if not found:
            return None
        return replace(
            _key(found),
            budget_constraints=_constraints(found["budget_constraints"]),
            budget_policy_rev=found["budget_policy_rev"] or 0,
        )

    @reads
    def get_key(self, key_id: str, now: datetime) -> Op[KeyView | None]:
        return (yield from self._get(_KEYS, key_id, now))

    @reads
    def get_budget(self, budget_id: str, now: datetime) -> Op[BudgetView | None]:
        return (yield from self._get(_BUDGETS, budget_id, now))

    @reads
    def list_keys(self, query: Listing, now: datetime) -> Op[list[KeyView]]:
        return (yield from self._list(_KEYS, query, now))

    @reads
    def list_budgets(self, query: Listing, now: datetime) -> Op[list[BudgetView]]:
        return (yield from self._list(_BUDGETS, query, now))

    def _get(self, kind: _Subject[Any, V], subject_id: str, now: datetime) -> Op[V | None]:
        where = Where().add(f"{kind.alias}.{kind.column} = :subject", subject=subject_id)
        views = yield from self._views(kind, where, now, 1)
        return views[0] if views else None

    def _list(self, kind: _Subject[Any, V], query: Listing, now: datetime) -> Op[list[V]]:
        where = _listed(Where(), kind.alias, query, now)
        return (yield from self._views(kind, where, now, query.limit))

    def _views(self, kind: _Subject[R, V], where: Where, now: datetime, limit: int) -> Op[list[V]]:
        """Keys or budgets with their usage, newest first (the order listings page in); a
        budget's with the keys drawing on it, and a lone one's (a get) with its changes."""
        alias = kind.alias
        found = yield from _page(
            f"{kind.table} {alias}",
            where,
            f"{alias}.created_at DESC, {alias}.{kind.column} DESC",
            limit,
            kind.record,
        )
        # The id column is named as the record's id field.
        ids: list[str] = [getattr(subject, kind.column) for subject in found]
        usage = yield from self._usage(ids, now)
        drawing = (yield from self._drawing(ids)) if kind.drawn_on else {}
        changes = (yield from _changes(ids[0])) if limit == 1 and ids else ()
        return [
            kind.view(subject, usage[subject_id], drawing.get(subject_id, ()), changes)
            for subject, subject_id in zip(found, ids, strict=True)
        ]

    def _drawing(self, budget_ids: list[str]) -> Op[dict[str, tuple[str, ...]]]:
        """The keys drawing on each budget, oldest first."""
        keys: dict[str, list[str]] = {budget_id: [] for budget_id in budget_ids}
        if budget_ids:
            found = yield rows(
                "SELECT budget_id, key_id FROM vault_keys "
                f"WHERE {self.dialect.any_of('budget_id', 'ids')} ORDER BY created_at, key_id",
                ids=budget_ids,
            )
            for r in found:
                keys[r["budget_id"]].append(r["key_id"])
        return {budget_id: tuple(drawing) for budget_id, drawing in keys.items()}

    def _usage(self, owners: list[str], now: datetime) -> Op[dict[str, Usage]]:
        """Each key's or budget's spend in the window and over its life, and its counters."""
        floor = _window_floor(now)
        if not owners:
            return {}
        spend = yield rows(
            "SELECT owner_id, "
            "coalesce(sum(settled_micros) FILTER (WHERE bucket >= :floor), 0) AS window_settled, "
            "coalesce(sum(reserved_micros) FILTER (WHERE bucket >= :floor), 0) AS window_reserved, "
            "coalesce(sum(settled_micros), 0) AS total_settled, "
            "coalesce(sum(reserved_micros), 0) AS total_reserved "
            f"FROM spend_window WHERE {self.dialect.any_of('owner_id', 'owners')} "
            "GROUP BY owner_id",
            floor=floor,
            owners=owners,
        )
        counts = yield rows(
            "SELECT owner_id, calls, cap_hits FROM usage_counts "
            f"WHERE {self.dialect.any_of('owner_id', 'owners')}",
            owners=owners,
        )
        calls = {r["owner_id"]: (int(r["calls"]), int(r["cap_hits"])) for r in counts}
        sums = {r["owner_id"]: r for r in spend}
        usage = {}
        for owner in owners:
            s = sums.get(owner)
            n, hits = calls.get(owner, (0, 0))
            usage[owner] = Usage(
                window_start=bucket_start(floor),
                spent_micros=int(s["window_settled"]) if s else 0,
                reserved_micros=int(s["window_reserved"]) if s else 0,
                total_micros=int(s["total_settled"]) if s else 0,
                total_reserved_micros=int(s["total_reserved"]) if s else 0,
                calls=n,
                cap_hits=hits,
            )
        return usage

    @writes
    def revoke_key(self, key_id: str, now: datetime, event: Event) -> Op[bool | None]:
        revoked = yield from _revoke(_KEYS, key_id, now, event)
        return None if revoked is None else revoked.changed

    @writes
    def revoke_budget(self, budget_id: str, now: datetime, event: Event) -> Op[list[str] | None]:
        revoked = yield from _revoke(_BUDGETS, budget_id, now, event)
        return None if revoked is None else revoked.drawing

    @writes
    def revoke_label(
        self,
        label: str,
        now: datetime,
        event: Event,
        *,
        namespace: str | None = None,
        workflow_uid: str | None = None,
        cluster: str | None = None,
        scope: Scope | None = None,
    ) -> Op[tuple[list[str], list[str]]]:
        revoked: list[list[str]] = []
        for table, column in (("vault_keys", "key_id"), ("budgets", "budget_id")):
            live = Listing(label=label, status="active", scope=scope, namespace=namespace)
            where = _listed(Where(), "t", live, now)
            if workflow_uid is not None:
                where.add("t.metadata ->> 'uid' = :uid", uid=workflow_uid)
            if cluster is not None:
                where.add("t.metadata ->> 'cluster' = :cluster", cluster=cluster)
            changed = yield rows(
                f"UPDATE {table} AS t SET revoked_at = :stamp WHERE {where.sql} RETURNING {column}",
                **where.params,
                stamp=now,
            )
            revoked.append(sorted(r[column] for r in changed))
        yield from _insert_event(revoked_event(event, revoked[0], revoked[1]))
        return revoked[0], revoked[1]

    @writes
    def patch(self, subject_id: str, patch: Patch, now: datetime, event: Event) -> Op[str]:
        table, column = subject_table(subject_id)
        fields: dict[str, Any] = dict(patch.fields())
        read = sorted({*fields, *(patch.expected or {})} - {"expires_at"})
        if patch.sets_policy:
            read = sorted({*read, "constraints", "policy_rev"})
        if not set(read) <= _PATCHABLE:
            raise ValueError(f"not a patchable field: {sorted(set(read) - _PATCHABLE)}")
        before = yield row(
            f"SELECT {', '.join(['revoked_at', 'expires_at', *read])} FROM {table} "
            f"WHERE {column} = :subject FOR UPDATE",
            subject=subject_id,
        )
        if before is None:
            return "unknown"
        if before["revoked_at"] is not None or moment(before["expires_at"]) <= now:
            return "not_live"
        olds = {name: before[name] for name in read}
        olds["expires_at"] = moment(before["expires_at"])
        if any(olds[name] != given for name, given in (patch.expected or {}).items()):
            return "changed"
        if patch.sets_policy:
            # The old ones as this build writes them (PostgreSQL's jsonb reorders keys), for the
            # record of changes. The revision rises with every patch of them: each replica's
            # next call judged under older ones is judged again (decisions, rule 0).
            olds["constraints"] = _policy_values(_constraints(olds["constraints"]))["constraints"]
            fields.update(_policy_values(patch.constraints), policy_rev=olds["policy_rev"] + 1)
        sets = ", ".join(f"{name} = :{name}" for name in fields)
        yield execute(
            f"UPDATE {table} SET {sets} WHERE {column} = :subject", **fields, subject=subject_id
        )
        yield execute_many(
            "INSERT INTO changes (subject_id, field, old, new, reason, at) "
            "VALUES (:subject, :field, :old, :new, :reason, :at)",
            [
                {
                    "subject": subject_id,
                    "field": name,
                    "old": shown(name, olds[name]),
                    "new": shown(name, new),
                    "reason": patch.reason,
                    "at": now,
                }
                for name, new in fields.items()
                if name in olds and name != "policy_rev" and olds[name] != new
            ],
        )
        yield from _insert_event(event)
        return "patched"

    # -- issuers and the record of admin actions ----------------------------------------------

    @writes
    def create_issuer(self, issuer: IssuerRecord, event: Event) -> Op[None]:
        yield from _insert(
            "issuers",
            {
                "issuer_id": issuer.issuer_id,
                "name": issuer.name,
                "token_hash": issuer.token_hash,
                "policy": json.dumps(issuer.policy),
                "kubernetes": _json_or_null(issuer.kubernetes),
                "created_at": issuer.created_at,
            },
        )
        yield from _insert_event(event)

    @reads
    def get_issuer(self, issuer_id: str) -> Op[IssuerRecord | None]:
        found = yield row("SELECT * FROM issuers WHERE issuer_id = :issuer", issuer=issuer_id)
        return _issuer(found) if found else None

    @reads
    def find_issuer(self, token_hash: bytes) -> Op[IssuerRecord | None]:
        found = yield row(
            "SELECT * FROM issuers WHERE token_hash = :hash AND deleted_at IS NULL", hash=token_hash
        )
        return _issuer(found) if found else None

    @reads
    def list_issuers(self, *, include_deleted: bool = False) -> Op[list[IssuerRecord]]:
        where = "1 = 1" if include_deleted else "deleted_at IS NULL"
        found = yield rows(f"SELECT * FROM issuers WHERE {where} ORDER BY created_at, name")
        return [_issuer(r) for r in found]

    @writes
    def delete_issuer(
        self, issuer_id: str, now: datetime, event: Event, *, revoke: bool = False
    ) -> Op[tuple[list[str], list[str]] | None]:
        deleted = yield execute(
            "UPDATE issuers SET deleted_at = :now WHERE issuer_id = :issuer AND deleted_at IS NULL",
            now=now,
            issuer=issuer_id,
        )
        if not deleted:
            return None
        revoked: list[list[str]] = [[], []]
        if revoke:
            for index, (table, column) in enumerate(
                (("vault_keys", "key_id"), ("budgets", "budget_id"))
            ):
                changed = yield rows(
                    f"UPDATE {table} SET revoked_at = :now WHERE issuer_id = :issuer "
                    f"AND revoked_at IS NULL AND expires_at > :now RETURNING {column}",
                    now=now,
                    issuer=issuer_id,
                )
                revoked[index] = sorted(r[column] for r in changed)
        yield from _insert_event(event)
        return revoked[0], revoked[1]

    @writes
    def record_event(self, event: Event) -> Op[None]:
        yield from _insert_event(event)

    @reads
    def events(self, query: EventFilter) -> Op[list[Event]]:
        where = _equal(Where(), query, ("action", "issuer_id", "target"))
        if query.refused is True:
            where.add("outcome <> 'ok'")
        elif query.refused is False:
            where.add("outcome = 'ok'")
        _since_and_ids(where, query.since, query.after_id, query.before_id)
        return (yield from _page("events", where, "id DESC", query.limit, _event))

    # -- the request path's reads and its audit rows -------------------------------------------

    @writes
    def record(self, audit: AuditRecord) -> Op[int]:
        return (yield from insert_audit(audit))

    @reads
    def check_lookup(self, key: KeyRecord, now: datetime) -> Op[tuple[Decision, int] | None]:
        """`admit_lookup` for a key whose cached record (its budget's too) has no call rate:
        nothing to count, so a read. Had a patch set a rate since, its revision says so."""
        found = yield from _lookup_state(key)
        return _lookup_refusal(found, key, now)

    @writes
    def admit_lookup(self, key: KeyRecord, now: datetime) -> Op[tuple[Decision, int] | None]:
        """Whether the proxy may look something up at a vendor with the real key for a call of
        `key` (as the pipeline cached it), now: (why not, seconds to wait) or None, and then the
        lookup is counted against the key's and its budget's call rates. Refused, in the
        ledger's order: judged against older constraints (rule 0: judge it again), a dead key
        or budget (rule 1: it learns nothing, and spends none of the account's rate limit), a
        full enforced rate (rule 8: it asks room for itself and its call, `places=2`). The
        rates are the database's, counted under the reservation's locks, in its order (the
        budget's row, then the key's). The reservation stays the authority on the call."""
        found = yield from _lookup_state(key)
        refused = _lookup_refusal(found, key, now)
        if refused is not None or found is None:
            return refused
        second = second_of(now)
        rates: list[Rate] = []
        limited: list[str] = []
        for owner, side in ((key.budget_id, "b"), (key.key_id, "k")):
            limit = found[f"{side}_rate"]
            if owner is None or limit is None:  # no rate to count it in: no lock to take
                continue
            yield row("SELECT 1 FROM usage_counts WHERE owner_id = :owner FOR UPDATE", owner=owner)
            calls = yield rows(
                "SELECT second, calls FROM call_rate WHERE owner_id = :owner "
                "AND second >= :floor ORDER BY second",
                owner=owner,
                floor=rate_floor(second),
            )
            counted = [(int(r["second"]), int(r["calls"])) for r in calls]
            rates.append(Rate(limit, found[f"{side}_mode"] == "report", counted.copy))
            limited.append(owner)
        rates.reverse()  # the key's first, as the reservation checks them
        over, wait = over_rate(rates, second, places=2)  # the lookup, and its call
        if over is not None:
            return over, wait or 0
        for owner in limited:
            yield execute(
                "INSERT INTO call_rate (owner_id, second, calls) VALUES (:owner, :second, 1) "
                "ON CONFLICT (owner_id, second) DO UPDATE SET calls = call_rate.calls + 1",
                owner=owner,
                second=second,
            )
        return None

    @reads
    def audit(self, query: AuditFilter) -> Op[list[AuditRecord]]:
        return (yield from _page("audit", _audit_where(query), "id DESC", query.limit, _audit))

    @writes
    def forget_replays(self, older_than: datetime) -> Op[int]:
        forgotten = yield execute("DELETE FROM replays WHERE created_at < :cut", cut=older_than)
        # An issue step's retries come within the run; a day later the key is long gone.
        yield execute("DELETE FROM issue_requests WHERE created_at < :cut", cut=older_than)
        return int(forgotten)

    # -- threshold alerts ----------------------------------------------------------------------

    @reads
    def alert_levels(self, now: datetime) -> Op[list[AlertLevel]]:
        found = []
        for table, column, vendor in (
            ("vault_keys", "key_id", "t.vendor"),
            ("budgets", "budget_id", "NULL"),
        ):
            levels = yield rows(
                f"SELECT t.{column} AS owner, t.label, t.namespace, {vendor} AS vendor, "
                "t.daily_cap_micros, t.total_cap_micros, t.alert_percents, "
                "coalesce(sum(w.settled_micros + w.reserved_micros) "
                "FILTER (WHERE w.bucket >= :floor), 0) AS window_used, "
                "coalesce(sum(w.settled_micros + w.reserved_micros), 0) AS life_used, "
                "coalesce(max(u.cap_hits), 0) AS hits "
                f"FROM {table} t LEFT JOIN spend_window w ON w.owner_id = t.{column} "
                f"LEFT JOIN usage_counts u ON u.owner_id = t.{column} "
                "WHERE t.revoked_at IS NULL AND t.expires_at > :now "
                "AND (t.daily_cap_micros IS NOT NULL OR t.total_cap_micros IS NOT NULL) "
                # By the primary key: PostgreSQL then reads the row's other columns as well.
                f"GROUP BY t.{column}",
                floor=_window_floor(now),
                now=now,
            )
            kind = "key" if table == "vault_keys" else "budget"
            found += [
                AlertLevel(
                    owner_id=r["owner"],
                    kind=kind,
                    label=r["label"],
                    namespace=r["namespace"],
                    vendor=r["vendor"],
                    window_micros=int(r["window_used"]),
                    daily_cap_micros=r["daily_cap_micros"],
                    life_micros=int(r["life_used"]),
                    total_cap_micros=r["total_cap_micros"],
                    cap_hits=int(r["hits"]),
                    percents=percents_of(r["alert_percents"]),
                )
                for r in levels
            ]
        return found

    @reads
    def alert_marks(self) -> Op[set[tuple[str, str]]]:
        found = yield rows("SELECT owner_id, mark FROM alert_marks")
        return {(str(r["owner_id"]), str(r["mark"])) for r in found}

    @writes
    def raise_alert(self, delivery: AlertDelivery) -> Op[bool]:
        marked = yield value(
            "INSERT INTO alert_marks (owner_id, mark) VALUES (:owner, :mark) "
            "ON CONFLICT DO NOTHING RETURNING true",
            owner=delivery.owner_id,
            mark=delivery.mark,
        )
        if not marked:
            return False
        created = delivery.created_at  # and first due at once
        yield from _insert(
            "alert_outbox",
            {
                "delivery_id": delivery.delivery_id,
                "owner_id": delivery.owner_id,
                "mark": delivery.mark,
                "payload": delivery.payload,
                "created_at": created,
                "next_attempt_at": created,
            },
        )
        return True

    @writes
    def forget_alert_marks(self, ended_before: datetime) -> Op[int]:
        forgotten = yield execute(
            # A lookup by id per mark: as cheap with a million live keys as with none.
            "DELETE FROM alert_marks WHERE NOT EXISTS (SELECT 1 FROM vault_keys k "
            "WHERE k.key_id = alert_marks.owner_id AND (k.revoked_at IS NULL "
            "OR k.revoked_at > :cut) AND k.expires_at > :cut) AND NOT EXISTS (SELECT 1 "
            "FROM budgets b WHERE b.budget_id = alert_marks.owner_id AND (b.revoked_at IS "
            "NULL OR b.revoked_at > :cut) AND b.expires_at > :cut)",
            cut=ended_before,
        )
        return int(forgotten)

    @writes
    def rearm_alerts(self, owner_id: str, marks: list[str]) -> Op[None]:
        yield execute_many(
            "DELETE FROM alert_marks WHERE owner_id = :owner AND mark = :mark",
            [{"owner": owner_id, "mark": mark} for mark in marks],
        )

    @writes
    def claim_alerts(self, now: datetime, lease: timedelta, limit: int) -> Op[list[AlertDelivery]]:
        claimed = yield rows(
            "UPDATE alert_outbox SET claimed_until = :until WHERE delivery_id IN ("
            "SELECT delivery_id FROM alert_outbox WHERE delivered_at IS NULL "
            "AND next_attempt_at <= :now AND (claimed_until IS NULL OR claimed_until <= :now) "
            "ORDER BY next_attempt_at LIMIT :limit FOR UPDATE SKIP LOCKED) RETURNING *",
            now=now,
            until=now + lease,
            limit=limit,
        )
        deliveries = [_alert(r) for r in claimed]
        return sorted(deliveries, key=lambda d: (d.next_attempt_at or d.created_at, d.delivery_id))

    @writes
    def finish_alert(
        self,
        delivery_id: str,
        now: datetime,
        *,
        error: str | None,
        retry_at: datetime | None,
    ) -> Op[None]:
        if error is None:
            yield execute(
                "UPDATE alert_outbox SET attempts = attempts + 1, delivered_at = :now, "
                "claimed_until = NULL, last_error = NULL WHERE delivery_id = :delivery",
                now=now,
                delivery=delivery_id,
            )
        else:
            yield execute(
                "UPDATE alert_outbox SET attempts = attempts + 1, last_error = :error, "
                "next_attempt_at = :retry, claimed_until = NULL WHERE delivery_id = :delivery",
                error=error[:500],
                retry=retry_at or now,
                delivery=delivery_id,
            )

    @reads
    def alert_deliveries(self, *, pending: bool, limit: int) -> Op[list[AlertDelivery]]:
        where = "WHERE delivered_at IS NULL" if pending else ""
        found = yield rows(
            f"SELECT * FROM alert_outbox {where} "
            "ORDER BY created_at DESC, delivery_id DESC LIMIT :limit",
            limit=limit,
        )
        return [_alert(r) for r in found]

    @reads
    def metrics_snapshot(self, now: datetime, stale_before: datetime) -> Op[MetricsSnapshot]:
        floor = _window_floor(now)
        spend = yield rows(
            "SELECT k.vendor, sum(w.settled_micros) AS total FROM spend_window w "
            "JOIN vault_keys k ON k.key_id = w.owner_id WHERE w.bucket >= :floor "
            "GROUP BY k.vendor",
            floor=floor,
        )
        reservations = yield row(
            "SELECT count(*) AS open, count(*) FILTER (WHERE ts < :stale) AS stale FROM audit "
            "WHERE decision = 'in_flight'",
            stale=stale_before,
        )
        active = yield value(
            "SELECT count(*) FROM vault_keys WHERE revoked_at IS NULL AND expires_at > :now",
            now=now,
        )
        near = yield value(
            "SELECT count(*) FROM (SELECT k.daily_cap_micros AS cap, "
            "sum(w.settled_micros + w.reserved_micros) AS used FROM vault_keys k "
            "JOIN spend_window w ON w.owner_id = k.key_id AND w.bucket >= :floor "
            "WHERE k.revoked_at IS NULL AND k.expires_at > :now AND k.daily_cap_micros > 0 "
            "GROUP BY k.key_id, k.daily_cap_micros) AS u "
            "WHERE used >= cap * CAST(:near AS DOUBLE PRECISION)",
            floor=floor,
            now=now,
            near=NEAR_CAP,
        )
        alerts = yield row(
            "SELECT count(*) AS pending, count(*) FILTER (WHERE attempts > 0) AS failing "
            "FROM alert_outbox WHERE delivered_at IS NULL"
        )
        return MetricsSnapshot(
            {r["vendor"]: int(r["total"]) for r in spend},
            int(reservations["open"]),
            int(reservations["stale"]),
            int(active),
            int(near),
            int(alerts["pending"]),
            int(alerts["failing"]),
        )

    # -- retention -----------------------------------------------------------------------------

    async def prune_audit(self, before: datetime, now: datetime, *, dry_run: bool = False) -> int:
        """Delete audit rows older than `before`, except a call's in flight and a key's that is
        active or ended within the last window (its spend may still be read); in slices, so the
        request path is served in between."""
        where = Where().add("ts < :before", before=before).add("decision <> 'in_flight'")
        where.add(
            "(key_id IS NULL OR NOT EXISTS (SELECT 1 FROM vault_keys k "
            "WHERE k.key_id = audit.key_id AND (k.revoked_at IS NULL OR k.revoked_at >= :ended) "
            "AND k.expires_at >= :ended))",
            ended=now - WINDOW - BUCKET,
        )
        if dry_run:
            return await self._read(lambda: _count_audit(where))
        removed = 0
        while True:
            count = await self._write(lambda: _delete_audit(where))
            removed += count
            if count < PRUNE_SLICE:
                return removed

    # -- the dashboard -------------------------------------------------------------------------

    @reads
    def list_runs(self, query: RunFilter, now: datetime) -> Op[list[RunRow]]:
        found = []
        for table in ("vault_keys", "budgets"):
            sql, params = self._runs_walk(query, now, table)
            walk = yield rows(sql, **params)
            found.append([(r["label"], moment(r["created_at"])) for r in walk])
        labels = sorted({label for walk in found for label, _ in walk})
        if not labels:
            return []
        sql, params = self._runs_counts(labels, query.scope, now)
        counted = yield rows(sql, **params)
        counts = {
            r["label"]: (
                moment(r["oldest"]),
                int(r["keys"]),
                int(r["budgets"]),
                int(r["live"]),
                int(r["revoked"]),
            )
            for r in counted
        }
        return merge_runs(found, counts, query.limit)

    def _runs_walk(self, query: RunFilter, now: datetime, table: str) -> tuple[str, dict[str, Any]]:
        """One page of runs from `table` (keys or budgets): the rows that are their run's newest,
        newest first, walking the creation-time index, so a page costs the same at any size
        instead of grouping every row. A run's newest row is in exactly one table (a key wins a
        tie), so the two walks merged are the runs listing. Labels compare by code point, as
        Python merges them."""
        column = _RUN_TABLES[table]
        other = "budgets" if table == "vault_keys" else "vault_keys"
        binary, find = self.dialect.binary, self.dialect.find
        where = _scoped(Where(), query.scope, "t")
        if query.label is not None:
            where.add("t.label = :label", label=query.label)
        if query.contains:
            where.add(f"{find}(t.label, :contains) > 0", contains=query.contains)
        if query.before is not None:
            # The `<=` alone is a range on the creation-time index, so the walk starts there.
            where.add(
                f"t.created_at <= :newest AND (t.created_at < :newest OR t.label{binary} < :after)",
                newest=query.before[0],
                after=query.before[1],
            )
        same = _scoped(where.sub(), query.scope, "n")
        where.add(
            f"NOT EXISTS (SELECT 1 FROM {table} n WHERE n.label = t.label AND {same.sql} AND "
            f"(n.created_at > t.created_at OR (n.created_at = t.created_at "
            f"AND n.{column} > t.{column})))"
        )
        later = _scoped(where.sub(), query.scope, "n")
        beats = ">" if table == "vault_keys" else ">="
        where.add(
            f"NOT EXISTS (SELECT 1 FROM {other} n WHERE n.label = t.label AND {later.sql} AND "
            f"n.created_at {beats} t.created_at)"
        )
        if query.live is not None:
            parts = []
            for name in _RUN_TABLES:
                scoped = _scoped(where.sub(), query.scope, "a")
                parts.append(
                    f"EXISTS (SELECT 1 FROM {name} a WHERE a.label = t.label AND {scoped.sql} "
                    "AND a.revoked_at IS NULL AND a.expires_at > :now)"
                )
            live = " OR ".join(parts)
            where.add(f"({live})" if query.live else f"NOT ({live})", now=now)
        sql = (
            f"SELECT t.label, t.created_at FROM {table} t WHERE {where.sql} "
            f"ORDER BY t.created_at DESC, t.label{binary} DESC LIMIT :limit"
        )
        return sql, {**where.params, "limit": query.limit}

    def _runs_counts(
        self, labels: list[str], scope: Scope | None, now: datetime
    ) -> tuple[str, dict[str, Any]]:
        """Each listed run's keys and budgets counted, read through the label index."""
        params: dict[str, Any] = {"now": now, "labels": labels}
        arms = []
        for table in _RUN_TABLES:
            scoped = _scoped(Where(params), scope, "t")
            arms.append(
                f"SELECT t.label, t.created_at, {int(table == 'vault_keys')} AS is_key, "
                "CASE WHEN t.revoked_at IS NULL AND t.expires_at > :now THEN 1 ELSE 0 END "
                "AS is_live, CASE WHEN t.revoked_at IS NULL THEN 0 ELSE 1 END AS is_revoked "
                f"FROM {table} t WHERE {self.dialect.any_of('t.label', 'labels')} "
                f"AND {scoped.sql}"
            )
        sql = (
            "SELECT label, min(created_at) AS oldest, sum(is_key) AS keys, "
            "sum(1 - is_key) AS budgets, sum(is_live) AS live, sum(is_revoked) AS revoked "
            f"FROM ({' UNION ALL '.join(arms)}) u GROUP BY label"
        )
        return sql, params

    @reads
    def run_activity(
        self, label: str, scope: Scope | None, points: int = ACTIVITY_POINTS
    ) -> Op[RunActivity]:
        where = _audit_where(AuditFilter(scope=scope, label=label))
        ends = []
        for order in ("ASC", "DESC"):
            ends.append(
                (
                    yield value(
                        f"SELECT ts FROM audit WHERE {where.sql} ORDER BY id {order} LIMIT 1",
                        **where.params,
                    )
                )
            )
        first, last = ends
        if first is None or last is None:
            return RunActivity([], [])
        start = int(moment(first).timestamp())
        width = activity_width(start, int(moment(last).timestamp()), points)
        hit = f"CASE WHEN {CAP_HIT_SQL} THEN 1 ELSE 0 END"
        second = self.dialect.epoch_seconds("ts")
        slices = yield rows(
            f"SELECT ({second} - :start) / :width AS b, sum(settled_micros) AS spent, "
            f"count(*) AS calls, sum({hit}) AS hits FROM audit WHERE {where.sql} "
            "GROUP BY b ORDER BY b",
            **where.params,
            start=start,
            width=width,
        )
        # Clamped: a replica's clock may put a row before the first or after the last.
        merged: dict[int, list[int]] = {}
        for r in slices:
            index = max(0, min(points - 1, int(r["b"])))
            sums = merged.setdefault(index, [0, 0, 0])
            for i, name in enumerate(("spent", "calls", "hits")):
                sums[i] += int(r[name] or 0)
        per_caller = yield rows(
            f"SELECT caller_tag, sum(settled_micros) AS spent, count(*) AS calls, "
            f"sum({hit}) AS hits FROM audit WHERE {where.sql} "
            "GROUP BY caller_tag ORDER BY spent DESC, calls DESC, caller_tag LIMIT 100",
            **where.params,
        )
        seconds = [
            (bucket_time(start, width, index), sums[0], sums[1], sums[2])
            for index, sums in sorted(merged.items())
        ]
        callers = [
            (r["caller_tag"], int(r["spent"] or 0), int(r["calls"]), int(r["hits"] or 0))
            for r in per_caller
        ]
        return RunActivity(seconds, callers)

    @writes
    def create_session(self, session: Session) -> Op[None]:
        yield from _insert(
            "ui_sessions",
            {
                "session_hash": session.session_hash,
                "issuer_id": session.issuer_id,
                "credential_hash": session.credential_hash,
                "created_at": session.created_at,
                "expires_at": session.expires_at,
            },
        )

    @reads
    def find_session(self, session_hash: bytes, now: datetime) -> Op[Session | None]:
        found = yield row(
            "SELECT * FROM ui_sessions WHERE session_hash = :hash AND expires_at > :now",
            hash=session_hash,
            now=now,
        )
        if found is None:
            return None
        return Session(
            session_hash,
            found["issuer_id"],
            bytes(found["credential_hash"]),
            moment(found["created_at"]),
            moment(found["expires_at"]),
        )

    @writes
    def end_session(self, session_hash: bytes) -> Op[None]:
        yield execute("DELETE FROM ui_sessions WHERE session_hash = :hash", hash=session_hash)

    @writes
    def forget_sessions(self, now: datetime) -> Op[int]:
        forgotten = yield execute("DELETE FROM ui_sessions WHERE expires_at <= :now", now=now)
        return int(forgotten)


# -- rows and records -------------------------------------------------------------------------

_RUN_TABLES = {"vault_keys": "key_id", "budgets": "budget_id"}
_PATCHABLE = {
    "daily_cap_micros",
    "total_cap_micros",
    "max_per_caller_micros",
    "constraints",
    "policy_rev",
}


def _lookup_state(key: KeyRecord) -> Op[Any]:
    """What a lookup for `key` is admitted by: the key's and its budget's life, constraints'
    revision and call rate, in one read."""
    found = yield row(
        "SELECT k.revoked_at AS k_revoked, k.expires_at AS k_expires, k.policy_rev AS k_rev, "
        "k.max_calls_per_minute AS k_rate, k.rate_mode AS k_mode, b.revoked_at AS b_revoked, "
        "b.expires_at AS b_expires, b.policy_rev AS b_rev, b.max_calls_per_minute AS b_rate, "
        "b.rate_mode AS b_mode FROM vault_keys k "
        "LEFT JOIN budgets b ON b.budget_id = :budget_id WHERE k.key_id = :key_id",
        key_id=key.key_id,
        budget_id=key.budget_id,
    )
    return found


def _lookup_refusal(found: Any, key: KeyRecord, now: datetime) -> tuple[Decision, int] | None:
    """Rules 0 and 1 for a lookup (`_lookup_state`): judged against older constraints, or a
    dead key or budget."""
    if found is None:
        return Decision.REVOKED, 0
    in_budget = key.budget_id is not None and found["b_expires"] is not None
    if found["k_rev"] != key.policy_rev or (in_budget and found["b_rev"] != key.budget_policy_rev):
        return Decision.POLICY_CHANGED, 0
    budget = None
    if key.budget_id is not None:
        expires = found["b_expires"]
        budget = (found["b_revoked"] is not None, None if expires is None else moment(expires))
    dead = dead_reason(now, (found["k_revoked"] is not None, moment(found["k_expires"])), budget)
    return None if dead is None else (dead, 0)


def _maybe_moment(stored: Any) -> datetime | None:
    return None if stored is None else moment(stored)


def _json_or_null(given: Any) -> str | None:
    return None if given is None else json.dumps(given)


def _constraints(stored: Any) -> Constraints | None:
    """A key's or budget's constraints as stored (JSON text; NULL: none)."""
    return None if stored is None else Constraints.from_json(json.loads(stored))


def _owner(r: Any) -> Owner | None:
    found = r["issuer_id"], r["namespace"], r["service_account"]
    return None if found == (None, None, None) else Owner(*found)


def _owner_values(owner: Owner | None) -> dict[str, str | None]:
    return {
        "issuer_id": owner.issuer_id if owner else None,
        "namespace": owner.namespace if owner else None,
        "service_account": owner.service_account if owner else None,
    }


def _subject_values(subject: KeyRecord | BudgetRecord) -> dict[str, Any]:
    """The columns of a key's or a budget's row that both have, as inserted."""
    return {
        "label": subject.label,
        "daily_cap_micros": subject.daily_cap_micros,
        "total_cap_micros": subject.total_cap_micros,
        "metadata": json.dumps(subject.metadata),
        "created_at": subject.created_at,
        "expires_at": subject.expires_at,
        **_owner_values(subject.owner),
        "alert_percents": percents_text(subject.alert_percents),
        **_policy_values(subject.constraints),
    }


def _policy_values(constraints: Constraints | None) -> dict[str, Any]:
    """The columns holding a key's or budget's constraints, as issued or patched."""
    rate = None if constraints is None else constraints.max_calls_per_minute
    return {
        "constraints": None if constraints is None else json.dumps(constraints.as_json()),
        # The call rate, where the ledger reads it beside the caps (as the constraints it is
        # copied from: set at issue, and by each patch of them).
        "max_calls_per_minute": rate,
        "rate_mode": None if rate is None or constraints is None else constraints.mode,
    }


def _subject_fields(r: Any) -> dict[str, Any]:
    """The fields of a key or a budget that both have, from its row (`revoked_at` too, which
    no insert sets)."""
    return {
        "label": r["label"],
        "daily_cap_micros": r["daily_cap_micros"],
        "total_cap_micros": r["total_cap_micros"],
        "metadata": json.loads(r["metadata"]),
        "created_at": moment(r["created_at"]),
        "expires_at": moment(r["expires_at"]),
        "revoked_at": _maybe_moment(r["revoked_at"]),
        "owner": _owner(r),
        "alert_percents": percents_of(r["alert_percents"]),
        "constraints": _constraints(r["constraints"]),
        "policy_rev": r["policy_rev"],
    }


def _key_values(key: KeyRecord) -> dict[str, Any]:
    """A key's row, as inserted (a new column goes here, in `_key` and in the migrations; one
    that budgets have too, in `_subject_values` and `_subject_fields`)."""
    return {
        "key_id": key.key_id,
        "key_hash": key.key_hash,
        "vendor": key.vendor,
        "max_per_call_micros": key.max_per_call_micros,
        "allowed_endpoints": json.dumps(list(key.allowed_endpoints)),
        "dedupe_window_s": key.dedupe_window_s,
        "allowed_accounts": json.dumps(list(key.allowed_accounts)),
        "max_per_caller_micros": key.max_per_caller_micros,
        "budget_id": key.budget_id,
        **_subject_values(key),
    }


def _key(r: Any) -> KeyRecord:
    return KeyRecord(
        key_id=r["key_id"],
        key_hash=bytes(r["key_hash"]),
        vendor=r["vendor"],
        max_per_call_micros=r["max_per_call_micros"],
        allowed_endpoints=tuple(json.loads(r["allowed_endpoints"])),
        dedupe_window_s=r["dedupe_window_s"],
        allowed_accounts=tuple(json.loads(r["allowed_accounts"])),
        max_per_caller_micros=r["max_per_caller_micros"],
        budget_id=r["budget_id"],
        **_subject_fields(r),
    )


def _key_view(
    key: KeyRecord, usage: Usage, _drawing: tuple[str, ...], changes: tuple[Change, ...]
) -> KeyView:
    return KeyView(key, usage, changes)  # no key draws on a key


def _budget_values(budget: BudgetRecord) -> dict[str, Any]:
    return {"budget_id": budget.budget_id, **_subject_values(budget)}


def _budget(r: Any) -> BudgetRecord:
    return BudgetRecord(budget_id=r["budget_id"], **_subject_fields(r))


@dataclass(frozen=True, slots=True)
class _Subject(Generic[R, V]):
    """Keys or budgets: where they are stored, and how a row becomes a record and a view."""

    table: str
    alias: str  # the table's name in queries
    column: str  # the id column, named as the record's id field
    record: Callable[[Any], R]  # a row as a record
    values: Callable[[R], dict[str, Any]]  # a record as a row
    # A record, its usage, the keys drawing on it and its changes, as a view.
    view: Callable[[R, Usage, tuple[str, ...], tuple[Change, ...]], V]
    drawn_on: bool  # keys draw on it: a view names them, a revoke revokes them


_KEYS = _Subject("vault_keys", "k", "key_id", _key, _key_values, _key_view, drawn_on=False)
_BUDGETS = _Subject("budgets", "b", "budget_id", _budget, _budget_values, BudgetView, drawn_on=True)


def _issuer(r: Any) -> IssuerRecord:
    return IssuerRecord(
        issuer_id=r["issuer_id"],
        name=r["name"],
        token_hash=bytes(r["token_hash"]) if r["token_hash"] is not None else None,
        policy=json.loads(r["policy"]),
        kubernetes=json.loads(r["kubernetes"]) if r["kubernetes"] else None,
        created_at=moment(r["created_at"]),
        deleted_at=_maybe_moment(r["deleted_at"]),
    )


def _event(r: Any) -> Event:
    fields = {column: r[column] for column in _EVENT_COLUMNS} | {"ts": moment(r["ts"])}
    detail = json.loads(r["detail"]) if r["detail"] else None
    return Event(id=r["id"], detail=detail, **fields)


def _audit(r: Any) -> AuditRecord:
    # Each column is the field of its name, read as stored but for the timestamp.
    fields = {column: r[column] for column in AUDIT_COLUMNS} | {"ts": moment(r["ts"])}
    return AuditRecord(id=r["id"], **fields)


def _alert(r: Any) -> AlertDelivery:
    return AlertDelivery(
        delivery_id=r["delivery_id"],
        owner_id=r["owner_id"],
        mark=r["mark"],
        payload=r["payload"],
        created_at=moment(r["created_at"]),
        attempts=int(r["attempts"]),
        next_attempt_at=_maybe_moment(r["next_attempt_at"]),
        delivered_at=_maybe_moment(r["delivered_at"]),
        last_error=r["last_error"],
    )


# -- pieces of operations ---------------------------------------------------------------------


def _insert(table: str, values: dict[str, Any]) -> Op[None]:
    names = ", ".join(values)
    marks = ", ".join(f":{name}" for name in values)
    yield execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", **values)


# An event row's columns but its id and JSON `detail`, named as `Event`'s fields.
_EVENT_COLUMNS = ("ts", "action", "actor", "issuer_id", "target", "outcome", "source")


def _insert_event(event: Event) -> Op[None]:
    values = {column: getattr(event, column) for column in _EVENT_COLUMNS}
    yield from _insert("events", values | {"detail": _json_or_null(event.detail)})


def _changes(subject_id: str) -> Op[tuple[Change, ...]]:
    found = yield rows(
        "SELECT field, old, new, reason, at FROM changes WHERE subject_id = :subject ORDER BY id",
        subject=subject_id,
    )
    return tuple(
        Change(r["field"], r["old"], r["new"], r["reason"], moment(r["at"])) for r in found
    )


def _claim_request(request: IssueRequest | None, now: datetime) -> Op[tuple[str, str | None]]:
    """Lock and check an idempotent issue: ("ok" | "mismatch", the earlier attempt's subject).
    The idempotency key's row is taken first (an empty one if it is new), so two attempts racing
    with the same key run one after the other."""
    if request is None:
        return "ok", None
    yield execute(
        "INSERT INTO issue_requests (scope, idempotency_key, request_hash, subject_id, "
        "created_at) VALUES (:scope, :key, :hash, '', :now) ON CONFLICT DO NOTHING",
        scope=request.scope,
        key=request.key,
        hash=request.request_hash,
        now=now,
    )
    found = yield row(
        "SELECT request_hash, subject_id FROM issue_requests WHERE scope = :scope "
        "AND idempotency_key = :key FOR UPDATE",
        scope=request.scope,
        key=request.key,
    )
    if found["request_hash"] != request.request_hash:
        return "mismatch", None
    return "ok", found["subject_id"] or None


def _record_request(request: IssueRequest | None, subject_id: str, now: datetime) -> Op[None]:
    if request is not None:
        yield execute(
            "UPDATE issue_requests SET subject_id = :subject, created_at = :now "
            "WHERE scope = :scope AND idempotency_key = :key",
            subject=subject_id,
            now=now,
            scope=request.scope,
            key=request.key,
        )


def _issue(
    kind: _Subject[R, Any],
    subject: R,
    replaced: str | None,
    request: IssueRequest | None,
    event: Event,
) -> Op[Issued]:
    """Insert a new key or budget and record its issue; first revoke `replaced`, what an
    earlier attempt with the same idempotency key issued."""
    values = kind.values(subject)
    subject_id, created_at = values[kind.column], values["created_at"]
    if replaced is not None:
        yield from _revoke_subject(_kind_of(replaced), replaced, created_at)
    yield from _insert(kind.table, values)
    yield execute("INSERT INTO usage_counts (owner_id) VALUES (:owner)", owner=subject_id)
    yield from _record_request(request, subject_id, created_at)
    yield from _insert_event(event)
    return Issued("created", replaced)


class _Revoked(NamedTuple):
    """What revoking a key or a budget changed."""

    changed: bool  # it was live until now
    drawing: list[str]  # the keys drawing on a budget, revoked with it


def _revoke(
    kind: _Subject[Any, Any], subject_id: str, now: datetime, event: Event
) -> Op[_Revoked | None]:
    """Revoke a key, or a budget with every key drawing on it, and record it; None (and
    nothing recorded) if there is no such key or budget."""
    exists = yield value(
        f"SELECT true FROM {kind.table} WHERE {kind.column} = :subject FOR UPDATE",
        subject=subject_id,
    )
    if not exists:
        return None
    revoked = yield from _revoke_subject(kind, subject_id, now)
    yield from _insert_event(event)
    return revoked


def _revoke_subject(kind: _Subject[Any, Any], subject_id: str, now: datetime) -> Op[_Revoked]:
    """Revoke a key, or a budget with every live key drawing on it (the caller locks it, if it
    must, and records the event)."""
    changed = yield execute(
        f"UPDATE {kind.table} SET revoked_at = :now WHERE {kind.column} = :subject "
        "AND revoked_at IS NULL",
        now=now,
        subject=subject_id,
    )
    drawing = []
    if kind.drawn_on:
        keys = yield rows(
            "UPDATE vault_keys SET revoked_at = :now WHERE budget_id = :subject "
            "AND revoked_at IS NULL RETURNING key_id",
            now=now,
            subject=subject_id,
        )
        drawing = sorted(r["key_id"] for r in keys)
    return _Revoked(bool(changed), drawing)


def _kind_of(subject_id: str) -> _Subject[Any, Any]:
    """Whether an id is a key's (`vk_...`) or a budget's (`bg_...`)."""
    table, _ = subject_table(subject_id)
    return _BUDGETS if table == _BUDGETS.table else _KEYS


# An audit row's columns, named as `AuditRecord`'s fields: the one statement inserting it is made
# from them, and SQLite's ledger binds a record's values in this order (`audit_values`).
AUDIT_COLUMNS = (
    "ts",
    "key_id",
    "label",
    "vendor",
    "method",
    "path",
    "status",
    "decision",
    "reserved_micros",
    "settled_micros",
    "amount",
    "currency",
    "vendor_request_id",
    "idempotency_key",
    "latency_ms",
    "caller_tag",
    "budget_id",
    "reported",
)
INSERT_AUDIT = "INSERT INTO audit ({}) VALUES ({})".format(
    ", ".join(AUDIT_COLUMNS), ", ".join(f":{c}" for c in AUDIT_COLUMNS)
)
audit_values = operator.attrgetter(*AUDIT_COLUMNS)


def insert_audit(audit: AuditRecord) -> Op[int]:
    """An audit row; its id."""
    values = dict(zip(AUDIT_COLUMNS, audit_values(audit), strict=True))
    audit_id = yield inserted_id(INSERT_AUDIT, **values)
    return int(audit_id)


def _page(
    source: str, where: Where, order: str, limit: int, record: Callable[[Any], T]
) -> Op[list[T]]:
    """The first `limit` rows of `source` (a table, and its alias if `where` uses one) in
    `order`, as records."""
    found = yield rows(
        f"SELECT * FROM {source} WHERE {where.sql} ORDER BY {order} LIMIT :limit",
        **where.params,
        limit=limit,
    )
    return [record(r) for r in found]


def _count_audit(where: Where) -> Op[int]:
    counted = yield value(f"SELECT count(*) FROM audit WHERE {where.sql}", **where.params)
    return int(counted)


def _delete_audit(where: Where) -> Op[int]:
    deleted = yield execute(
        f"DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE {where.sql} LIMIT :slice)",
        **where.params,
        slice=PRUNE_SLICE,
    )
    return int(deleted)


# -- filters ----------------------------------------------------------------------------------


def _scoped(where: Where, scope: Scope | None, alias: str) -> Where:
    """An issuer's view of a table holding `label` and `namespace` (`alias`.…)."""
    if scope is None:
        return where
    where.add(
        f"substr({alias}.label, 1, :prefix_length) = :prefix",
        prefix_length=len(scope.label_prefix),
        prefix=scope.label_prefix,
    )
    if scope.namespaces is not None:
        if not scope.namespaces:
            return where.add("1 = 0")
        marks = {f"ns{i}": namespace for i, namespace in enumerate(scope.namespaces)}
        where.add(f"{alias}.namespace IN ({', '.join(':' + m for m in marks)})", **marks)
    return where


def _listed(where: Where, alias: str, query: Listing, now: datetime) -> Where:
    """A listing's filters on keys (`k`) or budgets (`b`, `t`), newest first (paging)."""
    _scoped(where, query.scope, alias)
    if query.before is not None:
        column = "key_id" if alias == "k" else "budget_id"
        where.add(
            f"({alias}.created_at < :before OR ({alias}.created_at = :before "
            f"AND {alias}.{column} < :before_id))",
            before=query.before[0],
            before_id=query.before[1],
        )
    _equal(where, query, ("namespace", "label", "vendor", "budget_id"), alias)
    if query.status == "revoked":
        where.add(f"{alias}.revoked_at IS NOT NULL")
    elif query.status == "expired":
        where.add(f"{alias}.revoked_at IS NULL AND {alias}.expires_at <= :now", now=now)
    elif query.status == "active":
        where.add(f"{alias}.revoked_at IS NULL AND {alias}.expires_at > :now", now=now)
    return where


def _audit_where(query: AuditFilter) -> Where:
    where = Where()
    if query.scope is not None:
        # Audit rows carry the label; the namespace is the key's.
        keys = _scoped(where.sub(), query.scope, "k")
        where.add(f"key_id IN (SELECT k.key_id FROM vault_keys k WHERE {keys.sql})")
    _equal(where, query, ("key_id", "budget_id", "label", "vendor", "decision", "caller_tag"))
    return _since_and_ids(where, query.since, query.after_id, query.before_id)


def _equal(where: Where, query: Any, columns: tuple[str, ...], alias: str | None = None) -> Where:
    """Each of `columns` (of the table `alias` names) equal to the query's field of the same
    name, where the query gives one (not None)."""
    prefix = f"{alias}." if alias else ""
    for column in columns:
        given = getattr(query, column)
        if given is not None:
            where.add(f"{prefix}{column} = :{column}", **{column: given})
    return where


def _since_and_ids(
    where: Where, since: datetime | None, after_id: int | None, before_id: int | None
) -> Where:
    if since is not None:
        where.add("ts >= :since", since=since)
    if after_id is not None:
        where.add("id > :after_id", after_id=after_id)
    if before_id is not None:
        where.add("id < :before_id", before_id=before_id)
    return where
