"""The scheduler and retry-failed under AWS's failures: transaction conflicts, an invocation
running out of time, lost send jobs, a queue that refuses jobs, and one bad mailing among good
ones (moto DynamoDB, the virtual SQS and the sandbox gateway, the test's clock)."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import botocore.client
import pytest
from botocore.exceptions import ClientError

from chalicelib.services.reconciler import (
    LOST_JOB_AFTER,
    MAX_BACKLOG,
    SEND_VISIBILITY_TIMEOUT_SECONDS,
)
from chalicelib.services.scheduler import SWEEP_PAGE
from devstack.gateway import FaultProfile
from tests.conftest import body
from tests.integration import test_delivery as delivery
from tests.support.pipeline import FANOUT_URL, SEND_URL

# The delivery suite's fixtures (moto, virtual SQS, the sandbox gateway, the pipeline driver).
gateway, gateway_client, settings, sqs, services, pipeline = (
    delivery.gateway,
    delivery.gateway_client,
    delivery.settings,
    delivery.sqs,
    delivery.services,
    delivery.pipeline,
)
add_client, create_mailing = delivery.add_client, delivery.create_mailing

ROOT = Path(__file__).resolve().parents[2]


def conflict() -> ClientError:
    """What DynamoDB answers when another transaction touches one of the items meanwhile."""
    return ClientError(
        {
            "Error": {
                "Code": "TransactionCanceledException",
                "Message": "Transaction cancelled [None, TransactionConflict]",
            },
            "CancellationReasons": [
                {"Code": "None"},
                {"Code": "TransactionConflict", "Message": "Transaction is ongoing for the item"},
            ],
        },
        "TransactWriteItems",
    )


@pytest.fixture
def conflicts(monkeypatch):
    """`conflicts.left = n`: the next n TransactWriteItems calls are cancelled for a conflict
    (nothing written, as on AWS); `conflicts.seen` counts the ones cancelled."""
    original = botocore.client.BaseClient._make_api_call

    class Injector:
        left = 0
        seen = 0

    def make_api_call(client, operation, params):
        if operation == "TransactWriteItems" and Injector.left > 0:
            Injector.left -= 1
            Injector.seen += 1
            raise conflict()
        return original(client, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", make_api_call)
    return Injector


def jobs_queued(pipeline, skip_foreign: bool = False) -> Counter:
    """Message ids of the send jobs waiting in the send queue (delayed ones included); with
    `skip_foreign`, bodies that are not job batches are left out."""
    batches = [json.loads(message.body) for message in pipeline.sqs.queues[SEND_URL]]
    return Counter(
        job["message_id"]
        for batch in batches
        if not skip_foreign or "jobs" in batch
        for job in batch["jobs"]
    )


def message_ids(pipeline, mailing_id: str, status: str | None = None) -> set[int]:
    return {
        int(m.message_id)
        for m in pipeline.messages(mailing_id)
        if status is None or m.status == status
    }


# ---------------------------------------------------------------- conflicts


def mailing_whose_jobs_were_lost(
    api, pipeline, clock, clients: int, end: timedelta = timedelta(hours=2)
) -> dict:
    """A running mailing to `clients` new clients, fanned out, its send jobs gone from SQS."""
    for n in range(clients):
        add_client(api, f"7900000{n:04d}")
    mailing = create_mailing(api, clock, end=end)
    pipeline.kicks()
    pipeline.sqs.queues[SEND_URL].clear()
    return mailing


@pytest.mark.parametrize("settings", [{"fanout_page_size": 10}], indirect=True)
def test_a_conflict_on_a_fan_out_page_is_tried_again_not_taken_for_a_lost_lease(
    api, pipeline, services, clock, gateway, conflicts
):
    # Given a mailing whose start has come, over two fan-out pages
    for n in range(15):
        add_client(api, f"790000000{n:02d}")
    mailing = create_mailing(api, clock, start=timedelta(minutes=1))
    clock.advance(minutes=1)
    pipeline.sqs.queues[FANOUT_URL].clear()  # the test drives the scheduler itself

    # When the first page's transaction is cancelled for a conflict with another writer
    conflicts.left = 1
    progress = services.scheduler.tick(lambda: 60.0)

    # Then that one invocation still walked the whole audience: every message exists once,
    # with exactly one job each, and nothing is left for a continuation
    assert conflicts.seen == 1
    assert progress.messages_created == 15
    assert progress.continued == []
    created = message_ids(pipeline, mailing["id"])
    assert len(created) == 15
    assert jobs_queued(pipeline) == Counter({message_id: 1 for message_id in created})
    # And the mailing runs to the end: each client gets one message
    pipeline.settle()
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 15})
    assert sorted(gateway.accepted_ids().values()) == [1] * 15
    assert pipeline.mailing_status(mailing["id"]) == "finished"


# ---------------------------------------------------------------- deadlines


def test_a_sweep_out_of_time_keeps_what_it_did_and_is_continued_at_once(
    api, pipeline, services, clock
):
    # Given a running mailing with 120 pending messages whose jobs have not run yet
    mailing = mailing_whose_jobs_were_lost(api, pipeline, clock, 120)
    assert pipeline.statuses(mailing["id"]) == Counter({"pending": 120})

    # When it is cancelled and the worker's time runs out after the first page of the sweep
    api.post(f"/mailings/{mailing['id']}/cancel")
    pipeline.sqs.queues[FANOUT_URL].clear()

    def remaining() -> float:
        return 5.0 if pipeline.statuses(mailing["id"])["cancelled"] else 60.0

    progress = services.scheduler.advance(mailing["id"], remaining)

    # Then the page it moved is recorded, counters and records agree, and a kick continues it
    assert progress.cancelled == SWEEP_PAGE
    left = 120 - SWEEP_PAGE
    assert pipeline.statuses(mailing["id"]) == Counter({"cancelled": SWEEP_PAGE, "pending": left})
    assert pipeline.counters(mailing["id"]) == pipeline.statuses(mailing["id"])
    assert pipeline.sqs.depth(FANOUT_URL) == 1
    # And the continuation finishes the rest without waiting for a tick
    pipeline.kicks()
    assert pipeline.statuses(mailing["id"]) == Counter({"cancelled": 120})
    assert pipeline.counters(mailing["id"]) == pipeline.statuses(mailing["id"])
    assert pipeline.mailing_status(mailing["id"]) == "cancelled"


# ---------------------------------------------------------------- retry-failed


def failed_mailing(api, pipeline, clock, gateway, count: int = 3) -> dict:
    """A finished mailing whose `count` messages the gateway rejected; the gateway is fixed."""
    for n in range(count):
        add_client(api, f"79160000{n:02d}7")
    gateway.set_profile(FaultProfile(reject_phone_suffixes=("7",)))
    mailing = create_mailing(api, clock, end=timedelta(hours=2))
    pipeline.settle()
    assert pipeline.statuses(mailing["id"]) == Counter({"failed": count})
    gateway.set_profile(FaultProfile())
    return mailing


def test_retry_failed_queues_no_job_when_its_commit_fails(api, pipeline, clock, gateway, conflicts):
    # Given failed messages, and storage that keeps cancelling the retry's transaction
    mailing = failed_mailing(api, pipeline, clock, gateway)
    conflicts.left = 100

    # When the operator retries them
    response = api.post(f"/mailings/{mailing['id']}/retry-failed")

    # Then the caller is told to try again, and nothing was queued for messages still failed
    assert response.status_code == 503, response.body
    assert conflicts.seen > 1  # tried again before giving up
    assert pipeline.statuses(mailing["id"]) == Counter({"failed": 3})
    assert jobs_queued(pipeline) == Counter()

    # And once storage answers again, the retry sends them
    conflicts.left = 0
    assert body(api.post(f"/mailings/{mailing['id']}/retry-failed"))["requeued"] == 3
    pipeline.settle()
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 3})


def test_retry_failed_whose_jobs_cannot_be_queued_says_so_and_the_reconciler_sends_them(
    api, pipeline, clock, gateway, sqs, monkeypatch
):
    # Given failed messages, and a send queue that refuses every job for now
    mailing = failed_mailing(api, pipeline, clock, gateway)
    failed = message_ids(pipeline, mailing["id"], "failed")
    working = sqs.send_message_batch

    def refusing(QueueUrl, Entries):
        if QueueUrl == SEND_URL:
            raise ClientError({"Error": {"Code": "InternalError"}}, "SendMessageBatch")
        return working(QueueUrl=QueueUrl, Entries=Entries)

    monkeypatch.setattr(sqs, "send_message_batch", refusing)

    # When the operator retries them
    response = api.post(f"/mailings/{mailing['id']}/retry-failed")

    # Then the answer says what happened, not a bare 500: they are pending, their jobs are not
    assert response.status_code == 503, response.body
    assert response.headers["Retry-After"] == "5"
    error = body(response)
    assert error["error"] == "unavailable"
    assert "3 failed messages" in error["message"]
    assert "pending again" in error["message"]
    assert pipeline.statuses(mailing["id"]) == Counter({"pending": 3})
    assert pipeline.counters(mailing["id"]) == Counter({"pending": 3})
    assert jobs_queued(pipeline) == Counter()

    # And once the queue takes jobs again, the scheduler finds them and they go before the end
    monkeypatch.setattr(sqs, "send_message_batch", working)
    pipeline.run(until=clock() + LOST_JOB_AFTER + timedelta(minutes=3))
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 3})
    assert sorted(gateway.accepted_ids()[i] for i in failed) == [1, 1, 1]
    pipeline.tick()
    assert pipeline.mailing_status(mailing["id"]) == "finished"


# ---------------------------------------------------------------- reconciler


def test_pending_messages_whose_jobs_were_lost_are_queued_again_and_sent_before_the_end(
    api, pipeline, clock, gateway, caplog
):
    # Given a running mailing whose fan-out is done and whose send jobs were all lost
    mailing = mailing_whose_jobs_were_lost(api, pipeline, clock, 3, end=timedelta(hours=1))

    # When the scheduler ticks for a while, but less than a live job can stay out of sight
    pipeline.run(until=clock() + LOST_JOB_AFTER - timedelta(minutes=1))

    # Then nothing was queued again yet (a job may still be on its way)
    assert jobs_queued(pipeline) == Counter()
    assert pipeline.statuses(mailing["id"]) == Counter({"pending": 3})

    # When the mailing stays quiet past that
    caplog.set_level(logging.WARNING, logger="chalicelib.services.reconciler")
    pipeline.run(until=clock() + timedelta(minutes=3))

    # Then each message was queued again once, logged with its ids, and sent before the end
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 3})
    assert sorted(gateway.accepted_ids().values()) == [1, 1, 1]
    assert all(send.accepted_at for send in gateway.accepted())
    requeued = [r for r in caplog.records if "queued again" in r.getMessage()]
    assert {r.message_id for r in requeued} == message_ids(pipeline, mailing["id"])
    assert {r.mailing_id for r in requeued} == {mailing["id"]}
    assert all(r.client_id for r in requeued)
    pipeline.tick()
    assert pipeline.mailing_status(mailing["id"]) == "finished"


def test_a_message_with_a_live_claim_or_a_recent_change_is_not_queued_again(
    api, pipeline, services, clock
):
    # Given a running mailing whose three send jobs are gone
    mailing = mailing_whose_jobs_were_lost(api, pipeline, clock, 3)
    pipeline.tick()  # the scheduler notes the mailing's counters
    claimed, touched, lost = sorted(pipeline.messages(mailing["id"]), key=lambda m: m.message_id)
    # A sender holds the first for a long call
    services.messages.claim(mailing["id"], claimed.client_id, claimed.message_id, clock(), 3600)
    # The second was claimed a minute ago and given back (its job comes back after a while)
    clock.advance(seconds=LOST_JOB_AFTER.total_seconds() - 60)
    services.messages.claim(mailing["id"], touched.client_id, touched.message_id, clock(), 5)
    clock.advance(seconds=61)

    # When the scheduler ticks after the mailing has been quiet long enough
    pipeline.tick()

    # Then only the message nobody has touched is queued again
    assert jobs_queued(pipeline) == Counter({int(lost.message_id): 1})
    # And the pass is not repeated on the next tick
    clock.advance(minutes=1)
    pipeline.tick()
    assert jobs_queued(pipeline) == Counter({int(lost.message_id): 1})


def test_a_reconciler_pass_out_of_time_keeps_its_place_and_is_continued_at_once(
    api, pipeline, services, clock
):
    # Given a running mailing of 150 messages whose jobs were all lost long ago
    mailing = mailing_whose_jobs_were_lost(api, pipeline, clock, 150)
    pipeline.tick()
    clock.advance(seconds=LOST_JOB_AFTER.total_seconds() + 60)

    # When the tick runs out of time once a page of them has been queued again
    def remaining() -> float:
        return 5.0 if jobs_queued(pipeline) else 60.0

    progress = services.scheduler.tick(remaining)

    # Then that page stays queued, and a kick continues the pass without waiting for a tick
    assert progress.requeued == 99
    assert progress.continued == [mailing["id"]]
    assert pipeline.sqs.depth(FANOUT_URL) == 1
    pipeline.kicks()
    # And every message ends up with exactly one job
    assert jobs_queued(pipeline) == Counter(dict.fromkeys(message_ids(pipeline, mailing["id"]), 1))


def test_no_job_is_queued_again_while_the_senders_are_behind(api, pipeline, sqs, clock):
    # Given a mailing whose jobs were lost, and a send queue with a backlog of other jobs
    mailing = mailing_whose_jobs_were_lost(api, pipeline, clock, 1)
    pipeline.tick()
    clock.advance(seconds=LOST_JOB_AFTER.total_seconds() + 60)
    backlog = [{"Id": str(n), "MessageBody": f'{{"backlog": {n}}}'} for n in range(MAX_BACKLOG + 1)]
    sqs.send_message_batch(QueueUrl=SEND_URL, Entries=backlog)

    # When the scheduler ticks, the mailing quiet for long enough
    pipeline.tick()

    # Then nothing is queued again: its jobs may be waiting behind the backlog
    assert jobs_queued(pipeline, skip_foreign=True) == Counter()
    # And once the senders have caught up, the lost job is queued again
    sqs.queues[SEND_URL].clear()
    clock.advance(minutes=1)
    pipeline.tick()
    assert jobs_queued(pipeline) == Counter(dict.fromkeys(message_ids(pipeline, mailing["id"]), 1))


def test_a_message_waiting_for_its_send_window_is_not_queued_again(api, pipeline, clock):
    # Given a mailing whose window (Moscow time) is closed for hours, its jobs deferred in SQS
    add_client(api, "79000000001", timezone="Europe/Moscow")
    mailing = create_mailing(
        api,
        clock,
        end=timedelta(hours=30),
        send_window={"start": "03:00", "end": "04:00"},  # 12:00 UTC is 15:00 in Moscow
    )

    # When the scheduler and the sender run until just before the window opens
    pipeline.run(
        until=datetime(2026, 11, 23, 0, 0, tzinfo=UTC) - timedelta(minutes=5),
        step=timedelta(minutes=5),
    )

    # Then the deferred job is still the only one: nothing was queued a second time
    assert sum(jobs_queued(pipeline).values()) == 1
    # And it is sent once when the window opens
    pipeline.run(until=datetime(2026, 11, 23, 0, 30, tzinfo=UTC))
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 1})


def test_the_reconcilers_wait_covers_the_send_queues_visibility_timeout():
    """Given the send queue's visibility timeout in the template, when the reconciler's constants
    are compared with it, then they agree and a job is taken for lost only after its longest
    delay plus that timeout."""
    # The template's SendQueue and the reconciler must agree, or a live job is taken for lost
    template = (ROOT / "infra" / "resources.yaml").read_text()
    found = re.search(
        r"\n  SendQueue:\n(?:    .*\n|\s*#.*\n)*?\s+VisibilityTimeout: (\d+)", template
    )
    assert found is not None
    assert int(found.group(1)) == SEND_VISIBILITY_TIMEOUT_SECONDS
    assert timedelta(seconds=900 + SEND_VISIBILITY_TIMEOUT_SECONDS) <= LOST_JOB_AFTER


# ---------------------------------------------------------------- one bad mailing


def test_one_broken_mailing_does_not_stop_the_tick_and_a_far_end_still_sends(
    api, pipeline, services, clock, gateway, caplog
):
    # Given three mailings whose start has come: one ends in year 9999 (stored before the API
    # capped the end), one has a checkpoint no fan-out can read, one is ordinary
    add_client(api, "79000000001")
    far = create_mailing(api, clock, start=timedelta(minutes=1))
    broken = create_mailing(api, clock, start=timedelta(minutes=1))
    ordinary = create_mailing(api, clock, start=timedelta(minutes=1))
    Mailing = services.models.Mailing
    Mailing(far["id"]).update(
        actions=[Mailing.end_at.set(datetime(9999, 12, 31, 23, 59, tzinfo=UTC))]
    )
    Mailing(broken["id"]).update(actions=[Mailing.fanout_cursor.set("not-a-cursor")])
    pipeline.sqs.queues[FANOUT_URL].clear()
    clock.advance(minutes=1)

    # When the scheduler ticks
    caplog.set_level(logging.ERROR, logger="chalicelib.services.scheduler")
    pipeline.tick()
    pipeline.settle(limit=timedelta(minutes=5))

    # Then the far-ending and the ordinary mailing both sent their message
    assert pipeline.statuses(far["id"]) == Counter({"sent": 1})
    assert pipeline.statuses(ordinary["id"]) == Counter({"sent": 1})
    assert pipeline.mailing_status(ordinary["id"]) == "finished"
    # And the broken one is logged with its id, every tick, without stopping the others
    errors = [r for r in caplog.records if r.getMessage() == "could not advance mailing"]
    assert errors
    assert {r.mailing_id for r in errors} == {broken["id"]}


# ---------------------------------------------------------------- audience changes


@pytest.mark.parametrize("settings", [{"fanout_page_size": 5}], indirect=True)
def test_a_client_whose_tag_changes_mid_fan_out_gets_one_message_and_the_rest_still_go(
    api, pipeline, services, clock, gateway, monkeypatch
):
    # Given ten clients tagged "a" and ten tagged "b", and a mailing to both tags, fanned out
    # five clients a page
    tagged_a = [add_client(api, f"790000000{n:02d}", tag="a") for n in range(10)]
    for n in range(10):
        add_client(api, f"790100000{n:02d}", tag="b")
    mailing = create_mailing(api, clock, start=timedelta(minutes=1), filter={"tags": ["a", "b"]})
    clock.advance(minutes=1)
    pipeline.sqs.queues[FANOUT_URL].clear()  # the test drives the scheduler itself
    # ...and a client of the first page moves to "b" as soon as that page is committed
    original = botocore.client.BaseClient._make_api_call
    moved: list[str] = []

    def make_api_call(client, operation, params):
        answer = original(client, operation, params)
        writes_messages = any(
            "messages" in (item.get("Put") or {}).get("TableName", "")
            for item in params.get("TransactItems", [])
        ) or any("messages" in table for table in params.get("RequestItems", {}))
        if operation in ("TransactWriteItems", "BatchWriteItem") and writes_messages and not moved:
            written = {
                item["Put"]["Item"]["client_id"]["S"]
                for item in params.get("TransactItems", [])
                if "Put" in item
            } | {
                request["PutRequest"]["Item"]["client_id"]["S"]
                for requests in params.get("RequestItems", {}).values()
                for request in requests
                if "PutRequest" in request
            }
            client_id = next(c["id"] for c in tagged_a if c["id"] in written)
            moved.append(client_id)
            assert api.patch(f"/clients/{client_id}", {"tag": "b"}).status_code == 200
        return answer

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", make_api_call)

    # When the scheduler walks the audience
    services.scheduler.tick(lambda: 60.0)
    monkeypatch.undo()

    # Then every client has exactly one message, the moved one included, and the walk is done
    assert moved
    pipeline.settle()
    messages = pipeline.messages(mailing["id"])
    assert len(messages) == 20 == len({m.client_id for m in messages})
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 20})
    assert sorted(gateway.accepted_ids().values()) == [1] * 20
    assert pipeline.counters(mailing["id"])["sent"] == 20
    assert pipeline.mailing_status(mailing["id"]) == "finished"
