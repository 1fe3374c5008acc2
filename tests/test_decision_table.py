"""The ledger's rules as one table of cases, every row run against SQLite and PostgreSQL.

The expected outcomes are written out by hand, not computed by `keybrake.proxy.decisions`: SQLite
runs that module inside its transaction, PostgreSQL restates it in PL/pgSQL, and this table holds
both to the same answers. Rows cover every decision the ledger takes, and each rule's boundary
(a cap filled exactly, a key expiring exactly now, a dedupe window's last second, the rolling
window's oldest bucket) from both sides.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keybrake.proxy.constraints import Constraints
from keybrake.proxy.decisions import Decision, bucket_of, caller_of
from keybrake.proxy.store import Store, open_store
from keybrake.proxy.store.records import (
    AuditFilter,
    BudgetRecord,
    KeyRecord,
    Patch,
    Reservation,
    Settlement,
    StoredResponse,
)
from tests.helpers import TEST_EVENT

NOW = datetime(2026, 11, 26, 12, 30, tzinfo=UTC)
MICROS = 1_000_000


@dataclass(frozen=True)
class Earlier:
    """An earlier call holding an idempotency key (`order-1`) or the dedupe fingerprint."""

    kind: str  # "idempotency" or "dedupe"
    # "answered", "in_flight", "reconciled" (swept), "no_answer" (upstream error) or "busy" (the
    # vendor's 409: it still runs a request with this idempotency key)
    state: str
    age: timedelta = timedelta(minutes=1)
    body: str = "body-A"
    tag: str | None = None  # the caller tag it was presented with (`item@pod`)


@dataclass(frozen=True)
class Budget:
    """The budget the key draws on, and what its other key spent on it before."""

    daily: int | None = None
    total: int | None = None
    expires_in: timedelta = timedelta(hours=3)
    revoked: bool = False
    spent: tuple[tuple[timedelta, int], ...] = ()
    rate: int | None = None  # max_calls_per_minute
    rate_mode: str = "enforce"
    calls: tuple[tuple[timedelta, int], ...] = ()  # its other key's calls: (age, how many)
    lowered_to: int | None = None  # its rate, patched down after those calls


@dataclass(frozen=True)
class Row:
    name: str
    expect: Decision
    # The key.
    cap: int | None = 10 * MICROS  # for any 24 hours
    total: int | None = None  # over its life
    max_per_call: int | None = None
    max_per_caller: int | None = None
    budget: Budget | None = None
    dedupe_window: timedelta = timedelta(minutes=10)
    expires_in: timedelta = timedelta(hours=2)
    revoked: bool = False
    # What the key did before: settled spend, reservations still in flight, an earlier call.
    spent: tuple[tuple[timedelta, int], ...] = ()
    in_flight: tuple[tuple[timedelta, int], ...] = ()
    earlier: Earlier | None = None
    callers_spent: tuple[tuple[str, int], ...] = ()  # (caller tag, settled) a minute ago
    # Earlier calls that paid for the object this call confirms (`pi_paid`): (payer, age,
    # settled), the payer being "key" (this key), "sibling" (another key on its budget) or
    # "stranger" (another run's key).
    paid: tuple[tuple[str, timedelta, int], ...] = ()
    confirms: bool = False  # this call moves `pi_paid`'s money (its cost is the gross amount)
    # This call.
    caller_tag: str | None = None
    cost: int = 3 * MICROS
    idempotency_key: str | None = None
    dedupe: bool = False
    body: str = "body-A"
    vendor_replays: bool = True
    # What must come of it.
    used_after: int = 0  # settled plus reserved in the window, after the call
    cap_hits: int = 0
    replayed: bool = False
    forward_key: str | None = "fk-new"  # the idempotency key a forwarded call goes out with
    names_earlier: bool = False  # an outcome_unknown refusal names the earlier call's audit row
    life_after: int | None = None  # the key's settled plus reserved over its life, if checked
    budget_after: int | None = None  # the budget's, over its life
    budget_cap_hits: int = 0
    # The key's settled plus reserved in the window at a later moment (after this call).
    used_later: tuple[timedelta, int] | None = None
    # Call rates: the key's max_calls_per_minute and its mode, the calls it made before (age,
    # how many; free calls forwarded then), what a report-only constraint said of this call,
    # and what must come of it: the Retry-After of a `rate_limited`, the audit row's note.
    rate: int | None = None
    rate_mode: str = "enforce"
    calls: tuple[tuple[timedelta, int], ...] = ()
    report: str | None = None
    retry_after: int | None = None
    reported: str | None = None
    # Rule 0: whose constraints ("key" or "budget") were patched after the call was judged
    # against them (the call's record holds the revision before the patch).
    stale: str | None = None


H = timedelta(hours=1)
S = timedelta(seconds=1)
ROWS = [
    # -- policy revisions (rule 0): a call judged by older constraints writes nothing ------------
    Row(
        "a call judged by the key's constraints before a patch is judged again",
        Decision.POLICY_CHANGED,
        stale="key",
        spent=((H, 2 * MICROS),),
        used_after=2 * MICROS,
    ),
    Row(
        "a call judged by its budget's constraints before a patch is judged again",
        Decision.POLICY_CHANGED,
        stale="budget",
        budget=Budget(daily=50 * MICROS),
    ),
    Row(
        "a stale judgement comes before revocation",
        Decision.POLICY_CHANGED,
        stale="key",
        revoked=True,
    ),
    Row(
        "a stale judgement comes before a stored answer",
        Decision.POLICY_CHANGED,
        stale="key",
        earlier=Earlier("idempotency", "answered"),
        idempotency_key="order-1",
        used_after=3 * MICROS,
    ),
    Row(
        "a stale judgement comes before a full rate",
        Decision.POLICY_CHANGED,
        stale="key",
        rate=1,
        calls=((S, 1),),
    ),
    Row(
        "a stale judgement takes no place in a rate: its call, judged again, fits",
        Decision.POLICY_CHANGED,
        stale="key",
        rate=2,
        calls=((S, 1),),
    ),
    # -- call rates (rule 8): 1-second buckets, the current second and the 60 before -------------
    Row(
        "a call within its key's rate is forwarded",
        Decision.FORWARDED,
        rate=3,
        calls=((10 * S, 2),),
        used_after=3 * MICROS,
    ),
    Row(
        "a call over its key's rate waits for the oldest calls to leave the window",
        Decision.RATE_LIMITED,
        rate=3,
        calls=((10 * S, 1), (5 * S, 2)),
        retry_after=51,
    ),
    Row(
        "a call 60 seconds ago still counts",
        Decision.RATE_LIMITED,
        rate=1,
        calls=((60 * S, 1),),
        retry_after=1,
    ),
    Row(
        "a call 61 seconds ago no longer counts",
        Decision.FORWARDED,
        rate=1,
        calls=((61 * S, 1),),
        used_after=3 * MICROS,
    ),
    Row(
        "a report-only rate forwards the call and notes it",
        Decision.FORWARDED,
        rate=1,
        rate_mode="report",
        calls=((5 * S, 1),),
        used_after=3 * MICROS,
        reported="rate_limited: over max_calls_per_minute",
    ),
    Row(
        "a report-only constraint's note is kept on a call refused for a cap",
        Decision.CAP_HIT,
        cap=2 * MICROS,
        report="constraint_violated: customers: 'cus_3' is not allowed",
        cap_hits=1,
        reported="constraint_violated: customers: 'cus_3' is not allowed",
    ),
    Row(
        "a report-only constraint's note goes into the audit row beside the rate's",
        Decision.FORWARDED,
        rate=1,
        rate_mode="report",
        calls=((5 * S, 1),),
        report="constraint_violated: customers: 'cus_3' is not allowed",
        used_after=3 * MICROS,
        reported="constraint_violated: customers: 'cus_3' is not allowed; "
        "rate_limited: over max_calls_per_minute",
    ),
    Row(
        "the budget's rate counts its keys' calls",
        Decision.RATE_LIMITED,
        budget=Budget(daily=50 * MICROS, rate=2),
        calls=((30 * S, 2),),
        retry_after=31,
    ),
    Row(
        "a sibling key's calls fill the budget's rate",
        Decision.RATE_LIMITED,
        budget=Budget(daily=50 * MICROS, rate=2, calls=((10 * S, 2),)),
        retry_after=51,
    ),
    Row(
        "the key's and the budget's rates both full: the longer wait",
        Decision.RATE_LIMITED,
        rate=1,
        calls=((59 * S, 1),),  # the key's fits again in 2 s
        # The budget's, lowered to 1 over three calls, once all three have left: in 60 s.
        budget=Budget(daily=50 * MICROS, rate=3, calls=((S, 2),), lowered_to=1),
        retry_after=60,
    ),
    Row(
        "a report-only budget rate notes, the key's own rate decides",
        Decision.FORWARDED,
        rate=3,
        budget=Budget(daily=50 * MICROS, rate=1, rate_mode="report", calls=((S, 1),)),
        reported="rate_limited: over max_calls_per_minute",
        used_after=3 * MICROS,
    ),
    Row(
        "a cap hit is a cap hit, not a wait, when the rate is full too",
        Decision.CAP_HIT,
        rate=1,
        calls=((5 * S, 1),),
        spent=((H, 9 * MICROS),),
        used_after=9 * MICROS,
        cap_hits=1,
    ),
    Row(
        "a replay reaches no vendor: not rate limited",
        Decision.REPLAYED,
        rate=2,  # the earlier call (a minute ago) and one since: full
        calls=((5 * S, 1),),
        earlier=Earlier("idempotency", "answered"),
        idempotency_key="order-1",
        replayed=True,
        used_after=3 * MICROS,
    ),
    # -- revocation and expiry ---------------------------------------------------------------
    Row("a revoked key is refused", Decision.REVOKED, revoked=True),
    Row(
        "revocation comes before a stored answer",
        Decision.REVOKED,
        revoked=True,
        earlier=Earlier("idempotency", "answered"),
        idempotency_key="order-1",
        used_after=3 * MICROS,
    ),
    Row("a key expiring exactly now is expired", Decision.EXPIRED, expires_in=timedelta(0)),
    Row(
        "a key expiring a microsecond from now is live",
        Decision.FORWARDED,
        expires_in=timedelta(microseconds=1),
        used_after=3 * MICROS,
    ),
    # -- the rolling window ------------------------------------------------------------------
    Row(
        "a cost that fills the cap exactly is admitted",
        Decision.FORWARDED,
        spent=((H, 7 * MICROS),),
        used_after=10 * MICROS,
    ),
    Row(
        "a micro-dollar over the cap is a cap hit",
        Decision.CAP_HIT,
        spent=((H, 7 * MICROS),),
        cost=3 * MICROS + 1,
        used_after=7 * MICROS,
        cap_hits=1,
    ),
    Row(
        "reservations in flight count against the cap",
        Decision.CAP_HIT,
        in_flight=((timedelta(seconds=5), 8 * MICROS),),
        used_after=8 * MICROS,
        cap_hits=1,
    ),
    Row(
        "a free call passes a full cap",
        Decision.FORWARDED,
        spent=((H, 10 * MICROS),),
        cost=0,
        used_after=10 * MICROS,
    ),
    Row(
        "spend exactly 24 hours ago still counts",
        Decision.CAP_HIT,
        spent=((timedelta(hours=24), 8 * MICROS),),
        used_after=8 * MICROS,
        cap_hits=1,
    ),
    Row(
        # NOW is 12:30: 24 h 29 min ago is 12:01 yesterday, the window's oldest bucket.
        "spend in the window's oldest hour still counts (over-count, never under)",
        Decision.CAP_HIT,
        spent=((timedelta(hours=24, minutes=29), 8 * MICROS),),
        used_after=8 * MICROS,
        cap_hits=1,
    ),
    Row(
        "spend in the hour before the window's oldest no longer counts",
        Decision.FORWARDED,
        spent=((timedelta(hours=24, minutes=31), 8 * MICROS),),
        used_after=3 * MICROS,
    ),
    Row(
        "the UTC day is not the window: yesterday evening's spend counts",
        Decision.CAP_HIT,
        spent=((timedelta(hours=13), 9 * MICROS),),
        used_after=9 * MICROS,
        cap_hits=1,
    ),
    # -- the per-call cap ----------------------------------------------------------------------
    Row(
        "a cost equal to the per-call cap is admitted",
        Decision.FORWARDED,
        max_per_call=3 * MICROS,
        used_after=3 * MICROS,
    ),
    Row(
        "a micro-dollar over the per-call cap is a cap hit",
        Decision.PER_CALL_CAP_HIT,
        max_per_call=3 * MICROS - 1,
        cap_hits=1,
    ),
    Row(
        "the per-call cap is checked before the window",
        Decision.PER_CALL_CAP_HIT,
        cap=2 * MICROS,
        max_per_call=2 * MICROS,
        spent=((H, 2 * MICROS),),
        used_after=2 * MICROS,
        cap_hits=1,
    ),
    # -- idempotency keys ---------------------------------------------------------------------
    Row(
        "an answered idempotency key is replayed",
        Decision.REPLAYED,
        earlier=Earlier("idempotency", "answered"),
        idempotency_key="order-1",
        used_after=3 * MICROS,
        replayed=True,
    ),
    Row(
        "an idempotency key with another body is refused",
        Decision.IDEMPOTENCY_MISMATCH,
        earlier=Earlier("idempotency", "answered", body="body-B"),
        idempotency_key="order-1",
        used_after=3 * MICROS,
    ),
    Row(
        "an idempotency key still in flight is in progress",
        Decision.IN_PROGRESS,
        earlier=Earlier("idempotency", "in_flight"),
        idempotency_key="order-1",
        used_after=3 * MICROS,
    ),
    Row(
        "a reconciled call is sent again with its own key and reserved again",
        Decision.FORWARDED,
        earlier=Earlier("idempotency", "reconciled"),
        idempotency_key="order-1",
        used_after=6 * MICROS,
        forward_key="order-1",
    ),
    Row(
        "a reconciled call's retry still keeps to the cap",
        Decision.CAP_HIT,
        cap=5 * MICROS,
        earlier=Earlier("idempotency", "reconciled"),
        idempotency_key="order-1",
        used_after=3 * MICROS,
        cap_hits=1,
    ),
    Row(
        "an unanswered call (the vendor timed out) is sent again with its own key",
        Decision.FORWARDED,
        earlier=Earlier("idempotency", "no_answer"),
        idempotency_key="order-1",
        used_after=6 * MICROS,
        forward_key="order-1",
    ),
    Row(
        "a call the vendor said it was still running is sent again with its own key",
        Decision.FORWARDED,
        earlier=Earlier("idempotency", "busy"),
        idempotency_key="order-1",
        used_after=3 * MICROS,  # the first attempt moved nothing (a 4xx); this one is reserved
        forward_key="order-1",
    ),
    Row(
        "without vendor idempotency a reconciled call's outcome is unknown, for good",
        Decision.OUTCOME_UNKNOWN,
        earlier=Earlier("dedupe", "reconciled"),
        dedupe=True,
        vendor_replays=False,
        used_after=3 * MICROS,
        names_earlier=True,
    ),
    # -- the dedupe window --------------------------------------------------------------------
    Row(
        "an identical candidate within the window is deduplicated",
        Decision.DEDUPLICATED,
        earlier=Earlier("dedupe", "answered"),
        dedupe=True,
        used_after=3 * MICROS,
        replayed=True,
    ),
    Row(
        "the window's last second still deduplicates",
        Decision.DEDUPLICATED,
        earlier=Earlier("dedupe", "answered", age=timedelta(minutes=10)),
        dedupe=True,
        used_after=3 * MICROS,
        replayed=True,
    ),
    Row(
        "a second past the window is a new call",
        Decision.FORWARDED,
        earlier=Earlier("dedupe", "answered", age=timedelta(minutes=10, seconds=1)),
        dedupe=True,
        used_after=6 * MICROS,
    ),
    Row(
        "an identical candidate in flight is in progress",
        Decision.IN_PROGRESS,
        earlier=Earlier("dedupe", "in_flight"),
        dedupe=True,
        used_after=3 * MICROS,
    ),
    Row(
        "another body is another call",
        Decision.FORWARDED,
        earlier=Earlier("dedupe", "answered"),
        dedupe=True,
        body="body-B",
        used_after=6 * MICROS,
    ),
    Row(
        "a call that is no dedupe candidate is never merged",
        Decision.FORWARDED,
        earlier=Earlier("dedupe", "answered"),
        idempotency_key="order-2",
        used_after=6 * MICROS,
    ),
    Row(
        "an unseen SDK key falls through to the fingerprint",
        Decision.DEDUPLICATED,
        earlier=Earlier("dedupe", "answered"),
        idempotency_key="sdk-fresh",
        dedupe=True,
        used_after=3 * MICROS,
        replayed=True,
    ),
    Row(
        "a reconciled keyless call is sent again with the key it first went out with",
        Decision.FORWARDED,
        earlier=Earlier("dedupe", "reconciled"),
        dedupe=True,
        used_after=6 * MICROS,
        forward_key="fk-earlier",
    ),
    # -- lifetime caps ---------------------------------------------------------------------------
    Row(
        "a lifetime cap filled exactly is admitted",
        Decision.FORWARDED,
        cap=None,
        total=10 * MICROS,
        spent=((timedelta(hours=30), 7 * MICROS),),
        used_after=3 * MICROS,
        life_after=10 * MICROS,
    ),
    Row(
        "a micro-dollar over a lifetime cap is a total cap hit",
        Decision.TOTAL_CAP_HIT,
        cap=None,
        total=10 * MICROS,
        spent=((timedelta(hours=30), 7 * MICROS),),
        cost=3 * MICROS + 1,
        cap_hits=1,
        life_after=7 * MICROS,
    ),
    Row(
        "spend long out of the window still counts against the lifetime cap",
        Decision.TOTAL_CAP_HIT,
        cap=100 * MICROS,
        total=10 * MICROS,
        spent=((timedelta(hours=72), 8 * MICROS),),
        cap_hits=1,
        life_after=8 * MICROS,
    ),
    Row(
        "the 24-hour cap is checked before the lifetime cap",
        Decision.CAP_HIT,
        cap=2 * MICROS,
        total=2 * MICROS,
        cap_hits=1,
    ),
    # -- per-caller caps ---------------------------------------------------------------------------
    Row(
        "a caller filling its cap exactly is admitted, counted by the tag up to @",
        Decision.FORWARDED,
        max_per_caller=5 * MICROS,
        callers_spent=(("item-1@pod-a", 2 * MICROS),),
        caller_tag="item-1@pod-b",
        used_after=5 * MICROS,
    ),
    Row(
        "a micro-dollar over a caller's cap is a caller cap hit",
        Decision.CALLER_CAP_HIT,
        max_per_caller=5 * MICROS,
        callers_spent=(("item-1@pod-a", 2 * MICROS),),
        caller_tag="item-1@pod-b",
        cost=3 * MICROS + 1,
        used_after=2 * MICROS,
        cap_hits=1,
    ),
    Row(
        "another caller has a cap of its own",
        Decision.FORWARDED,
        max_per_caller=5 * MICROS,
        callers_spent=(("item-1", 5 * MICROS),),
        caller_tag="item-2@pod-c",
        used_after=8 * MICROS,
    ),
    Row(
        "untagged calls are one caller",
        Decision.CALLER_CAP_HIT,
        max_per_caller=5 * MICROS,
        callers_spent=((None, 4 * MICROS),),  # type: ignore[arg-type]
        used_after=4 * MICROS,
        cap_hits=1,
    ),
    Row(
        "the caller's cap is checked before the key's",
        Decision.CALLER_CAP_HIT,
        cap=4 * MICROS,
        max_per_caller=2 * MICROS,
        cap_hits=1,
    ),
    # -- budgets -----------------------------------------------------------------------------------
    Row(
        "a key whose budget is revoked is refused",
        Decision.BUDGET_REVOKED,
        budget=Budget(total=100 * MICROS, revoked=True),
    ),
    Row(
        "a key whose budget expires exactly now is refused",
        Decision.BUDGET_EXPIRED,
        budget=Budget(total=100 * MICROS, expires_in=timedelta(0)),
    ),
    Row(
        "two keys filling their budget exactly is admitted",
        Decision.FORWARDED,
        budget=Budget(total=10 * MICROS, spent=((H, 7 * MICROS),)),
        used_after=3 * MICROS,
        budget_after=10 * MICROS,
    ),
    Row(
        "a micro-dollar over the budget is a budget cap hit, counted on the key and the budget",
        Decision.BUDGET_CAP_HIT,
        budget=Budget(total=10 * MICROS, spent=((H, 7 * MICROS),)),
        cost=3 * MICROS + 1,
        cap_hits=1,
        budget_after=7 * MICROS,
        budget_cap_hits=1,
    ),
    Row(
        "a budget's 24-hour cap counts its keys' spend in the window",
        Decision.BUDGET_CAP_HIT,
        budget=Budget(daily=5 * MICROS, spent=((timedelta(hours=30), 4 * MICROS), (H, 3 * MICROS))),
        cap_hits=1,
        budget_after=7 * MICROS,
        budget_cap_hits=1,
    ),
    Row(
        "the key's own caps are checked before its budget's",
        Decision.CAP_HIT,
        cap=2 * MICROS,
        budget=Budget(total=MICROS),
        cap_hits=1,
        budget_after=0,
        budget_cap_hits=1,
    ),
    Row(
        "a key with no caps of its own draws on its budget alone",
        Decision.FORWARDED,
        cap=None,
        budget=Budget(daily=10 * MICROS),
        used_after=3 * MICROS,
        budget_after=3 * MICROS,
    ),
    # -- money already paid for: the payer's offset, within the window, re-dated -----------------
    Row(
        "confirming what the key paid for is free",
        Decision.FORWARDED,
        paid=(("key", timedelta(minutes=5), 3 * MICROS),),
        confirms=True,
        used_after=3 * MICROS,
    ),
    Row(
        "a key on the same budget confirms what its sibling paid for free",
        Decision.FORWARDED,
        budget=Budget(daily=10 * MICROS),
        paid=(("sibling", timedelta(minutes=5), 3 * MICROS),),
        confirms=True,
        used_after=0,
        budget_after=3 * MICROS,
    ),
    Row(
        "another run's key confirming what it did not pay for pays in full",
        Decision.FORWARDED,
        paid=(("stranger", timedelta(minutes=5), 3 * MICROS),),
        confirms=True,
        used_after=3 * MICROS,
    ),
    Row(
        "another run's paid-for mark lifts no cap",
        Decision.CAP_HIT,
        cap=2 * MICROS,
        paid=(("stranger", timedelta(minutes=5), 3 * MICROS),),
        confirms=True,
        cap_hits=1,
    ),
    Row(
        "a payment made before the window offsets nothing: the confirm counts again",
        Decision.FORWARDED,
        paid=(("key", 25 * H, 3 * MICROS),),
        confirms=True,
        used_after=3 * MICROS,
    ),
    Row(
        "a confirm's amount beyond its payment is capped like new spend",
        Decision.CAP_HIT,
        paid=(("key", 23 * H, 3 * MICROS),),
        confirms=True,
        spent=((H, 7 * MICROS),),
        cost=4 * MICROS,
        used_after=10 * MICROS,
        cap_hits=1,
    ),
    Row(
        "a confirm moving more than was paid for pays the difference",
        Decision.FORWARDED,
        paid=(("key", timedelta(minutes=5), 3 * MICROS),),
        confirms=True,
        cost=5 * MICROS,
        used_after=5 * MICROS,
    ),
    Row(
        "the confirm re-dates the payment: the window a day later still counts it",
        Decision.FORWARDED,
        paid=(("key", 23 * H, 3 * MICROS),),
        confirms=True,
        used_after=3 * MICROS,
        used_later=(2 * H, 3 * MICROS),
    ),
    # -- fan-out items ---------------------------------------------------------------------------
    Row(
        "another fan-out item with the same body is another call",
        Decision.FORWARDED,
        earlier=Earlier("dedupe", "answered", tag="item-1@pod-a"),
        dedupe=True,
        caller_tag="item-2@pod-b",
        used_after=6 * MICROS,
    ),
    Row(
        "the same item retried from a new pod is that earlier call",
        Decision.DEDUPLICATED,
        earlier=Earlier("dedupe", "answered", tag="item-1@pod-a"),
        dedupe=True,
        caller_tag="item-1@pod-b",
        used_after=3 * MICROS,
        replayed=True,
    ),
    Row(
        "a tag without @ names no item: a renamed pod's retry is that earlier call",
        Decision.DEDUPLICATED,
        earlier=Earlier("dedupe", "answered", tag="pod-a"),
        dedupe=True,
        caller_tag="pod-b",
        used_after=3 * MICROS,
        replayed=True,
    ),
]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'table.db'}"
    return str(request.getfixturevalue("pg_module_url"))


def reservation(
    key: KeyRecord,
    now: datetime,
    cost: int,
    body: str,
    *,
    idempotency_key: str | None = None,
    dedupe: bool = False,
    forward_key: str | None = None,
    vendor_replays: bool = True,
    tag: str | None = None,
    paid_object: str | None = None,
) -> Reservation:
    return Reservation(
        key=key,
        now=now,
        vendor="stripe",
        method="POST",
        path="/v1/payment_intents",
        caller_tag=tag,
        caller=caller_of(tag),
        cost_micros=cost,
        amount=None,
        currency=None,
        idempotency_key=idempotency_key,
        request_hash=body,
        dedupe=dedupe,
        forward_key=forward_key,
        vendor_replays=vendor_replays,
        paid_object=paid_object,
    )


def outcome(
    r: Reservation,
    audit_id: int,
    settled: int,
    *,
    answered: bool = True,
    status: int = 200,
    counts: tuple[str, ...] = (),
) -> Settlement:
    """What the pipeline settles: an answer (stored for replays unless it is the vendor's 409
    "still running"), or no answer at all (a 502)."""
    if not answered:
        status = 502
    decision = {200: "forwarded", 409: "vendor_busy", 502: "upstream_error"}[status]
    return Settlement(
        audit_id=audit_id,
        key_id=r.key.key_id,
        bucket=bucket_of(r.now),
        vendor="stripe",
        reserved_micros=r.cost_micros,
        settled_micros=settled,
        status=status,
        decision=decision,
        vendor_request_id=None,
        latency_ms=1.0,
        idempotency_key=r.idempotency_key,
        request_hash=r.request_hash,
        dedupe=r.dedupe,
        dedupe_token=r.dedupe_token,
        response=StoredResponse(200, [], b'{"id": "pi_1"}') if status == 200 else None,
        outcome_known=status == 200,
        budget_id=r.key.budget_id,
        caller=r.caller if r.key.max_per_caller_micros is not None else None,
        counts=counts,
    )


def rate_of(limit: int | None, mode: str) -> Constraints | None:
    """A key's or budget's constraints holding only a call rate."""
    return None if limit is None else Constraints(mode=mode, max_calls_per_minute=limit)


def key_record(
    key_id: str,
    cap: int | None = 10 * MICROS,
    max_per_call: int | None = None,
    dedupe_window: timedelta = timedelta(0),
    expires_in: timedelta = timedelta(hours=2),
) -> KeyRecord:
    return KeyRecord(
        key_id=key_id,
        key_hash=key_id.encode(),
        vendor="stripe",
        label="argo/table",
        daily_cap_micros=cap,
        max_per_call_micros=max_per_call,
        allowed_endpoints=("POST /v1/payment_intents",),
        metadata={},
        dedupe_window_s=int(dedupe_window.total_seconds()),
        created_at=NOW - timedelta(days=2),
        expires_at=NOW + expires_in,
    )


async def play(store: Store, row: Row, key_id: str) -> None:
    budget_id = None
    if row.budget is not None:
        budget_id = "bg_" + key_id.removeprefix("vk_").ljust(16, "0")
        await store.create_budget(
            BudgetRecord(
                budget_id=budget_id,
                label="argo/table",
                daily_cap_micros=row.budget.daily,
                total_cap_micros=row.budget.total,
                metadata={},
                created_at=NOW - timedelta(days=4),
                expires_at=NOW + row.budget.expires_in,
                constraints=rate_of(row.budget.rate, row.budget.rate_mode),
            ),
            TEST_EVENT,
        )
        other = replace(key_record(key_id + "_other", cap=None), budget_id=budget_id)
        await store.create_key(other, TEST_EVENT)
        for age, micros in row.budget.spent:
            earlier = reservation(other, NOW - age, micros, f"other-{age}")
            admitted = await store.reserve(earlier)
            assert admitted.decision is Decision.FORWARDED
            await store.settle(outcome(earlier, admitted.audit_id, micros))
        if row.budget.revoked:
            await store.revoke_budget(budget_id, NOW - timedelta(seconds=1), TEST_EVENT)
    key = replace(
        key_record(key_id, row.cap, row.max_per_call, row.dedupe_window, row.expires_in),
        total_cap_micros=row.total,
        max_per_caller_micros=row.max_per_caller,
        budget_id=budget_id,
        constraints=rate_of(row.rate, row.rate_mode),
    )
    await store.create_key(key, TEST_EVENT)
    for tag, micros in row.callers_spent:
        earlier = reservation(key, NOW - timedelta(minutes=1), micros, f"caller-{tag}", tag=tag)
        admitted = await store.reserve(earlier)
        assert admitted.decision is Decision.FORWARDED
        await store.settle(outcome(earlier, admitted.audit_id, micros))
    for age, micros in row.spent:
        earlier = reservation(key, NOW - age, micros, f"spent-{age}")
        admitted = await store.reserve(earlier)
        assert admitted.decision is Decision.FORWARDED
        await store.settle(outcome(earlier, admitted.audit_id, micros))
    payers = {"key": key, "stranger": key_record(key_id + "_stranger", cap=None)}
    if row.budget is not None:
        payers["sibling"] = other
    if any(payer == "stranger" for payer, _, _ in row.paid):
        await store.create_key(payers["stranger"], TEST_EVENT)
    for payer, age, micros in row.paid:
        paying = reservation(payers[payer], NOW - age, micros, f"paid-{payer}-{age}")
        admitted = await store.reserve(paying)
        assert admitted.decision is Decision.FORWARDED
        await store.settle(outcome(paying, admitted.audit_id, micros, counts=("pi_paid",)))
    for age, micros in row.in_flight:
        assert (await store.reserve(reservation(key, NOW - age, micros, "flying"))).decision == (
            Decision.FORWARDED
        )
    earlier_id = None
    if row.earlier is not None:
        e = row.earlier
        first = reservation(
            key,
            NOW - e.age,
            3 * MICROS,
            e.body,
            idempotency_key="order-1" if e.kind == "idempotency" else None,
            dedupe=e.kind == "dedupe",
            forward_key="order-1" if e.kind == "idempotency" else "fk-earlier",
            tag=e.tag,
        )
        admitted = await store.reserve(first)
        assert admitted.decision is Decision.FORWARDED
        earlier_id = admitted.audit_id
        if e.state == "answered":
            await store.settle(outcome(first, earlier_id, 3 * MICROS))
        elif e.state == "no_answer":
            await store.settle(outcome(first, earlier_id, 3 * MICROS, answered=False))
        elif e.state == "busy":
            await store.settle(outcome(first, earlier_id, 0, status=409))
        elif e.state == "reconciled":
            # (On PostgreSQL the rows share a database: other rows' dead calls may go too.)
            assert await store.sweep(NOW - e.age + timedelta(seconds=1)) >= 1
    # Last, the free calls it (and a sibling key on its budget) made in the last minute
    # (forwarded then: they count against the rates; a rate counts what it sees, the moment's
    # future included, so they go in in order, oldest first).
    made_by = [(age, count, key) for age, count in row.calls]
    if row.budget is not None:
        made_by += [(age, count, other) for age, count in row.budget.calls]
    for age, count, caller in sorted(made_by, key=lambda made: -made[0]):
        for n in range(count):
            made = await store.reserve(reservation(caller, NOW - age, 0, f"call-{age}-{n}"))
            assert made.decision is Decision.FORWARDED
    if row.budget is not None and row.budget.lowered_to is not None and budget_id is not None:
        lowered = rate_of(row.budget.lowered_to, row.budget.rate_mode)
        patch = replace(Patch(reason="table", constraints=lowered), sets_policy=True)
        assert await store.patch(budget_id, patch, NOW - S, TEST_EVENT) == "patched"
        key = replace(key, budget_policy_rev=key.budget_policy_rev + 1)  # (read after it)
    if row.stale is not None:  # patched by another replica: the call's record is one behind
        subject = key_id if row.stale == "key" else budget_id
        assert subject is not None
        # (Its call rate kept: the patch narrows whom it pays.)
        patched_to = Constraints(currencies=("usd",), max_calls_per_minute=row.rate)
        patch = Patch(reason="table", constraints=patched_to)
        patched = replace(patch, sets_policy=True)
        assert await store.patch(subject, patched, NOW - 2 * S, TEST_EVENT) == "patched"
    if row.revoked:
        assert await store.revoke_key(key_id, NOW - timedelta(seconds=1), TEST_EVENT)
    before = await store.get_key(key_id, NOW)
    assert before is not None
    budget_before = await store.get_budget(budget_id, NOW) if budget_id is not None else None
    rows_before = len(await store.audit(AuditFilter(key_id=key_id, limit=1000)))

    call = reservation(
        key,
        NOW,
        row.cost,
        row.body,
        idempotency_key=row.idempotency_key,
        dedupe=row.dedupe,
        forward_key="fk-new",
        vendor_replays=row.vendor_replays,
        tag=row.caller_tag,
        paid_object="pi_paid" if row.confirms else None,
    )
    admitted = await store.reserve(replace(call, report=row.report))
    view = await store.get_key(key_id, NOW)
    assert view is not None
    if admitted.decision is Decision.POLICY_CHANGED:  # nothing written: no row, no count
        assert len(await store.audit(AuditFilter(key_id=key_id, limit=1000))) == rows_before
        assert view.usage == before.usage, row.name
        if budget_before is not None:  # (PostgreSQL takes the budget's count back too)
            budget_after = await store.get_budget(budget_id or "", NOW)
            assert budget_after is not None and budget_after.usage == budget_before.usage
        # And no place in a call rate: the same call, judged by the current revision, fits.
        if row.rate is not None and row.rate > sum(count for _, count in row.calls):
            current = await store.find_key(key.key_hash)
            assert current is not None
            again = await store.reserve(replace(call, key=current, idempotency_key=None))
            assert again.decision is Decision.FORWARDED, (row.name, again)
    if budget_id is not None:
        budget_view = await store.get_budget(budget_id, NOW)
        assert budget_view is not None
        budget_usage = budget_view.usage
    got = {
        "decision": admitted.decision,
        "used_after": view.usage.spent_micros + view.usage.reserved_micros,
        "cap_hits": view.usage.cap_hits,
        "replayed": admitted.replay is not None,
        "forward_key": admitted.forward_key if admitted.decision is Decision.FORWARDED else None,
        "names_earlier": admitted.prior_audit_id is not None
        and admitted.prior_audit_id == earlier_id,
        "retry_after": admitted.retry_after,
        "reported": admitted.reported,
    }
    if row.life_after is not None:
        got["life_after"] = view.usage.total_micros + view.usage.total_reserved_micros
    if row.budget_after is not None:
        got["budget_after"] = budget_usage.total_micros + budget_usage.total_reserved_micros
        got["budget_cap_hits"] = budget_usage.cap_hits
    want = {
        "decision": row.expect,
        "used_after": row.used_after,
        "cap_hits": row.cap_hits,
        "replayed": row.replayed,
        "forward_key": row.forward_key if row.expect is Decision.FORWARDED else None,
        "names_earlier": row.names_earlier,
        "retry_after": row.retry_after,
        "reported": row.reported,
    }
    if row.life_after is not None:
        want["life_after"] = row.life_after
    if row.used_later is not None:
        later, _ = row.used_later
        seen = await store.get_key(key_id, NOW + later)
        assert seen is not None
        got["used_later"] = seen.usage.spent_micros + seen.usage.reserved_micros
        want["used_later"] = row.used_later[1]
    if row.budget_after is not None:
        want["budget_after"] = row.budget_after
        want["budget_cap_hits"] = row.budget_cap_hits
    assert got == want, row.name


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_decision_table(backend: str, row: Row) -> None:
    async def run() -> None:
        store = open_store(backend)
        await store.open()
        try:
            await play(store, row, f"vk_row{ROWS.index(row):02d}")
        finally:
            await store.close()

    asyncio.run(run())


def test_every_ledger_decision_has_a_row() -> None:
    ledger = {
        Decision.POLICY_CHANGED,
        Decision.REVOKED,
        Decision.EXPIRED,
        Decision.BUDGET_REVOKED,
        Decision.BUDGET_EXPIRED,
        Decision.CALLER_CAP_HIT,
        Decision.TOTAL_CAP_HIT,
        Decision.BUDGET_CAP_HIT,
        Decision.IDEMPOTENCY_MISMATCH,
        Decision.IN_PROGRESS,
        Decision.REPLAYED,
        Decision.DEDUPLICATED,
        Decision.OUTCOME_UNKNOWN,
        Decision.PER_CALL_CAP_HIT,
        Decision.CAP_HIT,
        Decision.RATE_LIMITED,
        Decision.FORWARDED,
    }
    assert {row.expect for row in ROWS} == ledger


SETTLE_ROWS = [
    # (name, answered, settled, swept first, window spend after)
    ("the outcome replaces the reservation", True, 2 * MICROS, False, 2 * MICROS),
    ("a refusal by the vendor releases it", True, 0, False, 0),
    ("no answer counts the estimate", False, 3 * MICROS, False, 3 * MICROS),
    ("the sweep counts a dead call in full", None, 0, True, 3 * MICROS),
    ("a late outcome corrects the sweep's count", True, MICROS, True, MICROS),
]


@pytest.mark.parametrize(
    "name,answered,settled,swept,after", SETTLE_ROWS, ids=[r[0] for r in SETTLE_ROWS]
)
def test_settle_table(
    backend: str, name: str, answered: bool | None, settled: int, swept: bool, after: int
) -> None:
    async def run() -> None:
        store = open_store(backend)
        await store.open()
        try:
            # The key draws on a budget and caps each caller: settle, sweep and a late settle
            # move the budget's and the caller's spend exactly as the key's.
            key_id = f"vk_settle{[r[0] for r in SETTLE_ROWS].index(name)}"
            budget = BudgetRecord(
                budget_id="bg_" + key_id.removeprefix("vk_").ljust(16, "0"),
                label="argo/table",
                daily_cap_micros=None,
                total_cap_micros=None,
                metadata={},
                created_at=NOW - timedelta(days=1),
                expires_at=NOW + H,
            )
            await store.create_budget(budget, TEST_EVENT)
            key = replace(
                key_record(key_id),
                budget_id=budget.budget_id,
                max_per_caller_micros=5 * MICROS,
            )
            await store.create_key(key, TEST_EVENT)
            call = reservation(key, NOW - timedelta(minutes=10), 3 * MICROS, "body", tag="k.pod")
            admitted = await store.reserve(call)
            if swept:
                assert await store.sweep(NOW) >= 1
            if answered is not None:
                await store.settle(outcome(call, admitted.audit_id, settled, answered=answered))
            view = await store.get_key(key.key_id, NOW)
            budget_view = await store.get_budget(budget.budget_id, NOW)
            assert view is not None and budget_view is not None
            for usage in (view.usage, budget_view.usage):
                assert (usage.spent_micros, usage.reserved_micros) == (after, 0), name
                assert usage.total_micros == after
            # The caller's spend is `after` too: a call of one micro-dollar more than what it
            # has left is over its cap, and one of what it has left is not.
            left = 5 * MICROS - after
            over = await store.reserve(reservation(key, NOW, left + 1, "over", tag="k.pod"))
            assert over.decision is Decision.CALLER_CAP_HIT, name
            within = await store.reserve(reservation(key, NOW, left, "within", tag="k.pod"))
            assert within.decision is Decision.FORWARDED, name
        finally:
            await store.close()

    asyncio.run(run())


LIFE_ROWS = [
    # (name, key revoked, key expires in, budget: None or (revoked, expires in))
    ("a live key on a live budget", False, H, (False, H), None),
    ("a live key without a budget", False, H, None, None),
    ("a revoked key", True, H, (False, H), Decision.REVOKED),
    ("an expired key", False, timedelta(0), None, Decision.EXPIRED),
    ("a revoked budget", False, H, (True, H), Decision.BUDGET_REVOKED),
    ("an expired budget", False, H, (False, -timedelta(seconds=1)), Decision.BUDGET_EXPIRED),
]


@pytest.mark.parametrize(
    "name,revoked,expires_in,budget,expect", LIFE_ROWS, ids=[r[0] for r in LIFE_ROWS]
)
def test_the_cheap_liveness_check_agrees_with_the_ledger(
    backend: str,
    name: str,
    revoked: bool,
    expires_in: timedelta,
    budget: tuple[bool, timedelta] | None,
    expect: Decision | None,
) -> None:
    """What the pipeline reads before a pricing lookup (`Store.admit_lookup`) is the ledger's
    rule 1: the same answer as the reservation, on both backends."""

    async def run() -> None:
        store = open_store(backend)
        await store.open()
        try:
            key_id = f"vk_life{[r[0] for r in LIFE_ROWS].index(name)}"
            budget_id = None
            if budget is not None:
                budget_id = "bg_" + key_id
                await store.create_budget(
                    BudgetRecord(
                        budget_id=budget_id,
                        label="argo/table",
                        daily_cap_micros=None,
                        total_cap_micros=None,
                        metadata={},
                        created_at=NOW - timedelta(days=1),
                        expires_at=NOW + budget[1],
                    ),
                    TEST_EVENT,
                )
                if budget[0]:
                    await store.revoke_budget(budget_id, NOW - timedelta(seconds=1), TEST_EVENT)
            key = replace(key_record(key_id, expires_in=expires_in), budget_id=budget_id)
            await store.create_key(key, TEST_EVENT)
            if revoked:
                await store.revoke_key(key_id, NOW - timedelta(seconds=1), TEST_EVENT)
            expected = None if expect is None else (expect, 0)
            assert await store.check_lookup(key, NOW) == expected, name  # (no rate: a read)
            assert await store.admit_lookup(key, NOW) == expected, name
            admitted = await store.reserve(reservation(key, NOW, 0, "life"))
            assert admitted.decision == (expect or Decision.FORWARDED), name
        finally:
            await store.close()

    asyncio.run(run())


# What the pipeline asks before each lookup with the real key (`Store.admit_lookup`): rule 0,
# then rule 1 (above), then rule 8 with two places (the lookup and its call), counting it.
# (name, rate, its mode, calls in the last second, patched meanwhile, the answer, then a second
# lookup's)
LOOKUP_ROWS = [
    ("room for a lookup and its call, counted", 3, "enforce", 0, False, None, None),
    (
        "the lookup counted fills the rate",
        3,
        "enforce",
        1,
        False,
        None,
        (Decision.RATE_LIMITED, 60),
    ),
    ("no room for its call too", 2, "enforce", 1, False, (Decision.RATE_LIMITED, 60), None),
    ("a rate of one never has room", 1, "enforce", 0, False, (Decision.RATE_LIMITED, 61), None),
    ("a report-only rate lets it go", 1, "report", 1, False, None, None),
    ("judged by older constraints", 3, "enforce", 0, True, (Decision.POLICY_CHANGED, 0), None),
]


@pytest.mark.parametrize(
    "name,rate,mode,before,patched,expect,then", LOOKUP_ROWS, ids=[r[0] for r in LOOKUP_ROWS]
)
def test_a_lookup_is_admitted_by_the_ledgers_rules(
    backend: str,
    name: str,
    rate: int,
    mode: str,
    before: int,
    patched: bool,
    expect: tuple[Decision, int] | None,
    then: tuple[Decision, int] | None,
) -> None:
    async def run() -> None:
        store = open_store(backend)
        await store.open()
        try:
            key_id = f"vk_look{[r[0] for r in LOOKUP_ROWS].index(name)}"
            key = replace(key_record(key_id), constraints=rate_of(rate, mode))
            await store.create_key(key, TEST_EVENT)
            for n in range(before):
                made = await store.reserve(reservation(key, NOW - S, 0, f"before-{n}"))
                assert made.decision is Decision.FORWARDED
            if patched:
                widened = Patch(reason="table", constraints=rate_of(rate, mode), sets_policy=True)
                assert await store.patch(key_id, widened, NOW - S, TEST_EVENT) == "patched"
                # (The read a key without a rate is checked by sees the same revision.)
                assert await store.check_lookup(key, NOW) == expect, name
            assert await store.admit_lookup(key, NOW) == expect, name
            if expect is None:  # counted: the next one sees it
                assert await store.admit_lookup(key, NOW) == then, name
        finally:
            await store.close()

    asyncio.run(run())
