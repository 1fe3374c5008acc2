"""The pricing table: shipped defaults (pricing.toml beside this file) merged with an operator file.

The table is data; each vendor module interprets its own section (`[stripe.endpoints]`, ...).
Loading validates everything up front and names the offending entry and line, so a typo stops
`serve` instead of mispricing calls later.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# The errors are defined in the one tree (errors.py); the vendor modules import them from here.
from keybrake.proxy.errors import AmbiguousRequest, ConfigError, PricingEntryError, Unpriceable
from keybrake.proxy.money import usd_to_micros

__all__ = ["AmbiguousRequest", "PricingEntryError", "PricingTable", "Unpriceable", "load_pricing"]


@dataclass(frozen=True)
class PricingTable:
    fx: Mapping[str, Decimal]
    exponents: Mapping[str, int]
    vendors: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    def minor_to_micros(self, amount: int, currency: str) -> int:
        """Micro-dollars for `amount` minor units of `currency` (rounded up)."""
        code = currency.lower()
        rate = self.fx.get(code)
        if rate is None:
            raise Unpriceable(
                f"no exchange rate for currency {code!r}: an operator adds it under [fx] in the "
                "pricing file (KEYBRAKE_PRICING_FILE)"
            )
        exponent = self.exponents.get(code, 2)
        return usd_to_micros(Decimal(amount) / (Decimal(10) ** exponent) * rate)

    def section(self, vendor: str) -> Mapping[str, Any]:
        return self.vendors.get(vendor, {})

    def as_json(self) -> dict[str, Any]:
        table: dict[str, Any] = json.loads(
            json.dumps(
                {
                    "sources": list(self.sources),
                    "fx": {k: str(v) for k, v in sorted(self.fx.items())},
                    "currency_exponents": dict(sorted(self.exponents.items())),
                    **{name: section for name, section in sorted(self.vendors.items())},
                },
                default=str,
            )
        )
        return table


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict):
            merged[key] = _merge(current, value)
        elif isinstance(value, str) and isinstance(current, dict) and "free_fields" in current:
            # A rule alone for an endpoint shipped with a list of fields changes the rule and
            # keeps the list: dropping it would forward every other field unpriced, a money
            # parameter Stripe adds later included. `free_fields` replaces the list.
            merged[key] = {**current, "rule": value}
        else:
            merged[key] = value
    return merged


def _line_of(text: str, needle: str, after: str | None = None) -> str:
    """` (line N)` of the first non-comment line holding `needle`, searching from the header of
    sub-table `after` (`[vendor.after]` in TOML, `after:` in YAML) when one is given."""
    lines = text.splitlines()
    start = 0
    if after:
        for index, line in enumerate(lines):
            stripped = line.strip()
            if stripped.endswith((f".{after}]", f".{after}]]")) or stripped.startswith(f"{after}:"):
                start = index + 1
                break
    for number, line in enumerate(lines[start:], start=start + 1):
        if needle in line and not line.lstrip().startswith("#"):
            return f" (line {number})"
    return ""


def _read(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"pricing file {path}: {exc.strerror or exc}") from exc
    try:
        if path.suffix.lower() in {".yaml", ".yml"}:
            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"pricing file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"pricing file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"pricing file {path}: expected a table at the top level")
    return data, text


def load_pricing(
    operator_file: Path | None = None,
    vendor_validators: Mapping[str, Any] | None = None,
) -> PricingTable:
    """Defaults merged with the operator file; `vendor_validators[name](section)` checks one."""
    default_text = resources.files("keybrake.proxy").joinpath("pricing.toml").read_text("utf-8")
    data: dict[str, Any] = tomllib.loads(default_text)
    sources = ["builtin"]
    text = default_text
    source = "builtin pricing.toml"
    if operator_file is not None:
        override, text = _read(operator_file)
        data = _merge(data, override)
        sources.append(str(operator_file))
        source = str(operator_file)

    fx: dict[str, Decimal] = {}
    for code, rate in (data.pop("fx", None) or {}).items():
        try:
            value = Decimal(str(rate))
        except InvalidOperation:
            value = Decimal(-1)
        if not value.is_finite() or value <= 0:
            raise ConfigError(
                f"{source}{_line_of(text, code)}: fx.{code} = {rate!r} is not a positive number"
            )
        fx[code.lower()] = value
    exponents: dict[str, int] = {}
    for code, digits in (data.pop("currency_exponents", None) or {}).items():
        if not isinstance(digits, int) or isinstance(digits, bool) or not 0 <= digits <= 4:
            raise ConfigError(
                f"{source}{_line_of(text, code)}: currency_exponents.{code} = {digits!r} "
                "must be 0..4"
            )
        exponents[code.lower()] = digits

    validators = vendor_validators or {}
    vendors: dict[str, Mapping[str, Any]] = {}
    for name, section in data.items():
        if not isinstance(section, Mapping):
            raise ConfigError(f"{source}{_line_of(text, name)}: [{name}] must be a table")
        check = validators.get(name)
        if check is None:
            raise ConfigError(
                f"{source}{_line_of(text, name)}: unknown section [{name}]; "
                f"known: fx, currency_exponents, {', '.join(sorted(validators))}"
            )
        try:
            check(section)
        except PricingEntryError as exc:
            where = _line_of(text, exc.entry, after=exc.table)
            raise ConfigError(f"{source}{where}: [{name}] {exc}") from exc
        except ValueError as exc:
            bad = str(exc).split("'")[1] if "'" in str(exc) else name
            raise ConfigError(f"{source}{_line_of(text, bad)}: [{name}] {exc}") from exc
        vendors[name] = section
    return PricingTable(fx=fx, exponents=exponents, vendors=vendors, sources=tuple(sources))
