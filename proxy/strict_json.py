"""JSON read strictly, as every JSON body keybrake prices or accepts is: no key twice in one
object (parsers disagree on which one counts), no NaN or Infinity, bounded nesting."""

from __future__ import annotations

import json
from typing import Any

from keybrake.proxy.errors import AmbiguousRequest

__all__ = ["parse_json"]


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise AmbiguousRequest(
                f"JSON key {key[:60]!r} appears twice in one object; parsers disagree on which "
                "one counts, so it is refused"
            )
        seen[key] = value
    return seen


def _constant(name: str) -> Any:
    raise AmbiguousRequest(f"JSON {name} is not valid JSON")


def parse_json(text: str | bytes) -> Any:
    """Strict JSON: no repeated keys, no NaN/Infinity, bounded nesting; AmbiguousRequest
    (saying which) otherwise."""
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
    except RecursionError as exc:
        raise AmbiguousRequest("the JSON is nested too deeply") from exc
    except AmbiguousRequest:
        raise
    except ValueError as exc:
        raise AmbiguousRequest(f"the request body is not valid JSON: {exc}") from exc
