"""A write that meets a concurrent one (or a throttle) is a 503 with Retry-After, never a 500.

DynamoDB cancels a transaction that touches an item another transaction is writing
(`TransactionCanceledException` with a `TransactionConflict` reason), refuses a single write
to such an item (`TransactionConflictException`), and throttles; the SDK does not retry a
cancelled transaction, and what is left of a throttle after its retries reaches the code. moto
does none of this, so each test makes botocore answer one operation as AWS would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import botocore.client
import pytest
from botocore.exceptions import ClientError

from tests.conftest import body

MAILING = {"text": "Hi", "start_at": "2026-11-23T09:00:00Z", "end_at": "2026-11-24T09:00:00Z"}


def cancelled_for_conflict(operation: str, params: dict[str, Any]) -> ClientError:
    """What DynamoDB answers when another transaction holds one of the items."""
    items = params.get("TransactItems", [None])
    reasons = [{"Code": "None"} for _ in items]
    reasons[-1] = {
        "Code": "TransactionConflict",
        "Message": "Transaction is ongoing for the item",
    }
    response = {
        "Error": {
            "Code": "TransactionCanceledException",
            "Message": "Transaction cancelled, please refer cancellation reasons for specific "
            "reasons [" + ", ".join(r["Code"] for r in reasons) + "]",
        },
        "CancellationReasons": reasons,
    }
    return ClientError(response, operation)


def error(code: str, message: str) -> Callable[[str, dict[str, Any]], ClientError]:
    def make(operation: str, _params: dict[str, Any]) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": message}}, operation)

    return make


conflict_on_item = error("TransactionConflictException", "Transaction is ongoing for the item")
throttled = error(
    "ProvisionedThroughputExceededException",
    "The level of configured provisioned throughput for the table was exceeded",
)


@contextmanager
def aws_answers(
    operation: str, answer: Callable[[str, dict[str, Any]], ClientError]
) -> Iterator[list]:
    """While in the block, every DynamoDB `operation` fails as AWS would fail it; nothing is
    written (the call never reaches the emulator). Yields the calls that were failed."""
    real_call = botocore.client.BaseClient._make_api_call
    failed: list[str] = []

    def call(self: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
        if operation_name == operation:
            failed.append(operation_name)
            raise answer(operation_name, api_params)
        return real_call(self, operation_name, api_params)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(botocore.client.BaseClient, "_make_api_call", call)
        yield failed


def assert_retry_later(response: Any) -> None:
    assert response.status_code == 503, response.body
    assert response.headers["Retry-After"] == "1"
    assert body(response) == {
        "error": "unavailable",
        "message": "storage is busy; retry shortly",
        "details": [],
    }


# ---------------------------------------------------------------- clients


@pytest.fixture
def client(api) -> dict:
    response = api.post("/clients", {"phone": "79001234567", "tag": "vip"})
    assert response.status_code == 201, response.body
    return body(response)


def test_a_conflict_creating_a_client_is_503_and_adds_nothing(api):
    # When creating a client meets a concurrent transaction
    with aws_answers("TransactWriteItems", cancelled_for_conflict) as failed:
        response = api.post("/clients", {"phone": "79001234567"})
    # Then the caller is told to retry shortly, and there is no client and no phone claim
    assert failed
    assert_retry_later(response)
    assert body(api.get("/clients"))["items"] == []
    assert api.post("/clients", {"phone": "79001234567"}).status_code == 201


def test_a_conflict_changing_a_clients_phone_is_503_and_changes_nothing(api, client):
    # When moving the client to a new number meets a concurrent transaction
    with aws_answers("TransactWriteItems", cancelled_for_conflict) as failed:
        response = api.patch(f"/clients/{client['id']}", {"phone": "79007654321"})
    # Then the caller is told to retry, the client is as it was, and the new number is free
    assert failed
    assert_retry_later(response)
    assert body(api.get(f"/clients/{client['id']}")) == client
    assert api.post("/clients", {"phone": "79001234567"}).status_code == 409
    assert api.post("/clients", {"phone": "79007654321"}).status_code == 201


@pytest.mark.parametrize(
    ("method", "payload", "operation", "answer"),
    [
        ("PATCH", {"tag": "gold"}, "PutItem", conflict_on_item),
        ("DELETE", None, "TransactWriteItems", cancelled_for_conflict),
    ],
    ids=["edit", "delete"],
)
def test_a_conflict_editing_or_deleting_a_client_is_503_and_keeps_it_as_it_was(
    api, client, method, payload, operation, answer
):
    # When the change meets a concurrent write
    with aws_answers(operation, answer) as failed:
        response = api.call(method, f"/clients/{client['id']}", payload)
    # Then the caller is told to retry shortly, and the client is as it was
    assert failed
    assert_retry_later(response)
    assert body(api.get(f"/clients/{client['id']}")) == client


def test_a_throttled_opt_out_is_503_and_opts_nobody_out(api, client):
    """Given DynamoDB throttling the update, when a client opts out, then the answer is a 503 to
    retry later and the client is not opted out."""
    with aws_answers("UpdateItem", throttled) as failed:
        response = api.post("/opt-outs", {"phone": client["phone"]})
    assert failed
    assert_retry_later(response)
    assert body(api.get(f"/clients/{client['id']}"))["opted_out"] is False


# ---------------------------------------------------------------- mailings


@pytest.fixture
def mailing(api) -> dict:
    response = api.post("/mailings", MAILING)
    assert response.status_code == 201, response.body
    return body(response)


def test_a_conflict_creating_a_mailing_is_503_and_adds_nothing(api):
    """Given a transaction conflict on the write, when a mailing is created, then the answer is a
    503 to retry later and no mailing exists."""
    with aws_answers("PutItem", conflict_on_item) as failed:
        response = api.post("/mailings", MAILING)
    assert failed
    assert_retry_later(response)
    assert body(api.get("/mailings"))["items"] == []


@pytest.mark.parametrize(
    ("method", "action", "payload", "operation", "answer"),
    [
        ("PATCH", "", {"text": "Changed"}, "UpdateItem", conflict_on_item),
        ("PUT", "", {**MAILING, "text": "Changed"}, "UpdateItem", throttled),
        # Cancelling a mailing before its start settles it into the totals: one transaction.
        ("POST", "/cancel", None, "TransactWriteItems", cancelled_for_conflict),
        ("POST", "/pause", None, "UpdateItem", throttled),
        ("DELETE", "", None, "DeleteItem", conflict_on_item),
    ],
    ids=["patch", "put", "cancel", "pause", "delete"],
)
def test_a_conflict_changing_a_mailing_is_503_and_changes_nothing(
    api, mailing, method, action, payload, operation, answer
):
    # When the change meets a concurrent write or a throttle
    with aws_answers(operation, answer) as failed:
        response = api.call(method, f"/mailings/{mailing['id']}{action}", payload)
    # Then the caller is told to retry shortly, and the mailing is as it was
    assert failed
    assert_retry_later(response)
    assert body(api.get(f"/mailings/{mailing['id']}")) == mailing


def test_the_api_document_says_a_503_comes_with_retry_after(api):
    """Given the OpenAPI document, when a write's 503 answer is looked up, then it declares an
    integer Retry-After header."""
    spec = body(api.get("/openapi.json"))
    unavailable = spec["paths"]["/mailings/{mailing_id}/cancel"]["post"]["responses"]["503"]
    assert "Retry-After" in unavailable["headers"]
    assert unavailable["headers"]["Retry-After"]["schema"]["type"] == "integer"
