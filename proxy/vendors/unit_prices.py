"""Pricing helpers for vendors that bill per unit (an SMS segment, an email) rather than move money.

Their `[vendor.endpoints]` tables map `"METHOD /path"` to a rule name the vendor knows (`"free"`,
`"message"`, `"email"`, ...) or to a flat price, `{ usd = "0.25" }`: what an operator writes to
price an endpoint keybrake has no rule for. Every price is a decimal string of US dollars, read
with `Decimal` and kept as integer micro-dollars; never a float.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from keybrake.proxy.endpoints import EndpointPattern
from keybrake.proxy.money import usd_to_micros
from keybrake.proxy.pricing import PricingEntryError, Unpriceable
from keybrake.proxy.vendors.base import Cost, VendorCall

__all__ = [
    "flat_rule",
    "parse_price",
    "unpriced",
    "validate_endpoints",
    "validate_price_table",
    "validate_section",
]


def parse_price(value: Any, *, entry: str, table: str | None = None) -> Decimal:
    """A price entry as Decimal dollars; a PricingEntryError naming the entry otherwise."""
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        price = Decimal(-1)
    else:
        try:
            price = Decimal(str(value).strip())
        except InvalidOperation:
            price = Decimal(-1)
    if not price.is_finite() or price < 0 or price > 1000:
        where = f" in [{table}]" if table else ""
        raise PricingEntryError(
            f"'{entry}'{where} = {value!r} is not a price: write US dollars as a decimal "
            'string, e.g. "0.0083"',
            entry=entry,
            table=table,
        )
    return price


def validate_price_table(
    section: Mapping[str, Any], table: str, *, key_ok: Any, key_hint: str
) -> None:
    """`[vendor.table]`: keys accepted by `key_ok(key)`, values prices."""
    prices = section.get(table, {})
    if not isinstance(prices, Mapping):
        raise PricingEntryError(
            f"'{table}' must be a table of {key_hint} = price", entry=table, table=None
        )
    for key, value in prices.items():
        if not isinstance(key, str) or not key_ok(key):
            raise PricingEntryError(
                f"'{key}' in [{table}] is not a valid key: use {key_hint}",
                entry=str(key),
                table=table,
            )
        parse_price(value, entry=key, table=table)


def validate_section(
    section: Mapping[str, Any], vendor: str, known: frozenset[str], rules: frozenset[str]
) -> None:
    """`[vendor]`: nothing but the `known` entries (a misspelt table would otherwise price
    nothing, silently), and its `[vendor.endpoints]` valid."""
    for key in section:
        if key not in known:
            what = "table" if isinstance(section[key], Mapping) else "entry"
            raise PricingEntryError(
                f"'{key}' is not a {vendor} pricing {what}; known: {sorted(known)}",
                entry=str(key),
            )
    validate_endpoints(section, rules)


def validate_endpoints(section: Mapping[str, Any], rules: frozenset[str]) -> None:
    """`[vendor.endpoints]`: valid patterns, each a known rule or a flat `{ usd = "..." }`."""
    endpoints = section.get("endpoints", {})
    if not isinstance(endpoints, Mapping):
        raise PricingEntryError(
            "'endpoints' must be a table of 'METHOD /path' = rule", entry="endpoints"
        )
    for pattern, rule in endpoints.items():
        try:
            EndpointPattern.parse(pattern)
        except ValueError as exc:
            raise PricingEntryError(f"'{pattern}': {exc}", entry=pattern) from exc
        if isinstance(rule, str):
            if rule not in rules:
                raise PricingEntryError(
                    f"'{pattern}' has unknown rule {rule!r}; rules: {sorted(rules)}, or a flat "
                    'price such as { usd = "0.25" }',
                    entry=pattern,
                )
        elif isinstance(rule, Mapping) and set(rule) == {"usd"}:
            parse_price(rule["usd"], entry=pattern, table="endpoints")
        else:
            raise PricingEntryError(
                f"'{pattern}' = {rule!r} is neither a rule ({', '.join(sorted(rules))}) nor a "
                'flat price such as { usd = "0.25" }',
                entry=pattern,
            )


def flat_rule(rule: Any, call: VendorCall) -> Cost:
    """The cost of a flat-priced endpoint (`{ usd = "0.25" }`); any other rule is unknown here."""
    if isinstance(rule, Mapping) and "usd" in rule:
        return Cost(usd_to_micros(Decimal(str(rule["usd"]))), priced=True)
    raise Unpriceable(f"unknown pricing rule {rule!r} for {call.method} {call.path}")


def unpriced(vendor: str, call: VendorCall, example: str) -> Unpriceable:
    """The fail-closed refusal of a write nobody priced, saying how an operator prices it."""
    return Unpriceable(
        f"keybrake has no price for {call.method} {call.path}: refused because it may cost "
        f"money. An operator prices it in the pricing file (KEYBRAKE_PRICING_FILE) under "
        f'[{vendor}.endpoints], e.g. "{call.method} {example}" = {{ usd = "0.05" }} or "free".'
    )
