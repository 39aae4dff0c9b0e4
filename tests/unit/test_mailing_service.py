"""The mailing service's lifecycle over the in-memory repository: no emulator needed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from chalicelib.domain import AudienceFilter, MailingStatus, SendWindow
from chalicelib.errors import Conflict, NotFound
from chalicelib.services.mailings import MailingFields, MailingService
from tests.support.memory.mailings import MemoryMailingRepository

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


class Kicks:
    """The fan-out queue as the service sees it: it records the kicks."""

    can_kick = True

    def __init__(self) -> None:
        self.sent: list[tuple[list[str], int]] = []

    def kick(self, mailing_ids: list[str], delay_seconds: int = 0) -> None:
        self.sent.append((list(mailing_ids), delay_seconds))


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def kicks() -> Kicks:
    return Kicks()


@pytest.fixture
def repository() -> MemoryMailingRepository:
    return MemoryMailingRepository()


@pytest.fixture
def service(repository: MemoryMailingRepository, clock: Clock, kicks: Kicks) -> MailingService:
    # The messages' store is not used by these lifecycle calls.
    messages: Any = None
    queues: Any = kicks
    return MailingService(clock, queues, messages, 10, mailings=repository)


def fields(start_in: timedelta = timedelta(hours=1), **changes: Any) -> MailingFields:
    values: dict[str, Any] = {
        "text": "Hello",
        "start_at": NOW + start_in,
        "end_at": NOW + timedelta(days=1),
        "audience": AudienceFilter(tags=("vip",)),
        "send_window": SendWindow.from_minutes(9 * 60, 21 * 60),
    }
    return MailingFields(**{**values, **changes})


def test_a_new_mailing_is_scheduled_and_due(service, repository):
    # When a mailing is created
    mailing = service.create(fields())

    # Then it is stored scheduled, on the scheduler's due list
    stored = repository.get(mailing.id)
    assert stored.status is MailingStatus.SCHEDULED
    assert stored.schedule.due
    assert stored == mailing


def test_a_mailing_starting_within_minutes_kicks_the_scheduler_at_its_start(service, kicks):
    # When a mailing starting in two minutes is created
    mailing = service.create(fields(start_in=timedelta(minutes=2)))

    # Then the scheduler is asked to start it then, not at its next tick
    assert kicks.sent == [([mailing.id], 120)]


def test_pause_then_resume_before_the_start_leaves_it_scheduled(service):
    # Given a scheduled mailing
    mailing = service.create(fields())

    # When it is paused, twice, then resumed before its start
    service.pause(mailing.id)
    paused = service.pause(mailing.id)
    resumed = service.resume(mailing.id)

    # Then the second pause changed nothing, and it is scheduled again
    assert paused.status is MailingStatus.PAUSED
    assert resumed.status is MailingStatus.SCHEDULED


def test_resume_after_the_start_runs_it_and_kicks_the_fan_out_now(service, clock, kicks):
    # Given a mailing paused before its start
    mailing = service.create(fields())
    service.pause(mailing.id)

    # When it is resumed after its start
    clock.now = NOW + timedelta(hours=2)
    resumed = service.resume(mailing.id)

    # Then it runs and its fan-out continues at once
    assert resumed.status is MailingStatus.RUNNING
    assert kicks.sent[-1] == ([mailing.id], 0)


def test_a_mailing_cancelled_before_its_start_leaves_the_due_list(service, repository):
    # Given a scheduled mailing
    mailing = service.create(fields())

    # When it is cancelled, twice
    service.cancel(mailing.id)
    cancelled = service.cancel(mailing.id)

    # Then it is cancelled and the scheduler never needs it again
    assert cancelled.status is MailingStatus.CANCELLED
    assert not repository.get(mailing.id).schedule.due


def test_a_cancelled_mailing_can_no_longer_change(service):
    # Given a cancelled mailing
    mailing = service.create(fields())
    service.cancel(mailing.id)

    # When its text is edited, or it is paused or resumed
    # Then each is refused as a conflict saying why
    with pytest.raises(Conflict, match="is cancelled; it can no longer change"):
        service.update(mailing.id, {"text": "Bye"})
    with pytest.raises(Conflict, match="is cancelled; there is nothing to pause"):
        service.pause(mailing.id)
    with pytest.raises(Conflict, match="is cancelled, not paused"):
        service.resume(mailing.id)


def test_a_running_mailing_keeps_its_start_and_audience(service, repository, clock):
    # Given a mailing the scheduler started
    mailing = service.create(fields(start_in=timedelta(minutes=30)))
    clock.now = NOW + timedelta(hours=1)
    repository.take_lease(
        mailing.id,
        "worker",
        clock.now,
        clock.now + timedelta(minutes=5),
        current=MailingStatus.SCHEDULED,
        start=MailingStatus.RUNNING,
    )

    # When its audience is changed
    # Then it is refused, naming the frozen field
    with pytest.raises(Conflict, match="filter can no longer change") as refused:
        service.update(mailing.id, {"audience": AudienceFilter(tags=("new",))})
    assert refused.value.details[0]["field"] == "body.filter"

    # And its text still can change
    assert service.update(mailing.id, {"text": "Bye"}).text == "Bye"


def test_an_unknown_or_malformed_id_is_not_found(service):
    # When a mailing that does not exist is read, by a well-formed id or not
    # Then it is not found
    with pytest.raises(NotFound):
        service.get("0b9a3c9e-2f8f-4a43-9d8e-3d1c1f1b2a10")
    with pytest.raises(NotFound):
        service.get("not-an-id")


def test_the_timelines_bucket_width_follows_the_dates_until_sending_starts(
    service, repository, clock
):
    # Given a mailing of a day (fields() start in an hour, end a day from now)
    mailing = service.create(fields())
    assert mailing.timeline_step == 600  # 23 hours over 200 buckets: ten minutes

    # When its end is brought to two hours from now before it starts
    edited = service.update(mailing.id, {"end_at": NOW + timedelta(hours=2)})

    # Then its buckets follow: an hour over 200 buckets, thirty seconds
    assert edited.timeline_step == 30

    # And once the scheduler started it, a later end keeps the buckets its messages are in
    clock.now = NOW + timedelta(hours=1, minutes=5)
    repository.take_lease(
        mailing.id,
        "worker",
        clock.now,
        clock.now + timedelta(minutes=5),
        current=MailingStatus.SCHEDULED,
        start=MailingStatus.RUNNING,
    )
    extended = service.update(mailing.id, {"end_at": NOW + timedelta(days=2)})
    assert extended.timeline_step == 30
    assert repository.get(mailing.id).timeline_step == 30
