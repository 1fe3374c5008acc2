"""Money and time units used everywhere in the proxy.

Spend is kept as integer micro-dollars (1 USD = 1,000,000 micros): exact, summable in SQL on both
backends, and fine-grained enough for per-segment SMS prices such as $0.0079. Decimals appear only
at the edges (JSON in and out); floats never.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal

__all__ = [
    "MAX_DURATION",
    "MICROS_PER_USD",
    "format_ts",
    "format_usd",
    "micros_to_usd",
    "parse_duration",
    "parse_ts",
    "usd_to_micros",
]

MICROS_PER_USD = 1_000_000
_DURATION = re.compile(r"\s*(\d{1,9})\s*([smhdw])\s*")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Longer than any lifetime, window or retention anyone means, and far inside datetime's range.
MAX_DURATION = timedelta(days=100 * 366)


def usd_to_micros(value: Decimal) -> int:
    """Whole micro-dollars, rounding up: an estimate must never be smaller than the charge."""
    return int((value * MICROS_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def micros_to_usd(micros: int) -> Decimal:
    return Decimal(micros) / MICROS_PER_USD


def format_usd(micros: int) -> str:
    """`300.00`, `0.0079`: at least cents, more digits only when they carry value."""
    value = micros_to_usd(micros)
    text = format(value.quantize(Decimal("0.000001")), "f").rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `2h`, `7d`, `1w` → timedelta; anything else is a ValueError with the reason."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(
            f"invalid duration {text[:40]!r}: use a number and a unit, e.g. 90s, 30m, 2h, 7d"
        )
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"duration {text.strip()!r} is too long: at most 100 years")
    return timedelta(seconds=seconds)


def format_ts(moment: datetime) -> str:
    """Fixed-width UTC timestamps sort as text on every backend."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> datetime:
    """The inverse of `format_ts` (fromisoformat: several times faster than strptime)."""
    return datetime.fromisoformat(text).astimezone(UTC)
