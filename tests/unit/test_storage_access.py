"""How the service reads DynamoDB: audiences and due mailings by Query, never by Scan."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import botocore.client
import pytest

from chalicelib.domain import AudienceFilter
from chalicelib.services.clients import ClientFields
from chalicelib.services.mailings import MailingFields
from chalicelib.storage.pagination import Position, read_page


@pytest.fixture
def dynamodb_calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts every DynamoDB API call made through botocore (boto3 and PynamoDB alike)."""
    calls: Counter = Counter()
    original = botocore.client.BaseClient._make_api_call

    def counting(self, operation_name, api_params):
        if self.meta.service_model.service_name == "dynamodb":
            calls[operation_name] += 1
        return original(self, operation_name, api_params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", counting)
    return calls


def add_clients(services, rows):
    for phone, code, tag in rows:
        fields = ClientFields(phone=phone, operator_code=code, tag=tag, timezone="UTC")
        services.clients.create(fields)


DIRECTORY = [
    ("79000000001", "900", "vip"),
    ("79000000002", "900", "new"),
    ("79000000003", "901", "vip"),
    ("79000000004", "902", "vip"),
    ("79000000005", "901", ""),
    ("79000000006", "903", "new"),
]


@pytest.mark.parametrize(
    ("operator_code", "tag"),
    [("900", None), (None, "vip"), ("900", "vip"), (None, None)],
)
def test_client_listing_uses_query_not_scan(services, dynamodb_calls, operator_code, tag):
    """Given a directory of clients, when they are listed with or without a filter, then DynamoDB
    is queried, never scanned."""
    add_clients(services, DIRECTORY)
    dynamodb_calls.clear()

    services.clients.list(limit=50, cursor=None, operator_code=operator_code, tag=tag)

    assert dynamodb_calls["Scan"] == 0
    assert dynamodb_calls["Query"] >= 1


@pytest.mark.parametrize(
    ("codes", "tags", "expected"),
    [
        (("900", "901"), ("vip",), {"79000000001", "79000000003"}),
        (("901",), (), {"79000000003", "79000000005"}),
        ((), ("new",), {"79000000002", "79000000006"}),
        (("900", "903"), ("new", "vip"), {"79000000001", "79000000002", "79000000006"}),
        ((), (), {row[0] for row in DIRECTORY}),
        (("999",), (), set()),
    ],
)
def test_audience_is_any_of_within_a_list_and_all_lists_together_by_query(
    services, dynamodb_calls, codes, tags, expected
):
    # Given a directory of clients
    add_clients(services, DIRECTORY)
    dynamodb_calls.clear()
    # When the audience of a filter is walked
    segments = services.clients.audience_segments(AudienceFilter(codes, tags))
    page = read_page(segments, Position(), limit=1000)
    # Then it holds exactly the matching clients, each once, found without any Scan
    phones = [item.phone for item in page.items]
    assert sorted(phones) == sorted(expected)
    assert dynamodb_calls["Scan"] == 0


def test_due_mailings_are_found_by_one_query(services, clock, dynamodb_calls):
    # Given one mailing that started an hour ago and two that start tomorrow
    def fields(start_in: timedelta) -> MailingFields:
        start = clock() + start_in
        return MailingFields("Hi", start, start + timedelta(days=2), AudienceFilter(), None)

    due = services.mailings.create(fields(timedelta(hours=-1)))
    services.mailings.create(fields(timedelta(days=1)))
    services.mailings.create(fields(timedelta(days=1, hours=1)))
    dynamodb_calls.clear()

    # When the scheduler asks which mailings are due
    found = services.mailings.due(clock())

    # Then it gets exactly the started one: one Query of the keys-only index, one read of the
    # due mailing itself, and no Scan
    assert [m.id for m in found] == [due.id]
    assert dynamodb_calls == Counter({"Query": 1, "BatchGetItem": 1})


def test_mailing_becomes_due_when_its_start_comes(services, clock):
    """Given a mailing starting in ten minutes, when the due mailings are asked before and at its
    start, then it is due only from its start."""
    start = clock() + timedelta(minutes=10)
    mailing = services.mailings.create(
        MailingFields("Hi", start, start + timedelta(hours=1), AudienceFilter(), None)
    )
    assert services.mailings.due(clock()) == []
    clock.advance(minutes=10)
    assert [m.id for m in services.mailings.due(clock())] == [mailing.id]
