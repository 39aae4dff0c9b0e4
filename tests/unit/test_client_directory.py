"""The client directory's rules over the in-memory repository: no emulator."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from chalicelib.domain.client import ClientFields, PhoneTaken
from chalicelib.errors import Conflict, NotFound
from chalicelib.services.clients import ClientDirectory
from tests.support.memory.clients import MemoryClientRepository

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture
def directory() -> ClientDirectory:
    return ClientDirectory(MemoryClientRepository(), lambda: NOW)


def fields(phone: str, operator_code: str | None = None, tag: str = "") -> ClientFields:
    return ClientFields(phone, operator_code, tag, "UTC")


def test_a_new_client_without_an_operator_code_takes_its_phones(directory):
    client = directory.create(fields("79161234567"))
    assert client.operator_code == "916"
    assert directory.get(client.id) == client


def test_a_phone_is_unique_across_clients(directory):
    directory.create(fields("79001234567"))
    with pytest.raises(PhoneTaken) as raised:
        directory.create(fields("79001234567"))
    assert isinstance(raised.value, Conflict)


def test_a_patch_keeps_the_operator_code_unless_given(directory):
    # Given a client of operator 901 whose phone says 900
    client = directory.create(fields("79001234567", "901"))
    # When only its phone changes, then only its operator code
    moved = directory.update(client.id, {"phone": "79161234567"})
    recoded = directory.update(client.id, {"operator_code": "902"})
    # Then the code stays until it is given
    assert (moved.phone, moved.operator_code) == ("79161234567", "901")
    assert recoded.operator_code == "902"


def test_a_put_derives_the_operator_code_again(directory):
    client = directory.create(fields("79001234567", "901"))
    replaced = directory.replace(client.id, fields("79161234567"))
    assert replaced.operator_code == "916"


def test_an_opt_out_is_idempotent_and_needs_a_known_phone(directory):
    client = directory.create(fields("79001234567"))
    assert directory.opt_out("79001234567").opted_out is True
    assert directory.opt_out("79001234567") == directory.get(client.id)
    with pytest.raises(NotFound):
        directory.opt_out("79009999999")


def test_a_listing_by_phone_finds_the_one_client_if_it_matches_the_filter(directory):
    client = directory.create(fields("79001234567", tag="vip"))
    assert directory.list(limit=10, cursor=None, phone="79001234567").items == [client]
    assert directory.list(limit=10, cursor=None, phone="79001234567", tag="new").items == []
    assert directory.list(limit=10, cursor=None, phone="79009999999").items == []


def test_a_preview_counts_the_opted_out_and_samples(directory):
    for n in range(3):
        directory.create(fields(f"7900000000{n}", tag="vip"))
    directory.opt_out("79000000001")
    from chalicelib.domain import AudienceFilter

    preview = directory.preview(AudienceFilter(tags=("vip",)), 2)
    assert (preview.count, preview.opted_out, len(preview.sample)) == (3, 1, 2)
    assert not preview.approximate
