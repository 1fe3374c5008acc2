"""SMS segment counts against hand-worked examples (the arithmetic is in each case's comment).

GSM-7: <= 160 septets is one segment, else parts of <= 153 septets; `^{}\\[~]|€` and form feed
take 2 septets and never straddle two parts. UCS-2 (any character outside GSM-7): <= 70 UTF-16
code units is one segment, else parts of <= 67; an emoji outside the BMP takes 2 code units and
never straddles two parts.
"""

from __future__ import annotations

import pytest

from keybrake.proxy.vendors.sms import GSM7_BASIC, GSM7_EXTENSION, Segments, sms_segments

GSM, UCS = "GSM-7", "UCS-2"


@pytest.mark.parametrize(
    "body,expected",
    [
        # Nothing to send still bills one segment (Twilio refuses an empty SMS anyway).
        ("", Segments(GSM, 0, 1)),
        # 5 septets <= 160: one segment.
        ("Hello", Segments(GSM, 5, 1)),
        # 160 septets: exactly the single-segment limit.
        ("a" * 160, Segments(GSM, 160, 1)),
        # 161 > 160, so parts of 153: 153 + 8 -> 2.
        ("a" * 161, Segments(GSM, 161, 2)),
        # 306 = 153 + 153 -> 2; one more character needs a third part.
        ("a" * 306, Segments(GSM, 306, 2)),
        ("a" * 307, Segments(GSM, 307, 3)),
        # Twilio's longest body, 1600 characters: 10 x 153 = 1530, 70 left over -> 11.
        ("a" * 1600, Segments(GSM, 1600, 11)),
        # Accented letters of the GSM-7 alphabet are single septets: 16 -> 1.
        ("ÄÖÑÜ§¿äöñüàèéùìò", Segments(GSM, 16, 1)),
        # Extension characters take two septets: "[" 2 + "x" 1 + "]" 2 = 5.
        ("[x]", Segments(GSM, 5, 1)),
        # 80 euro signs x 2 septets = 160: still one segment.
        ("€" * 80, Segments(GSM, 160, 1)),
        # 81 x 2 = 162 > 160. A part holds 76 of them (152 septets; a 77th makes 154 > 153),
        # so 76 + 5 -> 2.
        ("€" * 81, Segments(GSM, 162, 2)),
        # 152 + 2 + 152 = 306 septets, which 306 / 153 would call 2; but the euro sign cannot
        # straddle: part 1 = 152 a's (the € would make 154), part 2 = € + 151 a's = 153,
        # part 3 = the last a -> 3.
        ("a" * 152 + "€" + "a" * 152, Segments(GSM, 306, 3)),
        # Cyrillic is not GSM-7: UCS-2, 6 code units -> 1.
        ("Привет", Segments(UCS, 6, 1)),
        # 70 code units: exactly the UCS-2 single limit.
        ("я" * 70, Segments(UCS, 70, 1)),
        # 71 > 70, so parts of 67: 67 + 4 -> 2.
        ("я" * 71, Segments(UCS, 71, 2)),
        # One non-GSM letter (ş) turns the whole body UCS-2: 101 units -> 67 + 34 -> 2, where
        # "a" * 101 alone would be 1 segment.
        ("a" * 100 + "ş", Segments(UCS, 101, 2)),
        # "û" is not in GSM-7 (Ç and € are): UCS-2; 11 characters, 11 code units -> 1.
        ("Ça coûte 5€", Segments(UCS, 11, 1)),
        # A tab is not GSM-7 either: "a\tb" is UCS-2, 3 units.
        ("a\tb", Segments(UCS, 3, 1)),
        # 😀 (U+1F600) is outside the BMP: a surrogate pair, 2 units; 35 of them = 70 -> 1.
        ("😀" * 35, Segments(UCS, 70, 1)),
        # 36 x 2 = 72 > 70. A part holds 33 (66 units; a 34th makes 68 > 67): 33 + 3 -> 2.
        ("😀" * 36, Segments(UCS, 72, 2)),
        # 66 + 2 + 66 = 134 units, which 134 / 67 would call 2; the pair cannot straddle:
        # part 1 = 66 a's, part 2 = 😀 + 65 a's = 67, part 3 = the last a -> 3.
        ("a" * 66 + "😀" + "a" * 66, Segments(UCS, 134, 3)),
        # A typical notification with one emoji: 5 + 2 = 7 units -> 1, but 140 letters and an
        # emoji are 142 units: 67 + 67 + 8 -> 3 segments (the same text without it: 1).
        ("Done 😀", Segments(UCS, 7, 1)),
        ("b" * 140 + "😀", Segments(UCS, 142, 3)),
    ],
)
def test_hand_worked_segment_counts(body: str, expected: Segments) -> None:
    assert sms_segments(body) == expected


def test_the_gsm7_alphabet_has_its_128_characters() -> None:
    # GSM 03.38: 128 code points, one of them the escape to the extension table (not a
    # character): 127 printable basics, and 10 extension characters.
    assert len(GSM7_BASIC) == 127
    assert len(GSM7_EXTENSION) == 10
    assert not GSM7_BASIC & GSM7_EXTENSION
