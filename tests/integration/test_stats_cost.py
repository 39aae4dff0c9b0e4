"""What the statistics cost: GET /stats, GET /metrics and the daily report read the same with
10 or with 500 finished mailings in storage (the all-time totals item and the open mailings,
never every mailing), and their figures stay right as mailings finish, run again and go."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chalicelib.domain import AudienceFilter
from chalicelib.domain.mailing import Mailing, MailingStatus, MessageCounts, Schedule
from chalicelib.storage.mailings import DynamoMailingRepository
from chalicelib.storage.models import connection_for
from devstack.gateway import FaultProfile
from tests.integration import test_delivery as delivery
from tests.support.reads import Reads, record_reads

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

OWNER = "scheduler-test"


@pytest.fixture
def dynamodb_reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    return record_reads(monkeypatch)


@pytest.fixture
def repository(services: Any) -> DynamoMailingRepository:
    return DynamoMailingRepository(services.models, connection_for(services.settings))


def add_mailing(repository, clock, *, ago: timedelta, length: timedelta) -> Mailing:
    """Given: a mailing that started `ago` and runs `length`, stored as the API stores it."""
    start = clock() - ago
    mailing = Mailing(
        id=str(uuid.uuid4()),
        text="Hello",
        start_at=start,
        end_at=start + length,
        audience=AudienceFilter(),
        send_window=None,
        status=MailingStatus.SCHEDULED,
        counts=MessageCounts(),
        created_at=start - timedelta(hours=1),
        updated_at=start - timedelta(hours=1),
        schedule=Schedule(due=True),
    )
    repository.add(mailing)
    return mailing


def run(services, repository, clock, mailing: Mailing, **counts: int) -> None:
    """The scheduler starts it, and its messages end in `counts` (the counters as the senders
    leave them)."""
    repository.take_lease(
        mailing.id,
        OWNER,
        clock(),
        clock() + timedelta(minutes=5),
        current=MailingStatus.SCHEDULED,
        start=MailingStatus.RUNNING,
    )
    Record = services.models.Mailing
    Record(mailing.id).update(
        actions=[getattr(Record, f"count_{status}").add(n) for status, n in counts.items()]
    )


def finished_long_ago(services, repository, clock, count: int) -> None:
    """Given: `count` mailings that ran and finished days ago (3 sent, 1 failed each)."""
    for _ in range(count):
        mailing = add_mailing(repository, clock, ago=timedelta(days=5), length=timedelta(hours=2))
        run(services, repository, clock, mailing, sent=3, failed=1)
        repository.finish(mailing.id, OWNER, MailingStatus.FINISHED)


def recent_activity(services, repository, clock) -> None:
    """Given: what every stage has beside its history: a mailing running now, one scheduled,
    one finished within the report's window."""
    running = add_mailing(repository, clock, ago=timedelta(hours=1), length=timedelta(hours=5))
    run(services, repository, clock, running, sent=2, pending=5)
    add_mailing(repository, clock, ago=-timedelta(hours=3), length=timedelta(hours=1))
    today = add_mailing(repository, clock, ago=timedelta(hours=6), length=timedelta(hours=2))
    run(services, repository, clock, today, sent=4, expired=1)
    repository.finish(today.id, OWNER, MailingStatus.FINISHED)


def gauges(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def read_statistics(api, services, reads: Reads) -> tuple[Reads, dict, dict, Any]:
    """When /stats, /metrics and the daily report are read: what each cost, and what they said."""
    costs = Reads()
    reads.requests.clear()
    reads.items = 0
    stats = api.get("/stats?limit=5").json
    metrics = gauges(api.get("/metrics").body.decode())
    report = services.reports.build()
    costs.requests.update(reads.requests)
    costs.items = reads.items
    return costs, stats, metrics, report


def test_statistics_read_the_same_with_10_or_500_mailings_in_history(
    api, services, clock, repository, dynamodb_reads
):
    """Given 10 mailings finished days ago beside a running, a scheduled and a mailing finished
    today, when 490 more join the history, then /stats, /metrics and the daily report make the
    same DynamoDB requests and read the same number of items, and their totals count all 500."""
    recent_activity(services, repository, clock)
    finished_long_ago(services, repository, clock, 10)
    with_10, stats_10, metrics_10, report_10 = read_statistics(api, services, dynamodb_reads)

    finished_long_ago(services, repository, clock, 490)
    with_500, stats_500, metrics_500, report_500 = read_statistics(api, services, dynamodb_reads)

    print(
        f"\nDynamoDB reads with 10 and with 500 mailings: {dict(with_10.requests)}, "
        f"{with_10.items} items; {dict(with_500.requests)}, {with_500.items} items"
    )
    assert with_500.requests == with_10.requests
    assert with_500.items == with_10.items
    # ... and the figures are the whole history's.
    assert stats_10["mailings"] == 13
    assert stats_500["mailings"] == 503
    assert stats_500["messages"] == {
        "total": 500 * 4 + 7 + 5,
        "pending": 5,
        "sent": 500 * 3 + 2 + 4,
        "failed": 500,
        "expired": 1,
        "cancelled": 0,
        "skipped": 0,
    }
    assert metrics_500[("sms_mailings", (("status", "finished"),))] == 501
    assert metrics_500[("sms_mailings", (("status", "running"),))] == 1
    assert metrics_500[("sms_mailings", (("status", "scheduled"),))] == 1
    assert metrics_500[("sms_messages", (("status", "sent"),))] == 500 * 3 + 6
    assert metrics_10[("sms_messages", (("status", "sent"),))] == 10 * 3 + 6
    # The report lists the mailings active in its window only, as before.
    assert [row.counts for row in report_500.rows] == [row.counts for row in report_10.rows]
    assert sorted(row.status for row in report_500.rows) == ["finished", "running"]


def test_a_finished_mailing_counts_once_however_often_its_finish_is_written(
    services, clock, repository
):
    """Given a finished mailing, when its finish is written again (a retried request), then
    the totals hold its messages once."""
    mailing = add_mailing(repository, clock, ago=timedelta(hours=1), length=timedelta(hours=1))
    run(services, repository, clock, mailing, sent=3)
    repository.finish(mailing.id, OWNER, MailingStatus.FINISHED)
    repository.finish(mailing.id, OWNER, MailingStatus.FINISHED)

    overall = services.mailings.statistics()

    assert overall.counts == MessageCounts(sent=3)
    assert overall.mailings[MailingStatus.FINISHED] == 1
    assert overall.unsettled == []


def test_a_mailing_run_again_and_finished_again_changes_the_totals_by_its_difference(
    api, pipeline, clock, gateway
):
    """Given a finished mailing whose 3 messages to numbers ending in 7 failed, when
    retry-failed runs it again and they are sent, then /stats counts its messages once at
    every step, as its records are."""
    for n in range(10):
        add_client(api, f"791600000{n}7" if n < 3 else f"791600000{n}0")
    gateway.set_profile(FaultProfile(reject_phone_suffixes=("7",)))
    mailing = create_mailing(api, clock, end=timedelta(hours=2))
    pipeline.settle()
    finished = api.get("/stats").json

    gateway.set_profile(FaultProfile())
    assert api.post(f"/mailings/{mailing['id']}/retry-failed").status_code == 200
    reopened = api.get("/stats").json
    pipeline.settle()
    again = api.get("/stats").json

    assert pipeline.mailing_status(mailing["id"]) == "finished"
    assert (finished["mailings"], reopened["mailings"], again["mailings"]) == (1, 1, 1)
    assert (finished["messages"]["sent"], finished["messages"]["failed"]) == (7, 3)
    assert (reopened["messages"]["sent"], reopened["messages"]["pending"]) == (7, 3)
    assert reopened["messages"]["failed"] == 0
    assert again["messages"]["sent"] == again["messages"]["total"] == 10
    assert dict(pipeline.statuses(mailing["id"])) == {"sent": 10}


def test_deleting_or_cancelling_mailings_keeps_the_totals_equal_to_what_is_stored(
    api, services, clock, repository
):
    """Given a finished mailing and a scheduled one, when the scheduled one is cancelled and
    the finished one deleted, then /stats and /metrics count only what is left."""
    finished = add_mailing(repository, clock, ago=timedelta(hours=2), length=timedelta(hours=1))
    run(services, repository, clock, finished, sent=5)
    repository.finish(finished.id, OWNER, MailingStatus.FINISHED)
    scheduled = api.post(
        "/mailings",
        {
            "text": "Later",
            "start_at": (clock() + timedelta(days=1)).isoformat(),
            "end_at": (clock() + timedelta(days=2)).isoformat(),
        },
    ).json

    assert api.post(f"/mailings/{scheduled['id']}/cancel").status_code == 200
    cancelled = services.mailings.statistics()
    assert api.delete(f"/mailings/{finished.id}").status_code == 204
    overall = api.get("/stats").json
    metrics = gauges(api.get("/metrics").body.decode())

    assert cancelled.mailings[MailingStatus.CANCELLED] == 1
    assert cancelled.counts == MessageCounts(sent=5)
    assert overall["mailings"] == 1
    assert overall["messages"]["total"] == 0
    assert metrics[("sms_mailings", (("status", "cancelled"),))] == 1
    assert metrics[("sms_mailings", (("status", "finished"),))] == 0


def test_mailings_finished_before_the_totals_existed_are_added_once_by_the_backfill(
    api, services, clock, repository
):
    """Given mailings that finished before the totals item existed (settled by the old write,
    with no settle mark), when the backfill runs, twice, then /stats counts each once."""
    Record = services.models.Mailing
    for sent in (2, 3):
        mailing = add_mailing(repository, clock, ago=timedelta(days=3), length=timedelta(hours=1))
        run(services, repository, clock, mailing, sent=sent)
        # The finish as it was written before: status and off the due index, nothing else.
        Record(mailing.id).update(actions=[Record.status.set("finished"), Record.due_key.remove()])
    before = api.get("/stats").json

    first, second = repository.backfill_totals(), repository.backfill_totals()
    after = api.get("/stats").json

    assert before["mailings"] == 0  # what the stage shows until the backfill runs
    assert (first, second) == (2, 0)
    assert after["mailings"] == 2
    assert after["messages"]["sent"] == 5
