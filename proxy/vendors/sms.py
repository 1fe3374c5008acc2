"""How many SMS segments a message body takes: the unit Twilio bills an SMS by.

A body that fits the GSM-7 alphabet (GSM 03.38) is sent in 7-bit septets: up to 160 septets is
one segment; a longer body is split into parts of at most 153 septets each, because a 6-byte
concatenation header (7 septets) rides in every part. Characters of the extension table
(`^ { } \\ [ ] ~ | €` and form feed) take two septets, an escape and the character, and a part
never ends between the two.

One character outside GSM-7 sends the whole body as UCS-2 (UTF-16): up to 70 code units is one
segment, longer bodies go in parts of at most 67. A character outside the Basic Multilingual
Plane (most emoji) is a surrogate pair, two code units, never split across parts.

Both rules can only overcount what Twilio bills (its optional Smart Encoding may turn lookalike
characters into GSM-7 and send fewer segments), which is the safe side for a reservation.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GSM7_BASIC", "GSM7_EXTENSION", "Segments", "sms_segments"]

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

GSM7 = "GSM-7"
UCS2 = "UCS-2"
_LIMITS = {GSM7: (160, 153), UCS2: (70, 67)}


@dataclass(frozen=True, slots=True)
class Segments:
    encoding: str  # "GSM-7" or "UCS-2"
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2) in the whole body
    count: int  # segments billed


def sms_segments(body: str) -> Segments:
    """The encoding, size and segment count of an SMS body."""
    if all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in body):
        encoding = GSM7
        widths = [2 if ch in GSM7_EXTENSION else 1 for ch in body]
    else:
        encoding = UCS2
        widths = [2 if ord(ch) > 0xFFFF else 1 for ch in body]
    single, part = _LIMITS[encoding]
    units = sum(widths)
    if units <= single:
        return Segments(encoding, units, 1)
    count, used = 1, 0
    for width in widths:
        if used + width > part:  # the character does not fit: it starts the next part
            count, used = count + 1, 0
        used += width
    return Segments(encoding, units, count)
