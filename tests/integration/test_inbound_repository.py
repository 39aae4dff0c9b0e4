"""The inbound SMS storage contract, run against DynamoDB (moto) and the in-memory one."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from pynamodb.connection import Connection

from chalicelib.domain.inbound import InboundCounts, InboundReply, InboundResult
from chalicelib.errors import MalformedRequest
from chalicelib.storage.inbound import DynamoInboundRepository, InboundRepository
from tests.support.memory.inbound import MemoryInboundRepository

START = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["dynamodb", "memory"])
def inbound(request: pytest.FixtureRequest) -> Iterator[InboundRepository]:
    if request.param == "memory":
        yield MemoryInboundRepository()
        return
    services = request.getfixturevalue("services")
    yield DynamoInboundRepository(services.models, Connection(region="us-east-1"))


def reply(n: int, client_id: str = "c-1") -> InboundReply:
    at = START + timedelta(seconds=n)
    return InboundReply(
        f"{at:%Y-%m-%dT%H:%M:%S.%fZ}#{n:012d}", client_id, "79000000001", f"r{n}", at
    )


def test_replies_are_listed_per_client_newest_first_in_pages(inbound):
    # Given five replies of one client and one of another
    for n in range(5):
        inbound.add_reply(reply(n), START + timedelta(days=90))
    inbound.add_reply(reply(9, "c-2"), None)

    # When the first client's replies are read two at a time
    pages, cursor = [], None
    while True:
        page = inbound.page("c-1", limit=2, cursor=cursor)
        pages.append([r.text for r in page.items])
        cursor = page.next_cursor
        if cursor is None:
            break

    # Then they come newest first, each once, exactly as stored
    assert pages == [["r4", "r3"], ["r2", "r1"], ["r0"]]
    assert inbound.page("c-2", limit=10, cursor=None).items == [reply(9, "c-2")]


def test_a_cursor_of_another_client_is_refused(inbound):
    for n in range(3):
        inbound.add_reply(reply(n), None)
    cursor = inbound.page("c-1", limit=1, cursor=None).next_cursor
    with pytest.raises(MalformedRequest):
        inbound.page("c-2", limit=1, cursor=cursor)


def test_every_inbound_sms_is_counted_by_what_it_did(inbound):
    # Given nothing yet, Then the counts are zero
    assert inbound.counts() == InboundCounts()

    # When two replies are kept, an opt-out, a repeated keyword and an unknown number come
    inbound.add_reply(reply(1), None)
    inbound.add_reply(reply(2), None)
    inbound.count(InboundResult.OPTED_OUT)
    inbound.count(InboundResult.ALREADY_OPTED_OUT)
    inbound.count(InboundResult.UNKNOWN_PHONE)

    # Then each is counted once, the replies as stored
    assert inbound.counts() == InboundCounts(replies=2, opt_outs=2, unknown=1)
