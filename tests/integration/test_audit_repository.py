"""The audit trail's contract, run against the in-memory and the DynamoDB implementations."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from chalicelib.domain.audit import Actor, AuditEntry
from chalicelib.errors import MalformedRequest
from chalicelib.storage.audit import AuditTrail
from tests.support.memory.audit import MemoryAuditTrail

START = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
KEEP = timedelta(days=365)


@pytest.fixture(params=["memory", "dynamodb"])
def trail(request: pytest.FixtureRequest) -> Iterator[AuditTrail]:
    if request.param == "memory":
        yield MemoryAuditTrail()
        return
    request.getfixturevalue("aws")
    from chalicelib.settings import Settings
    from chalicelib.storage.audit import DynamoAuditTrail
    from chalicelib.storage.models import build_models

    record = build_models(Settings(table_prefix="sms-test")).AuditEntry
    record.create_table(wait=True)
    yield DynamoAuditTrail(record)


def entry(n: int, target: str, actor: str, **changes: Any) -> AuditEntry:
    """The n-th write (a second apart), stamped as AuditLog stamps it."""
    at = START + timedelta(seconds=n)
    written = AuditEntry(
        actor=Actor(actor, "admin", "static"),
        action="mailing.create",
        target_type="mailing",
        target_id=target,
        http_status=201,
        at=at,
        id=f"{at:%Y-%m-%dT%H:%M:%S.%fZ}#{n:012d}",
    )
    return replace(written, **changes)


def ids(page: list[AuditEntry]) -> list[str]:
    return [e.id for e in page]


def test_an_entry_is_stored_as_given(trail: AuditTrail):
    # Given an entry with every field set
    given = entry(
        1,
        "m-1",
        "token:ab12",
        request_id="req-1",
        fields=("text", "start_at"),
        status="scheduled",
    )

    # When it is added, Then it comes back, and is listed, exactly as given
    assert trail.add(given, START + KEEP) == given
    assert trail.page(target="m-1", actor=None, limit=10, cursor=None).items == [given]


def test_a_target_an_actor_or_everything_is_listed_newest_first(trail: AuditTrail):
    # Given writes to two mailings by two callers
    written = [
        entry(1, "m-1", "alice"),
        entry(2, "m-2", "bob"),
        entry(3, "m-1", "bob"),
        entry(4, "m-2", "alice"),
    ]
    for e in written:
        trail.add(e, START + KEEP)

    # When the trail is listed by target, by actor, by both, and whole
    def listed(target: str | None, actor: str | None) -> list[str]:
        return ids(trail.page(target=target, actor=actor, limit=10, cursor=None).items)

    # Then each listing holds only its entries, newest first
    assert listed("m-1", None) == [written[2].id, written[0].id]
    assert listed(None, "alice") == [written[3].id, written[0].id]
    assert listed("m-1", "bob") == [written[2].id]
    assert listed(None, None) == [e.id for e in reversed(written)]
    assert listed("m-3", None) == []


def test_pages_follow_each_other_until_the_last_has_no_cursor(trail: AuditTrail):
    # Given five writes to one mailing
    written = [entry(n, "m-1", "alice") for n in range(5)]
    for e in written:
        trail.add(e, START + KEEP)

    # When it is read two entries at a time
    pages = [trail.page(target="m-1", actor=None, limit=2, cursor=None)]
    while pages[-1].next_cursor is not None:
        pages.append(trail.page(target="m-1", actor=None, limit=2, cursor=pages[-1].next_cursor))

    # Then the pages hold every entry once, newest first, and the last one ends the listing
    assert [len(p.items) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in ids(p.items)] == [e.id for e in reversed(written)]


def test_a_cursor_of_another_listing_is_refused(trail: AuditTrail):
    # Given a next cursor of one mailing's trail
    for n in range(3):
        trail.add(entry(n, "m-1", "alice"), START + KEEP)
    cursor = trail.page(target="m-1", actor=None, limit=1, cursor=None).next_cursor
    assert cursor is not None

    # When it is sent with another filter, Then it is refused as a malformed request
    with pytest.raises(MalformedRequest):
        trail.page(target="m-2", actor=None, limit=1, cursor=cursor)
    with pytest.raises(MalformedRequest):
        trail.page(target=None, actor=None, limit=1, cursor="not-a-cursor")
