"""Resend: Bearer API key, JSON bodies, an optional `Idempotency-Key` header.

Where the vault key sits: it is the Bearer token, so a workload points the official SDK at the
proxy with environment variables only (`RESEND_API_URL`, `RESEND_API_KEY`); the proxy sends the
real key instead.

What a dollar is: an email sent costs the `[resend] email` price. `POST /emails` sends one;
`POST /emails/batch` (a JSON array) reserves for its length and, in permissive batch validation
where Resend may refuse some items, settles to the emails it accepted (`data`). Any other write
(broadcasts to an audience, API keys, domains, ...) is refused until an operator lists it in
`[resend.endpoints]`, as "free" or with a flat price.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar

from keybrake.proxy.money import usd_to_micros
from keybrake.proxy.pricing import PricingEntryError, PricingTable, Unpriceable
from keybrake.proxy.settings import VendorCredentials
from keybrake.proxy.vendors.base import FREE, Cost, Lookup, Vendor, VendorCall, default_settle
from keybrake.proxy.vendors.bodies import read_json
from keybrake.proxy.vendors.unit_prices import flat_cost, parse_price, unpriced, validate_endpoints

__all__ = ["Resend"]

_RULES = frozenset({"free", "email", "batch"})
_SECTION_KEYS = frozenset({"endpoints", "email"})
_UNIT = "email"

# keybrake's refusals under Resend's error names, so the SDK raises its usual exception types
# (RateLimitError for a cap hit, MissingApiKeyError for no key, ResendError for the rest).
_NAMES = {
    "keybrake_missing_key": "missing_api_key",
    "keybrake_invalid_key": "invalid_api_key",
    "keybrake_wrong_vendor": "invalid_api_key",
    "keybrake_key_revoked": "invalid_api_key",
    "keybrake_key_expired": "invalid_api_key",
    "keybrake_endpoint_not_allowed": "restricted_api_key",
    "keybrake_unpriced_endpoint": "restricted_api_key",
    "keybrake_account_not_allowed": "restricted_api_key",
    "keybrake_budget_revoked": "invalid_api_key",
    "keybrake_budget_expired": "invalid_api_key",
    "keybrake_daily_cap_exceeded": "daily_quota_exceeded",
    "keybrake_per_call_cap_exceeded": "daily_quota_exceeded",
    "keybrake_caller_cap_exceeded": "daily_quota_exceeded",
    "keybrake_total_cap_exceeded": "daily_quota_exceeded",
    "keybrake_budget_exceeded": "daily_quota_exceeded",
    "idempotency_key_in_use": "concurrent_idempotent_requests",
    "idempotency_error": "invalid_idempotent_request",
    "keybrake_ambiguous_request": "validation_error",
    "keybrake_body_timeout": "validation_error",
    "keybrake_upstream_error": "application_error",
    "keybrake_lookup_failed": "application_error",
    "keybrake_unavailable": "internal_server_error",
}


class Resend(Vendor):
    name: ClassVar[str] = "resend"
    # Resend documents no request-id header; its API is served through Cloudflare, whose
    # `cf-ray` names each request. (The email id is in the answer's body.)
    request_id_header: ClassVar[str] = "cf-ray"
    idempotency_header: ClassVar[str | None] = "idempotency-key"

    def __init__(self, credentials: VendorCredentials, pricing: PricingTable) -> None:
        super().__init__(credentials, pricing)
        price = pricing.section(self.name).get("email")
        self.email_price: Decimal | None = (
            None if price is None else parse_price(price, entry="email")
        )

    @staticmethod
    def validate_pricing(section: Mapping[str, Any]) -> None:
        for key in section:
            if key not in _SECTION_KEYS:
                raise PricingEntryError(
                    f"'{key}' is not a Resend pricing entry; known: {sorted(_SECTION_KEYS)}",
                    entry=str(key),
                )
        if "email" in section:
            parse_price(section["email"], entry="email")
        validate_endpoints(section, _RULES)

    def presented_key(self, headers: Mapping[str, str]) -> str | None:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return value.strip() or None

    async def estimate(self, call: VendorCall, lookup: Lookup) -> Cost:
        if call.method == "GET":
            return FREE
        rule = self.rule_for(call.method, call.path)
        if rule is None:
            raise unpriced(self.name, call, call.path)
        if rule == "free":
            return FREE
        if rule in ("email", "batch"):
            # Read strictly even where only the shape counts: Resend must see what was priced.
            emails = read_json(call.headers, call.query, call.body, f"{call.method} {call.path}")
        if rule == "email":
            if not isinstance(emails, dict):
                raise Unpriceable("POST /emails takes one email, a JSON object")
            return self._emails(1)
        if rule == "batch":
            if not isinstance(emails, list) or not emails:
                raise Unpriceable("POST /emails/batch takes a non-empty JSON array of emails")
            return self._emails(len(emails))
        flat = flat_cost(rule)
        if flat is None:
            raise Unpriceable(f"unknown pricing rule {rule!r} for {call.method} {call.path}")
        return flat

    def _emails(self, count: int) -> Cost:
        if self.email_price is None:
            raise Unpriceable(
                'keybrake has no price per email: an operator sets [resend] email = "0.0009" '
                "in the pricing file"
            )
        return Cost(usd_to_micros(self.email_price * count), count, _UNIT, priced=True)

    def settle(self, call: VendorCall, cost: Cost, status: int | None, body: bytes) -> Cost:
        actual = default_settle(cost, status)
        if cost.currency != _UNIT or status is None or not 200 <= status < 300:
            return actual
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            return actual
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or self.email_price is None or cost.amount is None:
            return actual  # one email, or an answer without the list: the estimate stands
        accepted = min(len(data), cost.amount)
        return Cost(
            min(usd_to_micros(self.email_price * accepted), cost.micros),
            accepted,
            _UNIT,
            cost.priced,
        )

    def error(self, status: int, code: str, message: str) -> tuple[bytes, dict[str, str]]:
        name = _NAMES.get(code) or ("validation_error" if status < 500 else "application_error")
        body = {"statusCode": status, "name": name, "message": message, "keybrake_code": code}
        return json.dumps(body).encode(), {}
