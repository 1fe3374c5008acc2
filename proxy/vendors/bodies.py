"""Reading request bodies exactly as the vendor will, or not at all.

A priced call is forwarded only when the proxy has read its body the one way the vendor can:
every place where two parsers could disagree is refused (`AmbiguousRequest`, a 400) instead of
guessed at. What is refused, and why:

- a content type other than the one the endpoint takes (a JSON body sent to Stripe v1 was read as
  "no amount" by a form parser while the vendor executed it); an empty body needs none;
- a query string on a priced write: Stripe mixes query parameters into the body's, Rack-style;
- bytes that are not UTF-8, percent escapes that do not decode to UTF-8, and `;` between fields
  (older Rack splits fields on `;` as well as `&`);
- a form field name outside `name[sub][...]` (letters, digits, `_ . -`, then bracketed parts):
  Rack versions differ on names such as `[amount]` or `amount]`, one of which reads them as
  `amount`;
- a field that pricing reads appearing more than once, nested (`amount[x]`) or in another case
  (`to` beside `To`): parsers differ on which copy wins;
- JSON with a repeated object key, `NaN`/`Infinity`, or nesting too deep to parse.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote_plus

from keybrake.proxy.pricing import AmbiguousRequest
from keybrake.proxy.strict_json import parse_json

__all__ = ["FormBody", "parse_json", "read_form", "read_json"]

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
_NAME = re.compile(r"[A-Za-z0-9_.-]+(?:\[[^\[\]]*\])*")
_SIBLING = re.compile(r"\[[A-Za-z_][A-Za-z0-9_]*\]")  # `[word]`, right after a field's top name


def _media_type(headers: Mapping[str, str]) -> tuple[str, str | None]:
    """(type, charset) of the Content-Type header, lower-cased; charset None if not given."""
    value = headers.get("content-type", "")
    if value in (FORM, JSON):  # what the SDKs send: no parsing needed
        return value, None
    media, *params = (part.strip() for part in value.split(";"))
    charset = None
    for param in params:
        name, _, raw = param.partition("=")
        if name.strip().lower() != "charset" or charset is not None:
            raise AmbiguousRequest(f"unexpected Content-Type parameter {param!r}")
        charset = raw.strip().strip('"').lower()
    return media.lower(), charset


def _require(
    headers: Mapping[str, str], query: str, body: bytes, expected: str, what: str
) -> str | None:
    """The body as text, after the checks every strictly read body passes; None if empty."""
    if query:
        raise AmbiguousRequest(
            f"{what}: a query string on a priced write is refused; send every parameter in the "
            "body, because the vendor merges both and the proxy prices the body"
        )
    encoding = headers.get("content-encoding")
    if encoding is not None and encoding.strip().lower() not in ("identity", ""):
        raise AmbiguousRequest(f"{what}: compressed request bodies are refused")
    if not body:
        return None
    media, charset = _media_type(headers)
    if media != expected or charset not in (None, "utf-8"):
        shown = headers.get("content-type") or "none"
        raise AmbiguousRequest(
            f"{what} takes {expected} bodies (UTF-8); refused a body with Content-Type {shown}"
        )
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AmbiguousRequest(f"{what}: the request body is not UTF-8") from exc


class FormBody:
    """A form body's fields in order, with reads that refuse whatever a vendor could read
    differently."""

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.fields = fields
        # Fields by their top-level name folded to lower case (`metadata` for `metadata[x]`),
        # so a read finds every spelling a vendor might take for the same field.
        self._by_top: dict[str, list[tuple[str, str]]] = {}
        for name, value in fields:
            top = name.partition("[")[0]
            self._by_top.setdefault(top.lower(), []).append((name, value))

    @classmethod
    def parse(cls, text: str) -> FormBody:
        if ";" in text:
            raise AmbiguousRequest("form fields are separated by '&' only; ';' is refused")
        fields: list[tuple[str, str]] = []
        for part in text.split("&"):
            if not part:
                continue
            raw_name, _, raw_value = part.partition("=")
            name, value = _unquote(raw_name), _unquote(raw_value)
            if not _NAME.fullmatch(name):
                raise AmbiguousRequest(
                    f"form field name {name[:60]!r} is refused: use name or name[key][...] "
                    "(letters, digits, _ . -), which every parser reads the same way"
                )
            fields.append((name, value))
        return cls(fields)

    def one(self, name: str) -> str | None:
        """The value of a field pricing reads; refused if the vendor could see another one."""
        found = self._by_top.get(name.lower())
        if not found:
            return None
        for field, _ in found:
            if field != name:
                raise AmbiguousRequest(
                    f"field {name!r} is read for pricing, so {field[:60]!r} beside or instead "
                    "of it is refused"
                )
        if len(found) > 1:
            raise AmbiguousRequest(
                f"field {name!r} appears {len(found)} times; it is read for pricing, so it must "
                "appear once"
            )
        return found[0][1]

    def nested(self, name: str) -> str | None:
        """The value of one nested field a constraint reads (`transfer_data[destination]`),
        beside its siblings (`transfer_data[amount]`); refused if the vendor could see another
        value for it (another spelling, a repeat, or the parent given as a value)."""
        top, lowered = name.partition("[")[0], name.lower()
        # A sibling is `top[word]...`; the parent as a value, a list (`top[]`, `top[0]`) or the
        # field itself in any other spelling or nesting could be read as it.
        found = [
            (field, value)
            for field, value in self._by_top.get(top.lower(), [])
            if (folded := field.lower()) == lowered
            or folded.startswith(lowered + "[")
            or not _SIBLING.match(field, len(top))
        ]
        if not found:
            return None
        if len(found) > 1 or found[0][0] != name:
            raise AmbiguousRequest(
                f"field {name!r} is read for a constraint, so it must appear once, exactly so "
                f"spelled; {found[-1][0][:60]!r} is refused"
            )
        return found[0][1]

    def many(self, name: str) -> list[str]:
        """Every value of a field that is a list by design (Twilio's `MediaUrl`)."""
        return [value for field, value in self.fields if field == name]

    def only(self, allowed: Iterable[str], what: str) -> None:
        """Refuse fields outside `allowed` (top-level names, or exact nested names)."""
        permitted = set(allowed)
        for field, _ in self.fields:
            if field.partition("[")[0] not in permitted and field not in permitted:
                raise AmbiguousRequest(
                    f"{what} refuses field {field[:60]!r}: it is neither priced nor on the list "
                    "of fields known not to move money (an operator may list it in the "
                    "endpoint's free_fields in the pricing file, which replace the shipped list)"
                )


def _unquote(raw: str) -> str:
    if "%" not in raw and "+" not in raw:
        return raw
    try:
        return unquote_plus(raw, errors="strict")
    except UnicodeDecodeError as exc:
        raise AmbiguousRequest("a form field does not decode to UTF-8") from exc


def read_form(headers: Mapping[str, str], query: str, body: bytes, what: str) -> FormBody:
    """A priced write's form body, read strictly (see the module docstring)."""
    text = _require(headers, query, body, FORM, what)
    return FormBody.parse(text or "")


def read_json(headers: Mapping[str, str], query: str, body: bytes, what: str) -> Any:
    """A priced write's JSON body, read strictly (see the module docstring); None if empty."""
    text = _require(headers, query, body, JSON, what)
    return None if text is None else parse_json(text)
