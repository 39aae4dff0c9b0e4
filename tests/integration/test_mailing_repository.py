"""The mailing repository's contract, run against DynamoDB (in-process moto) and in memory."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from chalicelib.domain import AudienceFilter, SendWindow
from chalicelib.domain.mailing import (
    Mailing,
    MailingChanged,
    MailingNotFound,
    MailingStatus,
    Message,
    MessageCounts,
    MessagesExist,
    MessageStatus,
    Schedule,
)
from chalicelib.domain.timeline import grid_of
from chalicelib.storage.mailings import MailingRepository
from tests.support.memory.mailings import MemoryMailingRepository

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=1)


@pytest.fixture(params=["dynamodb", "memory"])
def mailings(request: pytest.FixtureRequest) -> Iterator[MailingRepository]:
    if request.param == "memory":
        yield MemoryMailingRepository()
        return
    request.getfixturevalue("aws")
    settings = request.getfixturevalue("settings")
    from pynamodb.connection import Connection

    from chalicelib.storage.mailings import DynamoMailingRepository
    from chalicelib.storage.models import build_models, create_tables

    models = build_models(settings)
    create_tables(models)
    yield DynamoMailingRepository(models, Connection(region=settings.aws_region))


def a_mailing(**changes: Any) -> Mailing:
    mailing = Mailing(
        id=str(uuid.uuid4()),
        text="Hello {name}",
        start_at=NOW + timedelta(hours=1),
        end_at=NOW + timedelta(days=1),
        audience=AudienceFilter(operator_codes=("900",), tags=("vip",)),
        send_window=SendWindow.from_minutes(9 * 60, 21 * 60),
        status=MailingStatus.SCHEDULED,
        counts=MessageCounts(),
        created_at=NOW,
        updated_at=NOW,
        schedule=Schedule(due=True),
    )
    return replace(mailing, **changes)


def a_message(mailing: Mailing, client_id: str, message_id: int) -> Message:
    return Message(
        id=message_id,
        mailing_id=mailing.id,
        client_id=client_id,
        phone="+79000000000",
        status=MessageStatus.PENDING,
        created_at=NOW,
        sent_at=None,
        attempts=0,
        last_error=None,
    )


def leased(mailings: MailingRepository, mailing: Mailing, owner: str = "worker-1") -> Mailing:
    return mailings.take_lease(
        mailing.id,
        owner,
        NOW,
        NOW + timedelta(minutes=5),
        current=mailing.status,
        start=MailingStatus.RUNNING if mailing.status is MailingStatus.SCHEDULED else None,
    )


# ---------------------------------------------------------------- storing and reading


def test_a_stored_mailing_reads_back_as_it_was_given(mailings):
    # Given a new mailing
    mailing = a_mailing()

    # When it is stored
    mailings.add(mailing)

    # Then it reads back equal, its audience, window and bookkeeping included
    assert mailings.get(mailing.id) == mailing


def test_a_mailing_without_a_send_window_or_filter_reads_back_without_them(mailings):
    # Given a mailing to everyone at any hour
    mailing = a_mailing(send_window=None, audience=AudienceFilter())

    # When it is stored and read
    mailings.add(mailing)

    # Then it has neither a window nor a filter
    stored = mailings.get(mailing.id)
    assert stored.send_window is None
    assert stored.audience == AudienceFilter()


def test_an_id_taken_already_is_refused(mailings):
    # Given a stored mailing
    mailing = a_mailing()
    mailings.add(mailing)

    # When another is added with its id
    # Then the write is refused and the first stays
    with pytest.raises(MailingChanged):
        mailings.add(replace(mailing, text="other"))
    assert mailings.get(mailing.id).text == mailing.text


def test_an_unknown_mailing_is_not_found(mailings):
    # Given no mailing with this id
    missing = str(uuid.uuid4())

    # When it is read
    # Then it is not found, saying which
    with pytest.raises(MailingNotFound) as error:
        mailings.get(missing)
    assert missing in error.value.message


def test_many_mailings_read_in_the_order_asked_without_the_missing_ones(mailings):
    # Given three stored mailings
    stored = [a_mailing() for _ in range(3)]
    for mailing in stored:
        mailings.add(mailing)

    # When they are read in another order, with an unknown id among them
    ids = [stored[2].id, str(uuid.uuid4()), stored[0].id]
    found = mailings.get_many(ids)

    # Then they come in that order, the unknown one left out
    assert [m.id for m in found] == [stored[2].id, stored[0].id]
    assert mailings.counts(ids) == [MessageCounts(), MessageCounts()]


def test_listing_pages_go_newest_first_and_end(mailings):
    # Given five mailings created a minute apart
    created = [a_mailing(created_at=NOW + timedelta(minutes=n)) for n in range(5)]
    for mailing in created:
        mailings.add(mailing)

    # When they are listed two at a time
    seen, cursor = [], None
    while True:
        page = mailings.page(limit=2, cursor=cursor)
        seen += [m.id for m in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break

    # Then every mailing comes once, newest first
    newest_first = [m.id for m in reversed(created)]
    assert seen == newest_first
    assert mailings.ids() == newest_first


def test_only_mailings_whose_start_has_come_are_due(mailings):
    # Given a mailing starting now and one starting in an hour
    now_one = a_mailing(start_at=NOW)
    later_one = a_mailing(start_at=NOW + timedelta(hours=1))
    mailings.add(now_one)
    mailings.add(later_one)

    # When the due mailings are asked for now
    # Then only the one whose start has come is due
    assert mailings.due_ids(NOW) == [now_one.id]
    assert mailings.due_ids(NOW + timedelta(hours=2), limit=1) == [now_one.id]


# ---------------------------------------------------------------- a caller's writes


def test_fields_are_saved_only_if_nobody_changed_the_mailing_meanwhile(mailings):
    # Given a stored mailing
    mailing = a_mailing()
    mailings.add(mailing)

    # When its text and window change, based on what was read
    edited = replace(mailing, text="Bye", send_window=None, updated_at=LATER)
    saved = mailings.save_fields(edited, before=mailing.updated_at)

    # Then the change is stored
    assert saved.text == "Bye"
    assert saved.send_window is None
    assert mailings.get(mailing.id) == saved

    # And a second edit based on the old read is refused
    with pytest.raises(MailingChanged):
        mailings.save_fields(replace(edited, text="stale"), before=mailing.updated_at)
    assert mailings.get(mailing.id).text == "Bye"


def test_a_status_moves_only_from_the_status_it_is_in(mailings):
    # Given a scheduled mailing
    mailing = a_mailing()
    mailings.add(mailing)

    # When it is paused
    paused = mailings.set_status(mailing.id, MailingStatus.SCHEDULED, MailingStatus.PAUSED, LATER)

    # Then it is paused, changed at that time, and still due
    assert paused.status is MailingStatus.PAUSED
    assert paused.updated_at == LATER
    assert paused.schedule.due

    # And a move that expects it still scheduled is refused
    with pytest.raises(MailingChanged):
        mailings.set_status(mailing.id, MailingStatus.SCHEDULED, MailingStatus.CANCELLED, LATER)


def test_a_mailing_cancelled_before_its_start_leaves_the_due_list(mailings):
    # Given a scheduled mailing whose start has come
    mailing = a_mailing(start_at=NOW)
    mailings.add(mailing)

    # When it is cancelled off the due list
    mailings.set_status(
        mailing.id, MailingStatus.SCHEDULED, MailingStatus.CANCELLED, LATER, off_due=True
    )

    # Then the scheduler no longer sees it
    assert mailings.due_ids(LATER) == []
    assert not mailings.get(mailing.id).schedule.due


def test_a_status_change_of_a_missing_mailing_is_refused(mailings):
    # Given no mailing with this id
    # When its status is moved
    # Then the write is refused (nothing is created)
    missing = str(uuid.uuid4())
    with pytest.raises(MailingChanged):
        mailings.set_status(missing, MailingStatus.RUNNING, MailingStatus.PAUSED, NOW)
    with pytest.raises(MailingNotFound):
        mailings.get(missing)


def test_a_deleted_mailing_is_gone(mailings):
    # Given a stored mailing
    mailing = a_mailing()
    mailings.add(mailing)

    # When it is deleted
    mailings.delete(mailing.id)

    # Then it is not found
    with pytest.raises(MailingNotFound):
        mailings.get(mailing.id)


# ---------------------------------------------------------------- the scheduler's writes


def test_one_worker_at_a_time_holds_the_lease(mailings):
    # Given a due scheduled mailing
    mailing = a_mailing(start_at=NOW)
    mailings.add(mailing)

    # When a worker takes its lease, starting it
    started = leased(mailings, mailing, "worker-1")

    # Then it is running, and a second worker cannot take the lease
    assert started.status is MailingStatus.RUNNING
    with pytest.raises(MailingChanged):
        mailings.take_lease(
            mailing.id, "worker-2", NOW, LATER, current=MailingStatus.RUNNING, start=None
        )

    # And once the first gives it back, the second can
    mailings.release_lease(mailing.id, "worker-1")
    mailings.take_lease(mailing.id, "worker-2", NOW, LATER, current=started.status, start=None)


def test_an_expired_lease_can_be_taken_over(mailings):
    # Given a mailing whose lease ran out
    mailing = a_mailing(start_at=NOW)
    mailings.add(mailing)
    leased(mailings, mailing, "worker-1")

    # When another worker takes it after the lease's end
    after_end = NOW + timedelta(minutes=6)
    taken = mailings.take_lease(
        mailing.id,
        "worker-2",
        after_end,
        after_end + timedelta(minutes=5),
        current=MailingStatus.RUNNING,
        start=None,
    )

    # Then it holds the lease, and the first worker can no longer give it back
    assert taken.status is MailingStatus.RUNNING
    with pytest.raises(MailingChanged):
        mailings.release_lease(mailing.id, "worker-1")


def test_a_start_loses_to_a_pause_that_landed_first(mailings):
    # Given a scheduled mailing paused after the scheduler read it
    mailing = a_mailing(start_at=NOW)
    mailings.add(mailing)
    mailings.set_status(mailing.id, MailingStatus.SCHEDULED, MailingStatus.PAUSED, NOW)

    # When the scheduler starts it, expecting it scheduled
    # Then the lease is refused and it stays paused
    with pytest.raises(MailingChanged):
        leased(mailings, mailing)
    assert mailings.get(mailing.id).status is MailingStatus.PAUSED


def test_fan_out_pages_commit_in_order_with_their_checkpoint(mailings):
    # Given a running mailing whose lease worker-1 holds
    mailing = a_mailing(start_at=NOW)
    mailings.add(mailing)
    leased(mailings, mailing)
    first = mailings.reserve_message_ids(2)

    # When two pages are committed, each from the previous checkpoint
    commit = mailings.commit_fan_out_page
    page_one = [a_message(mailing, "c1", first), a_message(mailing, "c2", first + 1)]
    commit(
        mailing.id,
        "worker-1",
        cursor=None,
        next_cursor="p2",
        messages=page_one,
        expires_at=NOW + timedelta(days=30),
        lease_until=LATER,
        token=uuid.uuid4().hex,
    )
    commit(
        mailing.id,
        "worker-1",
        cursor="p2",
        next_cursor=None,
        messages=[a_message(mailing, "c3", first + 2)],
        expires_at=NOW + timedelta(days=30),
        lease_until=LATER,
        token=uuid.uuid4().hex,
    )

    # Then its pending counter holds every message and the fan-out is done
    stored = mailings.get(mailing.id)
    assert stored.counts.pending == 3
    assert stored.schedule.fanout_done


def test_a_page_from_a_stale_checkpoint_or_without_the_lease_is_refused(mailings):
    # Given a mailing whose first page is committed
    mailing = a_mailing(start_at=NOW)
    mailings.add(mailing)
    leased(mailings, mailing)
    page = dict(expires_at=NOW + timedelta(days=30), lease_until=LATER)
    mailings.commit_fan_out_page(
        mailing.id,
        "worker-1",
        cursor=None,
        next_cursor="p2",
        messages=[a_message(mailing, "c1", 1)],
        token=uuid.uuid4().hex,
        **page,
    )

    # When the same first page is committed again, or by a worker without the lease
    # Then both are refused and the counter is unchanged
    with pytest.raises(MailingChanged):
        mailings.commit_fan_out_page(
            mailing.id,
            "worker-1",
            cursor=None,
            next_cursor="p2",
            messages=[a_message(mailing, "c9", 9)],
            token=uuid.uuid4().hex,
            **page,
        )
    with pytest.raises(MailingChanged):
        mailings.commit_fan_out_page(
            mailing.id,
            "worker-2",
            cursor="p2",
            next_cursor=None,
            messages=[a_message(mailing, "c2", 2)],
            token=uuid.uuid4().hex,
            **page,
        )
    assert mailings.get(mailing.id).counts.pending == 1


def test_a_message_that_exists_is_never_created_twice(mailings):
    # Given a mailing with the message of client c1
    mailing = a_mailing(start_at=NOW)
    mailings.add(mailing)
    leased(mailings, mailing)
    page = dict(expires_at=NOW + timedelta(days=30), lease_until=LATER)
    mailings.commit_fan_out_page(
        mailing.id,
        "worker-1",
        cursor=None,
        next_cursor="p2",
        messages=[a_message(mailing, "c1", 1)],
        token=uuid.uuid4().hex,
        **page,
    )

    # When a page names c1 again
    # Then the whole page is refused, its checkpoint included, naming c1 as the one that has
    # a message already
    with pytest.raises(MessagesExist) as refused:
        mailings.commit_fan_out_page(
            mailing.id,
            "worker-1",
            cursor="p2",
            next_cursor=None,
            messages=[a_message(mailing, "c2", 2), a_message(mailing, "c1", 3)],
            token=uuid.uuid4().hex,
            **page,
        )
    assert refused.value.client_ids == {"c1"}
    stored = mailings.get(mailing.id)
    assert stored.counts.pending == 1
    assert stored.schedule.fanout_cursor == "p2"
    # And the page without c1 is committed
    mailings.commit_fan_out_page(
        mailing.id,
        "worker-1",
        cursor="p2",
        next_cursor=None,
        messages=[a_message(mailing, "c2", 2)],
        token=uuid.uuid4().hex,
        **page,
    )
    stored = mailings.get(mailing.id)
    assert stored.counts.pending == 2
    assert stored.schedule.fanout_done


def test_a_mailing_finishes_only_with_nothing_pending_under_the_lease(mailings):
    # Given a running mailing with one pending message
    mailing = a_mailing(start_at=NOW)
    mailings.add(mailing)
    leased(mailings, mailing)
    mailings.commit_fan_out_page(
        mailing.id,
        "worker-1",
        cursor=None,
        next_cursor=None,
        messages=[a_message(mailing, "c1", 1)],
        expires_at=NOW + timedelta(days=30),
        lease_until=LATER,
        token=uuid.uuid4().hex,
    )

    # When it is finished
    # Then it is refused while a message is pending
    with pytest.raises(MailingChanged):
        mailings.finish(mailing.id, "worker-1", MailingStatus.FINISHED)
    assert mailings.get(mailing.id).status is MailingStatus.RUNNING


def test_a_finished_mailing_leaves_the_due_list(mailings):
    # Given a running mailing with its audience walked and nothing pending
    mailing = a_mailing(start_at=NOW)
    mailings.add(mailing)
    leased(mailings, mailing)
    mailings.close_fan_out(mailing.id, "worker-1")

    # When its lease holder finishes it
    mailings.finish(mailing.id, "worker-1", MailingStatus.FINISHED)

    # Then it is finished and never due again
    stored = mailings.get(mailing.id)
    assert stored.status is MailingStatus.FINISHED
    assert not stored.schedule.due
    assert mailings.due_ids(LATER) == []


def test_message_ids_are_reserved_in_blocks_nobody_shares(mailings):
    # When two blocks of ids are reserved
    first = mailings.reserve_message_ids(10)
    second = mailings.reserve_message_ids(5)

    # Then they follow each other without overlap
    assert second == first + 10


def test_the_reconciler_position_is_kept_under_the_lease(mailings):
    # Given a running mailing whose lease worker-1 holds
    mailing = a_mailing(start_at=NOW)
    mailings.add(mailing)
    leased(mailings, mailing)

    # When a pass stops at message 42, then the mailing is counted quiet again
    at_42 = mailings.save_reconcile_position(mailing.id, "worker-1", 42)
    quiet = mailings.save_quiet(mailing.id, "worker-1", "0:0:0:0:0:0", LATER)

    # Then each is kept, and quiet clears the pass's position
    assert at_42.schedule.reconcile_after == 42
    assert quiet.schedule.quiet_mark == "0:0:0:0:0:0"
    assert quiet.schedule.quiet_since == LATER
    assert quiet.schedule.reconcile_after is None

    # And a worker without the lease cannot write them
    with pytest.raises(MailingChanged):
        mailings.save_reconcile_position(mailing.id, "worker-2", 7)


# ---------------------------------------------------------------- statistics


def test_statistics_count_every_stored_mailing_and_list_only_the_open_ones(mailings):
    # Given a finished mailing, one cancelled before its start, a scheduled one, and a
    # finished one that was deleted
    finished, cancelled, scheduled, deleted = (a_mailing(start_at=NOW) for _ in range(4))
    for mailing in (finished, cancelled, scheduled, deleted):
        mailings.add(mailing)
    for mailing in (finished, deleted):
        leased(mailings, mailing)
        mailings.close_fan_out(mailing.id, "worker-1")
        mailings.finish(mailing.id, "worker-1", MailingStatus.FINISHED)
    mailings.set_status(
        cancelled.id, MailingStatus.SCHEDULED, MailingStatus.CANCELLED, LATER, off_due=True
    )
    mailings.delete(deleted.id)

    # When the statistics are read
    overall = mailings.statistics()

    # Then every stored mailing is counted by its status, and only the open one is listed
    assert overall.mailing_count == 3
    assert {s: n for s, n in overall.mailings.items() if n} == {
        MailingStatus.FINISHED: 1,
        MailingStatus.CANCELLED: 1,
        MailingStatus.SCHEDULED: 1,
    }
    assert [m.id for m in overall.unsettled] == [scheduled.id]


def test_the_mailings_ending_after_a_moment_are_listed_without_the_older_ones(mailings):
    # Given mailings that ended two days ago, end today, and end tomorrow
    old = a_mailing(start_at=NOW - timedelta(days=3), end_at=NOW - timedelta(days=2))
    today = a_mailing(start_at=NOW - timedelta(hours=3), end_at=NOW - timedelta(hours=1))
    tomorrow = a_mailing()
    for mailing in (old, today, tomorrow):
        mailings.add(mailing)

    # When those ending within the last day or later are asked for
    # Then the old one is not among them
    ending = mailings.ending_since(NOW - timedelta(days=1))
    assert [m.id for m in ending] == [today.id, tomorrow.id]


# ---------------------------------------------------------------- timeline


def fanned_out(mailings: MailingRepository, at: datetime, clients: int = 3) -> Mailing:
    """Given: a running mailing (buckets of 30 s from NOW) whose `clients` messages were
    created at `at` in one fan-out page."""
    mailing = a_mailing(start_at=NOW, timeline_step=30)
    mailings.add(mailing)
    leased(mailings, mailing)
    mailings.commit_fan_out_page(
        mailing.id,
        "worker-1",
        cursor=None,
        next_cursor=None,
        messages=[
            replace(a_message(mailing, f"c{n}", n + 1), created_at=at) for n in range(clients)
        ],
        expires_at=NOW + timedelta(days=30),
        lease_until=LATER,
        token=uuid.uuid4().hex,
        timeline=grid_of(mailing),
    )
    return mailing


def test_a_mailings_bucket_width_reads_back_and_an_older_one_has_none(mailings):
    # Given a mailing stored with its timeline's bucket width, and one stored before timelines
    current, older = a_mailing(timeline_step=30), a_mailing()
    mailings.add(current)
    mailings.add(older)

    # Then each reads back as it was stored
    assert mailings.get(current.id).timeline_step == 30
    assert mailings.get(older.id).timeline_step is None
    # And a width given with an edit is saved with it
    edited = replace(older, timeline_step=60, updated_at=LATER)
    assert mailings.save_fields(edited, before=older.updated_at).timeline_step == 60
    assert mailings.get(older.id).timeline_step == 60


def test_a_fan_out_page_adds_its_messages_to_the_timeline_at_their_creation(mailings):
    # Given a mailing whose three messages were created 95 seconds after its start
    created_at = NOW + timedelta(seconds=95)
    mailing = fanned_out(mailings, created_at)

    # When its timeline is read a minute later
    grid = grid_of(mailing)
    assert grid is not None
    activity = mailings.timeline(mailing.id, grid, created_at + timedelta(minutes=1))

    # Then the bucket of their creation (the fourth of 30 s) holds them as pending
    assert activity.buckets == {3: MessageCounts(pending=3)}
    assert activity.last_change == created_at


def test_a_refused_fan_out_page_adds_nothing_to_the_timeline(mailings):
    # Given a mailing whose first page is committed
    mailing = fanned_out(mailings, NOW)
    grid = grid_of(mailing)

    # When a page from a worker without the lease is refused, a minute later
    with pytest.raises(MailingChanged):
        mailings.commit_fan_out_page(
            mailing.id,
            "worker-2",
            cursor=None,
            next_cursor=None,
            messages=[replace(a_message(mailing, "c9", 9), created_at=LATER)],
            expires_at=NOW + timedelta(days=30),
            lease_until=LATER,
            token=uuid.uuid4().hex,
            timeline=grid,
        )

    # Then the timeline holds the first page only
    assert grid is not None
    assert mailings.timeline(mailing.id, grid, LATER).buckets == {0: MessageCounts(pending=3)}


def test_timeline_parts_are_never_listed_counted_or_settled_as_mailings(mailings):
    # Given a mailing with a timeline
    mailing = fanned_out(mailings, NOW)

    # Then the listings, the statistics, the report's mailings and the backfill see the
    # mailing alone
    assert mailings.ids() == [mailing.id]
    assert [m.id for m in mailings.page(limit=50, cursor=None).items] == [mailing.id]
    overall = mailings.statistics()
    assert overall.mailing_count == 1
    assert [m.id for m in overall.unsettled] == [mailing.id]
    assert [m.id for m in mailings.ending_since(NOW)] == [mailing.id]
    assert mailings.backfill_totals() == 0


def test_a_deleted_mailing_takes_its_timeline_with_it(mailings):
    # Given a mailing with a timeline
    mailing = fanned_out(mailings, NOW)
    grid = grid_of(mailing)
    assert grid is not None

    # When it is deleted
    mailings.delete(mailing.id)

    # Then nothing of its timeline is read back
    assert mailings.timeline(mailing.id, grid, LATER).buckets == {}


def test_a_mailings_parts_estimate_and_max_parts_are_kept_and_replaced_by_an_edit(mailings):
    from chalicelib.domain.sms_parts import PartsEstimate

    # Given a mailing stored with its max_parts and its text's parts and cost
    estimate = PartsEstimate("UCS-2", 1, 2, 1_234, True, cost=617.5, currency="RUB")
    mailing = a_mailing(max_parts=3, parts=estimate)
    mailings.add(mailing)
    # Then it reads back with them
    stored = mailings.get(mailing.id)
    assert (stored.max_parts, stored.parts) == (3, estimate)
    # When an edit gives a new estimate and limit
    again = PartsEstimate("GSM-7", 1, 1, 10, False)
    edited = replace(stored, text="Hi", updated_at=LATER, max_parts=1, parts=again)
    mailings.save_fields(edited, before=stored.updated_at)
    # Then the mailing has them, the cost gone with the prices
    assert (mailings.get(mailing.id).max_parts, mailings.get(mailing.id).parts) == (1, again)
    # And an edit by a writer that gives none (an older one) keeps them
    older = replace(edited, updated_at=LATER + timedelta(minutes=1), max_parts=None, parts=None)
    mailings.save_fields(older, before=LATER)
    assert mailings.get(mailing.id).parts == again
