"""How many parts an SMS takes, and in which encoding (GSM 03.38 / 3GPP TS 23.038).

Carriers bill and throttle by part. A text made only of the GSM-7 default alphabet (with its
extension table, whose characters take two septets: an escape and the character) goes as GSM-7:
160 septets in one part, 153 a part when split (the rest of each part is the concatenation
header). One character outside it switches the whole text to UCS-2: 70 sixteen-bit units in one
part, 67 a part when split; a character outside the Basic Multilingual Plane (most emoji) takes
two units (a surrogate pair).

Splitting is by units, and a character is never cut: an extension character (escape + char)
or a surrogate pair that would straddle a part boundary starts the next part instead, as
handsets and gateways do. So a text of 153 GSM-7 units per part can need one part more than
`ceil(units / 153)` when such a character sits at a boundary; `parts_of` counts that part.

A mailing's text has placeholders, so its messages differ in length and even in encoding: the
figures over an audience come from the client values seen (`ClientValues`), see
`estimate_parts`. The admin UI's live counter (chalicelib/admin/app.js, `smsParts`) is a port of
this module; tests run the same reference table through both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from chalicelib.domain.text import PLACEHOLDERS, render

Encoding = Literal["GSM-7", "UCS-2"]
GSM7: Encoding = "GSM-7"
UCS2: Encoding = "UCS-2"

# The GSM 03.38 default alphabet (one septet each); 0x1B, the escape to the extension table,
# is not a character of its own.
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# The extension table: an escape and the character, two septets each (form feed included).
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

SINGLE_PART = {GSM7: 160, UCS2: 70}
PER_PART = {GSM7: 153, UCS2: 67}
# A mailing's max_parts may be set from 1 to this.
MAX_PARTS_LIMIT = 10

# A phone number is always 11 ASCII digits (client.PHONE_PATTERN): any one stands for all.
_ANY_PHONE = "70000000000"
# The shortest value a timezone can have (an IANA name of 3 ASCII characters, like UTC).
_SHORTEST_TIMEZONE = "UTC"


@dataclass(frozen=True)
class Parts:
    """One rendered text: its encoding, characters, units (septets or 16-bit units), parts."""

    encoding: Encoding
    characters: int
    units: int
    parts: int


def encoding_of(text: str) -> Encoding:
    """GSM-7 when every character is in the default alphabet or its extension, else UCS-2."""
    if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text):
        return GSM7
    return UCS2


def _unit_width(character: str, encoding: Encoding) -> int:
    if encoding == GSM7:
        return 2 if character in GSM7_EXTENSION else 1
    return 2 if ord(character) > 0xFFFF else 1


def parts_of(text: str) -> Parts:
    """The encoding and number of parts of `text` as it is sent (an empty text is one part)."""
    encoding = encoding_of(text)
    widths = [_unit_width(c, encoding) for c in text]
    units = sum(widths)
    if units <= SINGLE_PART[encoding]:
        return Parts(encoding, len(text), units, 1)
    per_part, parts, used = PER_PART[encoding], 1, 0
    for width in widths:
        if used + width > per_part:  # never cut an escape pair or a surrogate pair
            parts, used = parts + 1, 0
        used += width
    return Parts(encoding, len(text), units, parts)


class ClientValues(NamedTuple):
    """What a client's message depends on, besides the text: its operator code (the price),
    tag and timezone (placeholders of varying length). The phone is always 11 digits."""

    operator_code: str
    tag: str
    timezone: str


def rendered(text: str, values: ClientValues) -> str:
    """`text` as a client with `values` receives it."""
    return render(
        text,
        {
            "phone": _ANY_PHONE,
            "operator_code": values.operator_code,
            "tag": values.tag,
            "timezone": values.timezone,
        },
    )


@dataclass(frozen=True)
class Prices:
    """What one part costs: by operator code where listed, else `per_part`."""

    per_part: float
    currency: str
    by_operator: Mapping[str, float]

    def of(self, operator_code: str) -> float:
        return self.by_operator.get(operator_code, self.per_part)


@dataclass(frozen=True)
class PartsEstimate:
    """A text's parts over an audience: the encoding (UCS-2 if any message is), the fewest and
    most parts one message takes, the parts of all messages, and their cost if priced.
    `approximate`: the total (and cost) were scaled from a bounded read of the audience."""

    encoding: Encoding
    per_message_min: int
    per_message_max: int
    total: int
    approximate: bool
    cost: float | None = None
    currency: str | None = None


def estimate_parts(
    text: str,
    seen: Mapping[ClientValues, int],
    *,
    messages: int,
    approximate: bool,
    possible: Iterable[ClientValues] = (),
    prices: Prices | None = None,
) -> PartsEstimate:
    """The parts of `text` sent to `messages` clients, of which those read had the values
    `seen` (each with its number of clients). `possible` adds values clients may have that the
    read did not meet (a tag the filter names): they bound a message, but weigh nothing in
    the total. The total is exact when the read saw every message's client (`messages` equals
    the clients seen), else scaled from them."""
    per_value = {v: parts_of(rendered(text, v)) for v in {*seen, *possible}}
    if not per_value:  # nobody to send to: the text with the shortest values
        per_value = {_baseline(): parts_of(rendered(text, _baseline()))}
    encoding = UCS2 if any(p.encoding == UCS2 for p in per_value.values()) else GSM7
    counts = [p.parts for p in per_value.values()]
    read = sum(seen.values())
    scale = messages / read if read else 0.0
    total = round(sum(per_value[v].parts * n for v, n in seen.items()) * scale)
    cost = None
    if prices is not None:
        amount = sum(per_value[v].parts * n * prices.of(v.operator_code) for v, n in seen.items())
        cost = round(amount * scale, 2)
    return PartsEstimate(
        encoding=encoding,
        per_message_min=min(counts),
        per_message_max=max(counts),
        total=total,
        approximate=approximate,
        cost=cost,
        currency=None if prices is None else prices.currency,
    )


def mixed(shares: Sequence[tuple[PartsEstimate, float]]) -> PartsEstimate:
    """The parts of a mailing whose clients get several texts (A/B variants, a held-out share
    getting none): each text's estimate over the whole audience, weighed by the share of the
    audience that gets it. The encoding and the per-message bounds are those of every text."""
    first = shares[0][0]
    costs = [estimate.cost for estimate, _ in shares]
    return PartsEstimate(
        encoding=UCS2 if any(e.encoding == UCS2 for e, _ in shares) else GSM7,
        per_message_min=min(e.per_message_min for e, _ in shares),
        per_message_max=max(e.per_message_max for e, _ in shares),
        total=round(sum(e.total * share for e, share in shares)),
        approximate=first.approximate,
        cost=None
        if any(c is None for c in costs)
        else round(sum((e.cost or 0.0) * share for e, share in shares), 2),
        currency=first.currency,
    )


def _baseline(operator_code: str = "000") -> ClientValues:
    """The values that make the shortest message: no tag, the shortest timezone."""
    return ClientValues(operator_code, "", _SHORTEST_TIMEZONE)


def _placeholders_in(text: str) -> list[str]:
    return [name for name in PLACEHOLDERS if "{" + name + "}" in text]


def too_many_parts(text: str, values: Iterable[ClientValues], max_parts: int) -> str | None:
    """Why `text` is too long for `max_parts` for some client with one of `values`, naming
    the client field (placeholder) that makes it so when one does; None when every message
    fits."""
    candidates = [*values, _baseline()]
    worst = max(candidates, key=lambda v: parts_of(rendered(text, v)).parts)
    longest = parts_of(rendered(text, worst))
    if longest.parts <= max_parts:
        return None
    limit = f"more than max_parts {max_parts} allows"
    base = parts_of(rendered(text, _baseline()))
    if base.parts > max_parts:
        why = ""
        if base.encoding == UCS2:
            why = " (it has characters outside GSM-7, so a part holds 67 of them)"
        return (
            f"the text alone takes {base.parts} parts in {base.encoding}{why}, {limit}: "
            "shorten it or raise max_parts"
        )
    blamed = []
    for field in ("tag", "timezone"):
        if field not in _placeholders_in(text):
            continue
        alone = worst._replace(**{f: getattr(_baseline(), f) for f in ("tag", "timezone")})
        alone = alone._replace(**{field: getattr(worst, field)})
        if parts_of(rendered(text, alone)).parts > max_parts:
            blamed.append(field)
    blamed = blamed or [f for f in ("tag", "timezone") if f in _placeholders_in(text)]
    said = []
    for field in blamed:
        value = getattr(worst, field)
        kind = "" if encoding_of(value) == GSM7 else ", with characters outside GSM-7"
        said.append(f"{{{field}}} is {value!r} ({len(value)} characters{kind})")
    return (
        f"a client's message takes {longest.parts} parts in {longest.encoding} when "
        f"{' and '.join(said)}, {limit}: shorten the text, or raise max_parts"
    )
