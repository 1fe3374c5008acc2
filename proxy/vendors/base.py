"""The one small interface every vendor module implements.

A vendor module knows: where the vault key sits in the vendor's auth scheme and how the real
credential replaces it, any path rewriting, what a call costs before (estimate, for the
reservation) and after (settle), the vendor's request id header, and the shape of the vendor's own
error bodies (so SDKs raise their usual exceptions on the proxy's 401/403/429). The pipeline in
`keybrake.proxy.pipeline` is vendor-neutral and only talks to this interface.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from keybrake.proxy.constraints import Found, Unreadable
from keybrake.proxy.endpoints import EndpointPattern, compile_patterns
from keybrake.proxy.pricing import PricingTable, Unpriceable
from keybrake.proxy.settings import VendorCredentials

__all__ = [
    "FREE",
    "Cost",
    "Lookup",
    "Unpriceable",
    "Vendor",
    "VendorCall",
    "default_settle",
    "rule_parts",
]


@dataclass(slots=True)
class VendorCall:
    """An incoming call, as the vendor sees it: the path is relative to the vendor prefix."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]  # lower-cased names
    body: bytes


@dataclass(frozen=True, slots=True)
class Cost:
    """What a call costs in micro-dollars, and the vendor-side amount it was derived from."""

    micros: int = 0
    amount: int | None = None
    currency: str | None = None
    priced: bool = False
    counts: tuple[str, ...] = ()  # vendor objects this call pays for, marked with its payer
    # The object whose money this call moves, when it may be paid for already (a confirm or a
    # capture): the ledger offsets `micros` by what the same payer paid for it in the window.
    paid_object: str | None = None

    def with_micros(self, micros: int) -> Cost:
        return Cost(micros, self.amount, self.currency, self.priced, self.counts, self.paid_object)


FREE = Cost()


class Lookup(Protocol):
    """What an estimate may consult: the vendor, with the real credential. Whether an object is
    paid for already is the ledger's to decide (`Cost.paid_object`), inside the reservation."""

    async def fetch_json(self, path: str) -> Mapping[str, Any]: ...


def default_settle(cost: Cost, status: int | None) -> Cost:
    """2xx: the estimate was spent. 4xx: the vendor refused, nothing moved. 5xx or no answer:
    the money may have moved, so it counts as spent."""
    if status is not None and 400 <= status < 500:
        return Cost(0, cost.amount, cost.currency, cost.priced, (), cost.paid_object)
    return cost


class Vendor(ABC):
    name: ClassVar[str]
    request_id_header: ClassVar[str]
    # The vendor's idempotency header (lower case); None if it has none. A vendor with one
    # replays its own stored answer for a repeated key, which is how a call whose outcome was
    # lost in a crash is retried safely.
    idempotency_header: ClassVar[str | None] = "idempotency-key"
    # Idempotency keys the vendor's official SDKs make up per call (a re-run pod sends a fresh
    # one), so such a key does not tell two calls apart; any other key is the caller's own.
    sdk_key_shapes: ClassVar[tuple[re.Pattern[str], ...]] = ()
    # Request headers choosing which of the vendor's accounts a call acts on (lower case).
    account_headers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, credentials: VendorCredentials, pricing: PricingTable) -> None:
        self.credentials = credentials
        self.pricing = pricing
        self.rules: tuple[tuple[EndpointPattern, Any], ...] = tuple(
            (EndpointPattern.parse(pattern), rule)
            for pattern, rule in pricing.section(self.name).get("endpoints", {}).items()
        )

    @staticmethod
    @abstractmethod
    def validate_pricing(section: Mapping[str, Any]) -> None:
        """Raise ValueError naming the bad entry; called when the table loads."""

    @abstractmethod
    def presented_key(self, headers: Mapping[str, str]) -> str | None:
        """The vault key as the workload sent it (maybe with a `.tag`), or None."""

    def upstream_request(self, call: VendorCall) -> tuple[str, dict[str, str]]:
        """The upstream path (and query) and the auth headers carrying the real credential;
        by default the path unchanged and the secret as a Bearer token."""
        target = call.path + (f"?{call.query}" if call.query else "")
        return target, {"Authorization": f"Bearer {self.credentials.secret}"}

    @abstractmethod
    async def estimate(self, call: VendorCall, lookup: Lookup) -> Cost:
        """Cost before forwarding; raise Unpriceable to refuse a call whose cost is unknown."""

    async def subjects(
        self, call: VendorCall, cost: Cost, lookup: Lookup, wanted: frozenset[str]
    ) -> Found:
        """The call's values of the constrained fields `wanted` (`keybrake.proxy.constraints`),
        read exactly from what `estimate` read, looked up with the real key where the object
        holds them; called only for a key or budget with constraints. By default a priced call
        cannot say any: it is refused under every constraint of this vendor (fail closed)."""
        if not cost.priced:
            return {}
        what = f"{call.method} {call.path}"
        return {
            name: Unreadable(name, f"keybrake cannot tell the {name} of {what}") for name in wanted
        }

    def settle(self, call: VendorCall, cost: Cost, status: int | None, body: bytes) -> Cost:
        """Actual cost once the vendor answered (status None: timeout or dropped connection)."""
        return default_settle(cost, status)

    def workload_reply(
        self, call: VendorCall, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[list[tuple[str, str]], bytes]:
        """The vendor's answer as the workload may see it: the pipeline returns (and stores for
        replays) what this returns. Default: unchanged. A vendor whose answers name the real
        account (Twilio's `account_sid`, `uri`) rewrites them back to what the workload sent."""
        return headers, body

    @abstractmethod
    def error(self, status: int, code: str, message: str) -> tuple[bytes, dict[str, str]]:
        """Body and headers of an error the proxy answers itself, shaped like the vendor's."""

    @property
    def replays(self) -> bool:
        """Whether the vendor replays a stored answer for a repeated idempotency key."""
        return self.idempotency_header is not None

    def is_sdk_generated(self, idempotency_key: str) -> bool:
        return any(shape.fullmatch(idempotency_key) for shape in self.sdk_key_shapes)

    def accounts(self, headers: Mapping[str, str]) -> tuple[str, ...]:
        """The accounts other than the key owner's own that this call acts on."""
        return ()

    def is_replay(self, headers: Mapping[str, str]) -> bool:
        """Whether the vendor's answer (lower-cased header names) says it was replayed from its
        idempotency store."""
        return False

    def rule_for(self, method: str, path: str) -> Any | None:
        segments = path.strip("/").split("/")
        for pattern, rule in self.rules:
            if pattern.matches(method, segments):
                return rule
        return None

    def request_id(self, headers: Mapping[str, str]) -> str | None:
        return headers.get(self.request_id_header)


def validate_endpoint_rules(section: Mapping[str, Any], rules: frozenset[str]) -> None:
    """`[vendor.endpoints]` of rule names, or `{ rule = "...", free_fields = [...] }` tables."""
    endpoints = section.get("endpoints", {})
    if not isinstance(endpoints, Mapping):
        raise ValueError("'endpoints' must be a table of 'METHOD /path' = rule")
    for pattern, rule in endpoints.items():
        try:
            compile_patterns((pattern,))
        except ValueError as exc:
            raise ValueError(f"'{pattern}': {exc}") from exc
        name, fields = rule_parts(rule)
        if name not in rules:
            raise ValueError(f"'{pattern}' has unknown rule {rule!r}; rules: {sorted(rules)}")
        if fields is not None and not all(isinstance(f, str) and f for f in fields):
            raise ValueError(f"'{pattern}': free_fields must be a list of field names")


def rule_parts(rule: Any) -> tuple[str, tuple[str, ...] | None]:
    """(rule name, free fields) of a rule written as a name or as a table; free fields None when
    the endpoint takes any field."""
    if isinstance(rule, Mapping):
        if set(rule) - {"rule", "free_fields"} or not isinstance(rule.get("rule"), str):
            return f"{dict(rule)!r}", None
        fields = rule.get("free_fields")
        if fields is None:
            return rule["rule"], None
        if not isinstance(fields, list | tuple):
            return rule["rule"], ("",)
        return rule["rule"], tuple(fields)
    return str(rule), None
