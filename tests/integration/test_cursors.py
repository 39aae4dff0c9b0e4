"""Cursors over HTTP: every listing refuses a cursor it did not hand out with a 400, never a 500.

A cursor is opaque to callers but only base64 JSON underneath, so anyone can forge one: random
text, base64 of something else, JSON of the wrong shape, a cursor of another listing or filter,
or a real one with its key edited. Each must be the same clear 400 on every listing route.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from chalicelib.storage.models import status_key
from chalicelib.storage.pagination import fingerprint
from tests.conftest import API_TOKEN, AUTH, body

CURSOR_ERROR = "cursor is not valid; start again without it"
CURSOR_DETAIL = "not a next_cursor of this listing with these filters"


@pytest.fixture
def settings(aws, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The default settings with an import queue, so imports are queued (and listed)."""
    import boto3

    from chalicelib.settings import Settings

    monkeypatch.setenv("API_TOKENS", API_TOKEN)
    monkeypatch.delenv("AUTH_MODE", raising=False)
    queue = boto3.client("sqs").create_queue(QueueName="sms-test-import")["QueueUrl"]
    return Settings(table_prefix="sms-test", api_tokens=(API_TOKEN,), import_queue_url=queue)


def _encode(payload: Any) -> str:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode(cursor: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))


def _edited(change: Callable[[dict[str, Any]], None]) -> Callable[[str, str], str]:
    """A forgery made by editing this listing's own cursor."""

    def forge(own: str, _other: str) -> str:
        payload = _decode(own)
        change(payload)
        return _encode(payload)

    return forge


def _each_key_value(edit: Callable[[str, str], dict[str, Any]]) -> Callable[[dict], None]:
    def change(payload: dict[str, Any]) -> None:
        payload["k"] = {
            name: edit(*next(iter(value.items()))) for name, value in payload["k"].items()
        }

    return change


def _set(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda payload: payload.__setitem__(name, value)


FORGED: dict[str, Callable[[str, str], str]] = {
    "random text": lambda own, other: "not a cursor, honestly!",
    "base64 of binary": lambda own, other: _encode(b"\x00\xff\xfe binary"),
    "base64 of a JSON list": lambda own, other: _encode([1, 2, 3]),
    "base64 of a JSON string": lambda own, other: _encode("next page please"),
    "base64 of an empty object": lambda own, other: _encode({}),
    "too long": lambda own, other: "A" * 5000,
    "another listing's cursor": lambda own, other: other,
    "another version": _edited(_set("v", 3)),
    "the first version, unsigned": _edited(lambda payload: [payload.pop("h"), payload.update(v=1)]),
    "segment as text": _edited(_set("s", "0")),
    "segment as a boolean": _edited(_set("s", False)),
    "segment out of range": _edited(_set("s", 7)),
    "negative segment": _edited(_set("s", -1)),
    "key as a list": _edited(_set("k", ["a", "b"])),
    "key without attributes": _edited(_set("k", {})),
    "key of unknown attributes": _edited(_set("k", {"nope": {"S": "x"}})),
    "key values of the wrong type": _edited(
        _each_key_value(lambda kind, value: {"N" if kind == "S" else "S": "1"})
    ),
    "key values not strings": _edited(_each_key_value(lambda kind, value: {kind: 5})),
    "key values of another kind": _edited(_each_key_value(lambda kind, value: {"B": value})),
    "key values edited": _edited(
        _each_key_value(lambda kind, value: {kind: "9" if kind == "N" else f"x{value}"})
    ),
    "key values empty": _edited(_each_key_value(lambda kind, value: {kind: ""})),
    "key values of another record": _edited(
        _each_key_value(lambda kind, value: {kind: "12" if kind == "N" else str(uuid.uuid4())})
    ),
    "numeric key values not integers": _edited(_each_key_value(lambda kind, value: {"N": "1e400"})),
}

LISTINGS = [
    "/clients?limit=1",
    "/clients?limit=1&tag=vip",
    "/clients?limit=1&tag=vip&operator_code=900",
    "/mailings?limit=1",
    "/stats?limit=1",
    "/mailings/{mailing}/stats?limit=1",
    "/mailings/{mailing}/stats?limit=1&status=sent",
    "/clients/imports?limit=1",
]
# Clients are spread over 16 shards: with 17, one shard has two, so some page ends inside one.
CLIENTS = 17


@dataclass(frozen=True)
class Listing:
    path: str
    own: str  # a cursor this listing handed out, ending inside a query (its key is not null)
    other: str  # a cursor another listing handed out


def _cursor_with_key(api, path: str) -> str:
    cursor = None
    while True:
        page = body(api.get(path + (f"&cursor={cursor}" if cursor else "")))
        cursor = page["next_cursor"]
        assert cursor, f"no page of {path} ends inside a query"
        if _decode(cursor)["k"] is not None:
            return cursor


@pytest.fixture
def listings(api, services, clock) -> dict[str, Listing]:
    """Given enough of everything that each listing has a cursor with a key in it."""
    for n in range(CLIENTS):
        created = api.post("/clients", {"phone": f"79000000{n:03d}", "tag": "vip"})
        assert created.status_code == 201, created.body
    for n in range(2):
        csv = f"phone\n7900000100{n}\n".encode()
        queued = api.post("/clients/import", csv, headers={**AUTH, "Content-Type": "text/csv"})
        assert queued.status_code == 202, queued.body
    mailing = {"text": "Hi", "start_at": "2026-11-23T09:00:00Z", "end_at": "2026-11-24T09:00:00Z"}
    mailings = [body(api.post("/mailings", mailing))["id"] for _ in range(2)]
    for n in range(2):
        services.models.Message(
            mailings[0],
            str(uuid.uuid4()),
            message_id=1000 + n,
            phone=f"7900000000{n}",
            status="sent",
            status_key=status_key(mailings[0], "sent"),
            created_at=clock(),
            updated_at=clock(),
            attempts=1,
        ).save()
    paths = {listing: listing.format(mailing=mailings[0]) for listing in LISTINGS}
    own = {listing: _cursor_with_key(api, path) for listing, path in paths.items()}
    found = {}
    for listing, cursor in own.items():
        # /mailings and /stats page through the same listing: their cursors are one kind.
        other = next(c for c in own.values() if _decode(c)["f"] != _decode(cursor)["f"])
        found[listing] = Listing(paths[listing], cursor, other)
    return found


@pytest.mark.parametrize("listing", LISTINGS)
def test_a_forged_cursor_is_a_400_on_every_listing(api, listings, listing):
    # Given a listing, its own cursor and one of another listing
    given = listings[listing]
    answers = {}
    for name, forge in FORGED.items():
        # When the listing is asked for the page after a forged cursor
        response = api.get(f"{given.path}&cursor={quote(forge(given.own, given.other))}")
        answers[name] = (response.status_code, body(response))
    # Then each is a 400 that says to start again, naming the cursor parameter
    expected = {
        "error": "bad_request",
        "message": CURSOR_ERROR,
        "details": [{"field": "query.cursor", "message": CURSOR_DETAIL, "type": "cursor"}],
    }
    wrong = {name: answer for name, answer in answers.items() if answer != (400, expected)}
    assert wrong == {}


@pytest.mark.parametrize("listing", LISTINGS)
def test_a_listings_own_cursor_still_reads_the_next_page(api, listings, listing):
    # Given a cursor the listing handed out
    given = listings[listing]
    # When it is passed back unchanged
    response = api.get(f"{given.path}&cursor={given.own}")
    # Then the next page follows
    assert response.status_code == 200, response.body


def test_a_start_key_dynamodb_refuses_is_the_same_400(api, listings, monkeypatch):
    """A forger who knows the format can sign an edited cursor; its key then reaches DynamoDB,
    which (on AWS, not on moto) refuses a start key outside the query with a ValidationException."""
    import botocore.client
    from botocore.exceptions import ClientError

    # Given a cursor of one mailing's messages, edited to a key of another mailing and signed
    given = listings["/mailings/{mailing}/stats?limit=1"]
    payload = _decode(given.own)
    payload["k"]["mailing_id"] = {"S": str(uuid.uuid4())}
    payload["h"] = fingerprint("cursor", payload["f"], payload["s"], payload["k"])
    # And DynamoDB answering as AWS does for such a start key
    real_call = botocore.client.BaseClient._make_api_call

    def aws_like(self, operation_name, api_params):
        if operation_name == "Query" and "ExclusiveStartKey" in api_params:
            error = {
                "Code": "ValidationException",
                "Message": "The provided starting key is outside query boundaries",
            }
            raise ClientError({"Error": error}, operation_name)
        return real_call(self, operation_name, api_params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", aws_like)
    # When the listing is asked for the page after it
    response = api.get(f"{given.path}&cursor={_encode(payload)}")
    # Then it is the same 400 as any other bad cursor
    assert response.status_code == 400, response.body
    assert body(response)["message"] == CURSOR_ERROR
