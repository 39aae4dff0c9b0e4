"""The client repository's contract, run against DynamoDB (in-process moto) and in memory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from chalicelib.domain import AudienceFilter
from chalicelib.domain.client import (
    Client,
    ClientChanged,
    ClientFields,
    ClientNotFound,
    PhoneTaken,
)
from chalicelib.errors import MalformedRequest
from tests.support.memory.clients import MemoryClientRepository

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
IDS = iter(f"00000000-0000-4000-8000-{n:012d}" for n in range(1, 10**6))


@pytest.fixture(params=["dynamodb", "memory"])
def repository(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryClientRepository()
        return
    request.getfixturevalue("aws")
    from pynamodb.connection import Connection

    from chalicelib.storage.clients import DynamoClientRepository
    from chalicelib.storage.models import build_models

    settings = request.getfixturevalue("settings")
    models = build_models(settings)
    models.Client.create_table(wait=True)
    models.Phone.create_table(wait=True)
    yield DynamoClientRepository(models, Connection(region=settings.aws_region))


def new_client(phone: str, operator_code: str | None = None, tag: str = "") -> Client:
    return Client.new(next(IDS), ClientFields(phone, operator_code, tag, "UTC"), NOW)


def stored(repository: Any, phone: str, operator_code: str | None = None, tag: str = "") -> Client:
    return repository.add(new_client(phone, operator_code, tag))


def test_an_added_client_reads_back_as_it_was_stored(repository):
    # Given a new client
    client = new_client("79001234567", tag="vip")
    # When it is added
    added = repository.add(client)
    # Then it reads back with its fields, the operator code from its phone, and owns its phone
    assert repository.get(client.id) == added
    assert (added.phone, added.operator_code, added.tag, added.opted_out) == (
        "79001234567",
        "900",
        "vip",
        False,
    )
    assert repository.owner_of("79001234567") == client.id


def test_an_unknown_client_is_not_found(repository):
    with pytest.raises(ClientNotFound):
        repository.get("00000000-0000-4000-8000-ffffffffffff")
    assert repository.owner_of("79009999999") is None


def test_a_phone_another_client_has_cannot_be_added_again(repository):
    # Given a client with a phone
    first = stored(repository, "79001234567")
    # When another client with that phone is added
    with pytest.raises(PhoneTaken) as raised:
        repository.add(new_client("79001234567"))
    # Then it is refused as a taken phone, and the phone stays with the first client
    assert raised.value.details[0]["type"] == "unique"
    assert repository.owner_of("79001234567") == first.id


def test_a_saved_change_moves_the_phone_and_frees_the_old_one(repository):
    # Given a stored client
    client = stored(repository, "79001234567")
    # When its phone and tag change
    moved = client.with_fields(replace(client.fields, phone="79007654321", tag="gold"), NOW)
    saved = repository.save(moved, previous=client)
    # Then it reads back changed, owns the new phone, and the old one is free
    assert repository.get(client.id) == saved
    assert (saved.phone, saved.tag) == ("79007654321", "gold")
    assert repository.owner_of("79007654321") == client.id
    assert repository.owner_of("79001234567") is None


def test_a_change_to_a_phone_another_client_has_is_refused(repository):
    # Given two clients
    client = stored(repository, "79001234567")
    stored(repository, "79007654321")
    # When the first is moved to the second's phone
    moved = client.with_fields(replace(client.fields, phone="79007654321"), NOW)
    with pytest.raises(PhoneTaken):
        repository.save(moved, previous=client)
    # Then nothing changed
    assert repository.get(client.id) == client
    assert repository.owner_of("79001234567") == client.id


def test_a_change_to_a_client_read_before_another_change_is_refused(repository):
    # Given a client changed after it was read
    read = stored(repository, "79001234567")
    repository.save(read.with_fields(replace(read.fields, tag="first"), NOW), previous=read)
    # When a change made to the old reading is saved
    with pytest.raises(ClientChanged):
        repository.save(read.with_fields(replace(read.fields, tag="second"), NOW), previous=read)
    # Then the first change stands
    assert repository.get(read.id).tag == "first"


def test_a_deleted_client_is_gone_and_its_phone_free(repository):
    # Given a stored client
    client = stored(repository, "79001234567")
    # When it is deleted
    repository.delete(client)
    # Then it is not found, and its phone may be added again
    with pytest.raises(ClientNotFound):
        repository.get(client.id)
    assert repository.owner_of("79001234567") is None
    stored(repository, "79001234567")


def test_a_client_changed_since_it_was_read_is_not_deleted(repository):
    read = stored(repository, "79001234567")
    repository.save(read.with_fields(replace(read.fields, tag="new"), NOW), previous=read)
    with pytest.raises(ClientChanged):
        repository.delete(read)
    assert repository.get(read.id).tag == "new"


def test_an_opted_out_client_stays_opted_out(repository):
    # Given a stored client
    client = stored(repository, "79001234567")
    # When it opts out
    later = NOW + timedelta(minutes=5)
    opted = repository.opt_out(client, later)
    # Then it reads back opted out, changed at that moment
    assert repository.get(client.id) == opted
    assert (opted.opted_out, opted.updated_at) == (True, later)


def test_an_opt_out_of_a_client_whose_phone_changed_is_refused(repository):
    read = stored(repository, "79001234567")
    moved = read.with_fields(replace(read.fields, phone="79007654321"), NOW)
    repository.save(moved, previous=read)
    with pytest.raises(ClientChanged):
        repository.opt_out(read, NOW)
    assert repository.get(read.id).opted_out is False


def test_many_clients_are_found_at_once_and_the_missing_ones_named(repository):
    # Given two stored clients
    first, second = stored(repository, "79001234567"), stored(repository, "79001234568")
    missing = "00000000-0000-4000-8000-ffffffffffff"
    # When they are read with an unknown id
    found, problems = repository.find_many([first.id, missing, second.id])
    # Then the two are found, and the unknown one is reported as missing
    assert found == {first.id: first, second.id: second}
    assert set(problems) == {missing}
    assert "missing" in problems[missing]


def test_the_owners_of_phones_and_those_clients_are_read_at_once(repository):
    # Given two clients
    first, second = stored(repository, "79001234567"), stored(repository, "79001234568")
    # When the owners of their phones and of a free one are read, then those clients
    owners = repository.owners_of(["79001234567", "79001234568", "79009999999"])
    found, unreadable = repository.get_many([first.id, second.id, "no-such-client"])
    # Then the free phone has none, and the clients read back as stored
    assert owners == {"79001234567": first.id, "79001234568": second.id}
    assert found == {first.id: first, second.id: second}
    assert unreadable == set()


DIRECTORY = [
    ("79000000001", "900", "vip"),
    ("79000000002", "900", "new"),
    ("79000000003", "901", "vip"),
    ("79000000004", "902", ""),
    ("79000000005", "901", "vip"),
]


@pytest.mark.parametrize(
    ("audience", "phones"),
    [
        (AudienceFilter(), {row[0] for row in DIRECTORY}),
        (AudienceFilter(operator_codes=("900",)), {"79000000001", "79000000002"}),
        (AudienceFilter(tags=("vip",)), {"79000000001", "79000000003", "79000000005"}),
        (
            AudienceFilter(("901", "902"), ("vip", "")),
            {"79000000003", "79000000004", "79000000005"},
        ),
        (AudienceFilter(operator_codes=("999",)), set()),
    ],
    ids=["everyone", "operator", "tag", "both", "nobody"],
)
def test_pages_of_an_audience_hold_each_matching_client_once(repository, audience, phones):
    # Given a directory of clients
    for phone, code, tag in DIRECTORY:
        stored(repository, phone, code, tag)
    # When the audience is read two clients a page, following the cursors
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = repository.page(audience, limit=2, cursor=cursor)
        assert len(page.items) <= 2
        seen += [c.phone for c in page.items]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    # Then every matching client came once, and nothing else
    assert sorted(seen) == sorted(phones)
    assert pages <= len(phones) // 2 + 1


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_a_fan_out_reaches_each_client_of_its_audience_once_page_by_page(repository, limit):
    # Given a directory of clients
    for phone, code, tag in DIRECTORY:
        stored(repository, phone, code, tag)
    audience = AudienceFilter(tags=("vip", ""))
    # When the audience's recipients are read from checkpoint to checkpoint
    reached: list[tuple[str, str]] = []
    cursor = None
    while True:
        page = repository.recipients(audience, scope="mailing-1", cursor=cursor, limit=limit)
        assert len(page.items) <= limit
        reached += [(r.client_id, r.phone) for r in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    # Then each matching client is reached once, with its phone
    expected = {(c.id, c.phone) for c in repository.page(audience, limit=50, cursor=None).items}
    assert len(reached) == len(set(reached)) == 4
    assert set(reached) == expected


def test_a_fan_out_checkpoint_of_another_mailing_is_refused(repository):
    for phone, code, tag in DIRECTORY:
        stored(repository, phone, code, tag)
    page = repository.recipients(AudienceFilter(), scope="mailing-1", cursor=None, limit=1)
    with pytest.raises(MalformedRequest):
        repository.recipients(AudienceFilter(), scope="mailing-2", cursor=page.next_cursor, limit=1)


def test_a_cursor_of_another_audience_is_refused(repository):
    for phone, code, tag in DIRECTORY:
        stored(repository, phone, code, tag)
    page = repository.page(AudienceFilter(tags=("vip",)), limit=1, cursor=None)
    assert page.next_cursor is not None
    with pytest.raises(MalformedRequest):
        repository.page(AudienceFilter(tags=("new",)), limit=1, cursor=page.next_cursor)


def test_an_audience_summary_counts_the_opted_out_and_samples_the_first(repository):
    # Given three vip clients, one of whom opted out, and one other
    vips = [stored(repository, phone, "900", "vip") for phone in ("79000000001", "79000000002")]
    repository.opt_out(vips[0], NOW)
    stored(repository, "79000000003", "900", "vip")
    stored(repository, "79000000004", "900", "new")
    # When the vip audience is summarised with a sample of two
    summary = repository.summarize(AudienceFilter(tags=("vip",)), 2)
    # Then it counts three, one opted out, and samples two of them
    assert (summary.count, summary.opted_out, len(summary.sample_ids)) == (3, 1, 2)
    vip_ids = {
        c.id for c in repository.page(AudienceFilter(tags=("vip",)), limit=9, cursor=None).items
    }
    assert set(summary.sample_ids) <= vip_ids


@pytest.mark.parametrize(
    ("audience", "expected"),
    [
        (AudienceFilter(), 5),
        (AudienceFilter(tags=("vip",)), 3),
        (AudienceFilter(operator_codes=("900", "901")), 4),
        (AudienceFilter(operator_codes=("901",), tags=("vip", "new")), 2),
    ],
)
def test_an_audience_that_fits_the_bounded_read_is_counted_exactly(repository, audience, expected):
    # Given a small directory, one vip client opted out
    clients = [stored(repository, phone, code, tag) for phone, code, tag in DIRECTORY]
    repository.opt_out(clients[2], NOW)
    # When an audience is summarised, by default and asking for an exact count
    default = repository.summarize(audience, 50)
    exact = repository.summarize(audience, 50, exact=True)
    # Then both count it exactly and say so: no estimate, no interval
    for summary in (default, exact):
        assert summary.count == expected
        assert summary.approximate is False
        assert (summary.count_low, summary.count_high) == (expected, expected)
        assert len(summary.sample_ids) == expected
    # And both agree on who opted out and on the sample's members
    assert default.opted_out == exact.opted_out
    assert set(default.sample_ids) == set(exact.sample_ids)


@pytest.mark.parametrize("exact", [False, True])
def test_a_summary_tells_the_values_of_the_clients_that_would_get_a_message(repository, exact):
    from collections import Counter

    from chalicelib.domain.sms_parts import ClientValues

    # Given a small directory, one vip client opted out
    clients = [stored(repository, phone, code, tag) for phone, code, tag in DIRECTORY]
    repository.opt_out(clients[2], NOW)
    # When the vip audience is summarised
    summary = repository.summarize(AudienceFilter(tags=("vip",)), 0, exact=exact)
    # Then it tells the operator code, tag and timezone of each vip client not opted out: what
    # their messages' parts and price depend on
    assert summary.values == Counter(
        {ClientValues("900", "vip", "UTC"): 1, ClientValues("901", "vip", "UTC"): 1}
    )
