"""The delivery receipts' storage contract, run against DynamoDB (moto) and the in-memory one:
an id finds its message through its page, and a message's first receipt counts once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from pynamodb.connection import Connection

from chalicelib.domain.receipt import ID_BUCKET, Delivery, DeliveryStatus
from chalicelib.storage.receipts import DynamoReceiptRepository, ReceiptRepository
from tests.support.memory.receipts import MemoryReceiptRepository

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
KEEP = NOW + timedelta(days=90)


@dataclass
class World:
    receipts: ReceiptRepository
    add_mailing: Callable[[str], None]
    add_message: Callable[[str, str, int], None]
    delete_mailing: Callable[[str], None]
    counters: Callable[[str], tuple[int, int]]


def _dynamodb_world(services) -> World:
    models = services.models

    def add_mailing(mailing_id: str) -> None:
        models.Mailing(
            mailing_id,
            text="Hi",
            start_at=NOW,
            end_at=NOW + timedelta(hours=1),
            status="running",
            created_at=NOW,
            updated_at=NOW,
        ).save()

    def add_message(mailing_id: str, client_id: str, message_id: int) -> None:
        models.Message(
            mailing_id,
            client_id,
            message_id=message_id,
            phone="79000000001",
            status="sent",
            created_at=NOW,
            updated_at=NOW,
        ).save()

    def delete_mailing(mailing_id: str) -> None:
        models.Mailing(mailing_id).delete()

    def counters(mailing_id: str) -> tuple[int, int]:
        record = models.Mailing.get(mailing_id, consistent_read=True)
        return int(record.count_delivered or 0), int(record.count_undelivered or 0)

    repository = DynamoReceiptRepository(models, Connection(region="us-east-1"))
    return World(repository, add_mailing, add_message, delete_mailing, counters)


def _memory_world() -> World:
    memory = MemoryReceiptRepository()
    return World(
        memory, memory.add_mailing, memory.add_message, memory.delete_mailing, memory.counters
    )


@pytest.fixture(params=["dynamodb", "memory"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    if request.param == "memory":
        yield _memory_world()
    else:
        yield _dynamodb_world(request.getfixturevalue("services"))


def delivered(status: DeliveryStatus = DeliveryStatus.DELIVERED, **fields) -> Delivery:
    return Delivery(status=status, at=fields.pop("at", None), received_at=NOW, **fields)


def test_an_id_finds_its_client_through_its_page_across_a_bucket_edge(world):
    # Given two mailings' pages, one of them straddling a lookup bucket's edge, and a gap
    edge = 3 * ID_BUCKET
    world.receipts.register_ids("m-1", edge - 2, ["c-1", "c-2", "c-3", "c-4"], KEEP)
    world.receipts.register_ids("m-2", edge + 5, ["c-9"], KEEP)

    # When ids are looked up, Then each finds its (mailing, client), and the gaps find nothing
    assert world.receipts.locate(edge - 2) == ("m-1", "c-1")
    assert world.receipts.locate(edge) == ("m-1", "c-3")
    assert world.receipts.locate(edge + 1) == ("m-1", "c-4")
    assert world.receipts.locate(edge + 2) is None
    assert world.receipts.locate(edge + 5) == ("m-2", "c-9")
    assert world.receipts.locate(edge - 3) is None
    assert world.receipts.locate(10 * ID_BUCKET) is None


def test_the_first_receipt_counts_and_a_repeat_changes_nothing(world):
    # Given a mailing with two sent messages
    world.add_mailing("m-1")
    world.add_message("m-1", "c-1", 101)
    world.add_message("m-1", "c-2", 102)

    # When c-1 gets a receipt twice (the second one contrary) and c-2 one `expired`
    first = world.receipts.record("m-1", "c-1", 101, delivered(at=NOW))
    again = world.receipts.record("m-1", "c-1", 101, delivered(DeliveryStatus.UNDELIVERED))
    other = world.receipts.record("m-1", "c-2", 102, delivered(DeliveryStatus.EXPIRED, error="x"))

    # Then each message counts its first receipt once, and the repeat names the first
    assert first is not None
    assert first.duplicate is False
    assert again is not None
    assert again.duplicate is True
    assert again.delivery == delivered(at=NOW)
    assert other is not None
    assert other.delivery.error == "x"
    assert world.counters("m-1") == (1, 1)


def test_a_receipt_for_another_id_or_a_gone_mailing_is_unknown(world):
    # Given a message 101 of a mailing, and a message of a mailing since deleted
    world.add_mailing("m-1")
    world.add_message("m-1", "c-1", 101)
    world.add_mailing("m-2")
    world.add_message("m-2", "c-1", 201)
    world.delete_mailing("m-2")

    # When receipts name a wrong id, a missing message or the deleted mailing's message
    # Then each is unknown, and nothing was counted
    assert world.receipts.record("m-1", "c-1", 999, delivered()) is None
    assert world.receipts.record("m-1", "c-7", 101, delivered()) is None
    assert world.receipts.record("m-2", "c-1", 201, delivered()) is None
    assert world.counters("m-1") == (0, 0)
