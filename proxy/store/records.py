"""What the store reads and writes: keys, budgets, issuers, events, audit rows, and the
request path's reservations and settlements, as plain records both backends map rows to."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from keybrake.proxy.constraints import Constraints
from keybrake.proxy.decisions import Decision, dedupe_token, second_of
from keybrake.proxy.money import format_ts, format_usd
from keybrake.proxy.redact import redact

__all__ = [
    "ACTIVITY_POINTS",
    "NEAR_CAP",
    "Admission",
    "AlertDelivery",
    "AlertLevel",
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
    "Listing",
    "MetricsSnapshot",
    "Owner",
    "Patch",
    "Reservation",
    "RunActivity",
    "RunFilter",
    "RunRow",
    "Scope",
    "Session",
    "Settlement",
    "StoredResponse",
    "Usage",
    "activity_width",
    "bucket_time",
    "key_status",
    "merge_runs",
    "percents_of",
    "percents_text",
    "revoked_event",
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
    # Who its calls may pay or message, and how fast (None: anyone, any rate). Set at issue;
    # each patch of them raises `policy_rev`, which the reservation compares (decisions, rule 0).
    constraints: Constraints | None = None
    policy_rev: int = 0
    # Those of the budget it draws on, and their revision: filled by `find_key` only (the request
    # path's read), None and 0 everywhere else.
    budget_constraints: Constraints | None = None
    budget_policy_rev: int = 0

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
    constraints: Constraints | None = None  # as a key's; every key drawing on it is bound too
    policy_rev: int = 0  # as a key's

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
class Listing:
    """Which keys or budgets a listing returns, newest first: `vendor` and `budget_id` filter
    keys only; `before`: the (created_at, id) of the previous page's last (`continue`)."""

    label: str | None = None
    status: str | None = None  # active, revoked or expired
    namespace: str | None = None
    scope: Scope | None = None
    vendor: str | None = None
    budget_id: str | None = None
    limit: int = 1000
    before: tuple[datetime, str] | None = None


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


# What a `Patch` may change, named as the key's and budget's fields and columns.
_PATCHED = ("daily_cap_micros", "total_cap_micros", "max_per_caller_micros", "expires_at")


@dataclass(frozen=True, slots=True)
class Patch:
    """New caps and expiry for a live key or budget (None: unchanged), and the reason.
    `expected`: the caps and expiry the patch was checked against (`access.check_patch`); the
    store applies it only if the row still holds them, so two patches racing are never each
    judged against the state before the other."""

    reason: str
    daily_cap_micros: int | None = None
    total_cap_micros: int | None = None
    max_per_caller_micros: int | None = None
    expires_at: datetime | None = None
    expected: dict[str, int | datetime | None] | None = None
    # New constraints, call rate included, as a whole (None with `sets_policy`: none at all):
    # applied with the row's `policy_rev` raised, so every replica judges the next call by them.
    constraints: Constraints | None = None
    sets_policy: bool = False

    def fields(self) -> dict[str, int | datetime]:
        """The fields it changes, and their new values."""
        return {name: new for name in _PATCHED if (new := getattr(self, name)) is not None}


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
    # A report-only constraint's refusal that did not happen, for its audit row.
    report: str | None = None
    # The second it goes out, as call rates count it (`decisions.second_of`); `now` is when it
    # arrived, before its lookups (None: that second).
    second: int | None = None

    @property
    def rate_second(self) -> int:
        return second_of(self.now) if self.second is None else self.second

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
    retry_after: int | None = None  # `rate_limited`: seconds until the call fits
    reported: str | None = None  # the audit row's note of what report-only policies saw


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
    # What a report-only policy would have refused the call for (it went ahead), else None.
    reported: str | None = None
    id: int | None = None


@dataclass(slots=True)
class AuditFilter:
    scope: Scope | None = None
    key_id: str | None = None
    budget_id: str | None = None
    label: str | None = None
    vendor: str | None = None
    decision: str | None = None
    caller_tag: str | None = None
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


def merge_runs(
    walks: list[list[tuple[str, datetime]]],
    counts: dict[str, tuple[datetime, int, int, int, int]],
    limit: int,
) -> list[RunRow]:
    """The two walks (keys', budgets') as one page, newest first."""
    found = sorted(
        (row for walk in walks for row in walk), key=lambda r: (r[1], r[0]), reverse=True
    )
    rows = []
    for label, newest in found[:limit]:
        oldest, keys, budgets, live, revoked = counts[label]
        rows.append(RunRow(label, newest, oldest, keys, budgets, live, revoked))
    return rows


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
