"""The sender under the failures AWS has and moto lacks: transaction conflicts, throttles,
Lambda deadlines, and a cancel or pause arriving while a batch is being sent.

Faults are raised where botocore's own retries have already given up (`_make_api_call`), so the
code sees what would reach it on AWS. Pipeline fixtures as in test_delivery.py.
"""

# The pipeline fixtures are imported from test_delivery.py; pytest passes them as arguments.
# ruff: noqa: F811

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from botocore.client import BaseClient
from botocore.exceptions import ClientError

from chalicelib.services.delivery import countdown
from chalicelib.services.queues import JobBatch
from devstack.gateway import FaultProfile
from tests.integration.test_delivery import (  # noqa: F401
    add_client,
    assert_counters_match_records,
    calls,
    create_mailing,
    gateway,
    pipeline,
    services,
    settings,
    sqs,
)
from tests.support.pipeline import SEND_URL


class AwsFaults:
    """Fails chosen DynamoDB requests the way AWS answers under contention, a set number of
    times (or until cleared); counts what it failed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rules: list[list] = []
        self.failed: Counter = Counter()
        real = BaseClient._make_api_call
        faults = self

        def faulty(client, operation, params):
            for rule in faults.rules:
                wanted, table, error, left = rule
                if operation == wanted and left and table in str(params):
                    rule[3] -= 1
                    faults.failed[operation] += 1
                    raise error
            return real(client, operation, params)

        monkeypatch.setattr(BaseClient, "_make_api_call", faulty)

    def fail(self, operation: str, error: ClientError, times: int = 10**9, table: str = "") -> None:
        self.rules.append([operation, table, error, times])

    def clear(self) -> None:
        self.rules.clear()


def conflict(operation: str = "TransactWriteItems") -> ClientError:
    """A transaction cancelled because another transaction was writing one of its items."""
    response = {
        "Error": {
            "Code": "TransactionCanceledException",
            "Message": "Transaction cancelled [TransactionConflict, None]",
        },
        "CancellationReasons": [
            {"Code": "TransactionConflict", "Message": "Transaction is ongoing for the item"},
            {"Code": "None"},
        ],
    }
    return ClientError(response, operation)


def throttled(operation: str) -> ClientError:
    response = {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow"}}
    return ClientError(response, operation)


@pytest.fixture
def aws_faults(services, monkeypatch):
    return AwsFaults(monkeypatch)


def queued_jobs(pipeline) -> list[JobBatch]:
    return [JobBatch.model_validate_json(m.body) for m in pipeline.sqs.take_ready(SEND_URL, 100)]


# ---------------------------------------------------------------- conflicts and throttles


@pytest.mark.parametrize(
    ("operation", "error"),
    [
        ("TransactWriteItems", conflict()),
        ("UpdateItem", throttled("UpdateItem")),
    ],
    ids=["conflict on the outcome transaction", "throttled claim"],
)
def test_a_conflict_or_throttle_is_retried_and_each_message_is_sent_once(
    api, pipeline, clock, gateway, aws_faults, operation, error
):
    # Given a mailing whose three jobs are queued
    for n in range(3):
        add_client(api, f"7900000000{n}")
    mailing = create_mailing(api, clock)
    pipeline.kicks()
    # And DynamoDB answers the sender's first three writes of a kind with a conflict/throttle
    aws_faults.fail(operation, error, times=3)

    # When the sender delivers the jobs once
    pipeline.send_once()

    # Then the faults happened, and every message was sent once and is recorded `sent`
    assert aws_faults.failed[operation] == 3
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 3})
    assert sorted(gateway.accepted_ids().values()) == [1, 1, 1]
    # And counted once
    assert_counters_match_records(pipeline, mailing["id"])


@pytest.mark.parametrize("table", ["clients", "mailings"])
def test_a_throttled_read_leaves_the_message_pending_and_it_is_sent_later(
    api, pipeline, clock, gateway, aws_faults, table
):
    # Given a queued job, and the sender's reads of the clients (or the mailing) throttled
    # beyond the SDK's retries and the sender's own
    add_client(api, "79000000001")
    mailing = create_mailing(api, clock)
    pipeline.kicks()
    for operation in ("BatchGetItem", "GetItem"):
        aws_faults.fail(operation, throttled(operation), table=f"sms-test-{table}")

    # When the sender tries it
    pipeline.send_once()

    # Then nothing was sent or failed: the message is pending, no attempt spent
    assert gateway.accepted() == []
    [message] = pipeline.messages(mailing["id"])
    assert message.status == "pending"
    assert int(message.attempts or 0) == 0
    # And when DynamoDB recovers, the job comes back and the message is sent
    aws_faults.clear()
    pipeline.settle()
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 1})
    assert_counters_match_records(pipeline, mailing["id"])


# ---------------------------------------------------------------- the Lambda deadline


@pytest.mark.parametrize(
    "settings",
    [{"sender_concurrency": 1, "gateway_connect_timeout": 0.1, "gateway_read_timeout": 0.5}],
    indirect=True,
)
def test_a_deadline_mid_batch_records_what_was_sent_and_requeues_the_rest(
    api, pipeline, services, clock, gateway
):
    # Given ten jobs in one SQS message, a gateway taking 0.3 s a call, one call at a time
    gateway.set_profile(FaultProfile(latency_seconds=0.3))
    for n in range(10):
        add_client(api, f"7900000000{n}")
    mailing = create_mailing(api, clock)
    pipeline.kicks()
    [batch] = queued_jobs(pipeline)
    assert len(batch.jobs) == 10

    # When the sender gets them with 4.5 s left of its invocation, where a call needs 0.6 s
    # (connect + read timeouts) and 2 s for its outcome: time to start calls for about 2 s
    budget = 4.5
    started = time.monotonic()
    services.sender.deliver(batch, countdown(budget))
    elapsed = time.monotonic() - started

    # Then it stopped in time, with every call it made recorded `sent`
    assert elapsed < budget - 1
    sent_first = set(gateway.accepted_ids())
    assert 0 < len(sent_first) < 10
    by_id = {int(m.message_id): m for m in pipeline.messages(mailing["id"])}
    assert {i for i, m in by_id.items() if m.status == "sent"} == sent_first
    # And the rest are pending with no attempt spent, their jobs back in the queue
    rest = {i for i, m in by_id.items() if m.status == "pending"}
    assert rest == set(by_id) - sent_first
    assert {int(by_id[i].attempts or 0) for i in rest} == {0}
    clock.advance(seconds=10)
    requeued = queued_jobs(pipeline)
    assert {job.message_id for b in requeued for job in b.jobs} == rest

    # When the requeued jobs are delivered with time to spare
    for again in requeued:
        services.sender.deliver(again, countdown(60))

    # Then every message is sent, and the gateway got each message id exactly once
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 10})
    assert sorted(gateway.accepted_ids().values()) == [1] * 10
    assert_counters_match_records(pipeline, mailing["id"])


def test_claims_shorter_than_a_call_and_its_outcome_are_refused():
    from chalicelib.settings import Settings

    # A claim must outlast the longest call (connect + read timeouts) and its outcome's write
    with pytest.raises(ValueError, match="CLAIM_SECONDS"):
        Settings(claim_seconds=12, gateway_connect_timeout=3, gateway_read_timeout=8)
    assert Settings(claim_seconds=14, gateway_connect_timeout=3, gateway_read_timeout=8)


# ---------------------------------------------------------------- cancel and pause mid-batch


def stop_after_calls(calls, action, after: int) -> tuple[threading.Thread, dict]:
    """Run `action` (as the API would) from another thread once `after` calls were made."""
    seen: dict = {}

    def watch() -> None:
        while len(calls) < after:
            time.sleep(0.005)
        action()
        seen["calls"] = len(calls)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, seen


def deliver_a_batch_stopped_after_two_calls(
    api, pipeline, services, clock, gateway, calls, stop
) -> tuple[str, int]:
    """Given ten jobs in one SQS message, a gateway taking 0.2 s a call, one call at a time, and
    an operator who calls `stop(mailing_id)` after the second call; when the sender delivers
    the batch: the mailing's id, and how many calls were made once `stop` returned."""
    gateway.set_profile(FaultProfile(latency_seconds=0.2))
    for n in range(10):
        add_client(api, f"7900000000{n}")
    mailing_id = create_mailing(api, clock)["id"]
    pipeline.kicks()
    [batch] = queued_jobs(pipeline)
    thread, seen = stop_after_calls(calls, lambda: stop(mailing_id), 2)

    services.sender.deliver(batch, countdown(60))
    thread.join(5)
    return mailing_id, seen["calls"]


@pytest.mark.parametrize("settings", [{"sender_concurrency": 1}], indirect=True)
def test_cancel_stops_a_running_batch_within_a_second(
    api, pipeline, services, clock, gateway, calls
):
    # Given ten jobs in one SQS message, a gateway taking 0.2 s a call, one call at a time
    # And an operator who cancels the mailing after the second call
    # When the sender delivers the batch
    mailing_id, calls_at_cancel = deliver_a_batch_stopped_after_two_calls(
        api, pipeline, services, clock, gateway, calls, services.mailings.cancel
    )

    # Then at most a second of calls (five, plus the one under way) followed the cancel
    assert len(calls) - calls_at_cancel <= 6
    # And every message not sent is cancelled, the counters equal to the records
    statuses = pipeline.statuses(mailing_id)
    assert statuses == Counter({"sent": len(calls), "cancelled": 10 - len(calls)})
    assert len(gateway.accepted()) == len(calls)
    assert_counters_match_records(pipeline, mailing_id)


@pytest.mark.parametrize("settings", [{"sender_concurrency": 1}], indirect=True)
def test_pause_stops_a_running_batch_within_a_second_and_resume_sends_the_rest(
    api, pipeline, services, clock, gateway, calls
):
    # Given ten jobs in one SQS message, a gateway taking 0.2 s a call, one call at a time
    # And an operator who pauses the mailing after the second call
    # When the sender delivers the batch
    mailing_id, calls_at_pause = deliver_a_batch_stopped_after_two_calls(
        api, pipeline, services, clock, gateway, calls, services.mailings.pause
    )

    # Then at most a second of calls followed the pause; the rest wait, no attempt spent
    assert len(calls) - calls_at_pause <= 6
    waiting = [m for m in pipeline.messages(mailing_id) if m.status == "pending"]
    assert len(waiting) == 10 - len(calls)
    assert {int(m.attempts or 0) for m in waiting} == {0}
    # And after the resume, the rest are sent, each once
    services.mailings.resume(mailing_id)
    pipeline.settle()
    assert pipeline.statuses(mailing_id) == Counter({"sent": 10})
    assert sorted(gateway.accepted_ids().values()) == [1] * 10


# ---------------------------------------------------------------- least privilege


def test_a_duplicate_job_learns_why_its_claim_failed_without_reading_the_message(
    api, pipeline, services, clock, gateway, aws_faults
):
    # Given a job that was delivered and sent, and a sender whose role may not GetItem a message
    add_client(api, "79000000001")
    mailing = create_mailing(api, clock)
    pipeline.kicks()
    [batch] = queued_jobs(pipeline)
    services.sender.deliver(batch)
    denied = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "GetItem")
    aws_faults.fail("GetItem", denied, table="sms-test-messages")

    # When SQS delivers the same job again
    report = services.sender.deliver(batch)

    # Then the failed claim itself says the message is done: skipped, nothing else read or sent
    assert [str(result) for result in report.results] == ["skipped"]
    assert aws_faults.failed["GetItem"] == 0
    assert sorted(gateway.accepted_ids().values()) == [1]
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 1})
