"""Audience selection: which clients a filter selects, and the look-ups that find them once."""

from __future__ import annotations

import pytest

from chalicelib.domain.audience import AudienceFilter, AudienceQuery


@pytest.mark.parametrize(
    ("audience", "code", "tag", "selected"),
    [
        (AudienceFilter(), "900", "vip", True),
        (AudienceFilter(operator_codes=("900",)), "900", "vip", True),
        (AudienceFilter(operator_codes=("900",)), "901", "vip", False),
        (AudienceFilter(tags=("vip", "new")), "901", "new", True),
        (AudienceFilter(("900",), ("vip",)), "900", "new", False),
        (AudienceFilter(("900",), ("vip",)), "900", "vip", True),
    ],
)
def test_a_filter_selects_clients_by_any_of_its_codes_and_any_of_its_tags(
    audience, code, tag, selected
):
    # Given a filter and a client's operator code and tag
    # Then the client is selected when both the code and the tag match (an empty list: any)
    assert audience.matches(code, tag) is selected


def test_codes_and_tags_are_looked_up_as_every_pair_in_a_stable_order():
    # Given a filter with two codes and two tags, given out of order
    audience = AudienceFilter(operator_codes=("901", "900"), tags=("vip", "new"))

    # When its look-ups are planned
    plan = audience.selection(shards=16)

    # Then there is one per pair, sorted, so a cursor names the same position every time
    assert plan == [
        AudienceQuery(operator_code="900", tag="new"),
        AudienceQuery(operator_code="900", tag="vip"),
        AudienceQuery(operator_code="901", tag="new"),
        AudienceQuery(operator_code="901", tag="vip"),
    ]


@pytest.mark.parametrize(
    ("audience", "plan"),
    [
        (
            AudienceFilter(operator_codes=("901", "900")),
            [AudienceQuery("900"), AudienceQuery("901")],
        ),
        (AudienceFilter(tags=("vip",)), [AudienceQuery(tag="vip")]),
    ],
)
def test_codes_alone_or_tags_alone_are_looked_up_one_by_one(audience, plan):
    # Given a filter by codes only, or by tags only
    # Then each value is one look-up
    assert audience.selection(shards=16) == plan


def test_an_empty_filter_walks_every_shard_of_all_clients():
    # Given a filter that selects everyone
    # When its look-ups are planned over four shards
    plan = AudienceFilter().selection(shards=4)

    # Then every shard is looked up once
    assert plan == [AudienceQuery(shard=shard) for shard in range(4)]
