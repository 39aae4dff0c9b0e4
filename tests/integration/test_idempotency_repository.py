"""The Idempotency-Key store's contract, run against the in-memory and DynamoDB versions."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from chalicelib.domain.idempotency import KeyClaim, SavedResponse, UsedKey
from chalicelib.storage.idempotency import IdempotencyKeys
from tests.support.memory.idempotency import MemoryIdempotencyKeys

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)
CREATED = SavedResponse(201, '{"id": "m-1"}', "application/json")


@pytest.fixture(params=["memory", "dynamodb"])
def keys(request: pytest.FixtureRequest) -> Iterator[IdempotencyKeys]:
    if request.param == "memory":
        yield MemoryIdempotencyKeys()
        return
    request.getfixturevalue("aws")
    from chalicelib.settings import Settings
    from chalicelib.storage.idempotency import DynamoIdempotencyKeys
    from chalicelib.storage.models import build_models

    record = build_models(Settings(table_prefix="sms-test")).IdempotencyRecord
    record.create_table(wait=True)
    yield DynamoIdempotencyKeys(record)


def claim(attempt: str, at: datetime = NOW, fingerprint: str = "fp-1") -> KeyClaim:
    """A claim made at `at`, as the store makes them: held a minute, kept a day."""
    return KeyClaim("caller\x1fkey", fingerprint, attempt, at + MINUTE, at + DAY)


def test_a_free_key_is_claimed_once(keys: IdempotencyKeys):
    # Given nothing stored under the key
    assert keys.find("caller\x1fkey") is None

    # When two runs claim it, Then only the first gets it, and the key names its request
    assert keys.claim(claim("a1"), NOW) is True
    assert keys.claim(claim("a2"), NOW + timedelta(seconds=1)) is False
    assert keys.find("caller\x1fkey") == UsedKey("fp-1")


def test_a_saved_response_is_found_and_keeps_the_key_held(keys: IdempotencyKeys):
    # Given a claimed key whose run answered
    keys.claim(claim("a1"), NOW)
    assert keys.save_response("caller\x1fkey", "a1", CREATED) is True

    # When the same request comes again after the claim's minute
    later = NOW + 2 * MINUTE
    taken = keys.claim(claim("a2", later), later)

    # Then the key stays with its answer, to be replayed
    assert taken is False
    assert keys.find("caller\x1fkey") == UsedKey("fp-1", CREATED)


def test_a_claim_that_ran_out_unanswered_is_taken_over_by_the_same_request_only(
    keys: IdempotencyKeys,
):
    # Given a run that claimed the key and died without answering
    keys.claim(claim("a1"), NOW)
    later = NOW + 2 * MINUTE

    # When another request, then the same one, claims it after the claim's minute
    other = keys.claim(claim("a2", later, fingerprint="fp-2"), later)
    same = keys.claim(claim("a3", later), later)

    # Then only the same request takes it over
    assert (other, same) == (False, True)
    assert keys.save_response("caller\x1fkey", "a1", CREATED) is False
    assert keys.save_response("caller\x1fkey", "a3", CREATED) is True


def test_an_expired_key_is_free_for_any_request(keys: IdempotencyKeys):
    # Given an answered key whose day has passed (DynamoDB's TTL removes it some time later)
    keys.claim(claim("a1"), NOW)
    keys.save_response("caller\x1fkey", "a1", CREATED)
    later = NOW + DAY + MINUTE

    # When another request claims it, Then it gets it, unanswered
    assert keys.claim(claim("a2", later, fingerprint="fp-2"), later) is True
    assert keys.find("caller\x1fkey") == UsedKey("fp-2")


def test_only_the_holder_gives_the_key_back(keys: IdempotencyKeys):
    # Given a key claimed by one run
    keys.claim(claim("a1"), NOW)

    # When another run, then the holder, gives it back
    by_other = keys.release("caller\x1fkey", "a2")
    by_holder = keys.release("caller\x1fkey", "a1")

    # Then only the holder's give-back removes it, and it can be claimed again at once
    assert (by_other, by_holder) == (False, True)
    assert keys.find("caller\x1fkey") is None
    assert keys.claim(claim("a3"), NOW) is True
    assert keys.release("caller\x1fmissing", "a3") is False
