"""Inbound SMS and delivery receipts as the services decide them, over the in-memory
repositories: no emulator."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from chalicelib.domain.client import ClientFields
from chalicelib.domain.inbound import InboundCounts, InboundResult
from chalicelib.domain.receipt import DeliveryStatus
from chalicelib.services.clients import ClientDirectory
from chalicelib.services.inbound import InboundSms
from chalicelib.services.receipts import DeliveryReceipts, UnknownMessage
from chalicelib.settings import DEFAULT_OPT_OUT_KEYWORDS
from tests.support.memory.clients import MemoryClientRepository
from tests.support.memory.inbound import MemoryInboundRepository
from tests.support.memory.receipts import MemoryReceiptRepository

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture
def directory() -> ClientDirectory:
    return ClientDirectory(MemoryClientRepository(), lambda: NOW)


@pytest.fixture
def inbound(directory) -> InboundSms:
    return InboundSms(
        directory,
        MemoryInboundRepository(),
        lambda: NOW,
        keywords=DEFAULT_OPT_OUT_KEYWORDS,
        retention_days=90,
    )


def test_a_keyword_opts_out_once_and_a_reply_is_kept(directory, inbound):
    # Given a client
    client = directory.create(ClientFields("79001234567", None, "", "UTC"))

    # When it replies, then sends STOP twice
    outcomes = [inbound.receive("79001234567", text) for text in ("ok", "STOP", "Stop")]

    # Then the reply is kept, the first STOP opts it out and the second says so
    assert [o.result for o in outcomes] == [
        InboundResult.STORED,
        InboundResult.OPTED_OUT,
        InboundResult.ALREADY_OPTED_OUT,
    ]
    assert directory.get(client.id).opted_out is True
    assert [r.text for r in inbound.replies(client.id, limit=10, cursor=None).items] == ["ok"]
    assert inbound.counts() == InboundCounts(replies=1, opt_outs=2, unknown=0)


def test_a_number_nobody_has_is_only_counted(inbound):
    outcome = inbound.receive("79990000000", "STOP")
    assert (outcome.result, outcome.client_id) == (InboundResult.UNKNOWN_PHONE, None)
    assert inbound.counts() == InboundCounts(unknown=1)


def test_ids_are_registered_only_with_receipts_on():
    # Given the lookup with receipts off, then on
    storage = MemoryReceiptRepository()
    storage.add_mailing("m-1")
    storage.add_message("m-1", "c-1", 7)
    storage.add_message("m-1", "c-2", 8)
    off = DeliveryReceipts(storage, lambda: NOW, enabled=False)
    on = DeliveryReceipts(storage, lambda: NOW, enabled=True)

    # When a page of ids is registered while off, Then a receipt finds nothing
    off.register_ids("m-1", 7, ["c-1"], None)
    with pytest.raises(UnknownMessage):
        off.record(7, DeliveryStatus.DELIVERED)

    # When the next page is registered while on, Then its receipt is recorded, with the time
    on.register_ids("m-1", 8, ["c-2"], None)
    outcome = on.record(8, DeliveryStatus.UNDELIVERED, error="absent")
    assert (outcome.mailing_id, outcome.duplicate) == ("m-1", False)
    assert outcome.delivery.received_at == NOW
    assert storage.counters("m-1") == (0, 1)
