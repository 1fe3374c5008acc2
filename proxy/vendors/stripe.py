"""Stripe: Bearer (or Basic) secret key, form-encoded bodies, amounts in minor units.

What a dollar is: money a call moves, priced by the rules in the `[stripe.endpoints]` pricing table.
Confirming or capturing a PaymentIntent or charge moves its amount (or the amount the call names:
`amount_to_confirm`, `amount_to_capture`), looked up upstream with the real key; the ledger
offsets it by what the same payer (the key, or a key on the same budget) already paid for that
object within the window, so creating and then confirming an intent is paid once, while another
run's key confirming it pays in full (docs/guarantees.md). Every endpoint that moves money takes
only the fields its pricing rule lists (Stripe's documented parameters): one Stripe adds later
may move money, so it is refused, naming it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar
from urllib.parse import quote

from keybrake.proxy.constraints import Found, Unchecked, Unreadable, collect
from keybrake.proxy.pricing import AmbiguousRequest, PricingTable, Unpriceable
from keybrake.proxy.settings import VendorCredentials
from keybrake.proxy.vendor_facts import STRIPE
from keybrake.proxy.vendors.base import (
    FREE,
    Cost,
    Lookup,
    Vendor,
    VendorCall,
    default_settle,
    rule_parts,
    validate_endpoint_rules,
)
from keybrake.proxy.vendors.bodies import FormBody, read_form

__all__ = ["Stripe"]

# The fields each rule reads for its price: each must appear at most once, exactly so spelled.
_READS: dict[str, tuple[str, ...]] = {
    "free": (),
    "amount": ("amount", "currency"),
    "amount_if_set": ("amount", "currency"),
    "confirm_amount": ("amount_to_confirm",),
    "intent_amount": ("amount_to_capture",),
    "increment": ("amount",),
    "charge_amount": ("amount",),
    "refund": ("charge", "payment_intent", "amount"),
    "invoice_amount": (),
}
_RULES = frozenset(_READS)
# Object ids the proxy looks up with the real key: only in Stripe's own syntax, so a field such
# as `charge=../customers/cus_1` can never turn a lookup into another request.
_IDS = {
    "payment_intents": ("a PaymentIntent id (pi_...)", re.compile(r"pi_[A-Za-z0-9_]{1,250}")),
    "charges": ("a Charge id (ch_... or py_...)", re.compile(r"(?:ch|py)_[A-Za-z0-9_]{1,250}")),
    "invoices": ("an Invoice id (in_...)", re.compile(r"in_[A-Za-z0-9_]{1,250}")),
}
# Larger than any amount Stripe accepts; keeps the arithmetic within 64-bit integers.
_MAX_AMOUNT = 10**12
_ACCOUNT = re.compile(r"acct_[A-Za-z0-9]{1,250}")
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


class Stripe(Vendor):
    name: ClassVar[str] = STRIPE.name
    request_id_header: ClassVar[str] = "request-id"
    # Per-call keys of the official SDKs: a UUID (python, ruby, java, php, dotnet),
    # `stripe-node-retry-<uuid>` (node), `<unix nanoseconds>_<6 base64url>` (go).
    sdk_key_shapes: ClassVar[tuple[re.Pattern[str], ...]] = (
        re.compile(_UUID),
        re.compile(f"stripe-node-retry-{_UUID}"),
        re.compile(r"[0-9]{16,20}_[A-Za-z0-9_-]{6}"),
    )
    account_headers: ClassVar[tuple[str, ...]] = STRIPE.account_headers

    def __init__(self, credentials: VendorCredentials, pricing: PricingTable) -> None:
        super().__init__(credentials, pricing)
        # Each rule as (name, free fields), once, rather than taken apart on every call.
        self.rules = tuple((pattern, rule_parts(rule)) for pattern, rule in self.rules)

    @staticmethod
    def validate_pricing(section: Mapping[str, Any]) -> None:
        validate_endpoint_rules(section, _RULES)
        for pattern, rule in section.get("endpoints", {}).items():
            path = str(pattern).partition(" ")[2].strip()
            if path.startswith("/v2/"):
                raise ValueError(
                    f"'{pattern}': Stripe's /v2 API takes JSON bodies keybrake cannot price yet; "
                    "its writes are refused"
                )
            # A table written before confirms had a rule of their own priced them by a
            # capture's field: they would forward `amount_to_confirm` unpriced.
            if path.endswith("/confirm") and rule_parts(rule)[0] == "intent_amount":
                raise ValueError(
                    f"'{pattern}': a confirm moves `amount_to_confirm` when given; price it with "
                    '"confirm_amount" ("intent_amount" prices a capture)'
                )

    def presented_key(self, headers: Mapping[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            return value.strip() or None
        if scheme.lower() == "basic":
            try:
                user = base64.b64decode(value, validate=True).decode().partition(":")[0]
            except ValueError:
                return None
            return user or None
        return None

    def accounts(self, headers: Mapping[str, str]) -> tuple[str, ...]:
        # Stripe-Context names a path of accounts (`acct_1/acct_2`) and supersedes
        # Stripe-Account; the call acts through every account either names.
        found: list[str] = []
        if "stripe-account" in headers:
            found.append(headers["stripe-account"].strip())
        if "stripe-context" in headers:
            found.extend(part.strip() for part in headers["stripe-context"].split("/"))
        return tuple(found)

    def is_replay(self, headers: Mapping[str, str]) -> bool:
        return headers.get("idempotent-replayed", "").strip().lower() == "true"

    async def estimate(self, call: VendorCall, lookup: Lookup) -> Cost:
        if call.method == "GET":
            return FREE
        if call.path.startswith("/v2/"):
            raise Unpriceable(
                "keybrake refuses writes to Stripe's /v2 API: its JSON bodies are not priced yet"
            )
        rule = self.rule_for(call.method, call.path)
        if rule is None:
            raise Unpriceable(
                f"keybrake has no price for {call.method} {call.path}: refused because it may "
                "move money. An operator prices it in the pricing file under [stripe.endpoints], "
                'e.g. "POST /v1/..." = "amount" or "free".'
            )
        name, free_fields = rule
        if name == "free" and free_fields is None:
            return FREE  # nothing this endpoint takes moves money: its body is not read
        what = f"{call.method} {call.path}"
        form = read_form(call.headers, call.query, call.body, what)
        if free_fields is not None:
            form.only((*free_fields, *_READS[name]), what)
        segments = call.path.strip("/").split("/")
        if name == "free":
            return FREE
        if name == "amount":
            return self._priced(_amount(form.one("amount")), form.one("currency") or "")
        if name == "amount_if_set":
            amount, currency = form.one("amount"), form.one("currency")
            if amount is None and currency is None:
                return FREE
            intent = await _fetch(lookup, "payment_intents", segments[2])
            return self._priced(
                _amount(amount) if amount is not None else _fetched_int(intent, "amount"),
                currency or _fetched_currency(intent),
            )
        if name == "confirm_amount":
            # Stripe confirms `amount_to_confirm` when given (API 2026-04-22.dahlia: "the exact
            # amount to confirm", which may exceed the intent's amount), else the intent's amount.
            return await self._capture(
                lookup, "payment_intents", segments[2], form, "amount_to_confirm", ("amount",)
            )
        if name == "intent_amount":
            # Without `amount_to_capture` Stripe captures "the full amount_capturable", which a
            # padded confirm (`amount_to_confirm`) raises above the intent's amount.
            return await self._capture(
                lookup,
                "payment_intents",
                segments[2],
                form,
                "amount_to_capture",
                ("amount", "amount_capturable"),
            )
        if name == "charge_amount":
            return await self._capture(lookup, "charges", segments[2], form, "amount", ("amount",))
        if name == "increment":
            # `amount` is the intent's new total: the increment moves the difference, in the
            # intent's own currency (the request names none).
            intent = await _fetch(lookup, "payment_intents", segments[2])
            more = max(0, _amount(form.one("amount")) - _fetched_int(intent, "amount"))
            return self._priced(more, _fetched_currency(intent), counts=(segments[2],))
        if name == "refund":
            return await self._refund(form, lookup)
        if name == "invoice_amount":
            invoice = await _fetch(lookup, "invoices", segments[2])
            field = "amount_remaining" if "amount_remaining" in invoice else "amount_due"
            return self._priced(_fetched_int(invoice, field), _fetched_currency(invoice))
        raise Unpriceable(f"unknown pricing rule {name!r} for {what}")

    async def subjects(
        self, call: VendorCall, cost: Cost, lookup: Lookup, wanted: frozenset[str]
    ) -> Found:
        """Per endpoint (docs/guarantees.md, "Constraints"): the currency of a priced call; the
        customer a PaymentIntent or charge is created for (its body), of the intent, charge,
        refund's charge or invoice a call acts on (looked up, with an update's new customer
        too), and of a customer's update or delete (its path); where money goes out: a
        transfer's or payout's `destination` (a payout without one goes to the default external
        account: unreadable) and `transfer_data[destination]` of an intent or charge, from the
        body and the object, and the connected account a priced call acts on (its
        `Stripe-Account` or `Stripe-Context`). Another call that moves money cannot say its
        customer or destination, so it is refused under those constraints."""
        segments = call.path.strip("/").split("/")
        kind = segments[1] if len(segments) > 1 else ""
        what = f"{call.method} {call.path}"
        creates = call.method == "POST" and len(segments) == 2
        acts_on = call.method == "POST" and len(segments) >= 3 and kind in _IDS
        form: FormBody | None = None

        def body() -> FormBody:
            nonlocal form
            if form is None:
                form = read_form(call.headers, call.query, call.body, what)
            return form

        async def held(field: str) -> tuple[str, ...]:
            """The acted-on object's `field` (`customer`, or `destination` of its transfer_data)."""
            obj = await _fetch(lookup, kind, segments[2])
            value = obj.get("customer") if field == "customers" else _transfer_to(obj)
            if field == "destinations":
                return () if value is None else (_id_of(value, field),)
            if value is None:
                raise Unreadable(field, f"customers: the {kind[:-1]} has no customer")
            return (_id_of(value, field),)

        async def acted_on(
            field: str, moved: Callable[[], str | None], unknown: str
        ) -> tuple[str, ...]:
            """`field` of any call but a create. A call acting on an object: the object's and
            an update's new one (`moved`, from the body, read even when the object's is not
            looked up: `Unchecked`). Any other priced call cannot say it (`unknown`), so it is
            unreadable; an unpriced one moves no money."""
            if not acts_on:
                if cost.priced:
                    raise Unreadable(field, f"{field}: keybrake cannot tell {unknown}")
                return ()
            new = moved() if len(segments) == 3 else None
            named = (new,) if new else ()
            try:
                return (*(await held(field)), *named)
            except Unchecked:
                raise Unchecked(field, named) from None

        async def currencies() -> tuple[str, ...]:
            return (cost.currency,) if cost.priced and cost.currency else ()

        async def customers() -> tuple[str, ...]:
            if kind == "customers" and len(segments) >= 3 and call.method in ("POST", "DELETE"):
                # A customer's update or delete (or a sub-resource an operator prices) names the
                # customer in its path: free, yet it can raise what the next invoice bills.
                return (segments[2],)
            if creates and kind in ("payment_intents", "charges"):
                named = body().one("customer")
                if named is None:
                    raise Unreadable("customers", f"customers: {what} names no customer")
                return (named,)
            if creates and kind == "refunds":
                # The object the price read (`_refunded`): the one lookup serves both.
                found = (await _refunded(body(), lookup)).get("customer")
                if found is None:
                    raise Unreadable("customers", "customers: the refunded payment has none")
                return (_id_of(found, "customers"),)
            return await acted_on(
                "customers", lambda: body().one("customer"), f"the customer of {what}"
            )

        async def destinations() -> tuple[str, ...]:
            # A priced call on a connected account (`Stripe-Account`, every account of a
            # `Stripe-Context`) is a direct charge, capture, transfer or payout of that account:
            # its money settles there, whatever the body names.
            acting = self.accounts(call.headers) if cost.priced else ()
            try:
                return (*acting, *await named())
            except Unchecked as exc:
                raise Unchecked("destinations", (*acting, *exc.values)) from None

        async def named() -> tuple[str, ...]:
            """Where the body, or the object a call acts on, sends the money."""
            if creates and kind in ("transfers", "payouts"):
                named = body().one("destination")
                if named is None:
                    raise Unreadable(
                        "destinations",
                        f"destinations: {what} names no destination (Stripe would choose one)",
                    )
                return (named,)
            if creates and kind in ("payment_intents", "charges"):
                named = body().nested("transfer_data[destination]")
                legacy = body().one("destination") if kind == "charges" else None
                return tuple(v for v in (named, legacy) if v is not None)
            return await acted_on(
                "destinations",
                lambda: body().nested("transfer_data[destination]"),
                f"where {what} pays out",
            )

        return await collect(
            wanted,
            {"currencies": currencies, "customers": customers, "destinations": destinations},
        )

    async def _capture(
        self,
        lookup: Lookup,
        kind: str,
        object_id: str,
        form: FormBody,
        field: str,
        held: tuple[str, ...],
    ) -> Cost:
        """Confirming or capturing an intent or charge moves the amount the call names in
        `field` (an overcapture or a padded confirm moves more than the object's amount), else
        the largest of the object's `held` amounts (the first required; the others where the
        object has them). The ledger offsets it by what the same payer already paid for the
        object (`paid_object`)."""
        requested = form.one(field)
        fetched = await _fetch(lookup, kind, object_id)
        if requested is not None:
            amount = _amount(requested)
        else:
            first, *others = held
            amount = max(
                (
                    _fetched_int(fetched, first),
                    *(_fetched_int(fetched, f) for f in others if fetched.get(f) is not None),
                )
            )
        return self._priced(
            amount, _fetched_currency(fetched), counts=(object_id,), paid_object=object_id
        )

    async def _refund(self, form: FormBody, lookup: Lookup) -> Cost:
        charge = await _refunded(form, lookup)
        if form.one("charge") is None:  # an intent, with its latest charge
            intent = charge
            latest = intent.get("latest_charge")
            if isinstance(latest, Mapping):
                charge = latest
            else:
                received = intent.get("amount_received") or intent.get("amount")
                charge = {
                    "amount": received,
                    "amount_refunded": 0,
                    "currency": intent.get("currency"),
                }
        amount = form.one("amount")
        if amount is not None:
            refunded = _amount(amount)
        else:
            left = _fetched_int(charge, "amount") - _fetched_int(charge, "amount_refunded", 0)
            refunded = max(0, left)
        return self._priced(refunded, _fetched_currency(charge))

    def _priced(
        self,
        amount: int,
        currency: str,
        counts: tuple[str, ...] = (),
        paid_object: str | None = None,
    ) -> Cost:
        if not currency:
            raise Unpriceable("the request names no currency, so its cost cannot be known")
        micros = self.pricing.minor_to_micros(amount, currency)
        return Cost(micros, amount, currency.lower(), True, counts, paid_object)

    def settle(self, call: VendorCall, cost: Cost, status: int | None, body: bytes) -> Cost:
        actual = default_settle(cost, status)
        if status is not None and 200 <= status < 300 and cost.priced:
            # The created object is paid for now, by this call's payer: the same payer's confirm
            # or capture of it is offset by what this call paid.
            try:
                created = json.loads(body)
            except (ValueError, RecursionError):
                created = None
            if isinstance(created, dict) and isinstance(created.get("id"), str):
                counts = actual.counts
                if created["id"] not in counts:
                    counts = (*counts, created["id"])
                return Cost(
                    actual.micros,
                    actual.amount,
                    actual.currency,
                    actual.priced,
                    counts,
                    actual.paid_object,
                )
        return actual

    def error(self, status: int, code: str, message: str) -> tuple[bytes, dict[str, str]]:
        error_type = "idempotency_error" if code == "idempotency_error" else "invalid_request_error"
        body = json.dumps({"error": {"type": error_type, "code": code, "message": message}})
        # 409: an identical request is in flight; the SDK's retry then gets the stored answer.
        return body.encode(), {"Stripe-Should-Retry": "true" if status == 409 else "false"}

    @staticmethod
    def valid_account(account: str) -> bool:
        return bool(_ACCOUNT.fullmatch(account))


def _transfer_to(obj: Mapping[str, Any]) -> Any:
    """Where an intent's or charge's money goes out: `transfer_data.destination`, or a charge's
    legacy `destination`; None when it stays on the account."""
    data = obj.get("transfer_data")
    if isinstance(data, Mapping):
        return data.get("destination")
    return obj.get("destination")


def _id_of(value: Any, field: str) -> str:
    """An id an object names (a string, or an expanded object's `id`); the refusal never repeats
    what the object holds (it was read with the real key)."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if not isinstance(value, str) or not value:
        raise Unreadable(field, f"{field}: the object Stripe returned does not name one readably")
    return value


async def _refunded(form: FormBody, lookup: Lookup) -> Mapping[str, Any]:
    """What a refund refunds, as Stripe holds it: the charge it names, or the PaymentIntent it
    names with its latest charge expanded (read once for the price and the customer alike)."""
    charge_id, intent_id = form.one("charge"), form.one("payment_intent")
    if charge_id is not None and intent_id is not None:
        raise AmbiguousRequest("a refund names a charge or a payment_intent, not both")
    if charge_id is not None:
        return await _fetch(lookup, "charges", charge_id)
    if intent_id is not None:
        return await _fetch(lookup, "payment_intents", intent_id, "?expand[]=latest_charge")
    raise Unpriceable("a refund names a charge or a payment_intent")


async def _fetch(lookup: Lookup, kind: str, object_id: str, query: str = "") -> Mapping[str, Any]:
    """The object as Stripe holds it, fetched with the real key, by an id in Stripe's syntax."""
    described, syntax = _IDS[kind]
    if not syntax.fullmatch(object_id):
        raise AmbiguousRequest(f"{object_id[:40]!r} is not {described}")
    # Quoting changes nothing an id in Stripe's syntax can hold; it is the last line of defence.
    return await lookup.fetch_json(f"/v1/{kind}/{quote(object_id, safe='')}{query}")


def _amount(value: str | None) -> int:
    """A request's own amount, in minor units."""
    if value is None:
        raise Unpriceable("the request names no amount, so its cost cannot be known")
    if not (value.isascii() and value.isdigit() and len(value) <= 13 and int(value) <= _MAX_AMOUNT):
        raise AmbiguousRequest(f"amount {value[:24]!r} is not a whole number of minor units")
    return int(value)


def _fetched_int(obj: Mapping[str, Any], field: str, default: int | None = None) -> int:
    """A whole amount from an object the vendor returned. The refusal never repeats the object's
    data: it was fetched with the real key, and the caller's key may not be allowed to read it."""
    value = obj.get(field, default)
    if value is None and default is not None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_AMOUNT:
        raise Unpriceable(f"the object Stripe returned has no usable {field}")
    return value


def _fetched_currency(obj: Mapping[str, Any]) -> str:
    value = obj.get("currency")
    if not isinstance(value, str) or not value:
        raise Unpriceable("the object Stripe returned has no usable currency")
    return value
