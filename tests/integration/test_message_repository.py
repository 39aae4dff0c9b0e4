"""The message repository's contract, run against DynamoDB (moto) and the in-memory one: a
message leaves `pending` once, under its claim, with the mailing's counters in step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from pynamodb.connection import Connection

from chalicelib.domain import MailingStatus, Message, MessageStatus
from chalicelib.domain.mailing import MessageCounts
from chalicelib.domain.timeline import TimelineGrid
from chalicelib.errors import MalformedRequest
from chalicelib.storage.mailings import DynamoMailingRepository
from chalicelib.storage.messages import DynamoMessageRepository, MessageRepository, Outcome
from chalicelib.storage.models import status_key
from chalicelib.storage.timeline import Activity
from tests.support.memory.messages import MemoryMessageRepository

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=1)
MAILING = "m-1"


@dataclass
class World:
    """A repository and what its test needs around it: mailings and messages to start from,
    and the mailing's status and counters to look at."""

    messages: MessageRepository
    add_mailing: Callable[[str, MailingStatus], None]
    add_message: Callable[[Message], None]
    delete_mailing: Callable[[str], None]
    mailing: Callable[[str], tuple[MailingStatus, dict[MessageStatus, int]]]
    # The mailing's timeline as the mailing repository reads it back.
    timeline: Callable[[str, TimelineGrid, datetime], Activity]


def _message(client_id: str, message_id: int, status: MessageStatus) -> Message:
    return Message(
        id=message_id,
        mailing_id=MAILING,
        client_id=client_id,
        phone="79000000001",
        status=status,
        created_at=NOW,
        sent_at=None,
        attempts=0,
        last_error=None,
    )


def _dynamodb_world(services) -> World:
    models = services.models

    def add_mailing(mailing_id: str, status: MailingStatus) -> None:
        models.Mailing(
            mailing_id,
            text="Hi",
            start_at=NOW,
            end_at=NOW + timedelta(hours=1),
            status=status.value,
            created_at=NOW,
            updated_at=NOW,
        ).save()

    def add_message(message: Message) -> None:
        models.Message(
            message.mailing_id,
            message.client_id,
            message_id=message.id,
            phone=message.phone,
            status=message.status.value,
            status_key=status_key(message.mailing_id, message.status.value),
            created_at=message.created_at,
            updated_at=message.created_at,
        ).save()
        counter = getattr(models.Mailing, f"count_{message.status.value}")
        models.Mailing(message.mailing_id).update(actions=[counter.add(1)])

    def delete_mailing(mailing_id: str) -> None:
        models.Mailing(mailing_id).delete()

    def mailing(mailing_id: str) -> tuple[MailingStatus, dict[MessageStatus, int]]:
        record = models.Mailing.get(mailing_id, consistent_read=True)
        counts = {s: int(getattr(record, f"count_{s.value}") or 0) for s in MessageStatus}
        return MailingStatus(record.status), counts

    connection = Connection(region="us-east-1")
    repository = DynamoMessageRepository(models, connection)
    timeline = DynamoMailingRepository(models, connection).timeline
    return World(repository, add_mailing, add_message, delete_mailing, mailing, timeline)


def _memory_world() -> World:
    memory = MemoryMessageRepository()
    return World(
        memory,
        memory.add_mailing,
        memory.add_message,
        memory.delete_mailing,
        memory.mailing,
        memory.timelines.read,
    )


@pytest.fixture(params=["dynamodb", "memory"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    if request.param == "memory":
        yield _memory_world()
    else:
        yield _dynamodb_world(request.getfixturevalue("services"))


@pytest.fixture
def running(world: World) -> World:
    """A running mailing with two pending messages (c-1: 101, c-2: 102) and one failed (c-3)."""
    world.add_mailing(MAILING, MailingStatus.RUNNING)
    world.add_message(_message("c-1", 101, MessageStatus.PENDING))
    world.add_message(_message("c-2", 102, MessageStatus.PENDING))
    world.add_message(_message("c-3", 103, MessageStatus.FAILED))
    return world


def claim(world: World, client_id: str = "c-1", message_id: int = 101, name: str = "claim-a"):
    return world.messages.claim(MAILING, client_id, message_id, name, NOW, LATER)


def counts(world: World, **expected: int) -> dict[MessageStatus, int]:
    """The mailing's counters, those not named expected at 0."""
    return {s: expected.get(s.value, 0) for s in MessageStatus}


# ---------------------------------------------------------------- claims


def test_a_pending_message_is_claimed_once_and_counts_an_attempt(running):
    # When a sender claims a pending message
    taken = claim(running)
    # Then it holds the claim, and the message counts one attempt
    assert taken.claim_id == "claim-a"
    message = running.messages.get(MAILING, "c-1")
    assert message is not None
    assert (message.status, message.attempts) == (MessageStatus.PENDING, 1)
    # And another sender's claim is refused while it holds, showing the message as it is
    refused = claim(running, name="claim-b")
    assert refused.claim_id is None
    assert refused.message == message


def test_a_claim_for_another_id_or_a_missing_message_is_refused(running):
    # When a job claims a message under an id it does not have, then it is refused with it
    refused = claim(running, message_id=999)
    assert refused.claim_id is None
    assert refused.message is not None
    assert refused.message.id == 101
    # And a message that is not there is refused with nothing seen
    nothing = claim(running, client_id="c-9")
    assert (nothing.claim_id, nothing.message) == (None, None)


def test_a_lapsed_claim_can_be_taken_by_another_sender(running):
    # Given a claim that ended at LATER
    claim(running)
    # When another sender claims after LATER, then it gets the message
    after = LATER + timedelta(seconds=1)
    taken = running.messages.claim(MAILING, "c-1", 101, "claim-b", after, after)
    assert taken.claim_id == "claim-b"


def test_a_message_that_is_not_pending_cannot_be_claimed(running):
    refused = claim(running, client_id="c-3", message_id=103)
    assert refused.claim_id is None
    assert refused.message is not None
    assert refused.message.status is MessageStatus.FAILED


def test_a_released_message_is_pending_again_with_its_error(running):
    # Given a claimed message whose call failed
    claim(running)
    # When the sender releases it with the error
    assert running.messages.release(MAILING, "c-1", "claim-a", NOW, "HTTP 500")
    # Then it is pending, claimable again, and keeps the attempt and the error
    message = running.messages.get(MAILING, "c-1")
    assert message is not None
    assert (message.status, message.attempts, message.last_error) == (
        MessageStatus.PENDING,
        1,
        "HTTP 500",
    )
    assert claim(running, name="claim-b").claim_id == "claim-b"


def test_a_claim_given_back_without_a_call_undoes_its_attempt(running):
    claim(running)
    assert running.messages.release(MAILING, "c-1", "claim-a", NOW, None, called=False)
    message = running.messages.get(MAILING, "c-1")
    assert message is not None
    assert message.attempts == 0


def test_only_the_claims_holder_releases_it(running):
    claim(running)
    assert not running.messages.release(MAILING, "c-1", "claim-b", NOW, "x")


# ---------------------------------------------------------------- final statuses


def test_finishing_moves_the_messages_and_the_counters_together(running):
    # Given a claimed message and an unclaimed one
    claim(running)
    outcomes = [
        Outcome("c-1", MessageStatus.SENT, "claim-a"),
        Outcome("c-2", MessageStatus.EXPIRED, None, "end passed"),
    ]
    # When both are finished in one transaction
    assert running.messages.finish(MAILING, outcomes, NOW)
    # Then each has its status, and the counters moved from pending with them
    sent, expired = (running.messages.get(MAILING, c) for c in ("c-1", "c-2"))
    assert sent is not None
    assert expired is not None
    assert (sent.status, sent.sent_at) == (MessageStatus.SENT, NOW)
    assert (expired.status, expired.last_error) == (MessageStatus.EXPIRED, "end passed")
    assert running.mailing(MAILING)[1] == counts(running, sent=1, expired=1, failed=1)


def test_a_finish_that_is_not_ours_writes_nothing(running):
    # Given c-1 claimed by another sender
    claim(running)
    # When a transaction finishes c-2 and c-1 (without its claim)
    outcomes = [
        Outcome("c-2", MessageStatus.SENT),
        Outcome("c-1", MessageStatus.SENT),
    ]
    # Then it is refused as a whole: nothing moved
    assert not running.messages.finish(MAILING, outcomes, NOW)
    c2 = running.messages.get(MAILING, "c-2")
    assert c2 is not None
    assert c2.status is MessageStatus.PENDING
    assert running.mailing(MAILING)[1] == counts(running, pending=2, failed=1)


def test_a_message_is_finished_only_once(running):
    assert running.messages.finish(MAILING, [Outcome("c-2", MessageStatus.SENT)], NOW)
    assert not running.messages.finish(MAILING, [Outcome("c-2", MessageStatus.FAILED)], NOW)
    assert running.mailing(MAILING)[1] == counts(running, pending=1, sent=1, failed=1)


def test_the_messages_of_a_deleted_mailing_cannot_be_finished_with_counters(running):
    # Given the mailing deleted
    running.delete_mailing(MAILING)
    # Then finishing with counters is refused, and failing the orphan works once
    assert not running.messages.finish(MAILING, [Outcome("c-1", MessageStatus.SENT)], NOW)
    orphan = Outcome("c-1", MessageStatus.FAILED, None, "mailing record is missing")
    assert running.messages.fail_orphan(MAILING, orphan, NOW)
    assert not running.messages.fail_orphan(MAILING, orphan, NOW)
    message = running.messages.get(MAILING, "c-1")
    assert message is not None
    assert (message.status, message.last_error) == (
        MessageStatus.FAILED,
        "mailing record is missing",
    )


def test_a_long_error_is_kept_short(running):
    outcome = Outcome("c-1", MessageStatus.FAILED, None, "x" * 2000)
    assert running.messages.finish(MAILING, [outcome], NOW)
    message = running.messages.get(MAILING, "c-1")
    assert message is not None
    assert message.last_error == "x" * 500


# ---------------------------------------------------------------- reading and requeueing


def test_messages_are_listed_by_status_in_message_id_order_and_paged(running):
    pending = running.messages.with_status(MAILING, MessageStatus.PENDING, 10)
    assert pending == [("c-1", 101), ("c-2", 102)]
    assert running.messages.with_status(MAILING, MessageStatus.PENDING, 1, after=101) == [
        ("c-2", 102)
    ]
    assert running.messages.get(MAILING, "c-9") is None


def test_a_mailings_messages_are_listed_a_page_at_a_time_whole_or_by_status(running):
    # When the mailing's messages are listed two at a time
    first = running.messages.page(MAILING, status=None, limit=2, cursor=None)
    rest = running.messages.page(MAILING, status=None, limit=2, cursor=first.next_cursor)
    # Then every message is listed once, and the last page says there is no more
    listed = [m.client_id for m in first.items + rest.items]
    assert sorted(listed) == ["c-1", "c-2", "c-3"]
    assert first.next_cursor is not None
    assert rest.next_cursor is None
    # And by status, only the messages with it are listed, as they are now
    failed = running.messages.page(MAILING, status=MessageStatus.FAILED, limit=10, cursor=None)
    assert [(m.client_id, m.status) for m in failed.items] == [("c-3", MessageStatus.FAILED)]


def test_a_cursor_the_listing_did_not_hand_out_is_refused(running):
    # When a listing is asked to start from a made-up cursor
    # Then it is refused as a bad request, naming the cursor
    with pytest.raises(MalformedRequest) as refused:
        running.messages.page(MAILING, status=None, limit=2, cursor="made-up")
    assert refused.value.details[0]["field"] == "query.cursor"


def test_the_history_of_a_mailings_messages_says_when_each_left_pending(running):
    # Given one message sent now, one still pending and one failed earlier
    claim(running)
    assert running.messages.finish(MAILING, [Outcome("c-1", MessageStatus.SENT, "claim-a")], NOW)
    # When its history is read, at most two messages of it
    changes, more = running.messages.history(MAILING, limit=2)
    # Then two messages are told, and that there are more
    assert (len(changes), more) == (2, True)
    # And read whole, the sent message changed when it was sent, the pending one not yet
    changes, more = running.messages.history(MAILING, limit=10)
    assert more is False
    by_status = {change.status: change for change in changes}
    assert by_status[MessageStatus.SENT].changed_at == NOW
    assert by_status[MessageStatus.PENDING].changed_at is None
    assert by_status[MessageStatus.FAILED].changed_at is not None


def test_failed_messages_are_requeued_with_the_counters_and_reopen_the_mailing(world):
    # Given a finished mailing with a failed message
    world.add_mailing(MAILING, MailingStatus.FINISHED)
    world.add_message(_message("c-3", 103, MessageStatus.FAILED))
    # When it is requeued, reopening the mailing
    assert world.messages.requeue_failed(MAILING, [("c-3", 103)], NOW, reopen=True)
    # Then the message is pending, the counters followed and the mailing runs again
    assert world.messages.with_status(MAILING, MessageStatus.PENDING, 10) == [("c-3", 103)]
    assert world.mailing(MAILING) == (MailingStatus.RUNNING, counts(world, pending=1))
    # And requeueing it again is refused (it is no longer failed)
    assert not world.messages.requeue_failed(MAILING, [("c-3", 103)], NOW, reopen=False)


def test_the_failed_messages_of_a_cancelled_mailing_stay_failed(world):
    world.add_mailing(MAILING, MailingStatus.CANCELLED)
    world.add_message(_message("c-3", 103, MessageStatus.FAILED))
    assert not world.messages.requeue_failed(MAILING, [("c-3", 103)], NOW, reopen=True)
    assert world.mailing(MAILING) == (MailingStatus.CANCELLED, counts(world, failed=1))


# ---------------------------------------------------------------- lost jobs


def test_a_pending_message_untouched_since_then_is_marked_once_as_queued_again(running):
    # Given pending messages untouched since their creation at NOW
    since = NOW + timedelta(minutes=1)
    touched_at = NOW + timedelta(minutes=2)

    # When the reconciler marks c-1 as queued again, then a second time
    first = running.messages.touch_if_lost(MAILING, "c-1", 101, touched_at, since)
    second = running.messages.touch_if_lost(MAILING, "c-1", 101, touched_at, since)

    # Then only the first holds: the message was touched after `since` by it
    assert (first, second) == (True, False)


def test_a_claimed_failed_or_other_message_is_not_marked_as_queued_again(running):
    # Given c-1 claimed by a sender until LATER, c-3 failed
    claim(running)
    since, now = NOW + timedelta(minutes=1), LATER - timedelta(seconds=1)

    # When the reconciler tries to mark them, or c-2 under another id
    # Then none is marked: a sender, a final status or another message has it
    assert not running.messages.touch_if_lost(MAILING, "c-1", 101, now, since)
    assert not running.messages.touch_if_lost(MAILING, "c-3", 103, now, since)
    assert not running.messages.touch_if_lost(MAILING, "c-2", 999, now, since)
    assert running.messages.touch_if_lost(MAILING, "c-2", 102, now, since)


# ---------------------------------------------------------------- what listing by status costs


def test_a_requeued_then_sent_message_is_listed_under_its_status_at_each_step(running):
    # Given c-3 failed, then made pending again
    assert running.messages.requeue_failed(MAILING, [("c-3", 103)], NOW, reopen=False)
    pending = running.messages.page(MAILING, status=MessageStatus.PENDING, limit=10, cursor=None)
    # Then it is listed as pending, no longer as failed
    assert sorted(m.client_id for m in pending.items) == ["c-1", "c-2", "c-3"]
    assert running.messages.with_status(MAILING, MessageStatus.FAILED, 10) == []

    # When it is sent
    claimed = running.messages.claim(MAILING, "c-3", 103, "claim-c", NOW, LATER)
    sent = Outcome("c-3", MessageStatus.SENT, claimed.claim_id)
    assert running.messages.finish(MAILING, [sent], NOW)

    # Then it is listed as sent only
    assert running.messages.with_status(MAILING, MessageStatus.SENT, 10) == [("c-3", 103)]
    assert running.messages.with_status(MAILING, MessageStatus.PENDING, 10) == [
        ("c-1", 101),
        ("c-2", 102),
    ]


def test_only_rare_statuses_cost_a_status_index_entry(services):
    # Given the DynamoDB repository with three pending messages
    world = _dynamodb_world(services)
    world.add_mailing(MAILING, MailingStatus.RUNNING)
    for client_id, message_id in (("c-1", 101), ("c-2", 102), ("c-3", 103)):
        world.add_message(_message(client_id, message_id, MessageStatus.PENDING))

    # When c-1 is sent and c-2 fails
    first, second = claim(world, "c-1", 101), claim(world, "c-2", 102, "claim-b")
    assert world.messages.finish(
        MAILING,
        [
            Outcome("c-1", MessageStatus.SENT, first.claim_id),
            Outcome("c-2", MessageStatus.FAILED, second.claim_id, "HTTP 400"),
        ],
        NOW,
    )

    # Then the status index holds the failed message alone: creating a pending message wrote no
    # entry, sending one wrote none, failing one wrote one (a put, not a move out of `pending`)
    entries = [(e.status_key, int(e.message_id)) for e in services.models.Message.by_status.scan()]
    assert entries == [(f"{MAILING}#failed", 102)]
    # And each is still listed by its status
    assert world.messages.with_status(MAILING, MessageStatus.SENT, 10) == [("c-1", 101)]
    assert world.messages.with_status(MAILING, MessageStatus.FAILED, 10) == [("c-2", 102)]
    assert world.messages.with_status(MAILING, MessageStatus.PENDING, 10) == [("c-3", 103)]


def test_pending_messages_are_walked_a_page_at_a_time_by_client(running):
    # Given c-1 and c-2 pending, c-3 failed
    # When the pending ones are read one at a time, each page on from the last
    first = running.messages.pending(MAILING, 1)
    second = running.messages.pending(MAILING, 1, after=first[-1][0])
    third = running.messages.pending(MAILING, 1, after=second[-1][0])
    # Then each pending message comes once, and the failed one never
    assert (first, second, third) == ([("c-1", 101)], [("c-2", 102)], [])


# ---------------------------------------------------------------- timeline

GRID = TimelineGrid(NOW, 30)


def test_finishing_moves_the_timeline_with_the_counters(running):
    # When two pending messages are finished together a minute after the start
    outcomes = [Outcome("c-1", MessageStatus.SENT), Outcome("c-2", MessageStatus.FAILED)]
    assert running.messages.finish(MAILING, outcomes, LATER, GRID)

    # Then the bucket of that minute (the third of 30 s) moved as the counters did
    activity = running.timeline(MAILING, GRID, LATER)
    assert activity.buckets == {2: MessageCounts(pending=-2, sent=1, failed=1)}
    assert activity.last_change == LATER


def test_a_finish_that_is_not_ours_or_of_a_deleted_mailing_leaves_the_timeline(running):
    # When one finish names another sender's claim, and one comes after the mailing was deleted
    claim(running)
    other = [Outcome("c-1", MessageStatus.SENT, claim_id="claim-b")]
    assert not running.messages.finish(MAILING, other, LATER, GRID)
    running.delete_mailing(MAILING)
    assert not running.messages.finish(MAILING, [Outcome("c-2", MessageStatus.SENT)], LATER, GRID)

    # Then nothing was added to the timeline
    assert running.timeline(MAILING, GRID, LATER).buckets == {}


def test_requeued_messages_move_from_failed_to_pending_in_the_timeline(running):
    # When the failed message is queued again two minutes after the start
    at = NOW + timedelta(minutes=2)
    assert running.messages.requeue_failed(MAILING, [("c-3", 103)], at, reopen=False, timeline=GRID)

    # Then its bucket says one left failed and one became pending
    assert running.timeline(MAILING, GRID, at).buckets == {4: MessageCounts(pending=1, failed=-1)}
