"""The frequency-cap slots' contract, run against DynamoDB (moto) and the in-memory store: a slot
is taken only while it is free and the mailing holds none, and given back only by its holder."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest

from chalicelib.domain.frequency_cap import CapSlot
from chalicelib.storage.frequency_caps import DynamoFrequencyCaps, FrequencyCapStore
from tests.support.memory.frequency_caps import MemoryFrequencyCaps

NOW = 1_800_000_000.0
DAY = 86_400.0


@pytest.fixture(params=["dynamodb", "memory"])
def caps(request: pytest.FixtureRequest) -> Iterator[FrequencyCapStore]:
    if request.param == "memory":
        yield MemoryFrequencyCaps()
        return
    services = request.getfixturevalue("services")
    client = boto3.client("dynamodb", region_name="us-east-1")
    yield DynamoFrequencyCaps(client, services.settings.table_name("sequences"))


def test_a_free_slot_is_taken_and_then_seen_busy(caps):
    # Given a client nobody has sent to
    # When a message of mailing A takes slot 0 of a cap of 2
    assert caps.take("c1", "A", 0, 2, NOW, NOW + DAY) is None
    # Then the slot is A's until a day later, and the other slot is still free
    assert caps.slots("c1", 2) == [CapSlot("A", NOW + DAY), None]


def test_a_busy_slot_is_not_taken_and_the_refusal_shows_the_slots(caps):
    # Given slot 0 taken by mailing A
    caps.take("c1", "A", 0, 1, NOW, NOW + DAY)
    # When mailing B tries the same slot within the window
    seen = caps.take("c1", "B", 0, 1, NOW + 60, NOW + 60 + DAY)
    # Then it is refused, with the slots as the condition saw them
    assert seen == [CapSlot("A", NOW + DAY)]
    assert caps.slots("c1", 1) == [CapSlot("A", NOW + DAY)]


def test_a_mailing_holding_a_slot_cannot_take_a_second_one(caps):
    # Given mailing A holds slot 0 of a cap of 2
    caps.take("c1", "A", 0, 2, NOW, NOW + DAY)
    # When a job of A's message comes again and tries slot 1
    seen = caps.take("c1", "A", 1, 2, NOW + 5, NOW + 5 + DAY)
    # Then it is refused: its message already has a slot
    assert seen == [CapSlot("A", NOW + DAY), None]


def test_a_slot_whose_window_passed_is_free_again(caps):
    # Given slot 0 taken by mailing A a day ago
    caps.take("c1", "A", 0, 1, NOW, NOW + DAY)
    # When mailing B tries it once the window passed
    # Then B takes it
    assert caps.take("c1", "B", 0, 1, NOW + DAY, NOW + 2 * DAY) is None
    assert caps.slots("c1", 1) == [CapSlot("B", NOW + 2 * DAY)]


def test_only_the_holder_gives_a_slot_back(caps):
    # Given slot 0 taken by mailing A
    caps.take("c1", "A", 0, 1, NOW, NOW + DAY)
    # When mailing B gives it back, then A
    # Then only A's give-back frees it
    assert caps.give_back("c1", "B", 0) is False
    assert caps.give_back("c1", "A", 0) is True
    assert caps.slots("c1", 1) == [None]
    assert caps.take("c1", "B", 0, 1, NOW + 1, NOW + 1 + DAY) is None


def test_clients_have_their_own_slots(caps):
    # Given client c1's slot taken
    caps.take("c1", "A", 0, 1, NOW, NOW + DAY)
    # Then client c2's is free
    assert caps.take("c2", "A", 0, 1, NOW, NOW + DAY) is None
