"""Storage: one interface, implemented for SQLite (embedded default) and PostgreSQL.

The two write operations on the request path are `reserve` (before forwarding) and `settle`
(after). Each is one transaction. `reserve` first takes the key's lock (its `key_usage` row),
re-reads the key's revocation, expiry and caps, and applies `keybrake.proxy.decisions.admit`:
idempotency, dedupe, per-call cap, and the rolling 24-hour window, whose spend is kept in
hourly `spend_window` rows; so the cap holds however many calls, processes or replicas race.
Both also write the call's audit row, so no call is forwarded without one. Spend never depends on
audit rows: pruning the audit log cannot change a cap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from keybrake.proxy.decisions import Decision, dedupe_token
from keybrake.proxy.money import format_ts, format_usd
from keybrake.proxy.redact import redact

__all__ = [
    "ACTIVITY_POINTS",
    "Admission",
    "AuditFilter",
    "AuditRecord",
    "BudgetRecord",
    "BudgetView",
    "Change",
    "Event",
    "EventFilter",
    "IssueRequest",
    "Issued",
    "IssuerRecord",
    "KeyRecord",
    "KeyView",
    "Owner",
    "Patch",
    "Reservation",
    "RunActivity",
    "RunFilter",
    "RunRow",
    "Scope",
    "Session",
    "Settlement",
    "Store",
    "StoredResponse",
    "Usage",
    "activity_width",
    "bucket_time",
    "event_conditions",
    "key_status",
    "merge_runs",
    "percents_of",
    "percents_text",
    "prune_conditions",
    "run_conditions",
    "runs_counts",
    "runs_walk",
    "scope_conditions",
    "shown",
    "subject_table",
]


def key_status(revoked_at: datetime | None, expires_at: datetime, now: datetime) -> str:
    if revoked_at is not None:
        return "revoked"
    if expires_at <= now:
        return "expired"
    return "active"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    key_hash: bytes
    vendor: str
    label: str
    daily_cap_micros: int | None  # for any 24 hours; None: no such cap
    max_per_call_micros: int | None
    allowed_endpoints: tuple[str, ...]
    metadata: dict[str, Any]
    dedupe_window_s: int
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None
    # Connected accounts (Stripe-Account) the key may act on; "*" is any; empty: its own only.
    allowed_accounts: tuple[str, ...] = ()
    total_cap_micros: int | None = None  # over the key's life
    # Over the life of each caller tag (`<vault_key>.<tag>`; untagged calls are one caller). Set
    # at issue or never: only a key issued with one keeps per-caller spend.
    max_per_caller_micros: int | None = None
    budget_id: str | None = None  # the budget every call also draws on
    owner: Owner | None = None  # who issued it, and for which namespace
    # Percents of a cap at which it alerts; None: the operator's KEYBRAKE_ALERT_THRESHOLDS.
    alert_percents: tuple[int, ...] | None = None

    def status(self, now: datetime) -> str:
        return key_status(self.revoked_at, self.expires_at, now)


@dataclass(frozen=True, slots=True)
class Owner:
    """Who issued a key or budget: the issuer (None: the admin token), and the workflow
    namespace and service account it was issued for (from a verified Kubernetes token when the
    issuer logged in with one, never from the request body then)."""

    issuer_id: str | None = None
    namespace: str | None = None
    service_account: str | None = None


@dataclass(frozen=True, slots=True)
class BudgetRecord:
    """A run's budget: caps that every key drawing on it shares, whatever its vendor."""

    budget_id: str
    label: str
    daily_cap_micros: int | None
    total_cap_micros: int | None
    metadata: dict[str, Any]
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None
    owner: Owner | None = None
    alert_percents: tuple[int, ...] | None = None  # as a key's

    def status(self, now: datetime) -> str:
        return key_status(self.revoked_at, self.expires_at, now)


def percents_text(percents: tuple[int, ...] | None) -> str | None:
    """How both backends store alert percents: "50,80,100", "" for none, NULL for defaults."""
    return None if percents is None else ",".join(str(p) for p in percents)


def percents_of(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    return tuple(int(p) for p in text.split(",") if p)


@dataclass(frozen=True, slots=True)
class Scope:
    """What an issuer may see: labels starting with `label_prefix`, and, when it is bound to
    Kubernetes identities, only the namespaces in `namespaces`. The admin token has no scope."""

    label_prefix: str
    namespaces: tuple[str, ...] | None = None

    def holds(self, label: str | None, owner: Owner | None) -> bool:
        if label is None or not label.startswith(self.label_prefix):
            return False
        if self.namespaces is None:
            return True
        return owner is not None and owner.namespace in self.namespaces


@dataclass(frozen=True, slots=True)
class IssuerRecord:
    """A scoped issuer: its token (stored as a hash; None: it logs in only with Kubernetes
    service-account tokens), its policy and its Kubernetes binding, as JSON the access module
    reads (`keybrake.proxy.access`)."""

    issuer_id: str
    name: str
    token_hash: bytes | None
    policy: dict[str, Any]
    kubernetes: dict[str, Any] | None
    created_at: datetime
    deleted_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """A record of one admin action (issue, patch, revoke, issuer changes) or refused login:
    who, what, on what, with which outcome, from where. Never a token: every text a caller can
    put in one (the actor a refused token claims, the target, outcome, source and detail) is
    redacted here, when the event is made, as audit rows are (`keybrake.proxy.redact`)."""

    ts: datetime
    action: str  # key.issue, key.patch, key.revoke, label.revoke, budget.create, ...
    actor: str  # "admin", "issuer is_… (name)", "namespace/service-account via is_…"
    outcome: str  # "ok", or "refused: why"
    issuer_id: str | None = None
    target: str | None = None  # a key, budget or issuer id, or a label
    source: str | None = None  # the client's address
    detail: dict[str, Any] | None = None
    id: int | None = None

    def __post_init__(self) -> None:
        for name in ("action", "actor", "outcome", "issuer_id", "target", "source"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, redact(value))
        if self.detail is not None:
            object.__setattr__(self, "detail", _redacted(self.detail))


def _redacted(value: Any) -> Any:
    """A JSON value with every string in it (keys too) redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    return value


def revoked_event(event: Event, keys: list[str], budgets: list[str]) -> Event:
    """A revoke-by-label's record, saying what it changed: `unchanged` when another caller (or
    an earlier call) had already revoked everything it matched."""
    detail = {**(event.detail or {}), "revoked_keys": keys, "revoked_budgets": budgets}
    outcome = event.outcome if keys or budgets else "unchanged"
    return replace(event, outcome=outcome, detail=detail)


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    spend_by_vendor: dict[str, int]  # settled micro-dollars in the rolling 24-hour window
    open_reservations: int  # calls reserved and not yet settled
    stale_reservations: int  # of those, reserved before `stale_before` (a dead process's)
    active_keys: int
    keys_near_cap: int  # active keys that have used 80 % or more of their 24-hour cap
    alerts_pending: int = 0  # raised and not yet delivered
    alerts_failing: int = 0  # of those, ones whose delivery has failed at least once


@dataclass(frozen=True, slots=True)
class AlertLevel:
    """A live key's or budget's spend against its caps, as the threshold alerts read it."""

    owner_id: str
    kind: str  # key or budget
    label: str
    namespace: str | None
    vendor: str | None  # a budget's is None: any vendor
    window_micros: int  # settled and reserved in the rolling 24-hour window
    daily_cap_micros: int | None
    life_micros: int  # settled and reserved over its life
    total_cap_micros: int | None
    cap_hits: int
    percents: tuple[int, ...] | None = None  # its own thresholds; None: the operator's


@dataclass(frozen=True, slots=True)
class AlertDelivery:
    """One alert in the outbox: delivered at least once, retried until the receiver says 2xx."""

    delivery_id: str
    owner_id: str
    mark: str  # "80%" or "cap_hit"
    payload: str  # the JSON body, fixed when the alert was raised
    created_at: datetime
    attempts: int = 0
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    last_error: str | None = None


# An active key near its 24-hour cap: settled + reserved in the window at least this share of it.
NEAR_CAP = 0.8


@dataclass(slots=True)
class EventFilter:
    action: str | None = None
    issuer_id: str | None = None
    target: str | None = None
    refused: bool | None = None  # True: refusals only; False: successes only
    since: datetime | None = None
    after_id: int | None = None  # newer than this one (following new events)
    before_id: int | None = None  # older than this one (paging back, newest first)
    limit: int = 100


@dataclass(frozen=True, slots=True)
class IssueRequest:
    """An issue sent with an `Idempotency-Key`: scoped to who sent it (the admin, or an
    issuer), fingerprinted so that a different request under the same key is refused."""

    scope: str
    key: str
    request_hash: str


@dataclass(frozen=True, slots=True)
class Issued:
    """What `create_key` / `create_budget` did: "created", "too_many" (the issuer's active-key
    limit), or "mismatch" (the idempotency key was used for a different request); `replaced` is
    the key or budget an earlier attempt with the same idempotency key issued, now revoked."""

    outcome: str
    replaced: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """What a key or a budget has spent."""

    window_start: datetime  # the start of the oldest hour the rolling window counts
    spent_micros: int = 0  # settled within the window
    reserved_micros: int = 0  # reserved (in flight) within the window
    total_micros: int = 0  # settled over the whole life
    total_reserved_micros: int = 0  # reserved over the whole life
    calls: int = 0
    cap_hits: int = 0


@dataclass(frozen=True, slots=True)
class Change:
    """A cap or a lifetime changed on a live key or budget, and why."""

    field: str
    old: str | None
    new: str | None
    reason: str
    at: datetime


@dataclass(frozen=True, slots=True)
class KeyView:
    key: KeyRecord
    usage: Usage
    changes: tuple[Change, ...] = ()


@dataclass(frozen=True, slots=True)
class BudgetView:
    budget: BudgetRecord
    usage: Usage
    key_ids: tuple[str, ...] = ()
    changes: tuple[Change, ...] = ()


@dataclass(frozen=True, slots=True)
class Patch:
    """New caps and expiry for a live key or budget (None: unchanged), and the reason."""

    reason: str
    daily_cap_micros: int | None = None
    total_cap_micros: int | None = None
    max_per_caller_micros: int | None = None
    expires_at: datetime | None = None

    def fields(self) -> dict[str, int | datetime]:
        return {
            name: value
            for name, value in (
                ("daily_cap_micros", self.daily_cap_micros),
                ("total_cap_micros", self.total_cap_micros),
                ("max_per_caller_micros", self.max_per_caller_micros),
                ("expires_at", self.expires_at),
            )
            if value is not None
        }


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(slots=True)
class Reservation:
    """Everything `reserve` needs: who calls, what, for how much, and the replay tokens."""

    key: KeyRecord
    now: datetime
    vendor: str
    method: str
    path: str
    caller_tag: str | None
    cost_micros: int
    amount: int | None
    currency: str | None
    idempotency_key: str | None  # as the caller sent it
    request_hash: str  # the request's fingerprint (`pipeline._fingerprint`)
    dedupe: bool = False  # a dedupe candidate: look up, and register, the fingerprint
    forward_key: str | None = None  # the idempotency key it will be forwarded with
    vendor_replays: bool = True  # the vendor replays answers for a repeated idempotency key
    caller: str = ""  # what a per-caller cap counts by: the tag's caller part ("" untagged)
    # The vendor object this call moves money of, when its payer may have paid for it already:
    # `cost_micros` is then offset by the payer's marks on it within the window (re-dated).
    paid_object: str | None = None

    @property
    def dedupe_token(self) -> str:
        """What the dedupe rule matches it by: its fingerprint and fan-out item."""
        return dedupe_token(self.request_hash, self.caller_tag)


@dataclass(frozen=True, slots=True)
class Admission:
    decision: Decision  # FORWARDED or the reason it was not
    audit_id: int
    replay: StoredResponse | None = None
    forward_key: str | None = None  # the idempotency key to forward with
    prior_audit_id: int | None = None  # the earlier call an `outcome_unknown` refusal names
    # What was reserved: the cost, less the payer's offset for a `paid_object`.
    reserved_micros: int = 0


@dataclass(slots=True)
class Settlement:
    audit_id: int
    key_id: str
    bucket: int  # the window bucket the call was reserved in
    vendor: str
    reserved_micros: int
    settled_micros: int
    status: int
    decision: str
    vendor_request_id: str | None
    latency_ms: float
    idempotency_key: str | None
    request_hash: str
    dedupe: bool
    dedupe_token: str  # as reserved (`Reservation.dedupe_token`)
    response: StoredResponse | None  # kept for replays
    # False: no answer came, so a retry must go out as the same call (its replay tokens stay,
    # marked by the audit row's decision). True without a response: the tokens are forgotten.
    outcome_known: bool = True
    # Vendor objects this call paid for: each is marked paid by this key and budget, for the
    # settled amount in this call's bucket, so the same payer's later confirm is offset by it.
    counts: tuple[str, ...] = ()
    budget_id: str | None = None  # the budget the call drew on
    caller: str | None = None  # the caller whose spend it counts on (None: the key keeps none)


@dataclass(slots=True)
class AuditRecord:
    ts: datetime
    vendor: str
    method: str
    path: str
    status: int
    decision: str
    key_id: str | None = None
    label: str | None = None
    caller_tag: str | None = None
    budget_id: str | None = None
    reserved_micros: int = 0
    settled_micros: int = 0
    amount: int | None = None
    currency: str | None = None
    vendor_request_id: str | None = None
    idempotency_key: str | None = None
    latency_ms: float | None = None
    id: int | None = None


@dataclass(slots=True)
class AuditFilter:
    scope: Scope | None = None
    key_id: str | None = None
    budget_id: str | None = None
    label: str | None = None
    vendor: str | None = None
    decision: str | None = None
    since: datetime | None = None
    after_id: int | None = None
    before_id: int | None = None  # older than this one (paging back, newest first)
    limit: int = 100


@dataclass(slots=True)
class RunFilter:
    """Which runs (labels) the dashboard lists, newest first: a run's place in the order is
    the creation of its newest key or budget."""

    scope: Scope | None = None
    contains: str | None = None  # a part of the label
    label: str | None = None  # exactly this label
    live: bool | None = None  # True: with a key or budget still usable; False: none
    before: tuple[datetime, str] | None = None  # (newest, label) of the previous page's last
    limit: int = 25


@dataclass(frozen=True, slots=True)
class RunRow:
    """A run as the runs listing sees it: its keys and budgets counted, not yet their spend."""

    label: str
    newest: datetime  # the newest key or budget's creation
    oldest: datetime
    keys: int
    budgets: int
    live: int  # keys and budgets neither revoked nor expired
    revoked: int


ACTIVITY_POINTS = 400  # the most time slices a run's charts are drawn from


def activity_width(first: int, last: int, points: int) -> int:
    """Seconds per time slice, so a run from `first` to `last` (epoch seconds) takes at most
    `points` slices: one second each for runs up to that many seconds long."""
    return max(1, -(-(last - first + 1) // points))


def bucket_time(start: int, width: int, index: int) -> datetime:
    return datetime.fromtimestamp(start + index * width, tz=UTC)


@dataclass(frozen=True, slots=True)
class RunActivity:
    """A run's calls from its audit rows, summed in the database: per time slice (its start,
    spent, calls, cap hits; one second wide unless the run is longer than ACTIVITY_POINTS
    seconds), oldest first, and per caller tag (tag or None, spent, calls, cap hits), biggest
    spender first."""

    seconds: list[tuple[datetime, int, int, int]]
    callers: list[tuple[str | None, int, int, int]]


@dataclass(frozen=True, slots=True)
class Session:
    """A dashboard sign-in: the admin (no issuer) or an issuer. The cookie holds the session
    id; the database holds only its hash, so a copy of the database signs nobody in."""

    session_hash: bytes
    issuer_id: str | None
    credential_hash: bytes  # the token signed in with: changing it ends the session
    created_at: datetime
    expires_at: datetime


# A condition is SQL with a `{}` where each of its values goes (a tuple for several); each
# backend fills in its own placeholder style, so the two stores share which filters exist and
# what they mean.
Condition = tuple[str, Any]


def where_clause(conditions: list[Condition], placeholder: Callable[[Any], str]) -> str:
    parts = []
    for sql, value in conditions:
        values = value if isinstance(value, tuple) else (value,)
        parts.append(sql.format(*(placeholder(v) for v in values)) if "{}" in sql else sql)
    return " AND ".join(parts) or "1 = 1"


def scope_conditions(scope: Scope | None, alias: str) -> list[Condition]:
    """An issuer's view of a table holding `label` and `namespace` (`alias`.…)."""
    if scope is None:
        return []
    conditions: list[Condition] = [
        (f"substr({alias}.label, 1, {{}}) = {{}}", (len(scope.label_prefix), scope.label_prefix))
    ]
    if scope.namespaces is not None:
        if not scope.namespaces:
            return [("1 = 0", None)]
        marks = ", ".join("{}" for _ in scope.namespaces)
        conditions.append((f"{alias}.namespace IN ({marks})", scope.namespaces))
    return conditions


def run_conditions(query: RunFilter, alias: str, position: str) -> list[Condition]:
    """The runs listing's filters on its rows of keys and budgets (`alias`.label, .namespace).
    `position` is the backend's substring search (`instr`, `strpos`): no LIKE, whose `%` and `_`
    in a label would match more than typed."""
    conditions = scope_conditions(query.scope, alias)
    if query.label is not None:
        conditions.append((f"{alias}.label = {{}}", query.label))
    if query.contains:
        conditions.append((f"{position}({alias}.label, {{}}) > 0", query.contains))
    return conditions


_RUN_TABLES = {"vault_keys": "key_id", "budgets": "budget_id"}


def _scoped(table: str, alias: str, scope: Scope | None) -> Condition:
    return where_clause_template(scope_conditions(scope, alias))


def runs_walk(
    query: RunFilter, now: datetime, table: str, position: str, collate: str = ""
) -> tuple[str, Any]:
    """One page of runs from `table` (keys or budgets): the rows that are their run's newest,
    newest first, walking the creation-time index, so a page costs the same at any size
    instead of grouping every row. A run's newest row is in exactly one table (a key wins a
    tie), so the two walks merged are the runs listing. Labels compare by code point, as Python
    merges them (`collate`: the backend's clause for that, `COLLATE "C"` on PostgreSQL, whose
    database collation may order them otherwise). Returns one condition-style SQL text with
    `{}` for each value, and the values."""
    column = _RUN_TABLES[table]
    other = "budgets" if table == "vault_keys" else "vault_keys"
    conditions = run_conditions(query, "t", position)
    if query.before is not None:
        newest, label = query.before
        conditions.append(
            # The `<=` alone is a range on the creation-time index, so the walk starts there.
            (
                f"t.created_at <= {{}} AND (t.created_at < {{}} OR t.label{collate} < {{}})",
                (newest, newest, label),
            )
        )
    same, same_values = _scoped(table, "n", query.scope)
    conditions.append(
        (
            f"NOT EXISTS (SELECT 1 FROM {table} n WHERE n.label = t.label AND {same} AND "
            f"(n.created_at > t.created_at OR (n.created_at = t.created_at "
            f"AND n.{column} > t.{column})))",
            same_values,
        )
    )
    later, later_values = _scoped(other, "n", query.scope)
    beats = ">" if table == "vault_keys" else ">="
    conditions.append(
        (
            f"NOT EXISTS (SELECT 1 FROM {other} n WHERE n.label = t.label AND {later} AND "
            f"n.created_at {beats} t.created_at)",
            later_values,
        )
    )
    if query.live is not None:
        parts, values = [], []
        for name in _RUN_TABLES:
            scoped, scoped_values = _scoped(name, "a", query.scope)
            parts.append(
                f"EXISTS (SELECT 1 FROM {name} a WHERE a.label = t.label AND {scoped} AND "
                "a.revoked_at IS NULL AND a.expires_at > {})"
            )
            values.extend([*scoped_values, now])
        live = " OR ".join(parts)
        conditions.append((f"({live})" if query.live else f"NOT ({live})", tuple(values)))
    where, values = where_clause_template(conditions)
    sql = (
        f"SELECT t.label, t.created_at FROM {table} t WHERE {where} "
        f"ORDER BY t.created_at DESC, t.label{collate} DESC LIMIT {int(query.limit)}"
    )
    return sql, values


def runs_counts(labels: list[str], scope: Scope | None, now: datetime) -> tuple[str, Any]:
    """Each listed run's keys and budgets counted: (label, oldest, keys, budgets, live,
    revoked), read through the label index."""
    arms, values = [], []
    marks = ", ".join("{}" for _ in labels)
    for table in _RUN_TABLES:
        scoped, scoped_values = _scoped(table, "t", scope)
        arms.append(
            f"SELECT t.label, t.created_at, {int(table == 'vault_keys')} AS is_key, "
            "CASE WHEN t.revoked_at IS NULL AND t.expires_at > {} THEN 1 ELSE 0 END AS is_live, "
            "CASE WHEN t.revoked_at IS NULL THEN 0 ELSE 1 END AS is_revoked "
            f"FROM {table} t WHERE t.label IN ({marks}) AND {scoped}"
        )
        values.extend([now, *labels, *scoped_values])
    sql = (
        "SELECT label, min(created_at), sum(is_key), sum(1 - is_key), sum(is_live), "
        f"sum(is_revoked) FROM ({' UNION ALL '.join(arms)}) u GROUP BY label"
    )
    return sql, tuple(values)


def merge_runs(
    walks: list[list[tuple[str, datetime]]],
    counts: dict[str, tuple[datetime, int, int, int, int]],
    limit: int,
) -> list[RunRow]:
    """The two walks as one page, newest first."""
    found = sorted(
        (row for walk in walks for row in walk), key=lambda r: (r[1], r[0]), reverse=True
    )
    rows = []
    for label, newest in found[:limit]:
        oldest, keys, budgets, live, revoked = counts[label]
        rows.append(RunRow(label, newest, oldest, keys, budgets, live, revoked))
    return rows


def key_conditions(
    *,
    now: datetime,
    label: str | None,
    vendor: str | None = None,
    status: str | None = None,
    budget_id: str | None = None,
    scope: Scope | None = None,
    namespace: str | None = None,
    alias: str = "k",
    before: tuple[datetime, str] | None = None,
) -> list[Condition]:
    """Filters of key (and, without vendor and budget, budget) listings; `alias` is the table's.
    `before`: only rows listed after this (created_at, id) position, newest first (paging)."""
    conditions: list[Condition] = scope_conditions(scope, alias)
    if before is not None:
        column = "key_id" if alias == "k" else "budget_id"
        conditions.append(
            (
                f"({alias}.created_at < {{}} OR ({alias}.created_at = {{}} "
                f"AND {alias}.{column} < {{}}))",
                (before[0], before[0], before[1]),
            )
        )
    if namespace is not None:
        conditions.append((f"{alias}.namespace = {{}}", namespace))
    for column, value in (("label", label), ("vendor", vendor), ("budget_id", budget_id)):
        if value is not None:
            conditions.append((f"{alias}.{column} = {{}}", value))
    if status == "revoked":
        conditions.append((f"{alias}.revoked_at IS NOT NULL", None))
    elif status == "expired":
        conditions.append((f"{alias}.revoked_at IS NULL AND {alias}.expires_at <= {{}}", now))
    elif status == "active":
        conditions.append((f"{alias}.revoked_at IS NULL AND {alias}.expires_at > {{}}", now))
    return conditions


def audit_conditions(query: AuditFilter) -> list[Condition]:
    conditions: list[Condition] = []
    if query.scope is not None:
        # Audit rows carry the label; the namespace is the key's.
        keys = where_clause_template(scope_conditions(query.scope, "k"))
        conditions.append(
            (f"key_id IN (SELECT k.key_id FROM vault_keys k WHERE {keys[0]})", keys[1])
        )
    conditions += [
        (f"{column} = {{}}", value)
        for column, value in (
            ("key_id", query.key_id),
            ("budget_id", query.budget_id),
            ("label", query.label),
            ("vendor", query.vendor),
            ("decision", query.decision),
        )
        if value is not None
    ]
    if query.since is not None:
        conditions.append(("ts >= {}", query.since))
    if query.after_id is not None:
        conditions.append(("id > {}", query.after_id))
    if query.before_id is not None:
        conditions.append(("id < {}", query.before_id))
    return conditions


def where_clause_template(conditions: list[Condition]) -> Condition:
    """Several conditions as one (for a subquery): their SQL joined, their values in order."""
    parts: list[str] = []
    values: list[Any] = []
    for sql, value in conditions:
        parts.append(sql)
        if "{}" in sql:
            values.extend(value if isinstance(value, tuple) else (value,))
    return " AND ".join(parts) or "1 = 1", tuple(values)


def event_conditions(query: EventFilter) -> list[Condition]:
    conditions: list[Condition] = [
        (f"{column} = {{}}", value)
        for column, value in (
            ("action", query.action),
            ("issuer_id", query.issuer_id),
            ("target", query.target),
        )
        if value is not None
    ]
    if query.refused is True:
        conditions.append(("outcome <> 'ok'", None))
    elif query.refused is False:
        conditions.append(("outcome = 'ok'", None))
    if query.since is not None:
        conditions.append(("ts >= {}", query.since))
    if query.after_id is not None:
        conditions.append(("id > {}", query.after_id))
    if query.before_id is not None:
        conditions.append(("id < {}", query.before_id))
    return conditions


def subject_table(subject_id: str) -> tuple[str, str]:
    """(table, id column) of a key (`vk_...`) or budget (`bg_...`) id."""
    if subject_id.startswith("bg_"):
        return "budgets", "budget_id"
    return "vault_keys", "key_id"


def shown(field: str, value: Any) -> str | None:
    """A changed value as a key or budget view shows it: dollars, or a UTC timestamp."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return format_ts(value)
    return format_usd(int(value))


def prune_conditions(before: datetime, keys_ended_before: datetime) -> list[Condition]:
    """Audit rows `prune_audit` may delete: older than `before`, not of a call in flight, and not
    of a key that is active or ended after `keys_ended_before`."""
    return [
        ("ts < {}", before),
        ("decision <> 'in_flight'", None),
        (
            "(key_id IS NULL OR NOT EXISTS (SELECT 1 FROM vault_keys k "
            "WHERE k.key_id = audit.key_id AND (k.revoked_at IS NULL OR k.revoked_at >= {}) "
            "AND k.expires_at >= {}))",
            (keys_ended_before, keys_ended_before),
        ),
    ]


class Store(Protocol):
    """Every admin write takes the `Event` that records it and writes it in the same
    transaction: an action that happened is never missing from the record."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def create_key(
        self,
        key: KeyRecord,
        event: Event,
        *,
        max_active: int | None = None,
        request: IssueRequest | None = None,
    ) -> Issued:
        """Insert the key. `max_active`: refuse ("too_many") if its issuer already has that many
        active keys. `request`: an earlier issue under the same idempotency key is revoked and
        replaced, a different request under it refused ("mismatch"). All in one transaction."""
        ...

    async def find_key(self, key_hash: bytes) -> KeyRecord | None: ...

    async def get_key(self, key_id: str, now: datetime) -> KeyView | None: ...

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
    ) -> list[KeyView]: ...

    async def revoke_key(self, key_id: str, now: datetime, event: Event) -> bool | None: ...

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
        """Revoke the label's live keys and budgets (of `namespace`, of the run whose metadata
        `uid` is `workflow_uid` and `cluster` is `cluster`, within `scope`, when given); their
        ids (keys, budgets). Only
        what this call changed is returned and recorded (`revoked_event`), so of two callers
        racing to revoke a run, exactly one records each key."""
        ...

    async def create_budget(
        self, budget: BudgetRecord, event: Event, *, request: IssueRequest | None = None
    ) -> Issued: ...

    async def get_budget(self, budget_id: str, now: datetime) -> BudgetView | None: ...

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
    ) -> list[BudgetView]: ...

    async def revoke_budget(self, budget_id: str, now: datetime, event: Event) -> list[str] | None:
        """Revoke the budget and every live key drawing on it; those keys' ids, None if there
        is no such budget."""
        ...

    async def patch(self, subject_id: str, patch: Patch, now: datetime, event: Event) -> str:
        """Apply `patch` to a live key (`vk_...`) or budget (`bg_...`) and record each change:
        "patched", "unknown", or "not_live" (revoked or expired: nothing changed)."""
        ...

    async def create_issuer(self, issuer: IssuerRecord, event: Event) -> None: ...

    async def get_issuer(self, issuer_id: str) -> IssuerRecord | None: ...

    async def find_issuer(self, token_hash: bytes) -> IssuerRecord | None:
        """The live issuer whose token has this hash."""
        ...

    async def list_issuers(self, *, include_deleted: bool = False) -> list[IssuerRecord]: ...

    async def delete_issuer(
        self, issuer_id: str, now: datetime, event: Event, *, revoke: bool = False
    ) -> tuple[list[str], list[str]] | None:
        """Delete the issuer (its token stops at once); with `revoke`, revoke its live keys and
        budgets too: their ids (keys, budgets). None if there is no such live issuer."""
        ...

    async def record_event(self, event: Event) -> None:
        """Record an action that changed nothing (a refusal, a refused login)."""
        ...

    async def events(self, query: EventFilter) -> list[Event]: ...

    async def compact_spend(self, before_bucket: int) -> int:
        """Fold each owner's spend buckets older than `before_bucket` into its bucket 0, which
        only lifetime totals count: the rows a reservation sums stay few however long a key or
        budget lives."""
        ...

    async def reserve(self, reservation: Reservation) -> Admission: ...

    async def settle(self, settlement: Settlement) -> None: ...

    async def record(self, row: AuditRecord) -> int: ...

    async def forget_replays(self, older_than: datetime) -> int:
        """Drop replay tokens (idempotency keys, dedupe fingerprints) created before
        `older_than`, answered or not, so the replay table does not grow without end."""
        ...

    async def sweep(self, older_than: datetime) -> int:
        """Reservations still in flight since before `older_than` belong to a process that died:
        count them as spent (the vendor may have moved the money) and mark them `reconciled`.
        A late settle of such a call corrects spend to its real outcome."""
        ...

    async def liveness(self, key_id: str, budget_id: str | None, now: datetime) -> Decision | None:
        """Why a key (or its budget) is dead now (revoked or expired), or None when it is live:
        a cheap read before the proxy looks anything up at a vendor. The reservation stays the
        authority."""
        ...

    async def alert_levels(self, now: datetime) -> list[AlertLevel]:
        """Every live key and budget with a cap, and its spend against it."""
        ...

    async def alert_marks(self) -> set[tuple[str, str]]:
        """(owner, mark) of every alert raised and not re-armed."""
        ...

    async def raise_alert(self, delivery: AlertDelivery) -> bool:
        """Mark the alert raised and put it in the outbox, in one transaction; False (and
        nothing written) when it already was: of replicas scanning together, one raises it."""
        ...

    async def forget_alert_marks(self, ended_before: datetime) -> int:
        """Drop the raised marks of keys and budgets revoked or expired before `ended_before`
        (they alert no more); how many."""
        ...

    async def rearm_alerts(self, owner_id: str, marks: list[str]) -> None:
        """Spend fell back below these thresholds: they may alert again."""
        ...

    async def claim_alerts(
        self, now: datetime, lease: timedelta, limit: int
    ) -> list[AlertDelivery]:
        """Due, undelivered alerts, each claimed for `lease` so one replica sends it at a time."""
        ...

    async def finish_alert(
        self,
        delivery_id: str,
        now: datetime,
        *,
        error: str | None,
        retry_at: datetime | None,
    ) -> None:
        """An attempt's outcome: delivered (`error` None), or to be retried at `retry_at`."""
        ...

    async def alert_deliveries(self, *, pending: bool, limit: int) -> list[AlertDelivery]:
        """The outbox, newest first (`pending`: only those not yet delivered)."""
        ...

    async def metrics_snapshot(self, now: datetime, stale_before: datetime) -> MetricsSnapshot:
        """What /metrics reads from the database, so every worker and replica reports the same:
        bounded by vendor, never one series per run."""
        ...

    async def audit(self, query: AuditFilter) -> list[AuditRecord]: ...

    async def list_runs(self, query: RunFilter, now: datetime) -> list[RunRow]:
        """Labels of keys and budgets, newest first, one page (the dashboard's runs)."""
        ...

    async def run_activity(
        self, label: str, scope: Scope | None, points: int = ACTIVITY_POINTS
    ) -> RunActivity:
        """The run's audit rows summed per time slice (at most about `points`) and per caller
        tag."""
        ...

    async def create_session(self, session: Session) -> None: ...

    async def find_session(self, session_hash: bytes, now: datetime) -> Session | None:
        """The session, if it exists and has not expired."""
        ...

    async def end_session(self, session_hash: bytes) -> None: ...

    async def forget_sessions(self, now: datetime) -> int:
        """Delete expired sessions; how many."""
        ...

    async def prune_audit(self, before: datetime, now: datetime, *, dry_run: bool = False) -> int:
        """Delete (or count) audit rows older than `before`, except rows of a call still in
        flight and rows of keys that are active or ended less than a window (plus the window's
        last bucket) ago. Returns how many rows were (or would be) removed."""
        ...
