"""The audit trail: every write through the API leaves an entry, read back with GET /audit."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

import pytest

from tests.conftest import API_TOKEN, JSON_HEADERS, body

OTHER_TOKEN = "other-token-0123456789abcdef"
OTHER_HEADERS = {**JSON_HEADERS, "Authorization": f"Bearer {OTHER_TOKEN}"}
MAILING = {
    "text": "Hello!",
    "start_at": "2026-11-23T09:00:00+03:00",
    "end_at": "2026-11-24T21:00:00+03:00",
}


def token_id(token: str) -> str:
    """The id the audit trail shows for a static token: a digest prefix, never the token."""
    return f"static:{hashlib.sha256(token.encode()).hexdigest()[:8]}"


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Two static tokens, so entries can be told apart by actor."""
    from chalicelib.settings import Settings

    monkeypatch.setenv("API_TOKENS", f"{API_TOKEN},{OTHER_TOKEN}")
    monkeypatch.delenv("AUTH_MODE", raising=False)
    return Settings(table_prefix="sms-test", api_tokens=(API_TOKEN, OTHER_TOKEN))


def ok(response: Any, status: int = 200) -> dict:
    assert response.status_code == status, response.body
    return body(response) if response.body else {}


def audit(api: Any, query: str = "") -> list[dict]:
    return ok(api.get(f"/audit{query}"))["items"]


def mailing_history(api: Any, clock: Any) -> tuple[str, list[str]]:
    """Create, edit, pause and cancel one mailing, a second apart: its id and the requests' ids
    (API Gateway's request ids, which the API returns as X-Correlation-Id)."""
    created = api.post("/mailings", MAILING)
    mailing_id = ok(created, 201)["id"]
    responses = [created]
    for method, path, payload in (
        ("PATCH", "", {"text": "Hello again!"}),
        ("POST", "/pause", None),
        ("POST", "/cancel", None),
    ):
        clock.advance(seconds=1)
        responses.append(api.call(method, f"/mailings/{mailing_id}{path}", payload))
        ok(responses[-1])
    return mailing_id, [r.headers["X-Correlation-Id"] for r in responses]


def test_a_mailings_create_edit_pause_and_cancel_are_four_entries_newest_first(api, clock):
    # Given a mailing created, edited, paused and cancelled with one token
    mailing_id, request_ids = mailing_history(api, clock)

    # When an admin reads the mailing's audit trail
    entries = audit(api, f"?target={mailing_id}")

    # Then there are four entries, newest first, each naming that token's id as the actor
    assert [e["action"] for e in entries] == [
        "cancel_mailing",
        "pause_mailing",
        "patch_mailing",
        "create_mailing",
    ]
    assert {e["actor"]["id"] for e in entries} == {token_id(API_TOKEN)}
    assert {e["actor"]["auth_mode"] for e in entries} == {"static"}
    assert [e["status"] for e in entries] == ["cancelled", "paused", "scheduled", "scheduled"]
    times = [e["at"] for e in entries]
    assert times == sorted(times, reverse=True)
    assert len(set(times)) == 4
    # And the edit names the field it changed, not its new text
    assert entries[2]["fields"] == ["text"]
    assert "Hello again!" not in json.dumps(entries)
    assert all(e["target_type"] == "mailings" and e["target_id"] == mailing_id for e in entries)
    # And each entry names the request that made the change
    assert [e["request_id"] for e in entries] == list(reversed(request_ids))


def test_an_entry_never_holds_the_token_or_a_phone_number(api, clock):
    # Given a client created and, a second later, opted out by phone number
    client = ok(api.post("/clients", {"phone": "79001234567", "tag": "vip"}), 201)
    clock.advance(seconds=1)
    ok(api.post("/opt-outs", {"phone": "79001234567"}))

    # When the audit trail is read
    entries = audit(api)

    # Then both writes are there under the client's id, with neither the number nor the token
    assert [(e["action"], e["target_id"]) for e in entries] == [
        ("opt_out", client["id"]),
        ("create_client", client["id"]),
    ]
    assert entries[0]["fields"] == ["phone"]
    text = json.dumps(entries)
    assert "79001234567" not in text
    assert API_TOKEN not in text


def test_the_trail_filters_by_actor(api, clock):
    # Given one mailing written with each of two tokens
    mine = ok(api.post("/mailings", MAILING), 201)["id"]
    clock.advance(seconds=1)
    theirs = ok(api.post("/mailings", MAILING, headers=OTHER_HEADERS), 201)["id"]

    # When the trail is read for each actor
    by_me = audit(api, f"?actor={token_id(API_TOKEN)}")
    by_them = audit(api, f"?actor={token_id(OTHER_TOKEN)}")

    # Then each sees only its own write
    assert [e["target_id"] for e in by_me] == [mine]
    assert [e["target_id"] for e in by_them] == [theirs]
    # And target and actor together narrow to nothing where they do not meet
    assert audit(api, f"?target={mine}&actor={token_id(OTHER_TOKEN)}") == []


def test_pages_filtered_by_target_and_actor_are_full_and_follow_each_other(api, clock):
    # Given one mailing paused and resumed in turn by two tokens, three times each
    mailing_id = ok(api.post("/mailings", MAILING), 201)["id"]
    for _ in range(3):
        for headers, action in ((JSON_HEADERS, "pause"), (OTHER_HEADERS, "resume")):
            clock.advance(seconds=1)
            ok(api.post(f"/mailings/{mailing_id}/{action}", headers=headers))

    # When the other token's changes to it are read two at a time
    query = f"/audit?target={mailing_id}&actor={token_id(OTHER_TOKEN)}&limit=2"
    first = ok(api.get(query))
    second = ok(api.get(f"{query}&cursor={first['next_cursor']}"))

    # Then the first page is full although the other token's entries alternate with mine, and
    # the second holds the last one
    assert [e["action"] for e in first["items"]] == ["resume_mailing"] * 2
    assert [e["action"] for e in second["items"]] == ["resume_mailing"]
    times = [e["at"] for e in first["items"] + second["items"]]
    assert times == sorted(times, reverse=True)
    assert len(set(times)) == 3


def test_pages_of_the_trail_follow_each_other_newest_first(api, clock):
    # Given three mailings created a second apart
    ids = []
    for _ in range(3):
        ids.append(ok(api.post("/mailings", MAILING), 201)["id"])
        clock.advance(seconds=1)

    # When the trail is read two entries at a time
    first = ok(api.get("/audit?limit=2"))
    second = ok(api.get(f"/audit?limit=2&cursor={first['next_cursor']}"))

    # Then the pages hold the three creations, newest first, and end
    seen = [e["target_id"] for e in first["items"] + second["items"]]
    assert seen == list(reversed(ids))
    assert second["next_cursor"] is None


def test_reads_and_refused_writes_leave_no_entry(api):
    # Given a preview (a POST that creates nothing), a read, and a write refused as invalid
    ok(api.post("/mailings/preview", {"filter": {}}))
    ok(api.get("/mailings"))
    assert api.post("/mailings", {"text": ""}).status_code == 422

    # When the trail is read, then it is empty
    assert audit(api) == []


def test_entries_expire_after_the_retention_period(api, services, clock):
    # Given a mailing created now
    mailing_id = ok(api.post("/mailings", MAILING), 201)["id"]

    # When its entry is stored, then DynamoDB's TTL removes it AUDIT_RETENTION_DAYS later
    [item] = list(services.models.AuditEntry.query(mailing_id))
    retention = timedelta(days=services.settings.audit_retention_days)
    assert item.expires_at == clock() + retention
    assert services.settings.audit_retention_days == 365


def test_a_failed_audit_write_does_not_fail_the_users_write(api, services, clock, caplog):
    from chalicelib.metrics import MetricsWriter
    from chalicelib.services.audit import AuditLog
    from chalicelib.storage.audit import DynamoAuditTrail

    # Given the audit table is gone, and the audit log's metrics are watched
    emf: list[str] = []
    services.audit = AuditLog(
        trail=DynamoAuditTrail(services.models.AuditEntry),
        clock=clock,
        retention_days=365,
        metrics=MetricsWriter(services.settings, emf.append),
    )
    services.models.AuditEntry.delete_table()

    # When a mailing is created
    response = api.post("/mailings", MAILING)

    # Then it is created all the same, and the lost entry is logged as an error
    created = ok(response, 201)
    assert ok(api.get(f"/mailings/{created['id']}"))["id"] == created["id"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "audit entry not written" in errors
    # And counted in the AuditWriteFailures metric an alarm can watch
    blobs = [json.loads(line) for line in emf]
    assert [b["AuditWriteFailures"] for b in blobs if "AuditWriteFailures" in b] == [[1.0]]


def test_a_bad_filter_is_a_400_in_the_error_shape(api):
    # When the trail is asked for with an empty target, then the answer names the parameter
    response = api.get("/audit?target=")
    assert response.status_code == 400
    assert body(response)["error"] == "bad_request"
    assert body(response)["details"][0]["field"] == "query.target"


def test_on_aws_an_entry_carries_api_gateways_request_id_and_the_callers_role():
    from types import SimpleNamespace

    from chalice import Response

    from chalicelib.api import mailings  # noqa: F401 - declares the mailing routes
    from chalicelib.api.http import OPERATIONS, audit_entry

    # Given a pause as API Gateway delivers it: its request id, and an authorizer context that
    # names the principal and its role
    [pause] = [op for op in OPERATIONS if op.name == "pause_mailing"]
    request = SimpleNamespace(
        context={
            "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
            "authorizer": {"principalId": "user-sub-42", "auth_mode": "oidc", "role": "operator"},
        }
    )
    response = Response(body=json.dumps({"id": "m-1", "status": "paused"}), status_code=200)

    # When its audit entry is made
    entry = audit_entry(pause, request, {"mailing_id": "m-1"}, None, response)

    # Then it names API Gateway's request id, the OIDC subject and its role
    assert entry.request_id == "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"
    assert (entry.actor.id, entry.actor.auth_mode, entry.actor.role) == (
        "user-sub-42",
        "oidc",
        "operator",
    )
    assert (entry.action, entry.target_id, entry.status) == ("pause_mailing", "m-1", "paused")


@pytest.mark.parametrize(
    ("method", "status", "headers", "recorded"),
    [
        ("POST", 201, {}, True),
        ("DELETE", 204, {}, True),
        ("POST", 409, {}, False),
        ("POST", 201, {"Idempotent-Replay": "true"}, False),
        ("GET", 200, {}, False),
    ],
)
def test_only_a_write_that_changed_something_is_recorded(method, status, headers, recorded):
    from chalice import Response

    from chalicelib.api.http import Operation, changed_something

    # Given a route's answer: a success, a refusal, a replay of an earlier answer, or a read
    operation = Operation(
        method=method,
        path="/mailings",
        name="op",
        summary="",
        tag="mailings",
        audited=method != "GET",
    )
    response = Response(body="", status_code=status, headers=headers)

    # When the route wrapper decides, then only a write that changed something is recorded
    assert changed_something(operation, response) is recorded
