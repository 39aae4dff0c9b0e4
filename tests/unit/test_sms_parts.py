"""SMS parts: the encoding and number of parts of a text, by the reference table, and the
figures of a mailing's text over the client values of its audience."""

from __future__ import annotations

from collections import Counter

import pytest

from chalicelib.domain.sms_parts import (
    ClientValues,
    Prices,
    encoding_of,
    estimate_parts,
    parts_of,
    too_many_parts,
)
from tests.support.sms_reference import REFERENCE_TEXTS, Reference

MOSCOW = "Europe/Moscow"


@pytest.mark.parametrize("reference", REFERENCE_TEXTS, ids=lambda r: r.name)
def test_the_reference_texts_take_their_encoding_units_and_parts(reference: Reference):
    # When a reference text is counted
    counted = parts_of(reference.text)
    # Then it has the encoding, characters, units and parts worked out by hand
    assert (counted.encoding, counted.characters, counted.units, counted.parts) == (
        reference.encoding,
        reference.characters,
        reference.units,
        reference.parts,
    )


def test_the_escape_character_itself_is_not_gsm7_text():
    # A raw escape (0x1B) is how the extension table is reached, never a character to send
    assert encoding_of("a\x1bb") == "UCS-2"


def test_a_texts_figures_over_an_audience_follow_each_clients_values():
    # Given clients read: 3 with a short Latin tag, 1 with a long Cyrillic one
    seen = Counter(
        {ClientValues("916", "vip", MOSCOW): 3, ClientValues("903", "Ж" * 64, MOSCOW): 1}
    )
    # When a text naming the tag is estimated for those 4 messages
    estimate = estimate_parts(
        "Dear {tag}, your discount is ready", seen, messages=4, approximate=False
    )
    # Then it is UCS-2 (one message needs it), 1 to 2 parts a message, 5 in all
    assert (estimate.encoding, estimate.per_message_min, estimate.per_message_max) == (
        "UCS-2",
        1,
        2,
    )
    assert estimate.total == 5
    assert estimate.cost is None


def test_a_total_from_a_bounded_read_is_scaled_to_the_audience_and_priced_per_operator():
    # Given 10 clients read out of an audience of 1,000 messages, half of each operator
    seen = Counter({ClientValues("916", "a", "UTC"): 5, ClientValues("903", "b", "UTC"): 5})
    prices = Prices(per_part=1.0, currency="RUB", by_operator={"916": 0.8})
    # When a two-part text is estimated
    estimate = estimate_parts("z" * 200, seen, messages=1_000, approximate=True, prices=prices)
    # Then the total is the read's parts scaled to the audience, and so is the cost
    assert estimate.total == 2_000
    assert estimate.approximate
    assert estimate.cost == pytest.approx(500 * 2 * 0.8 + 500 * 2 * 1.0)
    assert estimate.currency == "RUB"


def test_a_possible_value_bounds_a_message_but_adds_nothing_to_the_total():
    # Given one client read, and a tag the filter names that no client read has
    seen = Counter({ClientValues("916", "a", "UTC"): 1})
    possible = [ClientValues("916", "Ж" * 64, "UTC")]
    # When a text naming the tag is estimated
    estimate = estimate_parts("{tag}!" * 2, seen, messages=1, approximate=False, possible=possible)
    # Then the longest message is the possible tag's, the total the client's one part
    assert estimate.per_message_max == 2
    assert estimate.total == 1


def test_a_text_that_fits_max_parts_for_every_client_has_no_problem():
    values = [ClientValues("916", "vip", MOSCOW)]
    assert too_many_parts("Hi {tag} in {timezone}", values, 1) is None


def test_the_field_that_makes_a_message_too_long_is_named():
    # Given a client with a 40-character timezone-like value and a short tag
    values = [ClientValues("916", "vip", "America/Argentina/ComodRivadavia")]
    # When a text near 160 characters names both, for max_parts 1
    problem = too_many_parts("{tag} " + "x" * 140 + " {timezone}", values, 1)
    # Then the timezone is named, not the tag
    assert problem is not None
    assert "{timezone}" in problem
    assert "{tag}" not in problem
