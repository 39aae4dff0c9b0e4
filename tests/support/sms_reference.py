"""Reference texts with their SMS encoding, units and parts, worked out by hand from GSM 03.38
and the concatenation limits (160/153 septets, 70/67 UCS-2 units): the Python rules
(domain/sms_parts.py) and the admin UI's port (admin/app.js) are both held to this table."""

from __future__ import annotations

from typing import NamedTuple


class Reference(NamedTuple):
    name: str
    text: str
    encoding: str
    characters: int
    units: int
    parts: int


EXTENSION = "^{}\\[~]|€"

REFERENCE_TEXTS = [
    Reference("empty", "", "GSM-7", 0, 0, 1),
    Reference("plain Latin", "Hello, world!", "GSM-7", 13, 13, 1),
    Reference("GSM-7 accents and Greek", "Café à Øresund, Δ_Ω £5 ¿¡", "GSM-7", 25, 25, 1),
    Reference("exactly 160 GSM-7", "a" * 160, "GSM-7", 160, 160, 1),
    Reference("161 GSM-7", "a" * 161, "GSM-7", 161, 161, 2),
    Reference("153*2 GSM-7", "b" * 306, "GSM-7", 306, 306, 2),
    Reference("153*2+1 GSM-7", "b" * 307, "GSM-7", 307, 307, 3),
    # Each extension character takes two septets (an escape and the character).
    Reference("extension characters", EXTENSION, "GSM-7", 9, 18, 1),
    Reference("form feed is an extension character", "page\fbreak", "GSM-7", 10, 11, 1),
    Reference("80 braces fill one part", "{" * 80, "GSM-7", 80, 160, 1),
    Reference("81 braces need two", "{" * 81, "GSM-7", 81, 162, 2),
    Reference("159 letters and a euro", "c" * 159 + "€", "GSM-7", 160, 161, 2),
    # An escape pair is never cut: at 152 units the euro does not fit part one and moves on.
    Reference("euro straddling a boundary", "d" * 152 + "€" + "d" * 153, "GSM-7", 306, 307, 3),
    Reference("all Cyrillic is UCS-2", "Привет", "UCS-2", 6, 6, 1),
    Reference("exactly 70 Cyrillic", "ж" * 70, "UCS-2", 70, 70, 1),
    Reference("71 Cyrillic", "ж" * 71, "UCS-2", 71, 71, 2),
    Reference("67*2 Cyrillic", "ж" * 134, "UCS-2", 134, 134, 2),
    Reference("67*2+1 Cyrillic", "ж" * 135, "UCS-2", 135, 135, 3),
    Reference("one Cyrillic letter switches it all", "a" * 69 + "ы", "UCS-2", 70, 70, 1),
    Reference("one Cyrillic letter in 71", "a" * 70 + "ы", "UCS-2", 71, 71, 2),
    # An emoji outside the Basic Multilingual Plane takes two units (a surrogate pair).
    Reference("35 emoji fill one part", "😀" * 35, "UCS-2", 35, 70, 1),
    Reference("36 emoji need two", "😀" * 36, "UCS-2", 36, 72, 2),
    # A surrogate pair is never cut: at 66 units the emoji does not fit part one and moves on.
    Reference("emoji straddling a boundary", "я" * 66 + "😀" + "я" * 5, "UCS-2", 72, 73, 2),
    Reference("emoji straddling, third part", "я" * 66 + "😀" + "я" * 66, "UCS-2", 133, 134, 3),
    Reference("an extension char in UCS-2 is one unit", "€{ и }", "UCS-2", 6, 6, 1),
    Reference("BMP symbol is one unit", "✓" * 70, "UCS-2", 70, 70, 1),
]
