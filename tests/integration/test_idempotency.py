"""Idempotency-Key on the creating routes: a retried create replays the first answer and never
creates twice; another body under the key is a 422; a retry while the first runs is a 409."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import API_TOKEN, AUTH, JSON_HEADERS, Api, body

START = "2026-11-23T09:00:00+03:00"
END = "2026-11-24T21:00:00+03:00"
MAILING = {"text": "Hello!", "start_at": START, "end_at": END}
OTHER_TOKEN = "second-caller-token-0123456789"


@pytest.fixture
def settings(aws: None, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Two static tokens (two callers whose keys must not meet) and an import queue."""
    import boto3

    from chalicelib.settings import Settings

    monkeypatch.setenv("API_TOKENS", f"{API_TOKEN},{OTHER_TOKEN}")
    monkeypatch.delenv("AUTH_MODE", raising=False)
    import_queue = boto3.client("sqs").create_queue(QueueName="sms-test-import")["QueueUrl"]
    return Settings(
        table_prefix="sms-test",
        api_tokens=(API_TOKEN, OTHER_TOKEN),
        import_queue_url=import_queue,
    )


def keyed(key: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    return {**(headers or JSON_HEADERS), "Idempotency-Key": key}


def mailings(api: Api) -> list[dict]:
    return body(api.get("/mailings?limit=500"))["items"]


# ---------------------------------------------------------------- replay


def test_a_retried_create_replays_the_first_answer_and_creates_one_mailing(api):
    # Given a mailing created with a key
    first = api.post("/mailings", MAILING, headers=keyed("retry-1"))
    assert first.status_code == 201, first.body
    # When the client retries the same request (say after a network timeout)
    again = api.post("/mailings", MAILING, headers=keyed("retry-1"))
    # Then it gets the first status and body, marked as a replay, and there is one mailing
    assert again.status_code == 201
    assert body(again) == body(first)
    assert again.headers["Idempotent-Replay"] == "true"
    assert again.headers["Content-Type"] == "application/json"
    assert "Idempotent-Replay" not in first.headers
    assert [m["id"] for m in mailings(api)] == [body(first)["id"]]


def test_the_same_body_with_other_key_order_and_spacing_is_the_same_request(api):
    # Given a mailing created with a key
    first = api.post("/mailings", MAILING, headers=keyed("spacing"))
    # When the same JSON is sent again written differently
    reordered = f'{{ "end_at": "{END}",  "text": "Hello!", "start_at": "{START}" }}'
    again = api.post("/mailings", reordered, headers=keyed("spacing"))
    # Then it is a replay, not another body
    assert again.status_code == 201, again.body
    assert body(again)["id"] == body(first)["id"]
    assert len(mailings(api)) == 1


def _prepare_client(api: Api) -> None:
    assert api.post("/clients", {"phone": "79001230000"}).status_code == 201


def _prepare_mailing(api: Api) -> str:
    response = api.post("/mailings", MAILING)
    assert response.status_code == 201
    return body(response)["id"]


CSV_HEADERS = {**AUTH, "Content-Type": "text/csv"}
ROUTES = {
    "POST /clients": lambda api: ("/clients", {"phone": "79001234567"}, JSON_HEADERS),
    "POST /clients/import": lambda api: (
        "/clients/import",
        "phone,tag\n79001234568,vip\n",
        CSV_HEADERS,
    ),
    "POST /mailings": lambda api: ("/mailings", MAILING, JSON_HEADERS),
    "POST /mailings/{id}/retry-failed": lambda api: (
        f"/mailings/{_prepare_mailing(api)}/retry-failed",
        None,
        AUTH,
    ),
    "POST /opt-outs": lambda api: (
        _prepare_client(api) or "/opt-outs",
        {"phone": "79001230000"},
        JSON_HEADERS,
    ),
}


@pytest.mark.parametrize("route", ROUTES)
def test_every_creating_route_replays_a_retry(api, route):
    # Given a request to the route sent with a key
    path, payload, headers = ROUTES[route](api)
    first = api.post(path, payload, headers=keyed("every-route", headers))
    assert first.status_code < 300, first.body
    # When it is sent again with the key
    again = api.post(path, payload, headers=keyed("every-route", headers))
    # Then the first answer comes back as a replay
    assert (again.status_code, body(again)) == (first.status_code, body(first))
    assert again.headers["Idempotent-Replay"] == "true"


# ---------------------------------------------------------------- misuse


def test_the_same_key_with_another_body_is_422_and_creates_nothing(api):
    # Given a mailing created with a key
    first = api.post("/mailings", MAILING, headers=keyed("reused"))
    # When another mailing is sent under the same key
    other = api.post("/mailings", {**MAILING, "text": "Other"}, headers=keyed("reused"))
    # Then it is refused in the error shape, saying why, and nothing more is created
    assert other.status_code == 422
    error = body(other)
    assert error["error"] == "idempotency_key_reused"
    assert "another request body" in error["message"]
    assert [d["field"] for d in error["details"]] == ["header.Idempotency-Key"]
    assert [m["id"] for m in mailings(api)] == [body(first)["id"]]


@pytest.mark.parametrize(
    "key",
    ["", "x" * 256, "tab\tinside", "non-ascii-é", " padded"],
    ids=["empty", "256 chars", "control char", "non-ascii", "leading space"],
)
def test_a_key_that_is_not_1_to_255_printable_ascii_is_400(api, key):
    # When a create is sent with an unusable key
    response = api.post("/mailings", MAILING, headers=keyed(key))
    # Then it is a 400 naming the header, and nothing is created
    assert response.status_code == 400, response.body
    assert "Idempotency-Key" in body(response)["message"]
    assert mailings(api) == []


def test_a_255_character_key_is_accepted(api):
    """Given an Idempotency-Key of 255 characters, when a mailing is created twice with it, then
    the first is created and the second is a replay."""
    key = "k" * 255
    assert api.post("/mailings", MAILING, headers=keyed(key)).status_code == 201
    assert api.post("/mailings", MAILING, headers=keyed(key)).headers["Idempotent-Replay"]


# ---------------------------------------------------------------- scope, expiry, no key


def test_keys_are_scoped_to_the_caller(api):
    # Given a mailing created with a key by one caller
    api.post("/mailings", MAILING, headers=keyed("shared-key"))
    # When another caller sends the same key with another body
    other_caller = {**JSON_HEADERS, "Authorization": f"Bearer {OTHER_TOKEN}"}
    response = api.post(
        "/mailings", {**MAILING, "text": "Mine"}, headers=keyed("shared-key", other_caller)
    )
    # Then theirs is a new request: created, not refused and not a replay
    assert response.status_code == 201, response.body
    assert "Idempotent-Replay" not in response.headers
    assert body(response)["text"] == "Mine"


def test_a_key_is_new_again_after_the_retention_period(api, clock):
    # Given a mailing created with a key
    first = api.post("/mailings", MAILING, headers=keyed("expires"))
    # When the same request comes within the 24 hours, it is a replay
    clock.advance(hours=23, minutes=59)
    assert api.post("/mailings", MAILING, headers=keyed("expires")).headers["Idempotent-Replay"]
    # When it comes again after them
    clock.advance(minutes=2)
    late = api.post("/mailings", MAILING, headers=keyed("expires"))
    # Then the key is new again: a second mailing is created (DynamoDB's TTL deletes the item
    # some time later; until then it is treated as gone)
    assert late.status_code == 201
    assert "Idempotent-Replay" not in late.headers
    assert body(late)["id"] != body(first)["id"]
    assert len(mailings(api)) == 2


def test_without_a_key_each_request_creates_as_before(api):
    # When the same mailing is sent twice without a key
    first = api.post("/mailings", MAILING)
    second = api.post("/mailings", MAILING)
    # Then there are two mailings
    assert (first.status_code, second.status_code) == (201, 201)
    assert len(mailings(api)) == 2


def test_a_failure_on_our_side_gives_the_key_back(api, services, monkeypatch):
    # Given a create that fails with a 5xx (storage throttled)
    real_create = services.mailings.create
    from chalicelib.errors import ServiceUnavailable

    def throttled(*args: Any, **kwargs: Any) -> Any:
        raise ServiceUnavailable("storage is busy; retry shortly")

    monkeypatch.setattr(services.mailings, "create", throttled)
    failed = api.post("/mailings", MAILING, headers=keyed("after-503"))
    assert failed.status_code == 503
    # When the client retries it with the key once storage is back
    monkeypatch.setattr(services.mailings, "create", real_create)
    retried = api.post("/mailings", MAILING, headers=keyed("after-503"))
    # Then it runs (no replay of the 503) and creates the mailing once
    assert retried.status_code == 201, retried.body
    assert "Idempotent-Replay" not in retried.headers
    assert len(mailings(api)) == 1


# ---------------------------------------------------------------- concurrency


@pytest.fixture
def held_create(
    services: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """(release, entered): mailing creates wait inside the service until `release` is set."""
    release, entered = threading.Event(), threading.Event()
    real_create = services.mailings.create

    def create(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(10), "the test never released the create"
        return real_create(*args, **kwargs)

    monkeypatch.setattr(services.mailings, "create", create)
    yield release, entered
    release.set()


def test_a_retry_while_the_first_runs_is_409_and_one_mailing_is_created(api, held_create):
    release, entered = held_create
    with ThreadPoolExecutor(1) as pool:
        # Given a create with a key still running
        first = pool.submit(api.post, "/mailings", MAILING, headers=keyed("slow"))
        assert entered.wait(10)
        # When the same request arrives meanwhile
        concurrent = api.post("/mailings", MAILING, headers=keyed("slow"))
        # Then it is told to retry later, in the error shape
        assert concurrent.status_code == 409, concurrent.body
        assert concurrent.headers["Retry-After"] == "1"
        assert body(concurrent)["error"] == "request_in_progress"
        release.set()
        created = first.result(10)
    # And once the first is done, a retry gets its answer; one mailing exists
    assert created.status_code == 201
    replay = api.post("/mailings", MAILING, headers=keyed("slow"))
    assert body(replay) == body(created)
    assert [m["id"] for m in mailings(api)] == [body(created)["id"]]


def test_simultaneous_claims_of_one_key_let_exactly_one_run(services):
    # Given eight requests with one key released at the same moment
    from chalicelib.services.idempotency import Claim

    start = threading.Barrier(8)

    def claim(_: int) -> str:
        start.wait(10)
        try:
            outcome = services.idempotency.claim("caller", "race", "fingerprint")
        except Exception as exc:  # the losers' answer
            return type(exc).__name__
        return "claimed" if isinstance(outcome, Claim) else "replayed"

    with ThreadPoolExecutor(8) as pool:
        outcomes = sorted(pool.map(claim, range(8)))
    # Then exactly one may run; every other one is told the first is in progress
    assert outcomes == ["RequestInProgress"] * 7 + ["claimed"]


# ---------------------------------------------------------------- the document


def test_the_openapi_document_offers_the_key_on_exactly_the_creating_routes():
    # Given the OpenAPI document of the app
    from app import app  # noqa: F401 - registers the routes
    from chalicelib.api.openapi import build_spec

    paths = build_spec()["paths"]
    # When a client looks for the Idempotency-Key header
    keyed_ops = {
        f"{method.upper()} {path}"
        for path, operations in paths.items()
        for method, op in operations.items()
        if any(p["name"] == "Idempotency-Key" for p in op.get("parameters", []))
    }
    # Then it is on the five creating routes and the reply webhook, whose 409 says when to retry
    assert keyed_ops == {
        "POST /clients",
        "POST /clients/import",
        "POST /mailings",
        "POST /mailings/{mailing_id}/retry-failed",
        "POST /opt-outs",
        "POST /inbound-sms",
    }
    for entry in keyed_ops:
        method, path = entry.split(" ")
        responses = paths[path][method.lower()]["responses"]
        assert "Retry-After" in responses["409"]["headers"]
        assert "another body" in responses["422"]["description"]


def test_a_claim_left_by_a_run_that_died_is_taken_over_after_a_minute(services, clock):
    # Given a request that claimed its key and then died (its Lambda timed out) without answering
    from chalicelib.errors import RequestInProgress
    from chalicelib.services.idempotency import CLAIM_SECONDS, Claim

    store = services.idempotency
    assert isinstance(store.claim("caller", "crashed", "fp"), Claim)
    # When the client retries within the claim's minute, it is told to wait
    clock.advance(seconds=CLAIM_SECONDS - 1)
    with pytest.raises(RequestInProgress):
        store.claim("caller", "crashed", "fp")
    # Then after it, the same request takes the key over and runs (not stuck for a day)
    clock.advance(seconds=2)
    assert isinstance(store.claim("caller", "crashed", "fp"), Claim)
