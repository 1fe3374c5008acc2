"""Twilio: HTTP Basic auth, form-encoded bodies, every resource under the account's own path.

Where the vault key sits: it is the Basic-auth password. The username and the account SID in the
path are a placeholder of the workload's choosing (`"AC" + "0" * 32`); the proxy sends the real
account SID and auth token instead, rewrites the SID in the path, and rewrites the real SID in
Twilio's answers (`account_sid`, `uri`, ...) back to the placeholder, so the workload never learns
either. The account resource itself (`/2010-04-01/Accounts/{sid}.json`, which carries the auth
token) and paths outside an account are refused.

What a dollar is: a message costs its SMS segments (see `keybrake.proxy.vendors.sms`) times the
per-segment price of its destination, or, when it carries media, the larger of the destination's
MMS price and the SMS that MMS Converter may send instead (`CONVERTER_LINK_LENGTH`), from
the `[twilio.sms]` / `[twilio.mms]` tables (longest E.164 prefix wins, `default` for other phone
numbers). The destination is `To` read as the `recipients` constraint reads it, `+` and digits
behind an optional `whatsapp:`; Twilio routes other spellings to the number they spell, so they
are refused rather than matched as text. Refused too, since Twilio would bill other than what
was counted: a scheduled message (billed when sent, up to 35 days later), Link Shortening
(`ShortenUrls`, which rewrites the body), and any other spelling of a field read here (`mediaUrl`
for `MediaUrl`). Twilio's answer carries `price` (negative decimal
string, usually null at creation): the call settles to it when present and keeps the estimate
otherwise. Any other write — calls above all, billed by the minute — is refused until an
operator prices it in `[twilio.endpoints]`.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

from keybrake.proxy.constraints import (
    Found,
    Unreadable,
    canonical_number,
    canonical_service,
    collect,
    twilio_address,
)
from keybrake.proxy.money import usd_to_micros
from keybrake.proxy.pricing import AmbiguousRequest, PricingTable, Unpriceable
from keybrake.proxy.settings import VendorCredentials
from keybrake.proxy.vendor_facts import (
    TWILIO,
    TWILIO_API_VERSION,
    TWILIO_PLACEHOLDER_SID,
    setting_variable,
)
from keybrake.proxy.vendors.base import FREE, Cost, Lookup, Vendor, VendorCall, default_settle
from keybrake.proxy.vendors.bodies import FormBody, read_form
from keybrake.proxy.vendors.sms import sms_segments
from keybrake.proxy.vendors.unit_prices import (
    flat_rule,
    parse_price,
    unpriced,
    validate_price_table,
    validate_section,
)

__all__ = ["PLACEHOLDER_SID", "Twilio"]

PLACEHOLDER_SID = TWILIO_PLACEHOLDER_SID
API_VERSION = TWILIO_API_VERSION
_RULES = frozenset({"free", "message"})
_SECTION_KEYS = frozenset({"endpoints", "sms", "mms"})
_SID = re.compile(r"AC[0-9a-fA-F]{32}")
# A destination prefix: E.164 (`+44`, `+1876`), optionally behind the WhatsApp channel
# (`whatsapp:+1`), or the whole channel (`whatsapp:`). `default` prices the phone numbers no
# prefix matches. Other channels name no phone number, so a message to one is refused (as the
# `recipients` constraint refuses it) and a price for one could never apply.
_PREFIX = re.compile(r"(?:whatsapp:)?\+[0-9]{0,15}|whatsapp:")
# A `To` of digits behind a space: a `+` sent unencoded in a form body, which decodes as a space.
_UNENCODED_PLUS = re.compile(r"(?:whatsapp:)? [0-9]+\s*")
# The message fields keybrake reads, for its price or for constraints, spelled as Twilio spells
# them, by their folded name (`_folded`). Twilio's field names are case-sensitive: `mediaUrl` is
# not `MediaUrl` to Twilio's documentation, but a field that differs from one of these only in
# case or punctuation is one a parser might take for it, so it is refused rather than guessed at.
_READ_FIELDS = {
    _name.lower(): _name
    for _name in (
        "To",
        "From",
        "Body",
        "MediaUrl",
        "SendAsMms",
        "ContentSid",
        "MessagingServiceSid",
        "ShortenUrls",
    )
}
# MMS Converter, on by default (https://support.twilio.com/hc/en-us/articles/223181248): a media
# message to a carrier without MMS is sent as an SMS of its Body and "a short URL linking to your
# media", and "charged for the cost of the SMS message instead of an MMS". Twilio does not state
# the link's length; its short links are a short domain and a unique string (Link Shortening's
# are the domain and ten characters, `https://twil.io/` + 10 = 26). keybrake counts a newline and
# 35 characters for it, room for a longer domain or string, each one septet of GSM-7 (as a URL's
# letters, digits and `:/.` are), so a GSM-7 body stays GSM-7 and a UCS-2 body grows by 36 units.
CONVERTER_LINK_LENGTH = 35
# Message Scheduling (https://www.twilio.com/docs/messaging/features/message-scheduling): Twilio
# sends, and bills, a scheduled message up to 35 days later, outside the window its cap counts
# and after its key may have been revoked. Refused in any spelling, whatever the value.
_SCHEDULING_FIELDS = frozenset({"sendat", "scheduletype"})
_AUTH_TOKEN_FIELD = re.compile(rb'"auth_token"\s*:\s*"[^"]*"')
_REDACTED = "[redacted by keybrake]"


class Twilio(Vendor):
    name: ClassVar[str] = TWILIO.name
    request_id_header: ClassVar[str] = "twilio-request-id"
    idempotency_header: ClassVar[str | None] = None  # Twilio has none; the dedupe window stands in

    def __init__(self, credentials: VendorCredentials, pricing: PricingTable) -> None:
        super().__init__(credentials, pricing)
        if not credentials.account:
            raise ValueError(
                f"Twilio needs the real account SID ({setting_variable(TWILIO.settings.account)})"
            )
        self.account_sid = credentials.account
        section = pricing.section(self.name)
        self.prices = {kind: _destinations(section.get(kind, {})) for kind in ("sms", "mms")}

    @staticmethod
    def validate_pricing(section: Mapping[str, Any]) -> None:
        validate_section(section, "Twilio", _SECTION_KEYS, _RULES)
        for table in ("sms", "mms"):
            validate_price_table(
                section,
                table,
                key_ok=lambda key: key == "default" or bool(_PREFIX.fullmatch(key)),
                key_hint='"default", an E.164 prefix such as "+44", "whatsapp:+44" or "whatsapp:"',
            )

    # -- auth and paths --------------------------------------------------------------------------

    def presented_key(self, headers: Mapping[str, str]) -> str | None:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except ValueError:
            return None
        return decoded.partition(":")[2] or None

    def upstream_request(self, call: VendorCall) -> tuple[str, dict[str, str]]:
        parts = call.path.split("/")
        if len(parts) > 3 and parts[1] == API_VERSION and parts[2] == "Accounts":
            _, dot, rest = parts[3].partition(".")
            parts[3] = self.account_sid + dot + rest
        target = "/".join(parts) + (f"?{call.query}" if call.query else "")
        basic = base64.b64encode(f"{self.account_sid}:{self.credentials.secret}".encode())
        return target, {"Authorization": f"Basic {basic.decode()}"}

    def workload_reply(
        self, call: VendorCall, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[list[tuple[str, str]], bytes]:
        placeholder = _placeholder(call.path)
        secret = self.credentials.secret
        body = body.replace(self.account_sid.encode(), placeholder.encode())
        body = body.replace(secret.encode(), _REDACTED.encode())
        body = _AUTH_TOKEN_FIELD.sub(b'"auth_token": null', body)
        shown = [
            (k, v.replace(self.account_sid, placeholder).replace(secret, _REDACTED))
            for k, v in headers
        ]
        return shown, body

    # -- cost ------------------------------------------------------------------------------------

    async def estimate(self, call: VendorCall, lookup: Lookup) -> Cost:
        _check_path(call.path)
        if call.method == "GET":
            return FREE
        rule = self.rule_for(call.method, call.path)
        if rule is None:
            general = "/".join("*" if i == 3 else p for i, p in enumerate(call.path.split("/")))
            raise unpriced(self.name, call, general)
        if rule == "free":
            return FREE
        if rule == "message":
            return self._message(read_form(call.headers, call.query, call.body, "a message"))
        return flat_rule(rule, call)

    async def subjects(
        self, call: VendorCall, cost: Cost, lookup: Lookup, wanted: frozenset[str]
    ) -> Found:
        """A message's `To` (`recipients`) and its `From` and `MessagingServiceSid` (`senders`,
        each given checked), read from the body its price was read from: E.164 behind an
        optional `whatsapp:` channel, nothing else. Another priced call says neither."""
        if not cost.priced or self.rule_for(call.method, call.path) != "message":
            return await super().subjects(call, cost, lookup, wanted)
        form = read_form(call.headers, call.query, call.body, "a message")

        async def recipients() -> tuple[str, ...]:
            return (canonical_number("recipients", form.one("To") or ""),)

        async def senders() -> tuple[str, ...]:
            number, service = form.one("From"), form.one("MessagingServiceSid")
            if number is None and service is None:
                raise Unreadable("senders", "senders: the message names no From")
            found = [] if number is None else [canonical_number("senders", number)]
            if service is not None:
                found.append(canonical_service("senders", service))
            return tuple(found)

        return await collect(wanted, {"recipients": recipients, "senders": senders})

    def _message(self, form: FormBody) -> Cost:
        _check_fields(form)
        # `one` refuses a field given twice; the senders are read here too, though only a
        # constraint uses them, so a message is refused the same way with or without one.
        form.one("From")
        form.one("MessagingServiceSid")
        to = _destination(form.one("To") or "")
        if form.one("ContentSid"):
            raise Unpriceable(
                "a message sent from a content template (ContentSid) cannot be priced: the "
                "proxy cannot count the segments of a body it does not see. Send Body instead."
            )
        if not _off(form.one("ShortenUrls")):
            raise Unpriceable(
                "a message with ShortenUrls is refused: Link Shortening rewrites the links in "
                "its Body, so the segments Twilio sends are not those keybrake counts. Send it "
                "without ShortenUrls (or with ShortenUrls=false)."
            )
        # Any MediaUrl, even a blank one, prices the message as media: a media message never
        # costs less than the SMS of its body, so a reading Twilio might not share errs high.
        media = form.many("MediaUrl")
        # Any SendAsMms but `false` may be read as true: priced as the MMS it may be.
        body = form.one("Body") or ""
        if media or not _off(form.one("SendAsMms")):
            return self._media_message(to, body)
        segments = sms_segments(body)
        return self._priced("sms", to, segments.count, "sms_segment")

    def _media_message(self, to: str, body: str) -> Cost:
        """One MMS, or the SMS that MMS Converter sends instead (the body, a newline and a link
        to the media: `CONVERTER_LINK_LENGTH`), whichever costs more: which one Twilio sends
        depends on the recipient's carrier, which the proxy cannot know. The audit's units are
        those of the one counted (1 `mms`, or its `sms_segment`s)."""
        mms = self._priced("mms", to, 1, "mms")
        converted = sms_segments(body + "\n" + "x" * CONVERTER_LINK_LENGTH)
        sms = self._priced("sms", to, converted.count, "sms_segment")
        return sms if sms.micros > mms.micros else mms

    def _priced(self, kind: str, to: str, count: int, unit: str) -> Cost:
        price = self._price(kind, to)
        return Cost(usd_to_micros(price * count), count, unit, priced=True)

    def _price(self, kind: str, to: str) -> Decimal:
        """The price of one unit to `to`, a destination as `_destination` reads it."""
        prices = self.prices[kind]
        for prefix, price in prices:
            if prefix != "default" and to.startswith(prefix):
                return price
        if to.startswith("+"):  # a phone number, not a channel
            for prefix, price in prices:
                if prefix == "default":
                    return price
        shown = to[:12] + ("…" if len(to) > 12 else "")
        raise Unpriceable(
            f"keybrake has no {kind.upper()} price for destination {shown!r}: an operator adds "
            f'its prefix under [twilio.{kind}] in the pricing file, e.g. "+44" = "0.0524"'
        )

    def settle(self, call: VendorCall, cost: Cost, status: int | None, body: bytes) -> Cost:
        actual = default_settle(cost, status)
        if not cost.priced or status is None or not 200 <= status < 300:
            return actual
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            return actual
        if not isinstance(answer, dict) or answer.get("price") in (None, ""):
            return actual  # not billed yet (the usual case at creation): keep the estimate
        try:
            price = abs(Decimal(str(answer["price"])))  # Twilio writes charges as negatives
        except InvalidOperation:
            return actual
        rate = self.pricing.fx.get(str(answer.get("price_unit") or "USD").lower())
        if rate is None or not price.is_finite():
            return actual
        return actual.with_micros(usd_to_micros(price * rate))

    def error(self, status: int, code: str, message: str) -> tuple[bytes, dict[str, str]]:
        # Twilio's own codes for HTTP-level errors: 20003 Authenticate, otherwise 20000 + status
        # (20403 Forbidden, 20429 Too Many Requests, ...). keybrake's reason rides alongside.
        twilio_code = 20003 if status == 401 else 20000 + status
        body = {
            "code": twilio_code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{twilio_code}",
            "status": status,
            "keybrake_code": code,
            # twilio-python's exception keeps `details` (not the rest of the body): a pod reads
            # keybrake's code there (hera_workflows/keybrake_pod.py).
            "details": {"keybrake_code": code},
        }
        return json.dumps(body).encode(), {}


def _check_fields(form: FormBody) -> None:
    """Refuse a scheduled message, and any spelling of a field keybrake reads but its own."""
    for name, _ in form.fields:
        folded = _folded(name)
        if folded in _SCHEDULING_FIELDS:
            raise Unpriceable(
                f"a scheduled message ({name[:30]!r}) is refused: Twilio sends and bills it "
                "later, outside the window its cap counts and after its key may be revoked. "
                "Send it when it is due."
            )
        spelled = _READ_FIELDS.get(folded)
        if spelled is not None and name != spelled:
            raise AmbiguousRequest(
                f"field {name[:60]!r} is refused: keybrake reads {spelled!r}, spelled so, and "
                "Twilio could read another spelling as it"
            )


def _folded(name: str) -> str:
    """A form field's top-level name, lower-cased, without the `_ . -` a name may hold:
    `Media_URL[0]` and `mediaurl` are both `mediaurl`."""
    return re.sub(r"[_.-]", "", name.partition("[")[0]).lower()


def _off(value: str | None) -> bool:
    """Whether a boolean field is off for certain: absent, or `false` (in any case)."""
    return value is None or value.lower() == "false"


def _destination(to: str) -> str:
    """A message's `To` as it is priced: `+` and digits (E.164), behind the `whatsapp:` channel
    if it has one; the reading the `recipients` constraint takes (`twilio_address`). Twilio says
    numbers not in E.164 "may work": `+1 876 555 0100`, `+1-876-...` or `+1 (876) ...` would then
    go to Jamaica while a prefix match on the text read them as `+1`. Anything else is refused."""
    if not to.strip():
        raise Unpriceable("the message names no To, so its destination price is unknown")
    address = twilio_address(to)
    if address is not None:
        return "".join(address)
    shown = to[:20] + ("…" if len(to) > 20 else "")
    if _UNENCODED_PLUS.fullmatch(to):
        raise Unpriceable(
            f"To {shown!r} is not a phone number in E.164: its '+' was probably sent unencoded in "
            "the form body, where '+' means a space; encode it as %2B (To=%2B14155550100)"
        )
    raise Unpriceable(
        f"To {shown!r} is not a phone number in E.164: keybrake prices a message by its "
        "destination, so To must be '+' and digits only (no spaces, dashes, brackets or dots), "
        "optionally behind 'whatsapp:', e.g. +14155550100"
    )


def _check_path(path: str) -> None:
    parts = path.split("/")
    if len(parts) < 5 or parts[1] != API_VERSION or parts[2] != "Accounts":
        raise Unpriceable(
            f"keybrake forwards Twilio resources under /{API_VERSION}/Accounts/{{AccountSid}}/ "
            "only; the account resource itself (it carries the auth token) and other paths "
            "are refused."
        )
    if not _SID.fullmatch(parts[3]):
        raise Unpriceable(
            f"the account SID in the path must look like one (AC and 32 hex digits); any "
            f"placeholder works, e.g. {PLACEHOLDER_SID}"
        )


def _placeholder(path: str) -> str:
    parts = path.split("/")
    if len(parts) > 3 and _SID.fullmatch(parts[3]):
        return parts[3]
    return PLACEHOLDER_SID


def _destinations(table: Mapping[str, Any]) -> tuple[tuple[str, Decimal], ...]:
    """Prefix → price, longest prefix first, so the first match is the most specific."""
    entries = [(str(key), parse_price(value, entry=str(key))) for key, value in table.items()]
    return tuple(sorted(entries, key=lambda entry: len(entry[0]), reverse=True))
