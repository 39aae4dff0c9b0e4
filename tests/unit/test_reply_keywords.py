"""The pure rules of inbound SMS and delivery receipts: which replies opt out, which lookup
buckets a page of ids touches, and the delivered rate."""

from __future__ import annotations

import pytest

from chalicelib.domain.inbound import is_opt_out
from chalicelib.domain.receipt import ID_BUCKET, DeliveryCounts, id_buckets
from chalicelib.settings import DEFAULT_OPT_OUT_KEYWORDS

OPT_OUT = DEFAULT_OPT_OUT_KEYWORDS


@pytest.mark.parametrize(
    "text",
    ["STOP", "stop", " Stop\n", "СТОП", "стоп", "ОтПиСкА", "unsubscribe", "\tОТПИСАТЬСЯ  "],  # noqa: RUF001
)
def test_a_text_made_only_of_a_keyword_opts_out(text):
    assert is_opt_out(text, OPT_OUT)


@pytest.mark.parametrize(
    "text", ["", "   ", "STOP IT", "stop?", "S T O P", "please stop", "STOPP", "СТОП!"]
)
def test_anything_more_or_less_than_a_keyword_is_a_reply(text):
    assert not is_opt_out(text, OPT_OUT)


def test_keywords_of_several_words_match_with_any_spacing():
    assert is_opt_out("  opt   OUT ", ("Opt out",))


def test_a_page_of_ids_touches_the_buckets_it_spans():
    # Given pages inside one bucket, across an edge, and empty
    assert id_buckets(5, 98) == [0]
    assert id_buckets(ID_BUCKET - 1, 2) == [0, 1]
    assert id_buckets(2 * ID_BUCKET, 1) == [2]
    assert id_buckets(7, 0) == []


def test_the_delivered_rate_is_of_the_sent_messages_and_never_above_one():
    assert DeliveryCounts(delivered=3, undelivered=1).rate(4) == 0.75
    assert DeliveryCounts(delivered=0, undelivered=0).rate(0) is None
    # A receipt may count before its `sent` does (the gateway was quicker than our write)
    assert DeliveryCounts(delivered=2).rate(1) == 1.0
