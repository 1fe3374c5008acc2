"""The one cursor format of every listing of the admin API (keys, budgets, audit rows, events).

A listing answers at most `limit` rows, newest first, and `continue`: an opaque token for the
next page, or null when there is none (as the Kubernetes API does,
https://kubernetes.io/docs/reference/using-api/api-concepts/#retrieving-large-results-sets-in-chunks).
The token is base64url JSON naming the listing and the position of the last row answered, so a
token of one listing is refused by another, and a changed or truncated one is refused (400), never
read as another position. It holds no secret: ids and times the caller was just shown.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import datetime
from typing import Any

from keybrake.proxy.errors import CursorError  # from the one tree; exported here too
from keybrake.proxy.money import format_ts, parse_ts

__all__ = ["CursorError", "decode_id", "decode_position", "encode_id", "encode_position"]

_VERSION = 1
_ROW_ID = re.compile(r"[A-Za-z0-9._:/@-]{1,253}")


def _encode(listing: str, position: list[Any]) -> str:
    raw = json.dumps({"v": _VERSION, "l": listing, "p": position}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(listing: str, token: str) -> list[Any]:
    if len(token) > 1024:  # a real one is under 200 characters
        raise CursorError("continue: not a token this proxy gave out")
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error, RecursionError) as exc:
        raise CursorError("continue: not a token this proxy gave out") from exc
    if (
        not isinstance(data, dict)
        or data.get("v") != _VERSION
        or not isinstance(data.get("p"), list)
    ):
        raise CursorError("continue: not a token this proxy gave out")
    if data.get("l") != listing:
        raise CursorError(f"continue: a token of another listing, not of {listing}")
    return list(data["p"])


def encode_position(listing: str, created_at: datetime, row_id: str) -> str:
    """The token after a key or budget row (ordered by creation time, then id)."""
    return _encode(listing, [format_ts(created_at), row_id])


def decode_position(listing: str, token: str) -> tuple[datetime, str]:
    position = _decode(listing, token)
    try:
        stamp, row_id = position
        if not isinstance(stamp, str) or not isinstance(row_id, str):
            raise TypeError
        # An id or a label, as this proxy gives them out: nothing a database could choke on.
        if not _ROW_ID.fullmatch(row_id):
            raise ValueError
        return parse_ts(stamp), row_id
    except (TypeError, ValueError, OverflowError) as exc:
        raise CursorError("continue: not a token this proxy gave out") from exc


def encode_id(listing: str, row_id: int) -> str:
    """The token after an audit row or event (ordered by id)."""
    return _encode(listing, [row_id])


def decode_id(listing: str, token: str) -> int:
    position = _decode(listing, token)
    if (
        len(position) != 1
        or not isinstance(position[0], int)
        or isinstance(position[0], bool)
        or not 0 <= position[0] <= 2**62  # row ids; a forged huge one never reaches the database
    ):
        raise CursorError("continue: not a token this proxy gave out")
    return int(position[0])
