"""The proxy against the money model (docs/guarantees.md), on random sequences, both backends.

A hypothesis state machine issues keys and budgets with every cap kind and with constraints
(customers, currencies, recipient numbers and domains), lets time pass across window edges, sends
Stripe, Twilio and Resend calls from many pods and fan-out items (with and without idempotency keys,
retried from new pods) to customers, numbers and domains within and outside them, confirms (some
padded with `amount_to_confirm`) and captures intents (all they hold) as their payer, as a key on
the same budget and as another run's key (and intents made without the proxy), sends texts with
media (billed as one MMS, or as the SMS MMS Converter sends) and scheduled ones, moves intents to
other customers, refunds, revokes, loses answers and settlements (a crash between reserve and
settle) and sweeps. Each call goes through the real pipeline and store (in-process,
`build_app(upstream=...)`) to vendors that bill (`billing.py`), and through the reference model
(`reference.py`). After every step:

- the proxy's decision is the model's;
- the money the vendors moved on behalf of each key, budget and fan-out item stays within each of
  its caps in every 24-hour window (and over its life), whatever the proxy counted;
- no request of a dead key, and no refused, replayed or deduplicated call, reached a vendor;
- nothing outside a constraint reached a vendor: every request the vendors received for a key
  with enforced constraints (its own or its budget's) paid or messaged only whom they admit, and
  no `constraint_violated` audit row reserved or spent anything;
- no 60 seconds hold more requests at the vendors (forwarded calls and the proxy's lookups) for a
  key or budget than its enforced `max_calls_per_minute`; a `rate_limited` call is a 429 that
  reserved and spent nothing and forwarded nothing (a refused lookup reached no vendor either);
- an issuer's constraints bind what it issues (inherited, and so checked by the invariant
  above) and what it patches: narrowing is always allowed, a loosening (a cap raised, the
  constraints widened or removed) only within its whole policy, its constraints included;
- report mode changes no outcome: each decision (and each lookup at a vendor) is the one the
  model takes with the report-only constraints and rates removed, and the audit row's `reported`
  says exactly what they would have refused, or that a customer went unchecked;
- distinct calls were never merged (each got its own object); a retried call moved nothing twice;
- an idempotency key reaches a vendor scoped to the key's issuer, never as the caller sent it, so
  the vendor's store (the account's) never replays one scope's call to another;
- what the proxy counts for each key and budget is what the model counts, and the audit rows'
  settled amounts add up to it;
- no 5xx but the faults the machine injected.

`make test` runs a bounded number of examples; `make soak-model` runs many more and prints its
seed (KEYBRAKE_MODEL_EXAMPLES, KEYBRAKE_MODEL_SEED).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from starlette.testclient import TestClient

from keybrake.proxy.app import build_app
from keybrake.proxy.errors import StoreUnavailable
from keybrake.proxy.settings import Settings
from keybrake.proxy.store import open_store
from tests.model import billing
from tests.model.reference import (
    CENT,
    CONSTRAINT_FIELDS,
    CONSTRAINT_VIOLATED,
    CONVERTER_LINK_COUNTED,
    DEAD,
    EMAIL,
    FORWARDED,
    MMS,
    RATE_LIMITED,
    RATE_NOTE,
    RATE_SECONDS,
    SEGMENT,
    Budget,
    Call,
    Constraints,
    Key,
    Model,
    Policy,
    admits,
    bucket,
    seconds,
    within,
)

ADMIN = "kba_model_admin_token_0123456789"
START = datetime(2026, 11, 30, 22, 10, tzinfo=UTC)  # two hours before midnight
SOAK = "KEYBRAKE_MODEL_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("KEYBRAKE_MODEL_EXAMPLES", "15"))
STEPS = int(os.environ.get("KEYBRAKE_MODEL_STEPS", "40"))
ENDPOINTS = {
    "stripe": [
        "POST /v1/payment_intents",
        "POST /v1/payment_intents/*/confirm",
        "POST /v1/payment_intents/*/capture",
        "POST /v1/payment_intents/*/increment_authorization",
        "POST /v1/payment_intents/*",
        "POST /v1/refunds",
    ],
    "twilio": ["POST /2010-04-01/Accounts/*/Messages.json"],
    "resend": ["POST /emails", "POST /emails/batch"],
}
PLACEHOLDER_SID = "AC" + "0" * 32
CONNECTED = "acct_1Connected"
SEEN: Counter[tuple[str, str, str]] = Counter()  # (vendor, endpoint, decision): what ran
# How an audit row's note begins for each finding of the report-only constraints (the model's
# `report`): a value outside them, or a customer only a lookup of its own could have read.
REPORT_PREFIXES = {
    "constraint": "constraint_violated: ",
    "unchecked": "constraint_unchecked: customers: not checked",
}
# Amounts repeat often, so that equal bodies from different items and pods meet.
AMOUNTS = st.one_of(st.sampled_from([100, 500, 2000]), st.integers(1, 3000))
CAPS = st.one_of(st.none(), st.integers(1, 40).map(lambda usd: usd * 1_000_000))
# Constraints (docs/guarantees.md, section 6) a key or budget may be issued with (one in three):
# values of each field the model draws, spelled as an operator might. A key takes its vendor's.
CONSTRAINT_VALUES = {
    "customers": ["cus_a", "cus_b", "cus_c"],
    "currencies": ["usd", "eur", "USD"],
    "recipients": ["+4420*", "+442071838750", "+1500555*", "+15005550006", "+44*"],
    "recipient_domains": ["example.com", "Example.COM", "mail.example.com", "bücher.example"],
}
CONSTRAINTS = st.one_of(
    st.none(),
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            name: st.lists(st.sampled_from(values), min_size=1, max_size=2, unique=True).map(tuple)
            for name, values in CONSTRAINT_VALUES.items()
        },
    ),
)
# A call rate a key or budget may be issued with (one in three): small, so that the machine fills
# it, enforced or report-only (`"mode"`, which the drawn constraints take too).
RATES = st.one_of(
    st.none(),
    st.none(),
    st.tuples(st.integers(1, 4), st.sampled_from(["enforce", "report"])),
)
Rate = tuple[int, str] | None
# Whom calls pay or message: within and outside what keys are constrained to, and values the
# proxy cannot read exactly (an intent for no customer, a quoted address; a number with spaces,
# which Twilio may route otherwise than its text reads, is refused as unpriceable first).
CUSTOMERS = st.sampled_from([None, *billing.CUSTOMERS])
CURRENCIES = st.sampled_from(["usd", "usd", "eur"])
NUMBERS = st.sampled_from(
    ["+15005550006", "+15005550006", "+442071838750", "+447700900123", "+44 20 7183 8750"]
)
COPIED = st.lists(
    st.sampled_from(
        [
            "x@example.com",
            "Ann <ann@Example.COM>",
            "x@mail.example.com",
            "x@other.org",
            "x@Bücher.example",
            '"a b"@example.com',
        ]
    ),
    max_size=2,
)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


class FlakyStore:
    """The store, whose next settle can be made to fail: the call was forwarded, and its
    outcome is not written (a crash between reserve and settle)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.fail_next_settle = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def settle(self, settlement: Any) -> None:
        if self.fail_next_settle:
            self.fail_next_settle = False
            raise StoreUnavailable("injected: the process died before settling")
        await self._store.settle(settlement)


@dataclass
class Sent:
    """A call as sent, and what the model expects of it."""

    call: Call
    at: datetime
    decision: str
    response_id: str | None = None


@dataclass
class Moved:
    owner: str  # key, budget, or "key/caller"
    at: datetime
    micros: int
    # The owner's caps when it moved (24 hours, life): a cap lowered later binds what comes
    # after, not what had already moved.
    caps: tuple[int | None, int | None] = (None, None)


@dataclass
class World:
    """What the machine holds across steps of one example."""

    client: TestClient
    clock: Clock
    vendors: billing.BillingUpstream
    store: FlakyStore
    settings: Settings
    model: Model = field(default_factory=Model)
    vault_keys: dict[str, str] = field(default_factory=dict)  # key id -> vault key
    calls: list[Sent] = field(default_factory=list)
    moved: list[Moved] = field(default_factory=list)
    seen_ids: set[str] = field(default_factory=set)
    call_ids: Iterator[int] = field(default_factory=itertools.count)
    issuers: dict[str, tuple[str, Policy]] = field(default_factory=dict)  # id -> (token, policy)
    # Each idempotency key as it reached a vendor -> the issuer whose key first sent it (None:
    # the admin): a vendor's store is the account's, so one key must never serve two scopes.
    vendor_idempotency: dict[str, str | None] = field(default_factory=dict)
    # (payer, object) -> the payer's caps when it paid for the object
    paid_caps: dict[tuple[str, str], tuple[int | None, int | None]] = field(default_factory=dict)
    # Each request a vendor received for a key's call, by key id (attributed by request order:
    # what reached the vendors while the proxy answered that call).
    # (With the key's and its budget's enforced constraints when it was made.)
    delivered: list[tuple[str, billing.Sent, list[Constraints]]] = field(default_factory=list)
    # Every request a vendor received (lookups too), by key id and when (the machine's clock),
    # with the call rates of the key and its budget then: owner id -> (limit, report-only).
    reached: list[tuple[str, datetime, billing.Sent, dict[str, tuple[int, bool]]]] = field(
        default_factory=list
    )
    # Another replica on the same database: it patches constraints while the replica serving
    # the calls holds them cached.
    other: TestClient | None = None
    # The newest audit row before this example (PostgreSQL: earlier examples', in the same
    # database): the invariants read only the rows after it.
    audit_floor: int = 0


def form(**fields: Any) -> bytes:
    from urllib.parse import urlencode

    return urlencode(fields).encode()


class MoneyMachine(RuleBasedStateMachine):
    stripe_keys = Bundle("stripe_keys")
    twilio_keys = Bundle("twilio_keys")
    resend_keys = Bundle("resend_keys")
    keys = st.one_of(stripe_keys, twilio_keys, resend_keys)
    budgets = Bundle("budgets")
    issuers = Bundle("issuers")
    intents = Bundle("intents")
    world: World  # set by the test before the run

    # -- issuing ---------------------------------------------------------------------------------

    @rule(
        target=budgets,
        daily=CAPS,
        total=CAPS,
        hours=st.integers(1, 60),
        constrain=CONSTRAINTS,
        rate=RATES,
    )
    def issue_budget(
        self,
        daily: int | None,
        total: int | None,
        hours: int,
        constrain: Constraints | None,
        rate: Rate = None,
    ) -> str:
        w = self.world
        body: dict[str, Any] = {
            "agent_run_label": f"argo/run-{len(w.model.budgets)}",
            "expires_in": f"{hours}h",
        }
        constraints = _constraints_into(body, constrain, None, rate)
        if daily is not None:
            body["daily_usd_cap"] = str(Decimal(daily) / 1_000_000)
        if total is not None:
            body["total_usd_cap"] = str(Decimal(total) / 1_000_000)
        if daily is None and total is None:
            body["total_usd_cap"] = "100"
            total = 100_000_000
        answer = w.client.post("/vault/budgets", json=body)
        assert answer.status_code == 201, answer.text
        budget_id = answer.json()["budget_id"]
        expires = w.clock.now + timedelta(hours=hours)
        w.model.budgets[budget_id] = Budget(
            budget_id,
            daily,
            total,
            expires,
            constraints=constraints,
            rate=rate[0] if rate else None,
            report=rate is not None and rate[1] == "report",
        )
        return str(budget_id)

    KEY_SPEC = {
        "daily": CAPS,
        "total": CAPS,
        "per_call": CAPS,
        "per_caller": CAPS,
        "dedupe": st.sampled_from([0, 600, 600, 3600]),
        "hours": st.integers(1, 60),
        "budget": st.one_of(st.none(), budgets),
        "connected": st.booleans(),  # (Stripe) it may act on a connected account
        "constrain": CONSTRAINTS,  # those of the key's vendor's fields
        "rate": RATES,  # (its mode is its constraints' too)
    }

    @rule(target=stripe_keys, **KEY_SPEC)
    def issue_stripe_key(self, **spec: Any) -> Any:
        return self._issue_key("stripe", **spec)

    @rule(target=twilio_keys, **KEY_SPEC)
    def issue_twilio_key(self, **spec: Any) -> Any:
        return self._issue_key("twilio", **spec)

    @rule(target=resend_keys, **KEY_SPEC)
    def issue_resend_key(self, **spec: Any) -> Any:
        return self._issue_key("resend", **spec)

    def _issue_key(
        self,
        vendor: str,
        daily: int | None,
        total: int | None,
        per_call: int | None,
        per_caller: int | None,
        dedupe: int,
        hours: int,
        budget: str | None,
        connected: bool,
        constrain: Constraints | None = None,
        rate: Rate = None,
    ) -> Any:
        w = self.world
        accounts = (CONNECTED,) if connected and vendor == "stripe" else ()
        body: dict[str, Any] = {
            "allowed_accounts": list(accounts),
            "vendor": vendor,
            "agent_run_label": f"argo/run-{len(w.model.keys)}",
            "allowed_endpoints": ENDPOINTS[vendor],
            "dedupe_window": f"{dedupe}s",
        }
        constraints = _constraints_into(body, constrain, vendor, rate)
        for name, value in (
            ("daily_usd_cap", daily),
            ("total_usd_cap", total),
            ("max_usd_per_call", per_call),
            ("max_usd_per_caller", per_caller),
        ):
            if value is not None:
                body[name] = str(Decimal(value) / 1_000_000)
        expires = w.clock.now + timedelta(hours=hours)
        if budget is not None:
            body["budget_id"] = budget
            body["agent_run_label"] = "argo/run-b"
            expires = min(expires, w.model.budgets[budget].expires)
            body["expires_in"] = f"{int((expires - w.clock.now).total_seconds())}s"
        else:
            body["expires_in"] = f"{hours}h"
            if daily is None and total is None:
                body["daily_usd_cap"] = "20"
                daily = 20_000_000
        answer = w.client.post("/vault/keys", json=body)
        if budget is not None and answer.status_code != 201:
            # A budget that ended no longer takes keys (and says so): nothing was issued.
            assert answer.status_code in (400, 409), answer.text
            return multiple()
        assert answer.status_code == 201, answer.text
        issued = answer.json()
        w.vault_keys[issued["key_id"]] = issued["vault_key"]
        w.model.keys[issued["key_id"]] = Key(
            issued["key_id"],
            vendor,
            daily,
            total,
            per_call,
            per_caller,
            timedelta(seconds=dedupe),
            expires,
            budget,
            accounts=accounts,
            constraints=constraints,
            rate=rate[0] if rate else None,
            report=rate is not None and rate[1] == "report",
        )
        return issued["key_id"]

    # -- issuers: scoped tokens whose policy bounds what they issue and patch ---------------------

    @rule(target=issuers, max_daily=CAPS, max_total=CAPS, constrain=CONSTRAINTS)
    def create_issuer(
        self, max_daily: int | None, max_total: int | None, constrain: Constraints | None = None
    ) -> str:
        w = self.world
        # (Unique across examples: on PostgreSQL they share one database.)
        name = f"issuer-{uuid.uuid4().hex[:12]}"
        body: dict[str, Any] = {"name": name, "label_prefix": "argo/"}
        if max_daily is not None:
            body["max_daily_usd_cap"] = str(Decimal(max_daily) / 1_000_000)
        if max_total is not None:
            body["max_total_usd_cap"] = str(Decimal(max_total) / 1_000_000)
        bound = _constraints_into(body, constrain, None)  # what it issues is held to them
        answer = w.client.post("/vault/issuers", json=body)
        assert answer.status_code == 201, answer.text
        issued = answer.json()
        policy = Policy(max_daily, max_total, bound)
        w.issuers[issued["issuer_id"]] = (issued["issuer_token"], policy)
        return str(issued["issuer_id"])

    @rule(target=budgets, issuer=issuers, daily=CAPS, total=CAPS, hours=st.integers(1, 60))
    def issue_budget_as_issuer(
        self, issuer: str, daily: int | None, total: int | None, hours: int
    ) -> Any:
        w = self.world
        token, policy = w.issuers[issuer]
        body: dict[str, Any] = {"agent_run_label": "argo/run-i", "expires_in": f"{hours}h"}
        _caps_into(body, daily=daily, total=total)
        answer = w.client.post(
            "/vault/budgets", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        allowed = (daily is not None or total is not None) and policy.allows(daily, total, None)
        if not allowed:
            assert answer.status_code in (400, 403), (answer.text, policy, daily, total)
            return multiple()
        assert answer.status_code == 201, (answer.text, policy, daily, total)
        budget_id = answer.json()["budget_id"]
        expires = w.clock.now + timedelta(hours=hours)
        w.model.budgets[budget_id] = Budget(
            budget_id, daily, total, expires, issuer=issuer, constraints=policy.bound(None)
        )  # (issued without its own: the issuer's)
        return budget_id

    @rule(
        target=stripe_keys,
        issuer=issuers,
        daily=CAPS,
        total=CAPS,
        dedupe=st.sampled_from([0, 600]),
        on_budget=st.booleans(),
    )
    def issue_stripe_key_as_issuer(
        self, issuer: str, daily: int | None, total: int | None, dedupe: int, on_budget: bool
    ) -> Any:
        w = self.world
        token, policy = w.issuers[issuer]
        budget = None
        if on_budget:
            mine = [
                b
                for b in w.model.budgets.values()
                if b.issuer == issuer and not b.revoked and b.expires > w.clock.now
            ]
            budget = mine[-1] if mine else None
        body: dict[str, Any] = {
            "vendor": "stripe",
            "agent_run_label": "argo/run-i",
            "allowed_endpoints": ENDPOINTS["stripe"],
            "dedupe_window": f"{dedupe}s",
        }
        _caps_into(body, daily=daily, total=total)
        expires = w.clock.now + timedelta(hours=2)
        if budget is not None:
            body["budget_id"] = budget.id
            expires = min(expires, budget.expires)
        body["expires_in"] = f"{int((expires - w.clock.now).total_seconds())}s"
        answer = w.client.post(
            "/vault/keys", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        capped = daily is not None or total is not None or budget is not None
        allowed = capped and policy.allows(daily, total, budget)
        if not allowed:
            assert answer.status_code in (400, 403), (answer.text, policy, daily, total, budget)
            return multiple()
        assert answer.status_code == 201, (answer.text, policy, daily, total, budget)
        issued = answer.json()
        w.vault_keys[issued["key_id"]] = issued["vault_key"]
        w.model.keys[issued["key_id"]] = Key(
            issued["key_id"],
            "stripe",
            daily,
            total,
            None,
            None,
            timedelta(seconds=dedupe),
            expires,
            budget.id if budget else None,
            issuer=issuer,
            constraints=policy.bound("stripe"),  # (issued without its own: the issuer's)
        )
        return issued["key_id"]

    @rule(key=keys, daily=CAPS, total=CAPS, fields=st.sampled_from(["daily", "total", "both"]))
    def patch_key(self, key: str, daily: int | None, total: int | None, fields: str) -> None:
        """Raise or lower a key's caps: as its issuer (held to its policy) or, for a key the
        admin issued, as the admin."""
        w = self.world
        model_key = w.model.keys[key]
        new_daily = daily if fields in ("daily", "both") else None
        new_total = total if fields in ("total", "both") else None
        if new_daily is None and new_total is None:
            return
        body: dict[str, Any] = {"reason": "the model test"}
        _caps_into(body, daily=new_daily, total=new_total)
        headers = {}
        if model_key.issuer is not None:
            headers["Authorization"] = f"Bearer {w.issuers[model_key.issuer][0]}"
        answer = w.client.patch(f"/vault/keys/{key}", json=body, headers=headers)
        after = (
            new_daily if new_daily is not None else model_key.daily,
            new_total if new_total is not None else model_key.total,
        )
        if w.model.dead(model_key, w.clock.now) is not None:
            assert answer.status_code == 409, answer.text
            return
        if model_key.issuer is not None:
            policy = w.issuers[model_key.issuer][1]
            budget = w.model.budgets[model_key.budget] if model_key.budget else None
            before = (model_key.daily, model_key.total)
            held = model_key.constraints
            if not policy.allows_patch(before, after, budget, held, model_key.vendor):
                assert answer.status_code == 403, (answer.text, policy, after)
                return
        assert answer.status_code == 200, (answer.text, after)
        model_key.daily, model_key.total = after

    @rule(subject=st.one_of(keys, budgets), constrain=CONSTRAINTS, rate=RATES)
    def patch_constraints(self, subject: str, constrain: Constraints | None, rate: Rate) -> None:
        """Another replica replaces a key's or budget's constraints, call rate and mode included
        (or removes them), as the admin: the replica serving the calls holds the old ones in its
        cache, and must judge its next call by the new ones (decisions, rule 0)."""
        w = self.world
        owner: Key | Budget
        if subject in w.model.keys:
            owner = w.model.keys[subject]
            vendor: str | None = owner.vendor
            dead = w.model.dead(owner, w.clock.now) in ("revoked", "expired")
            path = f"/vault/keys/{subject}"
        else:
            owner = w.model.budgets[subject]
            vendor, path = None, f"/vault/budgets/{subject}"
            dead = owner.revoked or owner.expires <= w.clock.now
        body: dict[str, Any] = {"reason": "the model test"}
        kept = _constraints_into(body, constrain, vendor, rate)
        body.setdefault("constraints", {})  # (none at all)
        answer = self._other_replica().patch(path, json=body)
        if dead:
            assert answer.status_code == 409, answer.text
            return
        assert answer.status_code == 200, answer.text
        owner.constraints = kept
        owner.rate = rate[0] if rate else None
        owner.report = rate is not None and rate[1] == "report"

    def _other_replica(self) -> TestClient:
        assert self.world.other is not None
        return self.world.other

    @rule(key=stripe_keys, constrain=CONSTRAINTS)
    def patch_constraints_as_its_issuer(self, key: str, constrain: Constraints | None) -> None:
        """An issuer replaces its key's constraints (or removes them: it then holds the
        issuer's): narrowing them is always allowed; widening them is a loosening, which must
        leave the key within the whole policy, the issuer's constraints included."""
        w = self.world
        model_key = w.model.keys[key]
        if model_key.issuer is None or model_key.rate is not None:
            return
        token, policy = w.issuers[model_key.issuer]
        body: dict[str, Any] = {"reason": "the model test"}
        own = _constraints_into(body, constrain, "stripe")
        body.setdefault("constraints", {})  # (none of its own)
        answer = w.client.patch(
            f"/vault/keys/{key}", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        if w.model.dead(model_key, w.clock.now) in ("revoked", "expired"):
            assert answer.status_code == 409, answer.text
            return
        after = own if own is not None else policy.bound("stripe")
        budget = w.model.budgets[model_key.budget] if model_key.budget else None
        caps = (model_key.daily, model_key.total)
        loosens = not within(after, model_key.constraints)
        if loosens and not (policy.allows(*caps, budget) and within(after, policy.bound("stripe"))):
            assert answer.status_code == 403, (answer.text, policy, after)
            return
        assert answer.status_code == 200, (answer.text, after)
        model_key.constraints = after
        model_key.report = False

    @rule(key=stripe_keys, which=st.sampled_from(["daily", "total"]))
    def patch_a_key_past_its_issuers_bound(self, key: str, which: str) -> None:
        """An issuer raising one of a key's caps above a maximum of its policy (the 24-hour
        one through the total, too): refused unless something else still bounds the key."""
        w = self.world
        model_key = w.model.keys[key]
        if model_key.issuer is None:
            return
        policy = w.issuers[model_key.issuer][1]
        most = max((m for m in (policy.max_daily, policy.max_total) if m is not None), default=0)
        raised = most + 1_000_000
        self.patch_key(key, raised, raised, which)

    @rule(
        target=stripe_keys,
        max_daily=CAPS,
        max_total=CAPS,
        daily=CAPS,
        total=CAPS,
        which=st.sampled_from(["daily", "total"]),
        cents=AMOUNTS,
    )
    def an_issuers_key_patched_then_spent(
        self,
        max_daily: int | None,
        max_total: int | None,
        daily: int | None,
        total: int | None,
        which: str,
        cents: int,
    ) -> Any:
        """A run's issuer issues a key, tries to lift it past its policy, and the run spends."""
        issuer = self.create_issuer(max_daily, max_total)
        key = self.issue_stripe_key_as_issuer(issuer, daily, total, 0, False)
        if not isinstance(key, str):
            return key
        self.patch_a_key_past_its_issuers_bound(key, which)
        for n in range(3):
            self.create_intent(key, cents, False, f"i{n}", "p", "none")
        return key

    @rule(budget=budgets, daily=CAPS, total=CAPS)
    def patch_budget_as_its_issuer(self, budget: str, daily: int | None, total: int | None) -> None:
        w = self.world
        model_budget = w.model.budgets[budget]
        if model_budget.issuer is None or (daily is None and total is None):
            return
        token, policy = w.issuers[model_budget.issuer]
        body: dict[str, Any] = {"reason": "the model test"}
        _caps_into(body, daily=daily, total=total)
        answer = w.client.patch(
            f"/vault/budgets/{budget}", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        after = (
            daily if daily is not None else model_budget.daily,
            total if total is not None else model_budget.total,
        )
        if model_budget.revoked or model_budget.expires <= w.clock.now:
            assert answer.status_code == 409, answer.text
            return
        before = (model_budget.daily, model_budget.total)
        if not policy.allows_patch(before, after, None, model_budget.constraints):
            assert answer.status_code == 403, (answer.text, policy, after)
            return
        assert answer.status_code == 200, (answer.text, after)
        model_budget.daily, model_budget.total = after

    # -- time and faults -------------------------------------------------------------------------

    @rule(minutes=st.sampled_from([1, 4, 6, 11, 59, 61, 180, 23 * 60, 25 * 60]))
    def time_passes(self, minutes: int) -> None:
        self.world.clock.now += timedelta(minutes=minutes)

    @rule(secs=st.sampled_from([1, 30, 59, 60, 61]))
    def seconds_pass(self, secs: int) -> None:
        """Across the edges of call rates' windows (the current second and the 60 before)."""
        self.world.clock.now += timedelta(seconds=secs)

    @rule()
    def lose_the_next_stripe_answer(self) -> None:
        self.world.vendors.lose_next_answer = True

    @rule()
    def crash_before_the_next_settle(self) -> None:
        self.world.store.fail_next_settle = True

    @rule()
    def maintenance(self) -> None:
        """What every replica does every 30 seconds (sweep, forget old replay tokens, ...)."""
        from keybrake.proxy.app import maintain

        w = self.world
        settings_ = Settings(api_key=ADMIN, database_url="sqlite:///unused")
        portal = w.client.portal
        assert portal is not None
        portal.call(maintain, w.store, settings_, w.clock.now)
        w.model.sweep(w.clock.now)
        w.model.forget_replays(w.clock.now)

    # -- revoking --------------------------------------------------------------------------------

    @rule(key=keys, now=st.integers(0, 3))
    def revoke_key(self, key: str, now: int) -> None:
        """(One time in four: revoking is a rule among many, and a revoked key stays drawn.)"""
        if now:
            return
        w = self.world
        answer = w.client.delete(f"/vault/keys/{key}")
        assert answer.status_code in (200, 409), answer.text
        w.model.keys[key].revoked = True

    @rule(budget=budgets, now=st.integers(0, 3))
    def revoke_budget(self, budget: str, now: int) -> None:
        if now:
            return
        w = self.world
        answer = w.client.delete(f"/vault/budgets/{budget}")
        assert answer.status_code in (200, 409), answer.text
        w.model.revoke_budget(budget)

    # -- calls -----------------------------------------------------------------------------------

    @rule(
        target=intents,
        key=stripe_keys,
        cents=AMOUNTS,
        manual=st.booleans(),
        item=st.sampled_from([None, "a", "b"]),
        pod=st.sampled_from(["p1", "p2"]),
        idempotency=st.sampled_from(["none", "sdk", "order-1", "order-2"]),
        account=st.sampled_from([None, None, CONNECTED, "acct_1Elsewhere"]),
        customer=CUSTOMERS,
        currency=CURRENCIES,
    )
    def create_intent(
        self,
        key: str,
        cents: int,
        manual: bool,
        item: str | None,
        pod: str,
        idempotency: str,
        account: str | None = None,
        customer: str | None = "cus_a",
        currency: str = "usd",
    ) -> Any:
        body: dict[str, Any] = {"amount": cents, "currency": currency}
        if customer is not None:
            body["customer"] = customer
        if manual:
            body["capture_method"] = "manual"
        call = Call(
            key,
            "stripe",
            "POST",
            "/v1/payment_intents",
            form(**body),
            tag=f"{item}@{pod}" if item else pod,
            gross=cents * billing.MINOR_MICROS[currency],
            account=account,
        )
        self._idempotency(call, idempotency)
        sent = self._send(call, created=True)
        return sent.response_id if sent.response_id in self.world.vendors.intents else multiple()

    @rule(
        key=stripe_keys,
        intent=intents,
        action=st.sampled_from(["confirm", "capture"]),
        partial=st.booleans(),
        padded=st.booleans(),
    )
    def move_an_intents_money(
        self, key: str, intent: str, action: str, partial: bool, padded: bool = False
    ) -> None:
        """A confirm moves the intent's amount, or `amount_to_confirm` (padded: twice it); a
        capture `amount_to_capture`, else all it holds, priced at the larger of its amount and
        amount_capturable."""
        w = self.world
        found = w.vendors.intents.get(intent)
        if found is None:
            return
        body = b""
        minor = billing.MINOR_MICROS[found.currency]
        gross = found.micros
        if action == "confirm" and padded:
            body = form(amount_to_confirm=found.amount * 2)
            gross = found.amount * 2 * minor
        if action == "capture":
            gross = max(found.amount, found.capturable) * minor
        if action == "capture" and partial and found.amount > 1:
            body = form(amount_to_capture=found.amount - 1)
            gross = (found.amount - 1) * minor
        call = Call(
            key,
            "stripe",
            "POST",
            f"/v1/payment_intents/{intent}/{action}",
            body,
            tag="pod-move",
            gross=gross,
            paid_object=intent,
        )
        call.looks_up = True
        self._send(call)

    @rule(
        target=intents,
        payer=stripe_keys,
        mover=stripe_keys,
        cents=st.integers(1, 3000),
        manual=st.booleans(),
        later=st.sampled_from([0, 30, 23 * 60, 25 * 60]),
        customer=CUSTOMERS,
    )
    def pay_then_move(
        self,
        payer: str,
        mover: str,
        cents: int,
        manual: bool,
        later: int,
        customer: str | None = "cus_a",
    ) -> Any:
        """An intent created by one key, and its money moved (confirmed, then captured when
        manual) by the same key, a key on the same budget or another run's, now or later: one
        held to other customers than the intent's is refused."""
        created = self.create_intent(payer, cents, manual, None, "p-pay", "none", customer=customer)
        if not isinstance(created, str):
            return created
        self.world.clock.now += timedelta(minutes=later)
        self.move_an_intents_money(mover, created, "confirm", False)
        if manual:
            self.move_an_intents_money(mover, created, "capture", False)
        return created

    @rule(target=intents, key=stripe_keys, item=st.sampled_from(["a", "b"]))
    def fill_a_cap_exactly(self, key: str, item: str) -> Any:
        """An intent for exactly what the key (and its budget) may still spend: each cap's
        boundary, where `used + cost <= cap` admits and one cent more is refused."""
        w = self.world
        model_key = w.model.keys[key]
        now = w.clock.now
        room = [
            cap - used
            for cap, used in (
                (model_key.daily, w.model.window(key, now)),
                (model_key.total, w.model.life(key)),
                (model_key.per_call, 0),
                (model_key.per_caller, w.model.caller_spend[(key, item)]),
            )
            if cap is not None
        ]
        if model_key.budget is not None:
            budget = w.model.budgets[model_key.budget]
            for cap, used in (
                (budget.daily, w.model.window(budget.id, now)),
                (budget.total, w.model.life(budget.id)),
            ):
                if cap is not None:
                    room.append(cap - used)
        cents = min(room, default=0) // CENT
        if not 0 < cents <= 1_000_000:
            return multiple()
        # For a customer its constraints admit, if any does: the boundary is the caps'.
        customer = next(
            (
                c
                for c in billing.CUSTOMERS
                if all(
                    admits("customers", x["customers"], c)
                    for x in w.model.layers(model_key)
                    if "customers" in x
                )
            ),
            None,
        )
        return self.create_intent(key, cents, False, item, "p-fill", "none", customer=customer)

    @rule(
        target=intents,
        key=stripe_keys,
        cents=AMOUNTS,
        items=st.integers(2, 3),
        idempotency=st.sampled_from(["none", "sdk"]),
        customer=CUSTOMERS,
    )
    def fan_out(
        self, key: str, cents: int, items: int, idempotency: str, customer: str | None = "cus_a"
    ) -> Any:
        """A fan-out step: every item's pod sends the same body (the README's pod example)."""
        created = [
            self.create_intent(
                key, cents, False, f"item-{n}", f"pod-{n}", idempotency, customer=customer
            )
            for n in range(items)
        ]
        return multiple(*(c for c in created if isinstance(c, str)))

    @rule(key=twilio_keys, length=st.sampled_from([5, 161]), to=NUMBERS)
    def text_from_every_item(self, key: str, length: int, to: str = "+15005550006") -> None:
        for item in ("x", "y", "z"):
            self.text(key, length, item, to)

    @rule(
        key=stripe_keys,
        intent=intents,
        cents=st.one_of(AMOUNTS, st.none()),
        customer=st.one_of(st.none(), st.sampled_from(billing.CUSTOMERS)),
    )
    def update_an_intent(
        self, key: str, intent: str, cents: int | None, customer: str | None = None
    ) -> None:
        """A new amount is priced in full, and marked paid by this key like a creation. A new
        customer moves no money, but is whom the intent will charge: a key held to customers is
        held to the intent's and the new one's."""
        found = self.world.vendors.intents.get(intent)
        if found is None or (cents is None and customer is None):
            return
        fields: dict[str, Any] = {}
        if cents is not None:
            fields["amount"] = cents
        if customer is not None:
            fields["customer"] = customer
        call = Call(
            key,
            "stripe",
            "POST",
            f"/v1/payment_intents/{intent}",
            form(**fields),
            tag="pod-update",
            gross=0 if cents is None else cents * billing.MINOR_MICROS[found.currency],
            priced=cents is not None,
        )
        call.looks_up = cents is not None  # to price a new amount in the intent's currency
        self._send(call, marks=intent if cents is not None else None)

    @rule(key=stripe_keys, intent=intents, more=st.integers(1, 1500))
    def increment_an_authorization(self, key: str, intent: str, more: int) -> None:
        """`amount` is the new total: the difference is priced, and marked paid."""
        found = self.world.vendors.intents.get(intent)
        if found is None:
            return
        call = Call(
            key,
            "stripe",
            "POST",
            f"/v1/payment_intents/{intent}/increment_authorization",
            form(amount=found.amount + more),
            tag="pod-more",
            gross=more * billing.MINOR_MICROS[found.currency],
        )
        call.looks_up = True
        self._send(call, marks=intent)

    @rule(key=stripe_keys, intent=intents, cents=st.one_of(st.none(), st.integers(1, 500)))
    def refund(self, key: str, intent: str, cents: int | None) -> None:
        w = self.world
        found = w.vendors.intents.get(intent)
        if found is None:
            return
        fields: dict[str, Any] = {"payment_intent": intent}
        if cents is not None:
            fields["amount"] = cents
        refunded = cents if cents is not None else (found.received or found.amount)
        gross = refunded * billing.MINOR_MICROS[found.currency]
        call = Call(
            key, "stripe", "POST", "/v1/refunds", form(**fields), tag="pod-refund", gross=gross
        )
        call.looks_up = True
        self._send(call)

    @rule(
        key=twilio_keys,
        length=st.sampled_from([5, 160, 161, 400]),
        item=st.sampled_from(["x", "y"]),
        to=NUMBERS,
        media=st.booleans(),
        scheduled=st.sampled_from([False, False, False, True]),
    )
    def text(
        self,
        key: str,
        length: int,
        item: str,
        to: str = "+15005550006",
        media: bool = False,
        scheduled: bool = False,
    ) -> None:
        """An SMS bills its segments; a media message one MMS, or, to a carrier without MMS
        (the model's: a number not ending in 6), the SMS of its body and a link that MMS
        Converter sends instead: priced at the larger, so neither outruns the caps."""
        fields = {"To": to, "From": "+15005550001", "Body": "a" * length}
        segments = 1 if length <= 160 else -(-length // 153)
        gross = segments * SEGMENT
        if media:
            fields["MediaUrl"] = "https://media.example/a.png"
            counted = length + CONVERTER_LINK_COUNTED
            gross = max(MMS, (1 if counted <= 160 else -(-counted // 153)) * SEGMENT)
        if scheduled:  # refused: Twilio would send and bill it up to 35 days later
            fields["SendAt"] = "2026-12-31T12:00:00Z"
        body = form(**fields)
        path = f"/2010-04-01/Accounts/{PLACEHOLDER_SID}/Messages.json"
        call = Call(
            key,
            "twilio",
            "POST",
            path,
            body,
            tag=f"{item}@pod-t",
            gross=gross,
            replays=False,
        )
        self._send(call)

    @rule(
        key=resend_keys,
        recipients=st.lists(st.integers(1, 4), min_size=1, max_size=3),
        batch=st.booleans(),
        copied=COPIED,
    )
    def email(
        self, key: str, recipients: list[int], batch: bool, copied: list[str] | None = None
    ) -> None:
        """Emails to example.com, the last one copied (cc) to `copied`: other domains, another
        spelling, a subdomain, an address the proxy cannot read as one."""
        emails: list[dict[str, Any]] = [
            {
                "from": "a@example.com",
                "to": [f"u{i}-{n}@example.com" for n in range(count)],
                "subject": "s",
                "text": "t",
            }
            for i, count in enumerate(recipients)
        ]
        if not batch:
            emails = emails[:1]
        if copied:
            emails[-1]["cc"] = list(copied)
        body = json.dumps(emails if batch else emails[0]).encode()
        path = "/emails/batch" if batch else "/emails"
        gross = sum(len(e["to"]) + len(e.get("cc", ())) for e in emails) * EMAIL
        call = Call(key, "resend", "POST", path, body, tag="pod-mail", gross=gross)
        self._send(call)

    @rule(data=st.data())
    def retry_from_a_new_pod(self, data: st.DataObject) -> None:
        """An Argo retry: the same call from a new pod (a new SDK idempotency key, if any)."""
        w = self.world
        if not w.calls:
            return
        earlier = data.draw(st.sampled_from(w.calls[-5:]))
        call = earlier.call
        if call.key not in w.model.keys:
            return
        tag = call.tag
        if tag is not None and "@" in tag:
            tag = tag.partition("@")[0] + "@pod-retry"
        again = Call(
            call.key,
            call.vendor,
            call.method,
            call.path,
            call.body,
            tag=tag,
            idempotency_key=call.idempotency_key,
            sdk_key=call.sdk_key,
            gross=call.gross,
            paid_object=call.paid_object,
            replays=call.replays,
            looks_up=call.looks_up,
            account=call.account,
            priced=call.priced,
        )
        if call.sdk_key:
            again.idempotency_key = str(uuid.uuid4())
        if call.vendor == "stripe" and call.paid_object is not None:
            found = w.vendors.intents.get(call.paid_object)
            if found is None:
                return
        if call.vendor == "stripe" and call.looks_up:
            # Priced by the object as the vendor holds it now (an update may have changed its
            # amount since): as the rule that first sent it prices it.
            again.gross = self._gross_now(call)
        self._send(again, created=call.path == "/v1/payment_intents")

    def _gross_now(self, call: Call) -> int:
        named = dict(parse_qsl(call.body.decode()))
        parts = call.path.strip("/").split("/")
        intent = named.get("payment_intent") if parts[1] == "refunds" else parts[2]
        found = self.world.vendors.intents.get(intent or "")
        if found is None:
            return call.gross
        minor = billing.MINOR_MICROS[found.currency]
        if parts[1] == "refunds" and "amount" not in named:
            return (found.received or found.amount) * minor
        if parts[-1] == "confirm" and "amount_to_confirm" not in named:
            return found.micros
        if parts[-1] == "capture" and "amount_to_capture" not in named:
            return max(found.amount, found.capturable) * minor
        if parts[-1] == "increment_authorization":
            return max(0, int(named["amount"]) - found.amount) * minor
        return call.gross

    # -- sending through the proxy and the model -------------------------------------------------

    def _idempotency(self, call: Call, kind: str) -> None:
        if kind == "sdk":
            call.idempotency_key, call.sdk_key = str(uuid.uuid4()), True
        elif kind != "none":
            call.idempotency_key = kind

    def _send(
        self,
        call: Call,
        *,
        created: bool = False,
        marks: str | None = None,
    ) -> Sent:
        """Send `call` through the proxy and the model, and hold them to each other. `marks`:
        the object a 2xx of it pays for besides what it creates."""
        w = self.world
        now = w.clock.now
        self._subjects(call)
        # Report mode changes no outcome: the decision without the report-only policies first
        # (it counts nothing), then the one the proxy must take.
        plain = w.model.decide(call, now, reports=False, commit=False)
        expect = w.model.decide(call, now)
        SEEN[(call.vendor, call.path.rsplit("/", 1)[-1], expect.decision)] += 1
        sent_before, moved_before = len(w.vendors.sent), len(w.vendors.moved)
        lose = w.vendors.lose_next_answer and call.vendor == "stripe"
        if not lose:
            w.vendors.lose_next_answer = False
        crash = w.store.fail_next_settle
        answer = self._post(call)
        w.store.fail_next_settle = False
        w.vendors.lose_next_answer = False
        row = self._newest_audit(call.key)
        call_id = next(w.call_ids)
        new_sent = w.vendors.sent[sent_before:]
        new_moved = w.vendors.moved[moved_before:]
        sent = Sent(call, now, expect.decision)
        w.calls.append(sent)
        # What reached the vendors while the proxy answered this call was this call's: checked
        # against its key's constraints first, so that a breach is named as one.
        posts = [s for s in new_sent if s.method == "POST"]
        layers = w.model.layers(w.model.keys[call.key])  # (as they stand when it is made)
        w.delivered.extend((call.key, s, layers) for s in posts)
        rates = {o.id: (o.rate, o.report) for o in w.model.rated(w.model.keys[call.key])}
        w.reached.extend((call.key, now, s, rates) for s in new_sent)
        self._within_constraints(call.key, posts, layers)
        self._rates_and_reports(call, expect, plain, answer, row, new_sent)

        if expect.decision != FORWARDED:
            assert row["decision"] == expect.decision, (call, row, expect)
            # Refused, replayed or deduplicated: no money moved; a dead key reached nothing.
            assert not new_moved, (expect.decision, new_moved)
            assert not posts, (expect.decision, posts)
            looked_up = w.model.looks_up(call, w.model.keys[call.key])
            if expect.decision in DEAD or (expect.decision != "in_progress" and not looked_up):
                assert not new_sent, (expect.decision, new_sent)
            if expect.decision == CONSTRAINT_VIOLATED:
                assert answer.status_code == 403, answer.text
                assert answer.headers["x-keybrake-code"] == "keybrake_constraint_violated"
                assert not _micros(row["reserved_usd"]) and not _micros(row["settled_usd"]), row
            if expect.decision in ("replayed", "deduplicated") and expect.prior is not None:
                sent.response_id = (
                    expect.prior.answer if isinstance(expect.prior.answer, str) else None
                )
                if sent.response_id is not None:
                    assert _object_id(answer) == sent.response_id
            assert answer.status_code < 500, (answer.status_code, answer.text)
            return sent

        # Admitted: the model counts it now, then the vendor's answer settles it.
        key = w.model.keys[call.key]
        forwards = [s for s in new_sent if s.method == "POST"]
        assert len(forwards) == 1, (call, new_sent)
        assert forwards[0].credential and w.vault_keys[call.key] not in forwards[0].credential
        sent_key = forwards[0].idempotency_key
        if sent_key is not None:
            assert sent_key != call.idempotency_key  # scoped, never the caller's own
            first = w.vendor_idempotency.setdefault(sent_key, key.issuer)
            assert first == key.issuer, (sent_key, first, key.issuer)  # no other scope's replay
        w.model.reserve(call, now, expect)
        self._attribute(call, key, now, new_moved, expect.cost)
        status = forwards[0].status
        forward_key = expect.forward_key or _forward_key(w.model, call, key)
        if crash:
            assert answer.status_code == 503, answer.text
            assert row["decision"] == "in_flight", row
            w.model.in_flight[call_id] = (now, call, expect.cost)
            w.model.remember(call, now, call_id, "in_flight", forward_key, None)
            return sent
        if lose:
            assert answer.status_code == 502, answer.text
            assert row["decision"] == "upstream_error", row
            # Counted as spent: the money may have moved (and here it did).
            w.model.remember(call, now, call_id, "cut_off", forward_key, None)
            return sent
        if forwards[0].replayed:
            assert row["decision"] == "vendor_replayed", row
            w.model.settle(call, now, expect.cost, 0, ())
        else:
            assert row["decision"] == FORWARDED, (row, call)
            # A 4xx moved nothing; a 5xx may have (counted as spent), and is not kept.
            settled = 0 if 400 <= status < 500 else expect.cost
            paid = ()
            if status < 300:
                created_id = _object_id(answer)
                paid = tuple(p for p in (call.paid_object, marks, created_id) if p)
                if created and created_id:
                    assert created_id not in w.seen_ids  # a distinct call, a distinct object
                    w.seen_ids.add(created_id)
                    sent.response_id = created_id
            w.model.settle(call, now, expect.cost, settled, paid)
            if settled > 0:
                for obj in paid:  # the caps it paid under (see `_attribute`)
                    for owner in (key.id, key.budget):
                        if owner is not None:
                            w.paid_caps[(owner, obj)] = _looser(
                                self._caps(owner), w.paid_caps.get((owner, obj))
                            )
        if status >= 500:
            w.model.forget_call(call, call_id)
        else:
            w.model.remember(call, now, call_id, "answered", forward_key, sent.response_id)
        assert answer.status_code < 500, (answer.status_code, answer.text)
        return sent

    def _rates_and_reports(
        self,
        call: Call,
        expect: Any,
        plain: Any,
        answer: Any,
        row: dict[str, Any],
        new_sent: list[billing.Sent],
    ) -> None:
        """A call's rate and report-only checks (docs/guarantees.md, section 6): the proxy
        looked up what the model says (each lookup counted in the rates), a rate_limited call is
        a 429 with Retry-After that reserved and forwarded nothing, and report mode changed no
        outcome, while `reported` names exactly what the report-only policies would refuse."""
        w = self.world
        gets = [s for s in new_sent if s.method == "GET"]
        assert len(gets) == expect.lookups, (call, expect, gets)
        # Report mode changes no outcome, and reaches no vendor more often: report-only
        # constraints read what the call looked up anyway.
        assert expect.decision == plain.decision, ("report mode changed an outcome", call, expect)
        assert expect.lookups == plain.lookups, ("report mode looked something up", call, expect)
        if expect.decision == RATE_LIMITED:
            assert row["decision"] == RATE_LIMITED, (call, row, expect)
            assert answer.status_code == 429 and row["status"] == 429, (answer.text, row)
            assert answer.headers["x-keybrake-rate-limited"] == "true", answer.headers
            assert "x-keybrake-cap-hit" not in answer.headers, answer.headers
            assert int(answer.headers["retry-after"]) == expect.retry_after, (
                answer.headers["retry-after"],
                expect,
            )
            assert not _micros(row["reserved_usd"]) and not _micros(row["settled_usd"]), row
            assert not [s for s in new_sent if s.method != "GET"], new_sent
        # A report-only constraint's note is kept on every call that reached the ledger (a cap
        # hit, a replay, a full enforced rate too); the rate's only on one that went ahead.
        notes = expect.reported
        reported = row.get("reported")
        if not notes:
            assert reported is None, (call, row, expect)
        elif notes == ("rate",):
            assert reported == RATE_NOTE, (call, row, expect)
        else:
            prefix = REPORT_PREFIXES[notes[0]]
            assert reported is not None and reported.startswith(prefix), (row, expect)
            assert reported.endswith(f"; {RATE_NOTE}") == ("rate" in notes), (row, expect)
        if notes:
            assert (
                any(o.report for o in w.model.rated(w.model.keys[call.key])) or "rate" not in notes
            )

    @invariant()
    def no_minute_holds_more_calls_than_a_rate(self) -> None:
        """Each key's and budget's enforced max_calls_per_minute bounds the requests the vendors
        received for it (forwarded calls and lookups, attributed to the call being answered) in
        every 60 seconds: any [t - 60 s, t], both ends in (the ledger counts 61 one-second
        buckets, so this holds at whole seconds; the machine's clock moves by whole seconds).
        Each request is held to the rate in force when it was made, counting those made while
        the owner had one (a rate set by a patch counts from then on; a lowered one counts what
        went before)."""
        w = self.world
        at: dict[str, list[tuple[datetime, tuple[int, bool]]]] = defaultdict(list)
        for _, when, _, rates in w.reached:
            for owner_id, rate in rates.items():
                at[owner_id].append((when, rate))
        for owner_id, made in at.items():
            for i, (end, (limit, report)) in enumerate(made):
                if report:
                    continue
                start = end - timedelta(seconds=RATE_SECONDS)
                inside = [t for t, _ in made[: i + 1] if start <= t]
                assert len(inside) <= limit, (owner_id, limit, end, inside)
        # And the model counts what reached the vendors.
        for owner_id in {*at, *w.model.reached}:
            made_at = sorted(seconds(t) for t, _ in at.get(owner_id, []))
            assert made_at == sorted(w.model.reached.get(owner_id, [])), owner_id

    def _subjects(self, call: Call) -> None:
        """Whom `call` pays or messages (docs/guarantees.md, section 6), by field, as the model
        reads each endpoint: a created intent's customer and currency (its body's); an update's,
        action's or refund's intent's customer (held by the vendor now) and an update's new one,
        and the intent's currency when the call is priced; a message's `To`; every to, cc and
        bcc address of every email."""
        if call.vendor == "twilio":
            fields = parse_qsl(call.body.decode())
            call.subjects = {"recipients": tuple(v for k, v in fields if k == "To")}
            return
        if call.vendor == "resend":
            body = json.loads(call.body)
            emails = body if isinstance(body, list) else [body]
            call.subjects = {
                "recipient_domains": tuple(
                    address
                    for email in emails
                    for name in ("to", "cc", "bcc")
                    for address in email.get(name, ())
                )
            }
            return
        named = dict(parse_qsl(call.body.decode()))
        parts = call.path.strip("/").split("/")
        if parts == ["v1", "payment_intents"]:
            call.subjects = {
                "customers": (named.get("customer"),),
                "currencies": (named["currency"],),
            }
            return
        call.acts_on = named["payment_intent"] if parts[1] == "refunds" else parts[2]
        intent = self.world.vendors.intents[call.acts_on]
        customers: tuple[str | None, ...] = (intent.customer,)
        if len(parts) == 3 and "customer" in named:  # an update
            customers = (*customers, named["customer"])
        call.subjects = {"customers": customers}
        if call.priced:
            call.subjects["currencies"] = (intent.currency,)

    def _within_constraints(
        self, key_id: str, requests: list[billing.Sent], layers: list[Constraints]
    ) -> None:
        """Each of `requests`, received by a vendor for a call of `key_id`, paid or messaged
        only whom the key's and its budget's enforced constraints (`layers`, as they stood when
        it was made) admit (whoever it was: the vendor's record, not the proxy's reading)."""
        key = self.world.model.keys[key_id]
        for constraints in layers:
            for name, allowed in constraints.items():
                if name not in CONSTRAINT_FIELDS[key.vendor]:
                    continue
                for request in requests:
                    for value in request.touched.get(name, ()):
                        assert admits(name, allowed, value), (
                            f"{request.method} {request.path} for {key_id} reached {key.vendor} "
                            f"with {name} {value!r}, outside {allowed}"
                        )

    @invariant()
    def nothing_outside_a_constraint_reaches_a_vendor(self) -> None:
        w = self.world
        for key_id, request, layers in w.delivered:
            self._within_constraints(key_id, [request], layers)

    @rule(
        target=intents,
        cents=AMOUNTS,
        customer=CUSTOMERS,
        currency=CURRENCIES,
        manual=st.booleans(),
    )
    def an_intent_made_elsewhere(
        self, cents: int, customer: str | None, currency: str, manual: bool
    ) -> str:
        """An intent made on the account without the proxy (the dashboard, another system),
        for any customer: a key that moves its money pays it in full, and may only if its
        constraints admit the intent's customer and currency."""
        capture = "manual" if manual else "automatic"
        return self.world.vendors.create_intent(cents, currency, customer, capture).id

    def _post(self, call: Call) -> Any:
        w = self.world
        vault = w.vault_keys[call.key] + (f".{call.tag}" if call.tag else "")
        headers = {"content-type": "application/x-www-form-urlencoded"}
        if call.vendor == "stripe":
            headers["authorization"] = f"Bearer {vault}"
        elif call.vendor == "twilio":
            token = base64.b64encode(f"{PLACEHOLDER_SID}:{vault}".encode()).decode()
            headers["authorization"] = f"Basic {token}"
        else:
            headers = {"content-type": "application/json", "authorization": f"Bearer {vault}"}
        if call.idempotency_key is not None:
            headers["idempotency-key"] = call.idempotency_key
        if call.account is not None:
            headers["stripe-account"] = call.account
        return w.client.post(f"/{call.vendor}{call.path}", content=call.body, headers=headers)

    def _newest_audit(self, key: str) -> dict[str, Any]:
        rows = self.world.client.get("/vault/audit", params={"key_id": key, "limit": 1}).json()
        return dict(rows["data"][0])

    def _attribute(
        self, call: Call, key: Key, now: datetime, moved: list[billing.Moved], cost: int
    ) -> None:
        """Money this call moved, on whose behalf: what its payer had paid for first (the
        offset), then this key, its budget and its caller for the rest."""
        w = self.world
        total = sum(m.micros for m in moved)
        # What the call's own count covers, then what its payer's re-dated marks cover.
        offset = total - min(total, cost)
        own = total - offset
        if offset:
            payers = [
                m
                for m in w.model.marks[(call.vendor, call.paid_object or "")][bucket(now)].values()
            ]
            # The payer's money moves now, but it was counted when paid: a cap lowered since
            # binds what the payer spends next, not this (docs/guarantees.md, section 3).
            obj = call.paid_object or ""
            for mark in payers:
                share = min(offset, mark.micros)
                for owner in (mark.key, mark.budget):
                    if owner is not None:
                        caps = _looser(self._caps(owner), w.paid_caps.get((owner, obj)))
                        w.moved.append(Moved(owner, now, share, caps))
                offset -= share
            assert offset == 0, "money moved that no payer paid for"
        if own:
            self._moved(key.id, now, own)
            self._moved(f"{key.id}/{call.caller}", now, own)
            if key.budget:
                self._moved(key.budget, now, own)
            if key.per_call is not None:
                assert own <= key.per_call

    @invariant()
    def the_audit_rows_add_up_to_what_is_counted(self) -> None:
        """Each key's audit rows, settled plus still reserved, are what its ledger counts over
        its life (moving spend between hours changes neither)."""
        w = self.world
        if not w.model.keys:
            return
        params = {"limit": 5000, "after_id": w.audit_floor}
        rows = w.client.get("/vault/audit", params=params).json()["data"]
        counted: dict[str, int] = defaultdict(int)
        for row in rows:
            if row["decision"] in (CONSTRAINT_VIOLATED, RATE_LIMITED):  # before reserving
                assert not _micros(row["reserved_usd"]) and not _micros(row["settled_usd"]), row
            if row["decision"] == RATE_LIMITED:
                assert row["status"] == 429, row
                assert not (row["reported"] or "").endswith(RATE_NOTE), row
            if row["key_id"] in w.model.keys:
                counted[row["key_id"]] += _micros(row["settled_usd"])
                if row["decision"] == "in_flight":
                    counted[row["key_id"]] += _micros(row["reserved_usd"])
        for key_id in w.model.keys:
            assert counted[key_id] == w.model.life(key_id), (key_id, counted[key_id])

    def _moved(self, owner: str, at: datetime, micros: int) -> None:
        self.world.moved.append(Moved(owner, at, micros, self._caps(owner)))

    # -- invariants --------------------------------------------------------------------------------

    @invariant()
    def money_stays_within_every_cap(self) -> None:
        w = self.world
        by_owner: dict[str, list[Moved]] = defaultdict(list)
        for m in w.moved:
            by_owner[m.owner].append(m)
        for owner, events in by_owner.items():
            for n, end in enumerate(events):
                daily, total = end.caps
                so_far = events[: n + 1]
                if total is not None:
                    assert sum(e.micros for e in so_far) <= total, (owner, so_far)
                if daily is not None:
                    inside = [e for e in so_far if end.at - timedelta(hours=24) < e.at]
                    assert sum(e.micros for e in inside) <= daily, (owner, inside)

    @invariant()
    def an_issuers_keys_stay_within_its_policy(self) -> None:
        """Whatever its issuer patched, each of its keys moved no more than the policy allows
        in any 24 hours and over its life."""
        w = self.world
        for key in w.model.keys.values():
            if key.issuer is None:
                continue
            policy = w.issuers[key.issuer][1]
            events = [m for m in w.moved if m.owner == key.id]
            if policy.max_total is not None:
                assert sum(e.micros for e in events) <= policy.max_total, (key, policy, events)
            if policy.max_daily is not None:
                for end in events:
                    inside = [e for e in events if end.at - timedelta(hours=24) < e.at <= end.at]
                    assert sum(e.micros for e in inside) <= policy.max_daily, (key, policy)

    def _caps(self, owner: str) -> tuple[int | None, int | None]:
        w = self.world
        if "/" in owner:
            key = w.model.keys[owner.partition("/")[0]]
            return None, key.per_caller
        if owner in w.model.budgets:
            budget = w.model.budgets[owner]
            return budget.daily, budget.total
        key = w.model.keys[owner]
        return key.daily, key.total

    @invariant()
    def the_proxy_counts_what_the_model_counts(self) -> None:
        w = self.world
        if not w.model.keys:
            return
        now = w.clock.now
        listed = w.client.get("/vault/keys", params={"limit": 500})
        assert listed.status_code == 200, listed.text
        for info in listed.json()["data"]:
            key_id = info["key_id"]
            if key_id not in w.model.keys:
                continue  # (PostgreSQL: an earlier example's, in the same database)
            flying = [(at, cost) for at, c, cost in w.model.in_flight.values() if c.key == key_id]
            in_window = sum(cost for at, cost in flying if bucket(at) >= bucket(now) - 24)
            assert _micros(info["reserved_usd"]) == in_window, (key_id, info)
            assert _micros(info["spent_usd"]) == w.model.window(key_id, now) - in_window, info
            assert _micros(info["total_spent_usd"]) == w.model.life(key_id) - sum(
                cost for _, cost in flying
            ), (key_id, info)


def _looser(
    caps: tuple[int | None, int | None], other: tuple[int | None, int | None] | None
) -> tuple[int | None, int | None]:
    """Each cap at the looser of the two (None: no cap)."""
    if other is None:
        return caps
    return tuple(  # type: ignore[return-value]
        None if a is None or b is None else max(a, b) for a, b in zip(caps, other, strict=True)
    )


def _constraints_into(
    body: dict[str, Any], drawn: Constraints | None, vendor: str | None, rate: Rate = None
) -> Constraints | None:
    """The constraints drawn, of `vendor`'s fields (a key's) or any (a budget's, vendor None),
    and the call rate drawn, in its mode (enforce without one), put into an issue's body; None
    when no counterparty constraint is left."""
    fields = CONSTRAINT_FIELDS.get(vendor or "", tuple(CONSTRAINT_VALUES))
    kept = {name: values for name, values in (drawn or {}).items() if name in fields}
    if not kept and rate is None:
        return None
    body["constraints"] = {
        "mode": rate[1] if rate else "enforce",
        **{name: list(v) for name, v in kept.items()},
    }
    if rate is not None:
        body["constraints"]["max_calls_per_minute"] = rate[0]
    return kept or None


def _caps_into(body: dict[str, Any], *, daily: int | None, total: int | None) -> None:
    for name, value in (("daily_usd_cap", daily), ("total_usd_cap", total)):
        if value is not None:
            body[name] = str(Decimal(value) / 1_000_000)


def _micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def _object_id(answer: Any) -> str | None:
    try:
        data = answer.json()
    except ValueError:
        return None
    if isinstance(data, dict):
        found = data.get("id") or data.get("sid")
        if found is None and isinstance(data.get("data"), list) and data["data"]:
            found = data["data"][0].get("id")
        return str(found) if found else None
    return None


def _forward_key(model: Model, call: Call, key: Key) -> str | None:
    """The idempotency key a forwarded call goes out with: the caller's, else one the proxy
    makes up for a dedupe candidate, on a vendor that replays answers (Twilio has none)."""
    if not call.replays:
        return None
    if call.idempotency_key is not None:
        return call.idempotency_key
    return "made-up" if model.dedupe_candidate(call, key) else None


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'model.db'}"
    return str(request.getfixturevalue("pg_url"))


def machine_for(database: str, tmp_path: Path) -> type[MoneyMachine]:
    """The state machine on `database`: each run a new app, clock and billing vendors (on
    PostgreSQL one database for all runs: keys, budgets and issuers never share ids)."""
    runs = itertools.count()

    class Machine(MoneyMachine):
        @initialize()
        def start(self) -> None:
            pass

        def __init__(self) -> None:
            super().__init__()
            n = next(runs)
            url = database if database.startswith("postgres") else f"sqlite:///{tmp_path}/m{n}.db"
            clock = Clock()
            vendors = billing.BillingUpstream()
            pricing = tmp_path / "pricing.toml"  # eur, and the UK at the US rate
            pricing.write_text(billing.PRICING)
            store = FlakyStore(open_store(url))
            app_settings = Settings(
                api_key=ADMIN,
                database_url=url,
                stripe_secret_key=billing.STRIPE_SECRET,
                stripe_api_base=billing.STRIPE,
                twilio_account_sid=billing.TWILIO_SID,
                twilio_auth_token=billing.TWILIO_TOKEN,
                twilio_api_base=billing.TWILIO,
                resend_api_key=billing.RESEND_SECRET,
                resend_api_base=billing.RESEND,
                pricing_file=pricing,
            )
            app = build_app(app_settings, clock=clock, store=store, upstream=vendors)  # type: ignore[arg-type]
            client = TestClient(app, headers={"Authorization": f"Bearer {ADMIN}"})
            client.__enter__()
            self.world = World(client, clock, vendors, store, app_settings)
            # Made now, as the first: its first maintenance (a sweep) finds nothing in flight.
            other = build_app(app_settings, clock=clock, upstream=vendors)  # type: ignore[arg-type]
            self.world.other = TestClient(other, headers={"Authorization": f"Bearer {ADMIN}"})
            self.world.other.__enter__()
            newest = client.get("/vault/audit", params={"limit": 1}).json()["data"]
            self.world.audit_floor = newest[0]["id"] if newest else 0

        def teardown(self) -> None:
            self.world.client.__exit__(None, None, None)
            if self.world.other is not None:
                self.world.other.__exit__(None, None, None)

    return Machine


def test_the_proxy_keeps_the_money_model(database: str, tmp_path: Path) -> None:
    Machine = machine_for(database, tmp_path)
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            # `make test` runs the same examples every time; a soak (`make soak-model`) draws
            # new ones from the seed it prints.
            derandomize=not SOAK,
            database=None,
        ),
    )
    for (vendor, endpoint, decision), count in sorted(SEEN.items()):
        print(f"{count:5d}  {vendor} {endpoint}: {decision}")


# Sequences that broke the proxy's rules when they were mutated (paid-for marks global again,
# items dropped from the dedupe token, lookups before the revocation check, the daily cap's <=
# flipped, one email per request, a patch checked field by field), kept as explicit regression
# examples: each runs every invariant after every step.
_CUS_A: Constraints = {"customers": ("cus_a",)}
REGRESSIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "another run's key confirms what it did not pay for": [
        ("issue_stripe_key", {"daily": 20_000_000, "total": None, "budget": None}),
        ("issue_stripe_key", {"daily": 1_000_000, "total": None, "budget": None}),
        ("pay_then_move", {"payer": 0, "mover": 1, "cents": 557, "manual": False, "later": 0}),
    ],
    "two fan-out items send one body": [
        ("issue_stripe_key", {"daily": 20_000_000, "total": None, "budget": None}),
        ("fan_out", {"key": 0, "cents": 100, "items": 2, "idempotency": "none"}),
    ],
    "an expired key confirms": [
        ("issue_stripe_key", {"daily": 20_000_000, "total": None, "budget": None, "hours": 1}),
        ("pay_then_move", {"payer": 0, "mover": 0, "cents": 1, "manual": False, "later": 1380}),
    ],
    "a call fills the daily cap exactly": [
        ("issue_stripe_key", {"daily": 1_000_000, "total": None, "budget": None}),
        ("fill_a_cap_exactly", {"key": 0, "item": "a"}),
        (
            "create_intent",
            {"key": 0, "cents": 1, "manual": False, "item": "a", "pod": "p", "idempotency": "none"},
        ),
    ],
    "an email to two recipients": [
        ("issue_resend_key", {"daily": 1_000_000, "total": None, "budget": None}),
        ("email", {"key": 0, "recipients": [2], "batch": False}),
    ],
    "an issuer lifts a key's total past its 24-hour maximum": [
        (
            "an_issuers_key_patched_then_spent",
            {
                "max_daily": 1_000_000,
                "max_total": None,
                "daily": None,
                "total": 1_000_000,
                "which": "total",
                "cents": 100,
            },
        ),
    ],
    # A confirm's `amount_to_confirm` priced as the intent's amount: a $6 intent confirmed
    # for $12 under a $10 cap (the create's $6 offset what the confirm moved).
    "a padded confirm moves more than its intent": [
        ("issue_stripe_key", {"daily": 10_000_000, "total": None, "budget": None}),
        (
            "create_intent",
            {
                "key": 0,
                "cents": 600,
                "manual": False,
                "item": None,
                "pod": "p",
                "idempotency": "none",
            },
        ),
        (
            "move_an_intents_money",
            {"key": 0, "intent": 0, "action": "confirm", "partial": False, "padded": True},
        ),
    ],
    # A capture priced at the intent's amount, not what a padded confirm left it holding.
    "another key captures all a padded confirm holds": [
        ("issue_stripe_key", {"daily": 100_000_000, "total": None, "budget": None}),
        ("issue_stripe_key", {"daily": 10_000_000, "total": None, "budget": None}),
        (
            "create_intent",
            {
                "key": 0,
                "cents": 600,
                "manual": True,
                "item": None,
                "pod": "p",
                "idempotency": "none",
            },
        ),
        (
            "move_an_intents_money",
            {"key": 0, "intent": 0, "action": "confirm", "partial": False, "padded": True},
        ),
        (
            "move_an_intents_money",
            {"key": 1, "intent": 0, "action": "capture", "partial": False},
        ),
    ],
    # Constraints (docs/guarantees.md, section 6), each broken by `_constrain` forwarding all.
    "a key held to one customer confirms another's intent": [
        ("issue_stripe_key", {"daily": 20_000_000, "total": None, "budget": None}),
        (
            "issue_stripe_key",
            {"daily": 20_000_000, "total": None, "budget": None, "constrain": _CUS_A},
        ),
        (
            "pay_then_move",
            {
                "payer": 0,
                "mover": 1,
                "cents": 500,
                "manual": False,
                "later": 0,
                "customer": "cus_b",
            },
        ),
    ],
    "a key held to one customer moves its intent to another": [
        (
            "issue_stripe_key",
            {"daily": 20_000_000, "total": None, "budget": None, "constrain": _CUS_A},
        ),
        (
            "create_intent",
            {"key": 0, "cents": 500, "manual": False, "item": None, "pod": "p"}
            | {"idempotency": "none", "customer": "cus_a"},
        ),
        ("update_an_intent", {"key": 0, "intent": 0, "cents": None, "customer": "cus_b"}),
    ],
    "a key on a budget held to London numbers texts New York": [
        (
            "issue_budget",
            {"daily": None, "total": 5_000_000, "hours": 5}
            | {"constrain": {"recipients": ("+4420*",)}},
        ),
        ("issue_twilio_key", {"daily": 1_000_000, "total": None, "budget": 0}),
        ("text", {"key": 0, "length": 5, "item": "x", "to": "+442071838750"}),
        ("text", {"key": 0, "length": 5, "item": "x", "to": "+15005550006"}),
    ],
    "an email copied to a subdomain": [
        (
            "issue_resend_key",
            {"daily": 1_000_000, "total": None, "budget": None}
            | {"constrain": {"recipient_domains": ("Example.COM",)}},
        ),
        ("email", {"key": 0, "recipients": [1], "batch": True, "copied": ["x@mail.example.com"]}),
    ],
    # Twilio's MMS Converter sends a media message to a carrier without MMS as an SMS of its body
    # and a link, billed as that SMS: three segments here, more than the one MMS it was priced at.
    # A scheduled message is refused: Twilio would send and bill it after its key may be revoked.
    "a media message that MMS Converter sends as an SMS, and a scheduled one": [
        ("issue_twilio_key", {"daily": 1_000_000, "total": None, "budget": None}),
        ("text", {"key": 0, "length": 400, "item": "x", "to": "+442071838750", "media": True}),
        ("text", {"key": 0, "length": 5, "item": "y", "to": "+15005550006", "media": True}),
        ("text", {"key": 0, "length": 5, "item": "z", "scheduled": True}),
    ],
    # Call rates (docs/guarantees.md, section 6, "How fast" and "Report-only").
    "a confirm's lookup takes a place in its key's call rate": [
        (
            "issue_stripe_key",
            {"daily": 20_000_000, "total": None, "budget": None, "rate": (2, "enforce")},
        ),
        (
            "create_intent",
            {"key": 0, "cents": 500, "manual": False, "item": None, "pod": "p"}
            | {"idempotency": "none"},
        ),
        ("move_an_intents_money", {"key": 0, "intent": 0, "action": "confirm", "partial": False}),
        ("seconds_pass", {"secs": 60}),
        ("move_an_intents_money", {"key": 0, "intent": 0, "action": "confirm", "partial": False}),
        ("seconds_pass", {"secs": 1}),
        ("move_an_intents_money", {"key": 0, "intent": 0, "action": "confirm", "partial": False}),
    ],
    "two keys share their budget's call rate": [
        (
            "issue_budget",
            {"daily": None, "total": 5_000_000, "hours": 5, "constrain": None}
            | {"rate": (2, "enforce")},
        ),
        ("issue_twilio_key", {"daily": 1_000_000, "total": None, "budget": 0}),
        ("issue_twilio_key", {"daily": 1_000_000, "total": None, "budget": 0}),
        ("text", {"key": 0, "length": 5, "item": "x"}),
        ("seconds_pass", {"secs": 30}),
        ("text", {"key": 1, "length": 5, "item": "x"}),
        ("text", {"key": 0, "length": 5, "item": "y"}),
        ("seconds_pass", {"secs": 30}),
        ("text", {"key": 1, "length": 5, "item": "y"}),
        ("seconds_pass", {"secs": 1}),
        ("text", {"key": 1, "length": 5, "item": "y"}),
    ],
    "a report-only rate and constraint refuse nothing and say so": [
        (
            "issue_resend_key",
            {"daily": 1_000_000, "total": None, "budget": None, "rate": (1, "report")}
            | {"constrain": {"recipient_domains": ("example.com",)}},
        ),
        ("email", {"key": 0, "recipients": [1], "batch": False, "copied": ["x@other.org"]}),
        ("email", {"key": 0, "recipients": [1], "batch": False, "copied": []}),
        ("email", {"key": 0, "recipients": [2], "batch": True, "copied": ["x@other.org"]}),
    ],
}
_KEY_DEFAULTS = {
    "per_call": None,
    "per_caller": None,
    "dedupe": 600,
    "hours": 5,
    "connected": False,
    "constrain": None,
    "rate": None,
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_a_sequence_that_once_broke_a_rule(name: str, tmp_path: Path) -> None:
    machine = machine_for(f"sqlite:///{tmp_path}/r.db", tmp_path)()
    made_by: dict[str, list[str]] = {"key": [], "intent": [], "budget": []}
    roles = {"key": "key", "payer": "key", "mover": "key", "intent": "intent", "budget": "budget"}
    invariants = [
        machine.money_stays_within_every_cap,
        machine.an_issuers_keys_stay_within_its_policy,
        machine.the_proxy_counts_what_the_model_counts,
        machine.the_audit_rows_add_up_to_what_is_counted,
        machine.nothing_outside_a_constraint_reaches_a_vendor,
        machine.no_minute_holds_more_calls_than_a_rate,
    ]
    try:
        for step, arguments in REGRESSIONS[name]:
            given = dict(arguments)
            for role, kind in roles.items():
                if given.get(role) is not None:
                    given[role] = made_by[kind][given[role]]
            if step.startswith("issue_") and step.endswith("_key"):
                given = {**_KEY_DEFAULTS, **given}
            made = getattr(machine, step)(**given)
            if isinstance(made, str):
                kind = (
                    "key" if step.endswith("_key") else "budget" if "budget" in step else "intent"
                )
                made_by[kind].append(made)
            for check in invariants:
                check()
    finally:
        machine.teardown()


def test_a_refund_under_a_customers_constraint_looks_its_intent_up_once(tmp_path: Path) -> None:
    machine = machine_for(f"sqlite:///{tmp_path}/r.db", tmp_path)()
    try:
        key = machine.issue_stripe_key(
            **{**_KEY_DEFAULTS, "daily": 20_000_000, "total": None, "budget": None}
            | {"constrain": _CUS_A}
        )
        intent = machine.create_intent(key, 500, False, None, "p", "none", customer="cus_a")
        machine.move_an_intents_money(key, intent, "confirm", False)
        vendors = machine.world.vendors
        before = len(vendors.sent)
        machine.refund(key, intent, 100)
        gets = [s for s in vendors.sent[before:] if s.method == "GET"]
        assert len(gets) == 1, [f"GET {s.path}" for s in gets]
    finally:
        machine.teardown()


def test_a_report_only_constraint_changes_no_outcome_under_a_rate(tmp_path: Path) -> None:
    machine = machine_for(f"sqlite:///{tmp_path}/r.db", tmp_path)()
    try:
        budget = machine.issue_budget(None, 5_000_000, 5, None, (2, "enforce"))
        key = machine.issue_stripe_key(
            **{**_KEY_DEFAULTS, "daily": 20_000_000, "total": None, "budget": budget}
            | {"constrain": _CUS_A, "rate": (4, "report")}
        )
        intent = machine.create_intent(key, 500, False, None, "p", "none", customer="cus_a")
        # A new customer: free, no lookup to price it, and report mode makes none of its own,
        # so the budget's rate keeps its place and the update goes ahead. The new customer,
        # named in the body, is a would-be refusal; one naming an allowed customer leaves the
        # intent's own customer unchecked.
        vendors = machine.world.vendors
        before = len(vendors.sent)
        machine.update_an_intent(key, intent, None, "cus_b")
        assert [s.method for s in vendors.sent[before:]] == ["POST"]
        row = machine._newest_audit(key)
        assert row["decision"] == "forwarded", row
        assert row["reported"] == "constraint_violated: customers: 'cus_b' is not allowed", row
        machine.seconds_pass(61)  # (the budget's rate of 2 a minute)
        machine.update_an_intent(key, intent, None, "cus_a")
        row = machine._newest_audit(key)
        assert row["decision"] == "forwarded", row
        assert row["reported"].startswith(REPORT_PREFIXES["unchecked"]), row
    finally:
        machine.teardown()


@pytest.mark.parametrize("whose", ["key", "budget"])
def test_a_patch_of_constraints_reaches_the_replica_serving_the_calls(
    whose: str, tmp_path: Path
) -> None:
    """The replica serving a key's calls holds its constraints cached; another replica patches
    them, narrower, then wider, then a call rate: each next call is judged by the patched ones
    (decisions, rule 0), through the machine's own checks (the model decides each call)."""
    machine = machine_for(f"sqlite:///{tmp_path}/r.db", tmp_path)()
    try:
        budget = machine.issue_budget(None, 50_000_000, 5, None, None)
        key = machine.issue_twilio_key(
            **{**_KEY_DEFAULTS, "daily": 20_000_000, "total": None, "budget": budget}
        )
        subject = key if whose == "key" else budget
        machine.text(key, 5, "a", "+442071838750")  # forwarded, and the key's record cached
        machine.patch_constraints(subject, {"recipients": ("+1500555*",)}, None)
        machine.text(key, 5, "b", "+442071838750")  # outside the patched constraints
        row = machine._newest_audit(key)
        assert row["decision"] == "constraint_violated", row
        machine.patch_constraints(subject, None, None)  # wider: none at all
        machine.text(key, 5, "c", "+442071838750")
        assert machine._newest_audit(key)["decision"] == "forwarded"
        machine.patch_constraints(subject, None, (1, "enforce"))  # a rate, from now on
        machine.text(key, 5, "d", "+442071838750")
        machine.text(key, 5, "e", "+442071838750")
        assert machine._newest_audit(key)["decision"] == "rate_limited"
    finally:
        machine.teardown()


def test_an_issuer_neither_loosens_nor_widens_past_its_constraints(tmp_path: Path) -> None:
    """An issuer bound to customers: its key inherits them; once the admin removed them, the
    issuer may not raise the key's cap (a loosening that leaves it paying anyone), nor widen
    its own key's constraints past its own, while narrowing them goes (the machine's checks)."""
    machine = machine_for(f"sqlite:///{tmp_path}/r.db", tmp_path)()
    try:
        issuer = machine.create_issuer(None, None, {"customers": ("cus_a", "cus_b")})
        key = machine.issue_stripe_key_as_issuer(issuer, 5_000_000, None, 0, False)
        model_key = machine.world.model.keys[key]
        assert model_key.constraints == {"customers": ("cus_a", "cus_b")}
        machine.patch_constraints_as_its_issuer(key, {"customers": ("cus_c",)})  # 403
        machine.patch_constraints_as_its_issuer(key, {"customers": ("cus_a",)})  # narrower
        assert model_key.constraints == {"customers": ("cus_a",)}
        machine.patch_constraints(key, None, None)  # the admin removes them
        machine.patch_key(key, 9_000_000, None, "daily")  # a loosening: 403
        assert model_key.daily == 5_000_000
    finally:
        machine.teardown()
