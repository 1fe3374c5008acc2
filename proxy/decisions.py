"""How the proxy decides about a vendor call, stated once.

Every call ends in one `Decision`, recorded in its audit row. The decisions before the ledger
(path, key, scope, body, price) are taken by `keybrake.proxy.pipeline`; the ledger's own are taken
by `admit`, a pure function of what the store read inside its reservation transaction. The SQLite
store calls `admit` itself; PostgreSQL's `keybrake_reserve` function restates it in PL/pgSQL, and
`tests/test_decision_table.py` holds both backends to one table of hand-written cases.

The ledger's rules, in the order they apply:

0. A call judged against constraints older than the key's or its budget's (their `policy_rev`,
   which every change of constraints or call rate raises) is `policy_changed`: the ledger writes
   nothing for it, and the pipeline reads the key again and judges the call again from the
   start. Each replica caches what a key may do; this is how a patch reaches every replica's
   next call (docs/guarantees.md, section 6).
1. A revoked key, then a key whose `expires_at <= now`, is refused; so is a key drawing on a budget
   that is revoked or expired (`budget_revoked`, `budget_expired`).
2. A call carrying an idempotency key the key has seen before is that earlier call: another
   request body under the same idempotency key is refused (`idempotency_mismatch`); an answered
   one is replayed; one still running is `in_progress` (409, retry shortly).
3. Otherwise, a dedupe candidate (no idempotency key, or one an official SDK generated, so a
   re-run pod sends a fresh one) that matches an identical request of the same key and the same
   fan-out item within the key's dedupe window is that earlier call, as in 2. The item is the
   caller tag's text before an `@` (`item-3@pod-abc`), only when the tag has one: distinct items
   are distinct calls even when their bodies are equal, while a tag without `@` names no item (a
   wrapped step whose pod name changes on every retry stays deduplicated). See `dedupe_token`.
4. An earlier call that was cut off, because its process died mid-call (the sweep then counts
   it as spent: `reconciled`), the vendor never answered (`upstream_error`) or the vendor said it
   was still running a request with its key (`vendor_busy`), has an unknown outcome. For a
   vendor with idempotency keys the retry is forwarded again with the earlier call's
   idempotency key, so the vendor replays its own answer if the first call reached it; the
   retry is priced and capped like a new call and settles to nothing if the vendor says it
   replayed. For a vendor without them (Twilio) it is refused, for good (`outcome_unknown`,
   naming the earlier call's audit row): never a 409 that a client would retry forever. So is
   a retry whose earlier call's idempotency key is not known.
5. A call that moves money already paid for (confirming or capturing a PaymentIntent or charge)
   is offset by what its payer paid for that object within the window: the key itself or any
   key drawing on the same budget (`paid_for` marks record who paid). The offset is re-dated to
   now when the call is admitted, so the window counts money when it moves (see
   docs/guarantees.md). Another run's key gets no offset: it pays in full.
6. A call costing more than the key's `max_usd_per_call` is a cap hit.
7. A priced call is admitted only if every cap that applies holds with its cost added
   (`used + cost <= cap`), checked in this order: the caller's spend over the key's life
   (`max_usd_per_caller`, per caller tag: `caller_cap_hit`), the key's spend in the rolling
   24-hour window (`daily_usd_cap`: `cap_hit`) and over its life (`total_usd_cap`:
   `total_cap_hit`), then the same two caps of the budget the key draws on (`budget_cap_hit`).
   It then reserves its cost against all of them at once. Calls costing nothing always pass.
   Every cap hit counts on the key, and on its budget.
8. Last, a call that would reach the vendor is counted against the key's and its budget's call
   rate (`max_calls_per_minute`, see `RATE_SECONDS`): one that would exceed an enforced rate is
   `rate_limited` (429 with `Retry-After`, never a cap hit), one over a report-only rate goes
   ahead with a note in its audit row. The proxy's own lookups with the real key count too
   (`Store.admit_lookup`); refusals and replays, which reach no vendor, do not.

The rolling window is kept in hourly buckets: spend counts in the hour its call was reserved,
and a check at time t sums the buckets from the one holding t - 24h to the newest. That covers
all of [t - 24h, t], so the window never under-counts; it over-counts by at most the spend of the
oldest bucket's first hour, which it releases at most one hour late.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

__all__ = [
    "BUCKET",
    "CAP_HITS",
    "CUT_OFF",
    "RATE_NOTE",
    "RATE_SECONDS",
    "RULE_VERSION",
    "WINDOW",
    "Admitted",
    "Caps",
    "Decision",
    "Prior",
    "Rate",
    "admit",
    "bucket_of",
    "bucket_start",
    "bucket_start_second",
    "caller_of",
    "dead_reason",
    "dedupe_token",
    "is_cap_hit",
    "item_of",
    "offset_cost",
    "over_rate",
    "rate_floor",
    "refusal",
    "refusal_status",
    "report_note",
    "second_of",
    "settle_amounts",
    "window_floor",
]

WINDOW = timedelta(hours=24)
BUCKET = timedelta(hours=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Decision(StrEnum):
    """What happened to a call: its audit row's `decision` and the metrics' label."""

    # Taken before the ledger, by the pipeline.
    UNKNOWN_VENDOR = "unknown_vendor"
    BAD_PATH = "bad_path"
    SECRET_IN_REQUEST = "secret_in_request"  # noqa: S105 (a decision name)
    TOO_LARGE = "too_large"
    BODY_TIMEOUT = "body_timeout"
    NO_KEY = "no_key"
    UNKNOWN_KEY = "unknown_key"
    WRONG_VENDOR = "wrong_vendor"
    ENDPOINT_DENIED = "endpoint_denied"
    ACCOUNT_DENIED = "account_denied"
    AMBIGUOUS = "ambiguous"
    UNPRICEABLE = "unpriceable"
    LOOKUP_FAILED = "lookup_failed"
    CONSTRAINT_VIOLATED = "constraint_violated"  # outside the key's or budget's constraints
    # Taken by the ledger (`admit`).
    POLICY_CHANGED = "policy_changed"  # judged against old constraints: judged again
    REVOKED = "revoked"
    EXPIRED = "expired"
    BUDGET_REVOKED = "budget_revoked"
    BUDGET_EXPIRED = "budget_expired"
    IDEMPOTENCY_MISMATCH = "idempotency_mismatch"
    IN_PROGRESS = "in_progress"
    REPLAYED = "replayed"
    DEDUPLICATED = "deduplicated"
    OUTCOME_UNKNOWN = "outcome_unknown"
    PER_CALL_CAP_HIT = "per_call_cap_hit"
    CALLER_CAP_HIT = "caller_cap_hit"
    CAP_HIT = "cap_hit"
    TOTAL_CAP_HIT = "total_cap_hit"
    BUDGET_CAP_HIT = "budget_cap_hit"
    RATE_LIMITED = "rate_limited"  # over a key's or budget's max_calls_per_minute: retry later
    FORWARDED = "forwarded"
    # Outcomes of an admitted call.
    IN_FLIGHT = "in_flight"  # reserved and at the vendor; settling rewrites it
    UPSTREAM_ERROR = "upstream_error"  # no answer: counted as spent
    VENDOR_REPLAYED = "vendor_replayed"  # the vendor answered from its idempotency store: free
    VENDOR_BUSY = "vendor_busy"  # the vendor still runs a request with this key (its 409): free
    RECONCILED = "reconciled"  # left in flight by a dead process; the sweep counted it as spent
    SETTLE_FAILED = "settle_failed"  # forwarded, but the outcome could not be written yet
    STORE_UNAVAILABLE = "store_unavailable"
    INTERNAL_ERROR = "internal_error"


# Every refusal: HTTP status, keybrake's code (Stripe's `error.code`, the other vendors'
# `keybrake_code`) and the message, with `{placeholders}` the pipeline fills in.
_REFUSALS: dict[Decision, tuple[int, str, str]] = {
    Decision.UNKNOWN_VENDOR: (
        404,
        "keybrake_unknown_vendor",
        "no vendor {vendor!r} is configured on this proxy",
    ),
    Decision.BAD_PATH: (
        400,
        "keybrake_invalid_path",
        "The request path is not allowed: no empty, dot or encoded separator segments, and no "
        "trailing slash.",
    ),
    Decision.SECRET_IN_REQUEST: (
        400,
        "keybrake_secret_in_request",
        "The request carries a keybrake secret (a vault key or token) in its {where}, where none "
        "belongs; it is not forwarded, and the audit row holds it redacted.",
    ),
    Decision.TOO_LARGE: (
        413,
        "keybrake_body_too_large",
        "The request body exceeds the proxy's limit.",
    ),
    Decision.BODY_TIMEOUT: (
        408,
        "keybrake_body_timeout",
        "The request body did not arrive within {seconds} seconds.",
    ),
    Decision.NO_KEY: (401, "keybrake_missing_key", "No vault key was provided."),
    Decision.UNKNOWN_KEY: (401, "keybrake_invalid_key", "Invalid vault key provided."),
    Decision.WRONG_VENDOR: (401, "keybrake_wrong_vendor", "This vault key is for another vendor."),
    Decision.REVOKED: (
        401,
        "keybrake_key_revoked",
        "This vault key has been revoked. A run's keys are revoked when it ends, and `argo "
        "retry` does not issue new ones: run the workflow again with `argo resubmit`.",
    ),
    Decision.EXPIRED: (401, "keybrake_key_expired", "This vault key has expired."),
    Decision.BUDGET_REVOKED: (
        401,
        "keybrake_budget_revoked",
        "The budget this vault key draws on has been revoked. A run's budget is revoked when "
        "it ends, and `argo retry` does not issue a new one: run the workflow again with "
        "`argo resubmit`.",
    ),
    Decision.BUDGET_EXPIRED: (
        401,
        "keybrake_budget_expired",
        "The budget this vault key draws on has expired.",
    ),
    Decision.ENDPOINT_DENIED: (
        403,
        "keybrake_endpoint_not_allowed",
        "This vault key may not call {ep}.",
    ),
    Decision.ACCOUNT_DENIED: (
        403,
        "keybrake_account_not_allowed",
        "This vault key may not act on account {account}: it was issued for {allowed}.",
    ),
    Decision.AMBIGUOUS: (400, "keybrake_ambiguous_request", "{reason}"),
    Decision.UNPRICEABLE: (403, "keybrake_unpriced_endpoint", "{reason}"),
    Decision.LOOKUP_FAILED: (502, "keybrake_lookup_failed", "Could not price the call: {reason}"),
    Decision.CONSTRAINT_VIOLATED: (
        403,
        "keybrake_constraint_violated",
        "This call is outside the {whose} constraints: {reason}.",
    ),
    # Only when the constraints change again between two readings of the same call.
    Decision.POLICY_CHANGED: (
        409,
        "keybrake_policy_changed",
        "The vault key's or its budget's constraints changed while this call was admitted; "
        "nothing was forwarded. Retry the call.",
    ),
    Decision.CAP_HIT: (
        429,
        "keybrake_daily_cap_exceeded",
        "The vault key's daily USD cap (for any 24 hours) is reached.",
    ),
    Decision.PER_CALL_CAP_HIT: (
        429,
        "keybrake_per_call_cap_exceeded",
        "This call costs more than the vault key's per-call USD cap.",
    ),
    Decision.CALLER_CAP_HIT: (
        429,
        "keybrake_caller_cap_exceeded",
        "This caller's USD cap on the vault key is reached (max_usd_per_caller).",
    ),
    Decision.TOTAL_CAP_HIT: (
        429,
        "keybrake_total_cap_exceeded",
        "The vault key's total USD cap is reached.",
    ),
    Decision.BUDGET_CAP_HIT: (
        429,
        "keybrake_budget_exceeded",
        "The run's budget is spent: its USD cap (for any 24 hours, or in total) is reached.",
    ),
    Decision.RATE_LIMITED: (
        429,
        "keybrake_rate_limited",
        "Too many calls at the vendor for this vault key or its budget (max_calls_per_minute): "
        "retry in {retry_after} seconds. Nothing was forwarded.",
    ),
    Decision.IN_PROGRESS: (
        409,
        "idempotency_key_in_use",
        "An identical request with this key is still being processed; retry shortly.",
    ),
    Decision.IDEMPOTENCY_MISMATCH: (
        400,
        "idempotency_error",
        "Keys for idempotent requests can only be used with the same parameters they were first "
        "used with.",
    ),
    Decision.OUTCOME_UNKNOWN: (
        422,
        "keybrake_outcome_unknown",
        "An identical earlier call (audit row {audit_id}) was cut off when the proxy handling it "
        "stopped, and this vendor offers no way to ask whether it went through; it is counted as "
        "spent. The outcome is unknown: check the vendor before sending it again.",
    ),
    Decision.UPSTREAM_ERROR: (
        502,
        "keybrake_upstream_error",
        "The vendor did not answer: {reason} The call may have gone through and counts as spent.",
    ),
    Decision.SETTLE_FAILED: (
        503,
        "keybrake_outcome_not_recorded",
        "The call was forwarded to the vendor{request_id}, but the proxy could not record its "
        "outcome: it stays counted against the cap until it is reconciled. Check the vendor "
        "before sending it again.",
    ),
    Decision.STORE_UNAVAILABLE: (
        503,
        "keybrake_unavailable",
        "The proxy cannot reach its database; no call was forwarded.",
    ),
    Decision.INTERNAL_ERROR: (
        500,
        "keybrake_internal_error",
        "The proxy failed to handle this call; it was not forwarded. The failure is logged.",
    ),
}


# The outcomes after which an unanswered call's replay tokens mean "cut off, outcome unknown".
CUT_OFF = frozenset({Decision.RECONCILED, Decision.UPSTREAM_ERROR, Decision.VENDOR_BUSY})

# The refusals that count as a cap hit (a key's or budget's `cap_hits`, the dashboard's cap-hit
# counts, the cap-hit alert): the one definition, which the ledgers' SQL is rendered from.
CAP_HITS = frozenset(
    {
        Decision.PER_CALL_CAP_HIT,
        Decision.CALLER_CAP_HIT,
        Decision.CAP_HIT,
        Decision.TOTAL_CAP_HIT,
        Decision.BUDGET_CAP_HIT,
    }
)

# The version of the admission and settlement rules this build enforces. A database records the
# version of the build that last loaded its ledger; a replica whose version is older refuses vendor
# calls instead of enforcing rules it does not know (`docs/deploy.md`, "Upgrading"). Raise it with
# any change to what `admit`, the ledgers or their SQL decide or count.
# 2: call rates (max_calls_per_minute) and report-only notes; 3: policy revisions (rule 0).
RULE_VERSION = 3

# A call rate counts the calls that reached a vendor in 1-second buckets: the current second's
# and the RATE_SECONDS before it. Any 60-second stretch of time lies within 61 such buckets, so
# no 60 seconds ever hold more calls than the limit; a call frees its slot 60 to 61 seconds
# after it was made (never early, at most one second late).
RATE_SECONDS = 60


def is_cap_hit(decision: str) -> bool:
    return decision in CAP_HITS


def offset_cost(gross_micros: int, paid_micros: int) -> int:
    """What a call moving money already paid for costs: its amount less what its payer paid for
    the same object within the window (never below nothing)."""
    return max(0, gross_micros - paid_micros)


def refusal(decision: Decision) -> tuple[int, str, str]:
    """(HTTP status, code, message template) of a refusal."""
    return _REFUSALS[decision]


def refusal_status(decision: Decision) -> int:
    """The HTTP status a refusal answers with (0 for decisions that are not refusals)."""
    found = _REFUSALS.get(decision)
    return found[0] if found else 0


def caller_of(tag: str | None) -> str:
    """What a per-caller cap counts by: the tag a key is presented with (`<vault_key>.<tag>`), up
    to an `@` (`item-3@pod-abc`: a fan-out item keeps its count when Argo re-runs it in a new
    pod, while the audit row shows the pod). Untagged calls are all one caller, ""."""
    return (tag or "").partition("@")[0]


def item_of(tag: str | None) -> str | None:
    """The fan-out item a caller tag names: its text before an `@`, only when it has one. A tag
    without `@` names no item (a pod name that changes on every retry must not split a call)."""
    if tag is None or "@" not in tag:
        return None
    return tag.partition("@")[0]


def dedupe_token(request_hash: str, tag: str | None) -> str:
    """What the dedupe rule matches calls by: the request's fingerprint and its fan-out item.
    The item is not part of the fingerprint itself, which decides an idempotency-key mismatch.
    (Tokens written before items counted were the bare fingerprint; the migration that brought
    items rewrote them from their audit rows' tags, so a retry straddling it still matches.)"""
    item = item_of(tag)
    return f"{request_hash}:{item}" if item is not None else f"{request_hash}:"


def bucket_of(moment: datetime) -> int:
    """The rolling window's hourly bucket holding `moment`: whole hours since the epoch."""
    return (moment - _EPOCH) // BUCKET


def bucket_start(bucket: int) -> datetime:
    return _EPOCH + bucket * BUCKET


def window_floor(now: datetime) -> int:
    """The oldest bucket the window at `now` counts: the one holding now - 24h."""
    return bucket_of(now - WINDOW)


@dataclass(frozen=True, slots=True)
class Prior:
    """An earlier call holding the same idempotency key, or the same request fingerprint."""

    audit_id: int
    same_request: bool  # its request fingerprint equals this call's
    answered: bool  # its answer is stored and can be replayed
    # Its call was cut off (its process died mid-call and the sweep reconciled it, or the vendor
    # never answered): counted as spent, outcome unknown.
    outcome_unknown: bool
    created_at: datetime
    forwarded_key: str | None  # the idempotency key it was forwarded with


@dataclass(frozen=True, slots=True)
class Admitted:
    decision: Decision
    reserve_micros: int = 0
    replay_from: Prior | None = None  # the earlier call whose stored answer is the reply
    forward_key: str | None = None  # the idempotency key to forward with (the earlier call's)
    prior_audit_id: int | None = None  # named by `outcome_unknown`
    retry_after: int | None = None  # `rate_limited`: seconds until the call fits
    # Forwarded under a report-only rate it is over: noted in its audit row, never refused.
    reported: Decision | None = None

    @property
    def cap_hit(self) -> bool:
        return self.decision in CAP_HITS


@dataclass(frozen=True, slots=True)
class Caps:
    """A key's or a budget's state as read inside the reservation: revocation, expiry, its caps
    (None: no such cap) and, read only when a cap needs it, what it has used (settled plus
    reserved) in the window and over its life."""

    revoked: bool
    expires_at: datetime
    daily: int | None
    total: int | None
    used: Callable[[], tuple[int, int]]  # (in the window, over its life)
    # The caller judged the call against older constraints than these (rule 0).
    stale: bool = False

    def over(self, cost: int) -> str | None:
        """Which cap `cost` more would break: "daily", "total", or None."""
        if self.daily is None and self.total is None:
            return None
        window, life = self.used()
        if self.daily is not None and window + cost > self.daily:
            return "daily"
        if self.total is not None and life + cost > self.total:
            return "total"
        return None


@dataclass(frozen=True, slots=True)
class Rate:
    """A key's or budget's call rate, as read inside the reservation: at most `limit` calls at
    its vendors in any 60 seconds; `report`: count and note the calls over it, refuse none.
    `calls()` reads what reached a vendor in the window, by second, oldest first."""

    limit: int
    report: bool
    calls: Callable[[], list[tuple[int, int]]]  # (second, calls)


def second_of(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(seconds=1)


def bucket_start_second(bucket: int) -> int:
    """The first second of an hourly window bucket."""
    return second_of(bucket_start(bucket))


def rate_floor(second: int) -> int:
    """The oldest second a call rate counts at `second`."""
    return second - RATE_SECONDS


def over_rate(
    rates: Sequence[Rate], second: int, places: int = 1
) -> tuple[Decision | None, int | None]:
    """`places` more calls at a vendor against `rates` at `second` (one; a lookup asks for two,
    itself and the call it serves, so that it never takes a place its call cannot follow):
    (RATE_LIMITED, seconds until they fit) when an enforced rate is full; (None, None) when they
    fit; a full report-only rate gives (None, 0), a note for the audit row. The retry waits for
    the oldest calls to leave the window, as many as must, in every full rate (the key's and its
    budget's: the longest wait, or the call would be refused again after the shorter)."""
    noted = None
    wait = None
    for rate in rates:
        calls = rate.calls()
        excess = sum(count for _, count in calls) + places - rate.limit
        if excess <= 0:
            continue
        if rate.report:
            noted = 0
            continue
        # More places than the limit holds: never (a call priced by a lookup, at 1 a minute).
        fits = RATE_SECONDS + 1
        for when, count in calls:
            excess -= count
            if excess <= 0:
                fits = max(1, when + RATE_SECONDS + 1 - second)
                break
        wait = fits if wait is None else max(wait, fits)
    if wait is not None:
        return Decision.RATE_LIMITED, wait
    return None, noted


# An audit row's note of a call over a report-only rate (which went ahead).
RATE_NOTE = "rate_limited: over max_calls_per_minute"


def report_note(constraint: str | None, rate: Decision | None) -> str | None:
    """The audit row's `reported`: what report-only policies would have refused the call for
    (a constraint's reason, then the rate's), or None."""
    notes = [note for note in (constraint, RATE_NOTE if rate is not None else None) if note]
    return "; ".join(notes) or None


def dead_reason(
    now: datetime,
    key: tuple[bool, datetime],
    budget: tuple[bool, datetime | None] | None,
) -> Decision | None:
    """Rule 1 alone: why a key, or the budget it draws on, is dead at `now` (None: both live).
    Each is (revoked, expires_at); a budget that is gone (expires_at None) counts as revoked."""
    if key[0]:
        return Decision.REVOKED
    if key[1] <= now:
        return Decision.EXPIRED
    if budget is not None and (budget[0] or budget[1] is None):
        return Decision.BUDGET_REVOKED
    if budget is not None and budget[1] is not None and budget[1] <= now:
        return Decision.BUDGET_EXPIRED
    return None


def admit(
    *,
    now: datetime,
    key: Caps,
    budget: Caps | None,
    by_key: Prior | None,
    by_fingerprint: Prior | None,
    dedupe_window: timedelta,
    vendor_replays: bool,
    cost_micros: int,
    max_per_call_micros: int | None,
    max_per_caller_micros: int | None,
    caller_used: Callable[[], int],
    rates: Sequence[Rate] = (),
) -> Admitted:
    """The ledger's decision for one call (the rules in this module's docstring).

    `by_key`: the earlier call with this call's idempotency key, if any. `by_fingerprint`: the
    latest earlier call with its fingerprint, looked up only for a dedupe candidate.
    `caller_used()`: the caller tag's spend on the key over its life, read only when needed.
    """
    if key.stale or (budget is not None and budget.stale):
        return Admitted(Decision.POLICY_CHANGED)
    dead = dead_reason(
        now,
        (key.revoked, key.expires_at),
        (budget.revoked, budget.expires_at) if budget is not None else None,
    )
    if dead is not None:
        return Admitted(dead)
    prior: Prior | None = None
    if by_key is not None:
        if not by_key.same_request:
            return Admitted(Decision.IDEMPOTENCY_MISMATCH)
        prior = by_key
    elif by_fingerprint is not None and by_fingerprint.created_at >= now - dedupe_window:
        prior = by_fingerprint
    forward_key = None
    if prior is not None:
        if prior.answered:
            replayed = Decision.REPLAYED if prior is by_key else Decision.DEDUPLICATED
            return Admitted(replayed, replay_from=prior)
        if not prior.outcome_unknown:
            return Admitted(Decision.IN_PROGRESS)
        if not vendor_replays or prior.forwarded_key is None:
            return Admitted(Decision.OUTCOME_UNKNOWN, prior_audit_id=prior.audit_id)
        forward_key = prior.forwarded_key
    if max_per_call_micros is not None and cost_micros > max_per_call_micros:
        return Admitted(Decision.PER_CALL_CAP_HIT)
    if cost_micros > 0:
        if (
            max_per_caller_micros is not None
            and caller_used() + cost_micros > max_per_caller_micros
        ):
            return Admitted(Decision.CALLER_CAP_HIT)
        broken = key.over(cost_micros)
        if broken is not None:
            hit = Decision.CAP_HIT if broken == "daily" else Decision.TOTAL_CAP_HIT
            return Admitted(hit)
        if budget is not None and budget.over(cost_micros) is not None:
            return Admitted(Decision.BUDGET_CAP_HIT)
    # Last, what reaches the vendor at all: a call refused above, or replayed, is not counted.
    limited, wait = over_rate(rates, second_of(now))
    if limited is not None:
        return Admitted(limited, retry_after=wait)
    return Admitted(
        Decision.FORWARDED,
        reserve_micros=cost_micros,
        forward_key=forward_key,
        reported=Decision.RATE_LIMITED if wait == 0 else None,
    )


def settle_amounts(*, still_in_flight: bool, reserved: int, settled: int) -> tuple[int, int]:
    """(reservation to release, spend to add) when a call's outcome is written. A call the sweep
    already reconciled was counted as spent in full: its late outcome corrects that count."""
    if still_in_flight:
        return reserved, settled
    return 0, settled - reserved
