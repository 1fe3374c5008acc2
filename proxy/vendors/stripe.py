"""Stripe: Bearer (or Basic) secret key, form-encoded bodies, amounts in minor units.

What a dollar is: money a call moves, priced by the rules in the `[stripe.endpoints]` pricing table.
An object that was paid for once (a PaymentIntent created through the proxy) is not paid for again
when it is confirmed or captured; one the proxy has not seen is looked up upstream with the real
key.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qs

from keybrake.proxy.pricing import Unpriceable
from keybrake.proxy.vendors.base import (
    FREE,
    Cost,
    Lookup,
    Vendor,
    VendorCall,
    default_settle,
    validate_endpoint_rules,
)

__all__ = ["Stripe"]

_RULES = frozenset(
    {
        "free",
        "amount",
        "amount_if_set",
        "intent_amount",
        "charge_amount",
        "refund",
        "invoice_amount",
    }
)


class Stripe(Vendor):
    name: ClassVar[str] = "stripe"
    request_id_header: ClassVar[str] = "request-id"

    @staticmethod
    def validate_pricing(section: Mapping[str, Any]) -> None:
        validate_endpoint_rules(section, _RULES)

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

    async def estimate(self, call: VendorCall, lookup: Lookup) -> Cost:
        if call.method == "GET":
            return FREE
        rule = self.rule_for(call.method, call.path)
        if rule is None:
            raise Unpriceable(
                f"keybrake has no price for {call.method} {call.path}: refused because it may "
                "move money. An operator prices it in the pricing file under [stripe.endpoints], "
                'e.g. "POST /v1/..." = "amount" or "free".'
            )
        if rule == "free":
            return FREE
        form = _form(call.body)
        object_id = call.path.strip("/").split("/")[2] if call.path.count("/") >= 3 else ""
        if rule == "amount":
            return self._priced(_amount(form), _currency(form))
        if rule == "amount_if_set":
            if "amount" not in form:
                return FREE
            fetched = await lookup.fetch_json(f"/v1/payment_intents/{object_id}")
            return self._priced(_amount(form), str(fetched.get("currency", "")))
        if rule in {"intent_amount", "charge_amount"}:
            if await lookup.is_counted(object_id):
                return Cost(priced=True)
            kind = "payment_intents" if rule == "intent_amount" else "charges"
            fetched = await lookup.fetch_json(f"/v1/{kind}/{object_id}")
            amount = _int(form.get("amount_to_capture") or form.get("amount") or fetched["amount"])
            return self._priced(amount, str(fetched["currency"]), counts=(object_id,))
        if rule == "refund":
            return await self._refund(form, lookup)
        if rule == "invoice_amount":
            fetched = await lookup.fetch_json(f"/v1/invoices/{object_id}")
            remaining = fetched.get("amount_remaining", fetched.get("amount_due"))
            return self._priced(_int(remaining), str(fetched["currency"]))
        raise Unpriceable(f"unknown pricing rule {rule!r} for {call.method} {call.path}")

    async def _refund(self, form: Mapping[str, str], lookup: Lookup) -> Cost:
        if "charge" in form:
            charge = await lookup.fetch_json(f"/v1/charges/{form['charge']}")
        elif "payment_intent" in form:
            intent = await lookup.fetch_json(
                f"/v1/payment_intents/{form['payment_intent']}?expand[]=latest_charge"
            )
            latest = intent.get("latest_charge")
            charge = (
                latest
                if isinstance(latest, Mapping)
                else {
                    "amount": intent.get("amount_received") or intent.get("amount"),
                    "amount_refunded": 0,
                    "currency": intent.get("currency"),
                }
            )
        else:
            raise Unpriceable("a refund names a charge or a payment_intent")
        if "amount" in form:
            amount = _amount(form)
        else:
            amount = _int(charge.get("amount")) - _int(charge.get("amount_refunded") or 0)
        return self._priced(amount, str(charge.get("currency") or form.get("currency", "")))

    def _priced(self, amount: int, currency: str, counts: tuple[str, ...] = ()) -> Cost:
        if not currency:
            raise Unpriceable("the request names no currency, so its cost cannot be known")
        micros = self.pricing.minor_to_micros(amount, currency)
        return Cost(micros, amount, currency.lower(), priced=True, counts=counts)

    def settle(self, call: VendorCall, cost: Cost, status: int | None, body: bytes) -> Cost:
        actual = default_settle(cost, status)
        if status is not None and 200 <= status < 300 and cost.priced:
            # The created object is paid for now: confirming or capturing it later costs nothing.
            try:
                created = json.loads(body)
            except ValueError:
                created = None
            if isinstance(created, dict) and isinstance(created.get("id"), str):
                return Cost(
                    actual.micros,
                    actual.amount,
                    actual.currency,
                    actual.priced,
                    (*actual.counts, created["id"]),
                )
        return actual

    def error(self, status: int, code: str, message: str) -> tuple[bytes, dict[str, str]]:
        error_type = "idempotency_error" if code == "idempotency_error" else "invalid_request_error"
        body = json.dumps({"error": {"type": error_type, "code": code, "message": message}})
        # 409: an identical request is in flight; the SDK's retry then gets the stored answer.
        return body.encode(), {"Stripe-Should-Retry": "true" if status == 409 else "false"}


def _form(body: bytes) -> dict[str, str]:
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as exc:
        raise Unpriceable("the request body is not UTF-8 form data") from exc
    return {key: values[-1] for key, values in parsed.items()}


def _int(value: Any) -> int:
    try:
        number = int(str(value))
    except (TypeError, ValueError) as exc:
        raise Unpriceable(f"amount {value!r} is not a whole number of minor units") from exc
    if number < 0:
        raise Unpriceable(f"amount {number} is negative")
    return number


def _amount(form: Mapping[str, str]) -> int:
    if "amount" not in form:
        raise Unpriceable("the request names no amount, so its cost cannot be known")
    return _int(form["amount"])


def _currency(form: Mapping[str, str]) -> str:
    return form.get("currency", "")
