"""Resend: Bearer API key, JSON bodies, an optional `Idempotency-Key` header.

Where the vault key sits: it is the Bearer token, so a workload points the official SDK at the
proxy with environment variables only (`RESEND_API_URL`, `RESEND_API_KEY`); the proxy sends the
real key instead.

What a dollar is: Resend bills per recipient, not per request: every `to`, `cc` and `bcc`
recipient of a sent email counts as one email against the account's quota
(https://resend.com/docs/knowledge-base/account-quotas-and-limits). So an email costs its
recipients times the `[resend] email` price. Each of `to`, `cc`, `bcc` is an address or a list of
addresses (https://resend.com/docs/api-reference/emails/send-email); every entry counts, repeats
included, and a string holding several addresses (`"a@x.com, b@y.com"`) counts each `@` in it, so
no reading of it by Resend can bill more than was reserved. `POST /emails` sends one email;
`POST /emails/batch` (a JSON array of at most 100 emails,
https://resend.com/docs/api-reference/emails/send-batch-emails) reserves the sum of its items'
recipients and, in permissive batch validation where Resend may refuse some items (listed by
index in `errors`), settles to that sum less each refused item's own recipients.

Refused before forwarding, since Resend could bill what the proxy did not count: a missing or
empty `to`, more than 50 addresses in `to`, a recipient field of another type (a number, an
object, a list holding anything but strings), a batch of more than 100 emails, a recipient field
spelled in another case (`To`, `BCC`), and a recipient header (`To`, `Cc`, `Bcc`, ...) among the
email's custom `headers`, or a header whose name is not printable ASCII without `:` or whose value
is not a string free of CR, LF and NUL (either could smuggle in another header). Refused too: a
scheduled email (`scheduled_at`, any spelling, any value), which Resend sends and bills later,
after the window its cap counts and after its key may be revoked; and `__proto__`, `constructor`
or `prototype` as a key anywhere in an email, which a JavaScript parser may treat specially.

Any other write (broadcasts to an audience, API keys, domains, ...) is refused until an operator
lists it in `[resend.endpoints]`, as "free" or with a flat price.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar

from keybrake.proxy.constraints import Found, Unreadable, collect, email_address
from keybrake.proxy.money import usd_to_micros
from keybrake.proxy.pricing import AmbiguousRequest, PricingTable, Unpriceable
from keybrake.proxy.settings import VendorCredentials
from keybrake.proxy.vendor_facts import RESEND
from keybrake.proxy.vendors.base import FREE, Cost, Lookup, Vendor, VendorCall, default_settle
from keybrake.proxy.vendors.bodies import parse_json, read_json
from keybrake.proxy.vendors.unit_prices import flat_rule, parse_price, unpriced, validate_section

__all__ = ["Resend"]

_RULES = frozenset({"free", "email", "batch"})
_SECTION_KEYS = frozenset({"endpoints", "email"})
_UNIT = "email"
MAX_TO = 50  # addresses in `to` per email: Resend's API reference, POST /emails
MAX_BATCH = 100  # emails per POST /emails/batch: Resend's API reference
_RECIPIENT_FIELDS = ("to", "cc", "bcc")
_COUNTED_FIELDS = (*_RECIPIENT_FIELDS, "headers")  # what the recipients are counted from
# Headers that could name another sender than `from`, which a senders constraint checks.
_SENDER_HEADERS = frozenset({"from", "sender", "resent-from", "resent-sender"})
# Custom headers that name recipients in a mail message: refused inside an email's `headers`.
_RECIPIENT_HEADERS = frozenset(
    {"to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc", "apparently-to"}
)
# A header field name as RFC 5322 (section 2.2) allows it: printable ASCII but `:`. Anything else
# (a control character, whitespace, a colon) could end the header early or start another one
# where a mail library writes it, a recipient header keybrake did not count among them.
_HEADER_NAME = re.compile(r"[!-9;-~]+")
# A header value keybrake lets through: no control character (CR, LF and NUL would start another
# header or end the string; a tab is folding white space, allowed) and no Unicode line break
# (U+0085, U+2028, U+2029), which some libraries split lines on.
_HEADER_VALUE_REFUSED = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
# Keys a JavaScript service may read as an object's prototype instead of a field (Resend's API
# is one): refused at any depth of an email, since what they do there is not keybrake's to know.
_PROTOTYPE_KEYS = frozenset({"__proto__", "constructor", "prototype"})

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
    "keybrake_constraint_violated": "restricted_api_key",
    "keybrake_budget_revoked": "invalid_api_key",
    "keybrake_budget_expired": "invalid_api_key",
    "keybrake_daily_cap_exceeded": "daily_quota_exceeded",
    "keybrake_per_call_cap_exceeded": "daily_quota_exceeded",
    "keybrake_caller_cap_exceeded": "daily_quota_exceeded",
    "keybrake_total_cap_exceeded": "daily_quota_exceeded",
    "keybrake_budget_exceeded": "daily_quota_exceeded",
    "keybrake_rate_limited": "rate_limit_exceeded",
    "idempotency_key_in_use": "concurrent_idempotent_requests",
    "idempotency_error": "invalid_idempotent_request",
    "keybrake_ambiguous_request": "validation_error",
    "keybrake_body_timeout": "validation_error",
    "keybrake_upstream_error": "application_error",
    "keybrake_lookup_failed": "application_error",
    "keybrake_unavailable": "internal_server_error",
}


class Resend(Vendor):
    name: ClassVar[str] = RESEND.name
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
        validate_section(section, "Resend", _SECTION_KEYS, _RULES)
        if "email" in section:
            parse_price(section["email"], entry="email")

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
            return self._emails(recipients(emails, "the email"))
        if rule == "batch":
            return self._emails(sum(batch_recipients(emails)))
        return flat_rule(rule, call)

    async def subjects(
        self, call: VendorCall, cost: Cost, lookup: Lookup, wanted: frozenset[str]
    ) -> Found:
        """Each email's recipients (`to`, `cc`, `bcc`: `recipient_domains`) and `from`
        (`senders`), from the body its price was read from, a batch's emails each. An address
        is one address (`a@x.com` or `Name <a@x.com>`), its domain lower-cased and IDNA-encoded;
        a string naming several (`"a@x.com, b@y.com"`, which Resend splits) is refused."""
        rule = self.rule_for(call.method, call.path)
        if not cost.priced or rule not in ("email", "batch"):
            return await super().subjects(call, cost, lookup, wanted)
        body = read_json(call.headers, call.query, call.body, f"{call.method} {call.path}")
        emails: list[Any] = body if rule == "batch" and isinstance(body, list) else [body]

        async def recipient_domains() -> tuple[str, ...]:
            domains: list[str] = []
            for email in emails:
                for field in _RECIPIENT_FIELDS:
                    value = email.get(field) if isinstance(email, dict) else None
                    items = value if isinstance(value, list) else [] if value is None else [value]
                    for item in items:
                        address = email_address("recipient_domains", str(item))
                        domains.append(address.rpartition("@")[2])
            return tuple(domains)

        async def senders() -> tuple[str, ...]:
            found = []
            for email in emails:
                if not isinstance(email, dict):
                    raise Unreadable("senders", "senders: an email is not a JSON object")
                if any(key.lower() == "from" and key != "from" for key in email):
                    raise Unreadable("senders", "senders: `from` is read in lower case only")
                named = email.get("headers")
                if isinstance(named, dict) and _SENDER_HEADERS & {h.strip().lower() for h in named}:
                    raise Unreadable(
                        "senders", "senders: a sender header is refused; name it in `from`"
                    )
                sender = email.get("from")
                if not isinstance(sender, str):
                    raise Unreadable("senders", "senders: an email names no `from`")
                found.append(email_address("senders", sender))
            return tuple(found)

        return await collect(wanted, {"recipient_domains": recipient_domains, "senders": senders})

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
        try:
            items = batch_recipients(parse_json(call.body))
        except (ValueError, Unpriceable, AmbiguousRequest):
            return actual
        failed = _failed_items(answer.get("errors"), len(items))
        if failed is None or len(data) + len(failed) != len(items):
            return actual  # an answer that does not add up: the estimate stands
        sent = min(sum(items) - sum(items[index] for index in failed), cost.amount)
        return Cost(
            min(usd_to_micros(self.email_price * sent), cost.micros), sent, _UNIT, cost.priced
        )

    def error(self, status: int, code: str, message: str) -> tuple[bytes, dict[str, str]]:
        name = _NAMES.get(code) or ("validation_error" if status < 500 else "application_error")
        body = {"statusCode": status, "name": name, "message": message, "keybrake_code": code}
        return json.dumps(body).encode(), {}


def batch_recipients(emails: Any) -> list[int]:
    """The recipients of each email of a `POST /emails/batch` body, in order."""
    if not isinstance(emails, list) or not emails:
        raise Unpriceable("POST /emails/batch takes a non-empty JSON array of emails")
    if len(emails) > MAX_BATCH:
        raise Unpriceable(
            f"a batch holds at most {MAX_BATCH} emails (Resend's limit); this one holds "
            f"{len(emails)}: send it as several batches"
        )
    return [recipients(email, f"email {index} of the batch") for index, email in enumerate(emails)]


def recipients(email: Any, what: str) -> int:
    """What one email costs, in emails: its `to`, `cc` and `bcc` recipients, repeats included.
    Refuses a body Resend could bill for more recipients than this counts."""
    if not isinstance(email, dict):
        raise Unpriceable(f"{what} must be a JSON object")
    _refuse_prototype_keys(email, what)
    for key in email:
        if re.sub(r"[_-]", "", key).lower() == "scheduledat":
            raise Unpriceable(
                f"{what}: a scheduled email ({key[:20]!r}) is refused: Resend sends and bills it "
                "later, outside the window its cap counts and after its key may be revoked. "
                "Send it when it is due."
            )
        # (`headers` too: recipient headers inside it are refused, so another spelling of it
        # must not carry them past that check.)
        if key.lower() in _COUNTED_FIELDS and key not in _COUNTED_FIELDS:
            raise AmbiguousRequest(
                f"{what}: recipients are read from {key.lower()!r}, so {key[:20]!r} is refused "
                "(Resend's field names are lower case)"
            )
    headers = email.get("headers")
    if headers is not None:
        if not isinstance(headers, dict):
            raise Unpriceable(f"{what}: `headers` must be a JSON object")
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise AmbiguousRequest(
                    f"{what}: header name {name[:20]!r} is refused: a header name is printable "
                    "ASCII without spaces, control characters or ':'"
                )
            if not isinstance(value, str) or _HEADER_VALUE_REFUSED.search(value):
                raise AmbiguousRequest(
                    f"{what}: the value of header {name[:20]!r} is refused: a header value is a "
                    "string without line breaks (CR, LF, U+2028, ...) or other control characters"
                )
            if name.lower() in _RECIPIENT_HEADERS:
                raise AmbiguousRequest(
                    f"{what}: a {name[:20]!r} header is refused; name recipients in to, cc "
                    "and bcc, where keybrake counts them"
                )
    if "to" not in email:
        raise Unpriceable(f"{what} names no `to`, so its recipients cannot be counted")
    to = _addresses(email["to"], "to", what)
    if to == 0:
        raise Unpriceable(f"{what}: `to` is an empty list")
    if to > MAX_TO:
        raise Unpriceable(
            f"{what} has {to} addresses in `to`; Resend takes at most {MAX_TO}: send several "
            "emails (or a batch)"
        )
    cc = _addresses(email.get("cc"), "cc", what)
    bcc = _addresses(email.get("bcc"), "bcc", what)
    return to + cc + bcc


def _refuse_prototype_keys(value: Any, what: str) -> None:
    """Refuse `__proto__`, `constructor` or `prototype` as a key anywhere in an email."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in _PROTOTYPE_KEYS:
                raise AmbiguousRequest(
                    f"{what}: the key {key!r} is refused: a JavaScript service may read it as "
                    "the object's prototype rather than a field"
                )
            _refuse_prototype_keys(inner, what)
    elif isinstance(value, list):
        for inner in value:
            _refuse_prototype_keys(inner, what)


def _addresses(value: Any, field: str, what: str) -> int:
    """How many recipients a `to`/`cc`/`bcc` value names: an address or a list of addresses."""
    if value is None and field != "to":
        return 0
    if isinstance(value, str):
        return _in_string(value)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return sum(_in_string(item) for item in value)
    raise Unpriceable(
        f"{what}: `{field}` must be an email address or a list of email addresses (strings), "
        f"not {_json_type(value)}"
    )


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "a list holding something other than strings"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


def _in_string(address: str) -> int:
    """One address, or as many as it has `@` if it lists several (`"a@x.com, b@y.com"`): every
    address Resend can deliver to holds one, so this never counts fewer than it could send to."""
    return max(1, address.count("@"))


def _failed_items(errors: Any, size: int) -> set[int] | None:
    """The indexes of the batch items Resend refused, from a permissive answer's `errors`;
    None if the list is not one the proxy can trust."""
    if errors is None:
        return set()
    if not isinstance(errors, list):
        return None
    failed: set[int] = set()
    for error in errors:
        index = error.get("index") if isinstance(error, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < size:
            return None
        failed.add(index)
    return failed
