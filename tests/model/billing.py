"""Vendors that bill, behind the proxy's `upstream=` seam: what the money model test checks the
proxy against. Each records every request it receives with the credential it carried, and
bills in the vendor's own unit, as documented (docs/guarantees.md, section 1):

- Stripe: PaymentIntents created (no money moves) for a customer in usd or eur, updated (a new
  amount, a new customer), confirmed (automatic capture: the amount moves, or `amount_to_confirm`
  when given, which may exceed it; manual capture: it is held, as `amount_capturable`) and
  captured (`amount_to_capture`, else everything held, moves), refunds (the amount moves back
  out). Money is counted
  in micro-dollars at the operator's rates (`MINOR_MICROS`). Idempotency keys replay the stored
  answer (`Idempotent-Replayed`), as Stripe does for 24 hours.
- Twilio: a message bills its segments (GSM-7: 160, then 153 a segment) at $0.0083.
- Resend: an email bills each of its to/cc/bcc recipients; a batch, each item's.

Each request records whom it paid or messaged (`Sent.touched`), as the vendor saw it: the
customer and currency of the intent it created or acted on (the intent's customer before an
update, and the new one), each `To`, each to/cc/bcc address as sent. The money model holds the
requests of a constrained key to its constraints (docs/guarantees.md, section 6).

Nothing here imports the proxy's pricing or ledger.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from keybrake.proxy.upstream import UpstreamError, UpstreamResponse
from tests.fakes.inprocess import InProcessUpstream

STRIPE = "http://stripe.model"
TWILIO = "http://twilio.model"
RESEND = "http://resend.model"
STRIPE_SECRET = "sk_test_MODELSECRET_0000000000000000"
TWILIO_SID = "AC" + "5e" * 16
TWILIO_TOKEN = "twilio_MODELTOKEN_000000000000"
RESEND_SECRET = "re_MODELSECRET_00000000000000"
SEGMENT_USD = Decimal("0.0083")
MMS_USD = Decimal("0.0220")
# MMS Converter's link to a media message's media, as the model's Twilio writes it when the
# recipient's carrier takes no MMS (Twilio's short links: a domain and ten characters).
CONVERTER_LINK = "https://twil.io/" + "a" * 10
EMAIL_USD = Decimal("0.0009")
# Micro-dollars per minor unit of each currency the account takes: the operator's rates, which
# the model test configures the proxy with (`PRICING`); eur at $1.25.
MINOR_MICROS = {"usd": 10_000, "eur": 12_500}
CUSTOMERS = ("cus_a", "cus_b", "cus_c")  # the account's customers
PRICING = """
[fx]
eur = "1.25"

[twilio.sms]
# The model's Twilio bills every destination at the US rate.
"+44" = "0.0083"

[twilio.mms]
"+44" = "0.0220"
"""


@dataclass
class Sent:
    """One request as the vendor received it."""

    vendor: str
    method: str
    path: str
    credential: str
    body: bytes
    status: int = 0
    replayed: bool = False  # answered from the vendor's idempotency store
    idempotency_key: str | None = None  # as it reached the vendor
    # Whom it paid or messaged, by constraint field: each value as the vendor saw it (None: a
    # Stripe call naming no customer, or acting on an intent that has none). Empty: it executed
    # nothing (a replay, an unknown object).
    touched: dict[str, tuple[str | None, ...]] = field(default_factory=dict)


@dataclass
class Moved:
    """Money the vendor moved (or billed), in micro-dollars, and what moved it."""

    vendor: str
    micros: int
    what: str  # "confirm pi_3", "capture pi_3", "refund pi_3", "sms", "email", ...
    object_id: str | None = None


@dataclass
class Intent:
    id: str
    amount: int  # in the currency's minor unit
    capture_method: str
    status: str = "requires_confirmation"
    received: int = 0
    capturable: int = 0  # held by a manual confirm, which `amount_to_confirm` may pad
    currency: str = "usd"
    customer: str | None = None

    @property
    def micros(self) -> int:
        return self.amount * MINOR_MICROS[self.currency]

    def touched(self) -> dict[str, tuple[str | None, ...]]:
        return {"customers": (self.customer,), "currencies": (self.currency,)}

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "payment_intent",
            "amount": self.amount,
            "currency": self.currency,
            "customer": self.customer,
            "capture_method": self.capture_method,
            "status": self.status,
            "amount_received": self.received,
            "amount_capturable": self.capturable,
        }


@dataclass
class BillingUpstream(InProcessUpstream):
    sent: list[Sent] = field(default_factory=list)
    moved: list[Moved] = field(default_factory=list)
    intents: dict[str, Intent] = field(default_factory=dict)
    # Stripe's idempotency store: key -> (request fingerprint, stored answer)
    stripe_idempotency: dict[str, tuple[bytes, UpstreamResponse]] = field(default_factory=dict)
    resend_idempotency: dict[str, UpstreamResponse] = field(default_factory=dict)
    lose_next_answer: bool = False  # the next request executes, then its answer is lost
    _ids: int = 0
    _receiving: Sent = field(init=False)

    def __post_init__(self) -> None:
        InProcessUpstream.__init__(self)

    async def respond(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> UpstreamResponse:
        lowered = {k.lower(): v for k, v in headers}
        base, path = _split(url)
        vendor = {STRIPE: "stripe", TWILIO: "twilio", RESEND: "resend"}[base]
        record = Sent(vendor, method, path, lowered.get("authorization", ""), body or b"")
        record.idempotency_key = lowered.get("idempotency-key")
        self.sent.append(record)
        self._receiving = record
        answer = getattr(self, f"_{vendor}")(method, path, lowered, body or b"")
        record.status = answer.status
        record.replayed = any(k.lower() == "idempotent-replayed" for k, _ in answer.headers)
        if self.lose_next_answer and vendor == "stripe" and method == "POST":
            self.lose_next_answer = False
            raise UpstreamError("the connection dropped before the answer")
        return answer

    def _id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}_{self._ids:06d}"

    def _touch(self, touched: dict[str, tuple[str | None, ...]]) -> None:
        """What the request being answered paid or messaged."""
        for name, values in touched.items():
            self._receiving.touched[name] = (*self._receiving.touched.get(name, ()), *values)

    def create_intent(
        self, amount: int, currency: str, customer: str | None, capture_method: str
    ) -> Intent:
        """An intent made on the account without the proxy (the dashboard, another system)."""
        intent = Intent(self._id("pi"), amount, capture_method, currency=currency)
        intent.customer = customer
        self.intents[intent.id] = intent
        return intent

    # -- Stripe ----------------------------------------------------------------------------------

    def _stripe(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> UpstreamResponse:
        if headers.get("authorization") != f"Bearer {STRIPE_SECRET}":
            return _json(401, {"error": {"type": "invalid_request_error"}})
        key = headers.get("idempotency-key")
        if key is not None and method == "POST":
            stored = self.stripe_idempotency.get(key)
            fingerprint = method.encode() + path.encode() + body
            if stored is not None:
                if stored[0] != fingerprint:
                    return _json(400, {"error": {"type": "idempotency_error"}})
                replay = stored[1]
                return UpstreamResponse(
                    replay.status, [*replay.headers, ("Idempotent-Replayed", "true")], replay.body
                )
            answer = self._stripe_execute(method, path, dict(parse_qsl(body.decode())))
            if answer.status < 500:
                self.stripe_idempotency[key] = (fingerprint, answer)
            return answer
        return self._stripe_execute(method, path, dict(parse_qsl(body.decode())))

    def _stripe_execute(self, method: str, path: str, form: dict[str, str]) -> UpstreamResponse:
        parts = path.strip("/").split("/")
        if method == "GET" and parts[:2] == ["v1", "payment_intents"] and len(parts) == 3:
            found = self.intents.get(parts[2])
            return _stripe_object(found) if found else _json(404, {"error": {"code": "missing"}})
        if method != "POST" or parts[:2] not in (["v1", "payment_intents"], ["v1", "refunds"]):
            return _json(404, {"error": {"code": "unknown"}})
        if parts == ["v1", "payment_intents"]:
            customer, currency = form.get("customer"), form.get("currency", "")
            self._touch({"customers": (customer,), "currencies": (currency,)})
            if customer is not None and customer not in CUSTOMERS:
                return _json(400, {"error": {"code": "resource_missing", "param": "customer"}})
            if currency not in MINOR_MICROS:
                return _json(400, {"error": {"code": "parameter_invalid", "param": "currency"}})
            created = Intent(
                self._id("pi"),
                int(form["amount"]),
                form.get("capture_method", "automatic"),
                currency=currency,
                customer=customer,
            )
            self.intents[created.id] = created
            return _stripe_object(created)
        if parts == ["v1", "refunds"]:
            refunded = self.intents.get(form.get("payment_intent", ""))
            if refunded is not None:
                self._touch(refunded.touched())
            if refunded is None or refunded.received <= 0:
                return _json(400, {"error": {"code": "charge_not_refundable"}})
            amount = int(form.get("amount", refunded.received))
            if amount > refunded.received:
                return _json(400, {"error": {"code": "amount_too_large"}})
            refunded.received -= amount
            micros = amount * MINOR_MICROS[refunded.currency]
            self.moved.append(Moved("stripe", micros, f"refund {refunded.id}", refunded.id))
            refund = {"id": self._id("re"), "object": "refund", "amount": amount}
            return _json(200, refund)
        intent = self.intents.get(parts[2])
        if intent is None:
            return _json(404, {"error": {"code": "resource_missing"}})
        action = parts[3] if len(parts) > 3 else "update"
        if action == "update":
            # It acts on the intent's customer, and pays the new one; a new amount is money.
            self._touch({"customers": (intent.customer,)})
            if "customer" in form:
                self._touch({"customers": (form["customer"],)})
            if "amount" in form:
                self._touch({"currencies": (intent.currency,)})
            if intent.status != "requires_confirmation":
                return _json(400, {"error": {"code": "payment_intent_unexpected_state"}})
            if form.get("customer", CUSTOMERS[0]) not in CUSTOMERS:
                return _json(400, {"error": {"code": "resource_missing", "param": "customer"}})
            if "amount" in form:
                intent.amount = int(form["amount"])
            if "customer" in form:
                intent.customer = form["customer"]
            return _stripe_object(intent)
        self._touch(intent.touched())
        if action == "confirm":
            if intent.status != "requires_confirmation":
                return _json(400, {"error": {"code": "payment_intent_unexpected_state"}})
            # "The exact amount to confirm", the intent's amount if not given (API 2026-04-22).
            confirmed = int(form.get("amount_to_confirm", intent.amount))
            if intent.capture_method == "manual":
                intent.status, intent.capturable = "requires_capture", confirmed
            else:
                intent.status, intent.received = "succeeded", confirmed
                micros = confirmed * MINOR_MICROS[intent.currency]
                self.moved.append(Moved("stripe", micros, f"confirm {intent.id}", intent.id))
            return _stripe_object(intent)
        if action == "increment_authorization":
            # Only a held (manual, confirmed) intent, and only upward (Stripe's API reference).
            amount = int(form.get("amount", "0"))
            if intent.status != "requires_capture" or amount <= intent.amount:
                return _json(400, {"error": {"code": "payment_intent_unexpected_state"}})
            intent.amount, intent.capturable = amount, max(intent.capturable, amount)
            return _stripe_object(intent)
        if action == "capture":
            if intent.status != "requires_capture":
                return _json(400, {"error": {"code": "payment_intent_unexpected_state"}})
            # "Defaults to the full amount_capturable" (Stripe's API reference).
            amount = int(form.get("amount_to_capture", intent.capturable))
            if amount > intent.capturable:
                return _json(400, {"error": {"code": "amount_too_large"}})
            intent.status, intent.received, intent.capturable = "succeeded", amount, 0
            micros = amount * MINOR_MICROS[intent.currency]
            self.moved.append(Moved("stripe", micros, f"capture {intent.id}", intent.id))
            return _stripe_object(intent)
        return _json(404, {"error": {"code": "unknown"}})

    # -- Twilio ----------------------------------------------------------------------------------

    def _twilio(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> UpstreamResponse:
        if not path.endswith("/Messages.json") or TWILIO_SID not in path:
            return _json(404, {"code": 20404})
        form = parse_qsl(body.decode())
        self._touch({"recipients": tuple(v for k, v in form if k == "To")})
        text = next((v for k, v in form if k == "Body"), "")
        to = next((v for k, v in form if k == "To"), "")
        media = any(k == "MediaUrl" for k, _ in form)
        if media and to.endswith("6"):  # a carrier that takes MMS: billed as one
            segments = 1
            self.moved.append(Moved("twilio", int(MMS_USD * 1_000_000), "mms"))
        else:
            if media:  # MMS Converter: an SMS of the body and a link, "charged" as that SMS
                text = f"{text}\n{CONVERTER_LINK}"
            segments = 1 if len(text) <= 160 else math.ceil(len(text) / 153)
            self.moved.append(Moved("twilio", int(segments * SEGMENT_USD * 1_000_000), "sms"))
        sid = self._id("SM")
        message = {"sid": sid, "status": "queued", "price": None, "num_segments": str(segments)}
        return UpstreamResponse(
            201,
            [("content-type", "application/json"), ("twilio-request-id", "RQ1")],
            json.dumps(message).encode(),
        )

    # -- Resend ----------------------------------------------------------------------------------

    def _resend(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> UpstreamResponse:
        if headers.get("authorization") != f"Bearer {RESEND_SECRET}":
            return _json(401, {"name": "invalid_api_key"})
        key = headers.get("idempotency-key")
        if key is not None and key in self.resend_idempotency:
            return self.resend_idempotency[key]  # Resend answers a repeated key from its store
        answer = self._resend_send(path, body)
        if key is not None:
            self.resend_idempotency[key] = answer
        return answer

    def _resend_send(self, path: str, body: bytes) -> UpstreamResponse:
        data = json.loads(body)
        emails = data if path == "/emails/batch" else [data]
        ids = []
        for email in emails:
            for name in ("to", "cc", "bcc"):
                value = email.get(name)
                addresses = value if isinstance(value, list) else [] if value is None else [value]
                self._touch({"recipient_domains": tuple(addresses)})
            recipients = sum(
                len(v) if isinstance(v, list) else 1
                for v in (email.get(f) for f in ("to", "cc", "bcc"))
                if v is not None
            )
            self.moved.append(Moved("resend", int(recipients * EMAIL_USD * 1_000_000), "email"))
            ids.append({"id": self._id("em")})
        answer: Any = {"data": ids} if path == "/emails/batch" else ids[0]
        return _json(200, answer)


def _split(url: str) -> tuple[str, str]:
    for base in (STRIPE, TWILIO, RESEND):
        if url.startswith(base):
            return base, url[len(base) :].partition("?")[0]
    raise AssertionError(f"a request to no model vendor: {url}")


def _json(status: int, body: Any) -> UpstreamResponse:
    return UpstreamResponse(
        status,
        [("content-type", "application/json"), ("request-id", "req_model")],
        json.dumps(body).encode(),
    )


def _stripe_object(intent: Intent) -> UpstreamResponse:
    return _json(200, intent.json())
