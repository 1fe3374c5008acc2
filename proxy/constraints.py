"""Spend constraints: who a key or budget may pay or message, beyond how much.

A dollar cap bounds how much a runaway agent moves, not where it goes. Constraints name the
counterparties a key's (or its budget's) calls may have; a call whose counterparty lies outside,
or cannot be read exactly from what the proxy already parses, is refused before it reaches the
vendor (`Decision.CONSTRAINT_VIOLATED`, a 403). Each field is read per endpoint by the vendor's
module (`Vendor.subjects`); docs/guarantees.md lists which field is read where, and when it is
looked up with the real key.

- `currencies` (Stripe): ISO 4217 codes (`usd`); a priced call's currency.
- `customers` (Stripe): exact ids (`cus_...`); the customer charged, confirmed or refunded.
- `destinations` (Stripe): exact ids (`acct_...`, `ba_...`, `card_...`); where money goes out.
- `recipients` (Twilio): E.164 numbers or prefixes (`+4420*`); `To`, canonical.
- `senders` (Twilio: numbers, prefixes, `MG...` services; Resend: addresses or `*@domain`):
  `From` or `MessagingServiceSid`; `from`.
- `recipient_domains` (Resend): domains, IDNA (`example.com`); every to/cc/bcc address's domain.

A domain names itself only: `example.com` does not admit `mail.example.com` (list it too).
`mode` is `enforce` (refuse) or `report` (forward, and record what would have been refused).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import idna

# From the one tree; exported here too.
from keybrake.proxy.errors import Unchecked, Unreadable
from keybrake.proxy.vendor_facts import RESEND, STRIPE, TWILIO

__all__ = [
    "FIELDS",
    "RATE",
    "VENDOR_FIELDS",
    "Constraints",
    "Found",
    "Unchecked",
    "Unreadable",
    "Violation",
    "canonical_domain",
    "canonical_number",
    "canonical_service",
    "collect",
    "email_address",
    "parse_constraints",
    "twilio_address",
]

# The fields each vendor's calls are checked against; a budget may hold any of them, and each
# call is checked against its own vendor's.
VENDOR_FIELDS: dict[str, tuple[str, ...]] = {
    STRIPE.name: ("currencies", "customers", "destinations"),
    TWILIO.name: ("recipients", "senders"),
    RESEND.name: ("recipient_domains", "senders"),
}
FIELDS = ("currencies", "customers", "destinations", "recipients", "recipient_domains", "senders")
MODES = ("enforce", "report")
MAX_VALUES = 1000  # per field
# The call rate a key or budget may have at its vendors (`max_calls_per_minute`): counted and
# enforced by the ledger (`keybrake.proxy.decisions.admit`), not read from a call's body.
RATE = "max_calls_per_minute"
MAX_RATE = 1_000_000

_CURRENCY = re.compile(r"[a-z]{3}")
_CUSTOMER = re.compile(r"cus_[A-Za-z0-9]{1,250}")
_DESTINATION = re.compile(r"(?:acct|ba|card)_[A-Za-z0-9]{1,250}")
_NUMBER = re.compile(r"\+[1-9][0-9]{1,14}")
_NUMBER_PREFIX = re.compile(r"\+[0-9]{0,14}\*")
_SERVICE = re.compile(r"MG[0-9a-fA-F]{32}")
# A domain as DNS writes it after IDNA: labels of letters, digits and inner hyphens.
_DOMAIN = re.compile(r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}")
# An address's local part: the dot-atom characters of RFC 5322, no quoting.
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")
# A Twilio `To`: an optional WhatsApp channel, then E.164. Other channels (`messenger:`,
# `client:`, `sip:`) name no phone number, so a constrained key refuses them.
_TO = re.compile(r"(whatsapp:)?(\+[1-9][0-9]{1,14})")


# What a call's constrained fields hold, by field, as `Vendor.subjects` read them: canonical
# values, or why a field could not be read exactly. A field missing is one the call does not
# have (a free call's currency).
Found: TypeAlias = dict[str, "tuple[str, ...] | Unreadable"]


async def collect(
    wanted: frozenset[str], readers: Mapping[str, Callable[[], Awaitable[tuple[str, ...]]]]
) -> Found:
    """Each wanted field that the call has (a reader for it), read on its own: one field that
    cannot be read does not hide another's values."""
    found: Found = {}
    for name in sorted(wanted & readers.keys()):
        try:
            found[name] = await readers[name]()
        except Unchecked as exc:
            found[name] = Unchecked(name, exc.values)
        except Unreadable as exc:
            found[name] = exc
    return found


@dataclass(frozen=True, slots=True)
class Violation:
    field: str
    reason: str  # for the refusal's message and the audit row; never a secret


@dataclass(frozen=True, slots=True)
class Constraints:
    """Constraints as stored (None: the field is not constrained)."""

    mode: str = "enforce"
    currencies: tuple[str, ...] | None = None
    customers: tuple[str, ...] | None = None
    destinations: tuple[str, ...] | None = None
    recipients: tuple[str, ...] | None = None
    recipient_domains: tuple[str, ...] | None = None
    senders: tuple[str, ...] | None = None
    max_calls_per_minute: int | None = None

    @property
    def constrained(self) -> tuple[str, ...]:
        """The counterparty fields these constraints constrain (the rate aside)."""
        return tuple(name for name in FIELDS if getattr(self, name) is not None)

    def for_vendor(self, vendor: str) -> frozenset[str]:
        """The fields a call to `vendor` is checked against."""
        return frozenset(self.constrained) & frozenset(VENDOR_FIELDS.get(vendor, ()))

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        for name in self.constrained:
            out[name] = list(getattr(self, name))
        if self.max_calls_per_minute is not None:
            out[RATE] = self.max_calls_per_minute
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Constraints:
        """As stored: trusted (written by `parse_constraints`)."""
        values = {name: tuple(data[name]) for name in FIELDS if data.get(name) is not None}
        rate = data.get(RATE)
        return cls(mode=str(data.get("mode", "enforce")), max_calls_per_minute=rate, **values)

    def outside(self, outer: Constraints) -> str | None:
        """The first field in which these constraints are not within `outer`'s (an issuer's),
        or None: every field `outer` constrains is constrained here at least as narrowly, and a
        report-only mode cannot stand under an enforcing one."""
        if outer.mode == "enforce" and self.mode != "enforce":
            return "mode"
        if outer.max_calls_per_minute is not None and (
            self.max_calls_per_minute is None
            or self.max_calls_per_minute > outer.max_calls_per_minute
        ):
            return RATE
        for name in outer.constrained:
            inner_values, outer_values = getattr(self, name), getattr(outer, name)
            if inner_values is None:
                return name
            if not all(_covered(name, value, outer_values) for value in inner_values):
                return name
        return None

    def check(self, vendor: str, found: Found) -> Violation | None:
        """The first value of the call (`found`: by field, what `Vendor.subjects` read) that
        these constraints do not admit; a constrained field that could not be read is one."""
        for name in sorted(self.for_vendor(vendor)):
            allowed = getattr(self, name)
            values = found.get(name, ())
            if isinstance(values, Unreadable):
                return Violation(name, str(values))
            for value in values:
                if not _admits(name, allowed, value):
                    return Violation(name, f"{name}: {_shown(value)} is not allowed")
        return None


def _shown(value: str) -> str:
    return repr(value[:80])


def _admits(name: str, allowed: tuple[str, ...], value: str) -> bool:
    """Whether a call's canonical `value` of field `name` lies within `allowed`."""
    # An address first: `+tag@x.com` is an address, never a number a `+44*` pattern admits.
    if name == "senders" and "@" in value:
        domain = value.rpartition("@")[2]
        return value in allowed or f"*@{domain}" in allowed
    if name in ("recipients", "senders") and value.startswith("+"):
        return any(_number_matches(pattern, value) for pattern in allowed)
    return value in allowed


def _number_matches(pattern: str, number: str) -> bool:
    if pattern.endswith("*"):
        return number.startswith(pattern[:-1])
    return number == pattern


def _covered(name: str, value: str, outer: tuple[str, ...]) -> bool:
    """Whether constraint value `value` (itself maybe a pattern) admits nothing `outer` does
    not."""
    if value.endswith("*") and value.startswith("+"):  # a number prefix: within a shorter one
        return any(p.endswith("*") and value[:-1].startswith(p[:-1]) for p in outer)
    if value.startswith("*@"):  # every address of a domain: only the same wildcard covers it
        return value in outer
    return _admits(name, outer, value)


# -- reading a call's values canonically -----------------------------------------------------


def twilio_address(value: str) -> tuple[str, str] | None:
    """A Twilio `To`/`From` read as (channel, E.164 number): `("", "+447700900123")`,
    `("whatsapp:", "+447700900123")`; None for anything else (spaces, dashes, brackets or dots
    between the digits, no `+`, another channel). The one reading that constraints and Twilio's
    pricing share, so a number is priced as the destination it is checked as."""
    match = _TO.fullmatch(value.strip())
    return None if match is None else (match.group(1) or "", match.group(2))


def canonical_number(field: str, value: str) -> str:
    """A Twilio `To`/`From` as E.164, its channel prefix removed; anything else is refused."""
    address = twilio_address(value)
    if address is None:
        raise Unreadable(field, f"{field}: {_shown(value)} is not a phone number in E.164")
    return address[1]


def canonical_service(field: str, value: str) -> str:
    """A Twilio Messaging Service SID (`MG` and 32 hex digits), its hex lower-cased; anything
    else is refused."""
    text = value.strip()
    if not _SERVICE.fullmatch(text):
        raise Unreadable(field, f"{field}: {_shown(value)} is not a Messaging Service SID (MG...)")
    return "MG" + text[2:].lower()


def canonical_domain(field: str, domain: str) -> str:
    """A domain, lower-cased and IDNA-encoded as today's mail software does (IDNA 2008, UTS 46
    non-transitional: `bücher.example` → `xn--bcher-kva.example`, `straße.de` →
    `xn--strae-oqa.de`). Python's own "idna" codec is IDNA 2003, which rewrites `ß` as `ss` and
    drops joiners, naming another domain than the one mail goes to; and a name that UTS 46 would
    map to another (full-width letters, a final sigma) is refused rather than read either way."""
    lowered = domain.strip().lower()
    try:
        ascii_domain = idna.encode(lowered, uts46=True, transitional=False).decode("ascii")
        # Given as it is encoded already (A-labels, which `idna` checks decode validly), or as
        # the Unicode name it encodes (and no other that UTS 46 maps onto it).
        same = lowered == ascii_domain or (
            idna.decode(ascii_domain) == unicodedata.normalize("NFC", lowered)
        )
    except (UnicodeError, ValueError) as exc:
        raise Unreadable(field, f"{field}: {_shown(domain)} is not a domain name") from exc
    if not same or not _DOMAIN.fullmatch(ascii_domain):
        raise Unreadable(field, f"{field}: {_shown(domain)} is not a domain name")
    return ascii_domain


_ANGLED = re.compile(r"[^<>@,;\"]*<([^<>]+)>")


def email_address(field: str, text: str) -> str:
    """One address of a Resend `to`/`cc`/`bcc`/`from` value (`a@x.com` or `Name <a@x.com>`),
    its domain canonical; anything that could name several addresses or none is refused."""
    value = text.strip()
    angled = _ANGLED.fullmatch(value)
    if angled is not None:
        value = angled.group(1).strip()
    local, at, domain = value.rpartition("@")
    if not at or not _LOCAL.fullmatch(local) or local.startswith(".") or local.endswith("."):
        raise Unreadable(field, f"{field}: {_shown(text)} is not one email address")
    return f"{local.lower()}@{canonical_domain(field, domain)}"


# -- constraints as given to the API ----------------------------------------------------------


def parse_constraints(data: Any, vendor: str | None = None) -> Constraints:
    """Constraints from an API body, canonical; ValueError naming the bad entry. `vendor`: a
    key's, whose constraints must all apply to it (a budget's may name any vendor's)."""
    if not isinstance(data, Mapping):
        raise ValueError("constraints: a JSON object of field: [values]")
    unknown = set(data) - {"mode", RATE, *FIELDS}
    if unknown:
        raise ValueError(
            f"constraints: unknown field {sorted(map(str, unknown))[0]!r}; fields: mode, {RATE}, "
            f"{', '.join(FIELDS)}"
        )
    mode = data.get("mode", "enforce")
    if mode not in MODES:
        raise ValueError("constraints.mode: enforce or report")
    values: dict[str, tuple[str, ...]] = {}
    for name in FIELDS:
        if name not in data or data[name] is None:
            continue
        if vendor is not None and name not in VENDOR_FIELDS.get(vendor, ()):
            applies = ", ".join(VENDOR_FIELDS.get(vendor, ())) or "none"
            raise ValueError(f"constraints.{name}: not a {vendor} constraint ({applies} are)")
        items = data[name]
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError(f"constraints.{name}: a list of strings")
        if len(items) > MAX_VALUES:
            raise ValueError(f"constraints.{name}: at most {MAX_VALUES} values")
        values[name] = tuple(sorted({_canonical_value(name, item) for item in items}))
    rate = data.get(RATE)
    if rate is not None and (
        isinstance(rate, bool) or not isinstance(rate, int) or not 1 <= rate <= MAX_RATE
    ):
        raise ValueError(f"constraints.{RATE}: a whole number from 1 to {MAX_RATE:,}")
    if not values and rate is None:
        raise ValueError(f"constraints: constrain at least one of {RATE}, {', '.join(FIELDS)}")
    return Constraints(mode=mode, max_calls_per_minute=rate, **values)


def _canonical_value(name: str, item: str) -> str:
    value = item.strip()
    if name == "currencies" and _CURRENCY.fullmatch(value.lower()):
        return value.lower()
    if name == "customers" and _CUSTOMER.fullmatch(value):
        return value
    if name == "destinations" and _DESTINATION.fullmatch(value):
        return value
    if name in ("recipients", "senders") and (
        _NUMBER.fullmatch(value) or _NUMBER_PREFIX.fullmatch(value)
    ):
        return value
    if name == "senders" and _SERVICE.fullmatch(value):
        return canonical_service(name, value)
    try:
        if name == "recipient_domains":
            return canonical_domain(name, value)
        if name == "senders" and value.startswith("*@"):
            return "*@" + canonical_domain(name, value[2:])
        if name == "senders" and "@" in value:
            return email_address(name, value)
    except Unreadable as exc:
        raise ValueError(f"constraints.{exc}") from exc
    raise ValueError(f"constraints.{name}: {_shown(item)} is not {_EXPECTED[name]}")


_EXPECTED = {
    "currencies": "a three-letter ISO 4217 currency code (usd)",
    "customers": "a Stripe customer id (cus_...); ids are exact, no patterns",
    "destinations": "a Stripe account or external account id (acct_..., ba_..., card_...)",
    "recipients": "an E.164 number (+442071838750) or prefix (+4420*)",
    "recipient_domains": "a domain name",
    "senders": "an E.164 number or prefix, a Messaging Service SID (MG...), an email address "
    "or *@domain",
}
