"""What a mailing's timeline costs and how it stays right: GET /mailings/{id}/timeline reads the
same with 50 or with 2,000 messages (the buckets its counter updates keep, never the message
records), sums to the counters through failures and a retry, goes with the mailing, and a
mailing stored before timelines were kept is still shown from its records."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest

from chalicelib.domain import MessageStatus
from chalicelib.domain.mailing import MailingStatus, Message
from chalicelib.domain.timeline import grid_of
from chalicelib.storage.mailings import DynamoMailingRepository
from chalicelib.storage.messages import DynamoMessageRepository, Outcome
from chalicelib.storage.models import connection_for, timeline_part_key
from devstack.gateway import FaultProfile
from tests.conftest import body
from tests.integration import test_delivery as delivery
from tests.integration import test_stats_cost as stats_cost

# The delivery suite's fixtures (moto, virtual SQS, the sandbox gateway, the pipeline driver)
# and the statistics suite's count of DynamoDB reads.
gateway, gateway_client, settings, sqs, services, pipeline, dynamodb_reads = (
    delivery.gateway,
    delivery.gateway_client,
    delivery.settings,
    delivery.sqs,
    delivery.services,
    delivery.pipeline,
    stats_cost.dynamodb_reads,
)
add_client, create_mailing = delivery.add_client, delivery.create_mailing

OWNER = "scheduler-test"
# Outcomes per transaction, as a sender writes a batch's.
BATCH = 10


def created(mailing_id: str, client_id: str, message_id: int, now: datetime) -> Message:
    """A message as the fan-out creates it."""
    return Message(
        message_id, mailing_id, client_id, "79000000000", MessageStatus.PENDING, now, None, 0, None
    )


def with_messages(api: Any, services: Any, clock: Any, size: int) -> str:
    """Given: a mailing of `size` messages created at its start, then finished a tenth at a
    time over ten minutes (one in five failed), through the storage the workers use."""
    models, connection = services.models, connection_for(services.settings)
    mailings = DynamoMailingRepository(models, connection)
    messages = DynamoMessageRepository(models, connection)
    mailing_id = create_mailing(api, clock, end=timedelta(hours=2))["id"]
    mailing = mailings.take_lease(
        mailing_id,
        OWNER,
        clock(),
        clock() + timedelta(hours=1),
        current=MailingStatus.SCHEDULED,
        start=MailingStatus.RUNNING,
    )
    grid = grid_of(mailing)
    clients = [str(uuid.uuid4()) for _ in range(size)]
    first = mailings.reserve_message_ids(size)
    page = services.settings.fanout_page_size
    now = clock()
    for start in range(0, size, page):
        chunk = clients[start : start + page]
        mailings.commit_fan_out_page(
            mailing_id,
            OWNER,
            cursor=None if start == 0 else f"at-{start}",
            next_cursor=f"at-{start + page}" if start + page < size else None,
            messages=[created(mailing_id, c, first + start + n, now) for n, c in enumerate(chunk)],
            expires_at=clock() + timedelta(days=90),
            lease_until=clock() + timedelta(hours=1),
            token=uuid.uuid4().hex,
            timeline=grid,
        )
    tenth = size // 10
    for minute in range(10):
        clock.advance(minutes=1)
        part = clients[minute * tenth : (minute + 1) * tenth]
        for start in range(0, len(part), BATCH):
            outcomes = [
                Outcome(c, MessageStatus.FAILED if n % 5 == 0 else MessageStatus.SENT)
                for n, c in enumerate(part[start : start + BATCH], start)
            ]
            assert messages.finish(mailing_id, outcomes, clock(), grid)
    return mailing_id


@pytest.fixture
def keys_asked(dynamodb_reads: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many items each DynamoDB GetItem or BatchGetItem asked for (a read unit each, found
    or not, for items under 4 KB read consistently)."""
    import botocore.client

    counted = botocore.client.BaseClient._make_api_call
    asked: list[int] = []

    def asking(client: Any, operation: str, params: dict) -> Any:
        if operation == "GetItem":
            asked.append(1)
        elif operation == "BatchGetItem":
            asked.append(sum(len(t["Keys"]) for t in params["RequestItems"].values()))
        return counted(client, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", asking)
    return asked


def read_timeline(api: Any, reads: Any, asked: list[int], mailing_id: str) -> tuple[dict, Any]:
    """When the operator opens the mailing's timeline: what it said, and what it read (the
    requests, the items read, and `keys`: the items asked for by key)."""
    reads.requests.clear()
    reads.items = 0
    asked.clear()
    response = api.get(f"/mailings/{mailing_id}/timeline")
    assert response.status_code == 200, response.body
    cost = stats_cost.Reads()
    cost.requests.update(reads.requests)
    cost.items = reads.items
    cost.requests["keys"] = sum(asked)
    return body(response), cost


def test_the_timeline_reads_the_same_with_50_or_2000_messages(
    api, services, clock, dynamodb_reads, keys_asked
):
    """Given two mailings alike but for their size, 50 and 2,000 messages, each created at its
    start and finished over ten minutes, when their timelines are read, then each makes the
    same DynamoDB requests and reads the same items, and shows its own counts."""
    start = clock()
    small = with_messages(api, services, clock, 50)
    clock.now = start
    large = with_messages(api, services, clock, 2000)

    small_timeline, small_cost = read_timeline(api, dynamodb_reads, keys_asked, small)
    large_timeline, large_cost = read_timeline(api, dynamodb_reads, keys_asked, large)

    assert large_cost.requests == small_cost.requests
    assert large_cost.items == small_cost.items
    # One read of the mailing, one BatchGetItem of its timeline's parts so far: never a
    # message record (and never more than 1 + 16 items asked for)
    assert large_cost.requests == {"GetItem": 1, "BatchGetItem": 1, "keys": 2}
    for size, timeline in ((50, small_timeline), (2000, large_timeline)):
        stats = body(api.get(f"/mailings/{timeline['mailing_id']}/stats"))["stats"]
        assert timeline["points"][0]["stats"]["pending"] == size
        assert timeline["points"][-1]["stats"] == stats
        assert stats["failed"] == size // 5
        assert timeline["truncated"] is False

    # Beside it, what the same mailings cost read as before (rebuilt from the message records,
    # as a mailing stored before timelines still is): it grows with the messages
    Record = services.models.Mailing
    for mailing_id in (small, large):
        Record(mailing_id).update(actions=[Record.timeline_step.remove()])
    _, small_before = read_timeline(api, dynamodb_reads, keys_asked, small)
    _, large_before = read_timeline(api, dynamodb_reads, keys_asked, large)
    print(
        "\nDynamoDB reads of the timeline with 50 and with 2,000 messages:"
        f"\n  kept in buckets: {dict(small_cost.requests)}, {small_cost.items} items; "
        f"{dict(large_cost.requests)}, {large_cost.items} items"
        f"\n  rebuilt from the records: {dict(small_before.requests)}, {small_before.items} "
        f"items; {dict(large_before.requests)}, {large_before.items} items"
    )
    assert large_before.items - small_before.items == 2000 - 50


def total(stats: dict) -> int:
    return sum(n for status, n in stats.items() if status != "total")


def part_keys_stored(services: Any, mailing_id: str) -> list[str]:
    """The parts of the mailing's timeline that are in the mailings table."""
    import boto3

    table = services.models.Mailing.Meta.table_name
    client = boto3.client("dynamodb", region_name=services.settings.aws_region)
    keys = [timeline_part_key(mailing_id, part) for part in range(16)]
    return [
        key
        for key in keys
        if "Item" in client.get_item(TableName=table, Key={"mailing_id": {"S": key}})
    ]


def test_the_timeline_follows_the_counters_through_failures_and_a_retry(
    api, pipeline, clock, gateway
):
    # Given a mailing of six clients, two of whom the gateway rejects at first
    for n in range(6):
        add_client(api, f"7916{n:06d}" + ("7" if n < 2 else "0"))
    gateway.set_profile(FaultProfile(reject_phone_suffixes=("7",)))
    mailing = create_mailing(api, clock, end=timedelta(hours=2))
    pipeline.tick()
    pipeline.kicks()
    pipeline.settle()
    # And their messages go again ten minutes later, when the gateway takes them
    clock.advance(minutes=10)
    gateway.set_profile(FaultProfile())
    assert api.post(f"/mailings/{mailing['id']}/retry-failed").status_code == 200
    pipeline.settle()

    # When the operator opens its timeline
    points = body(api.get(f"/mailings/{mailing['id']}/timeline"))["points"]

    # Then it shows the two failures, then everything sent, as the counters say
    stats = body(api.get(f"/mailings/{mailing['id']}/stats"))["stats"]
    assert stats["sent"] == 6
    assert points[-1]["stats"] == stats
    assert any(p["stats"]["failed"] == 2 and p["stats"]["sent"] == 4 for p in points)
    # And at every moment each of the six messages is counted once
    assert all(total(p["stats"]) == 6 for p in points)


def test_deleting_a_mailing_removes_its_timeline(api, pipeline, services, clock):
    # Given a finished mailing and a running one, each with a timeline
    add_client(api, "79160000001")
    finished = create_mailing(api, clock, end=timedelta(hours=2))
    pipeline.tick()
    pipeline.kicks()
    pipeline.settle()
    assert body(api.get(f"/mailings/{finished['id']}"))["status"] == "finished"
    running = create_mailing(api, clock, end=timedelta(hours=2))
    pipeline.tick()
    pipeline.kicks()
    assert body(api.get(f"/mailings/{running['id']}"))["status"] == "running"
    for mailing in (finished, running):
        assert part_keys_stored(services, mailing["id"])

    # When both are deleted
    for mailing in (finished, running):
        assert api.delete(f"/mailings/{mailing['id']}").status_code == 204

    # Then no part of their timelines is left
    for mailing in (finished, running):
        assert part_keys_stored(services, mailing["id"]) == []


def test_a_mailing_stored_before_timelines_is_shown_from_its_message_records(
    api, pipeline, services, clock
):
    # Given a mailing stored as before timelines were kept (no bucket width), then sent
    for n in range(3):
        add_client(api, f"791600000{n:02d}")
    mailing = create_mailing(api, clock, end=timedelta(hours=2))
    Record = services.models.Mailing
    Record(mailing["id"]).update(actions=[Record.timeline_step.remove()])
    pipeline.tick()
    pipeline.kicks()
    pipeline.settle()

    # When its timeline is read
    timeline = body(api.get(f"/mailings/{mailing['id']}/timeline"))

    # Then it is rebuilt from the message records, up to the counts of the end
    stats = body(api.get(f"/mailings/{mailing['id']}/stats"))["stats"]
    assert timeline["points"][0]["stats"]["pending"] == 3
    assert timeline["points"][-1]["stats"] == stats == {**stats, "sent": 3}
    assert timeline["truncated"] is False
    # And no timeline was kept for it
    assert part_keys_stored(services, mailing["id"]) == []


def test_keeping_the_timeline_adds_one_small_item_to_each_counter_transaction_and_no_request(
    api, pipeline, services, clock, monkeypatch
):
    """Given 100 clients, when a mailing is fanned out and delivered, then every transaction
    that moves its counters carries exactly one timeline part, no other request touches a
    part, and a part stays under 1 KB (one write unit, two in a transaction)."""
    import boto3
    import botocore.client

    for n in range(100):
        add_client(api, f"79161{n:06d}")
    original = botocore.client.BaseClient._make_api_call
    writes: list[tuple[str, list[str]]] = []  # (operation, the mailings-table keys it wrote)

    def recording(client: Any, operation: str, params: dict) -> Any:
        if client.meta.service_model.service_name == "dynamodb":
            items = [next(iter(i.values())) for i in params.get("TransactItems", [])]
            keys = [i["Key"]["mailing_id"]["S"] for i in items if "mailing_id" in i.get("Key", {})]
            keys += (
                [params["Key"]["mailing_id"]["S"]] if "mailing_id" in params.get("Key", {}) else []
            )
            writes.append((operation, keys))
        return original(client, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", recording)
    mailing = create_mailing(api, clock, end=timedelta(hours=2))
    pipeline.tick()
    pipeline.kicks()
    pipeline.settle()
    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", original)

    parts = [k for _, keys in writes for k in keys if k.startswith("#timeline#")]
    moving = [
        keys
        for operation, keys in writes
        if operation == "TransactWriteItems" and mailing["id"] in keys
    ]
    counted = [keys for keys in moving if any(k.startswith("#timeline#") for k in keys)]
    assert all(
        op == "TransactWriteItems"
        for op, keys in writes
        if any(k.startswith("#timeline#") for k in keys)
    )
    print(
        f"\nTimeline parts written for 100 messages: {len(parts)} items in {len(moving)} "
        f"transactions that touch the mailing ({len(parts) / 100:.3f} per message, "
        f"{2 * len(parts) / 100:.3f} write units per message)"
    )
    # Every counter transaction (fan-out page, outcomes) has its part; the finish (which
    # settles, moving no counter) has none
    assert len(counted) == len(parts)
    assert len(moving) - len(counted) <= 1
    table = services.models.Mailing.Meta.table_name
    client = boto3.client("dynamodb", region_name=services.settings.aws_region)
    for key in set(parts):
        item = client.get_item(TableName=table, Key={"mailing_id": {"S": key}})["Item"]
        size = sum(len(name) + len(next(iter(value.values()))) for name, value in item.items())
        assert size < 1024
