"""Endpoint patterns such as `POST /v1/payment_intents` or `GET /v1/customers/*`.

Used twice: a vault key's `allowed_endpoints` (its scope) and the pricing table's endpoint rules.
`*` stands for exactly one path segment; matching is on the vendor-relative path without query.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["EndpointPattern", "allows", "compile_patterns", "safe_path"]

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "*"})
_SEGMENT = re.compile(r"^[A-Za-z0-9._~:@!$&'()+,;=-]+$")


@dataclass(frozen=True, slots=True)
class EndpointPattern:
    method: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> EndpointPattern:
        parts = text.split()
        if len(parts) != 2:
            raise ValueError(f"endpoint {text!r}: expected 'METHOD /path', e.g. 'POST /v1/charges'")
        method, path = parts[0].upper(), parts[1]
        if method not in _METHODS:
            raise ValueError(f"endpoint {text!r}: unknown method {parts[0]!r}")
        if not path.startswith("/") or path == "/":
            raise ValueError(f"endpoint {text!r}: the path must start with / and name a resource")
        segments = tuple(path.strip("/").split("/"))
        for segment in segments:
            if segment != "*" and (segment in {".", ".."} or not _SEGMENT.match(segment)):
                raise ValueError(f"endpoint {text!r}: invalid path segment {segment!r}")
        return cls(method, segments)

    def matches(self, method: str, segments: Sequence[str]) -> bool:
        if self.method != "*" and self.method != method:
            return False
        if len(segments) != len(self.segments):
            return False
        return all(p == "*" or p == s for p, s in zip(self.segments, segments, strict=True))

    def covers(self, other: EndpointPattern) -> bool:
        """Every request `other` matches, this matches too (an issuer's endpoints bound the
        keys it issues): `*` covers one segment or method, a literal only itself."""
        if self.method != "*" and self.method != other.method:
            return False
        if len(self.segments) != len(other.segments):
            return False
        return all(p == "*" or p == o for p, o in zip(self.segments, other.segments, strict=True))

    def __str__(self) -> str:
        return f"{self.method} /{'/'.join(self.segments)}"


@lru_cache(maxsize=4096)
def compile_patterns(patterns: tuple[str, ...]) -> tuple[EndpointPattern, ...]:
    return tuple(EndpointPattern.parse(p) for p in patterns)


def allows(patterns: Iterable[EndpointPattern], method: str, path: str) -> bool:
    segments = path.strip("/").split("/")
    return any(p.matches(method, segments) for p in patterns)


def safe_path(raw: str) -> str | None:
    """The vendor-relative path if it cannot escape the vendor prefix, else None.

    Refuses dot segments, empty segments (a trailing slash included: vendors read
    `/v1/charges/` in ways of their own), backslashes, control characters and percent-encoded
    separators or dots (`%2f`, `%2e`, `%5c`), which an upstream might decode after our checks.
    """
    if not raw.startswith("/") or "\\" in raw or "//" in raw:
        return None
    if raw.endswith("/") and raw != "/":
        return None
    lowered = raw.lower()
    if any(bad in lowered for bad in ("%2f", "%2e", "%5c", "%00", "%25")):
        return None
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in raw):
        return None
    if any(segment in {".", ".."} for segment in raw.split("/")):
        return None
    return raw
