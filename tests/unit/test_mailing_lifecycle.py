"""The mailing lifecycle: one table of statuses and actions, read by pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from chalicelib.domain.mailing import (
    LIFECYCLE,
    Action,
    MailingStatus,
    MessageStatus,
    TransitionRefused,
    allows,
    audience_frozen,
    may_finish,
    may_have_fanned_out,
    moves,
    pending_become,
    transition,
)
from chalicelib.errors import Conflict

S = MailingStatus
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
ID = "0b9a3c9e-2f8f-4a43-9d8e-3d1c1f1b2a10"


def test_the_table_says_something_for_every_status_and_action():
    # Given every status and every action
    pairs = {(status, action) for status in S for action in Action}

    # Then the table names each pair once, and nothing else
    assert set(LIFECYCLE) == pairs


@pytest.mark.parametrize(
    ("status", "action", "after"),
    [
        (S.SCHEDULED, Action.START, S.RUNNING),
        (S.RUNNING, Action.START, S.RUNNING),
        (S.PAUSED, Action.START, S.PAUSED),
        (S.CANCELLED, Action.START, S.CANCELLED),
        (S.SCHEDULED, Action.PAUSE, S.PAUSED),
        (S.RUNNING, Action.PAUSE, S.PAUSED),
        (S.PAUSED, Action.PAUSE, S.PAUSED),
        (S.SCHEDULED, Action.CANCEL, S.CANCELLED),
        (S.RUNNING, Action.CANCEL, S.CANCELLED),
        (S.PAUSED, Action.CANCEL, S.CANCELLED),
        (S.CANCELLED, Action.CANCEL, S.CANCELLED),
        (S.SCHEDULED, Action.EDIT, S.SCHEDULED),
        (S.RUNNING, Action.EDIT, S.RUNNING),
        (S.PAUSED, Action.EDIT, S.PAUSED),
        (S.RUNNING, Action.RETRY_FAILED, S.RUNNING),
        (S.PAUSED, Action.RETRY_FAILED, S.PAUSED),
        (S.FINISHED, Action.RETRY_FAILED, S.RUNNING),
        (S.RUNNING, Action.FINISH, S.FINISHED),
        (S.PAUSED, Action.FINISH, S.FINISHED),
        (S.CANCELLED, Action.FINISH, S.CANCELLED),
        (S.RUNNING, Action.EXPIRE, S.RUNNING),
        (S.PAUSED, Action.EXPIRE, S.PAUSED),
    ],
)
def test_an_allowed_action_moves_the_mailing_to_its_next_status(status, action, after):
    # Given a mailing in `status`
    # When `action` happens to it
    moved = transition(ID, status, action)

    # Then it is in `after`
    assert moved is after


@pytest.mark.parametrize(
    ("status", "action", "message"),
    [
        (S.FINISHED, Action.CANCEL, f"mailing {ID} has finished; there is nothing left to cancel"),
        (S.FINISHED, Action.PAUSE, f"mailing {ID} is finished; there is nothing to pause"),
        (S.CANCELLED, Action.PAUSE, f"mailing {ID} is cancelled; there is nothing to pause"),
        (S.RUNNING, Action.RESUME, f"mailing {ID} is running, not paused"),
        (S.SCHEDULED, Action.RESUME, f"mailing {ID} is scheduled, not paused"),
        (S.FINISHED, Action.EDIT, f"mailing {ID} is finished; it can no longer change"),
        (S.CANCELLED, Action.EDIT, f"mailing {ID} is cancelled; it can no longer change"),
        (
            S.CANCELLED,
            Action.RETRY_FAILED,
            f"mailing {ID} is cancelled; nothing is sent any more",
        ),
    ],
)
def test_a_refused_action_is_a_conflict_that_says_why(status, action, message):
    # Given a mailing in `status`
    # When a caller asks for `action`
    with pytest.raises(TransitionRefused) as refused:
        transition(ID, status, action)

    # Then it is refused as a conflict (HTTP 409), with the reason the caller reads
    assert isinstance(refused.value, Conflict)
    assert refused.value.message == message


@pytest.mark.parametrize(("started", "after"), [(False, S.SCHEDULED), (True, S.RUNNING)])
def test_a_resumed_mailing_runs_only_once_its_start_has_come(started, after):
    # Given a paused mailing, its start come or not
    # When it is resumed
    resumed = transition(ID, S.PAUSED, Action.RESUME, started=started)

    # Then it is running after its start, scheduled before it
    assert resumed is after


@pytest.mark.parametrize(
    ("status", "action", "expected"),
    [
        (S.SCHEDULED, Action.START, S.RUNNING),
        (S.RUNNING, Action.START, None),
        (S.PAUSED, Action.START, None),
        (S.FINISHED, Action.START, None),
        (S.FINISHED, Action.RETRY_FAILED, S.RUNNING),
        (S.CANCELLED, Action.FINISH, None),
    ],
)
def test_moves_names_only_a_change_of_status(status, action, expected):
    # Given a mailing in `status`
    # When the scheduler asks where `action` takes it
    # Then it learns the new status, or None when nothing is to be written
    assert moves(status, action) is expected


@pytest.mark.parametrize(
    ("status", "fans_out", "reconciles"),
    [
        (S.SCHEDULED, True, False),
        (S.RUNNING, True, True),
        (S.PAUSED, False, False),
        (S.FINISHED, False, False),
        (S.CANCELLED, False, False),
    ],
)
def test_only_a_running_mailing_fans_out_and_reconciles(status, fans_out, reconciles):
    # Given a mailing in `status`
    # Then its audience is walked, and lost jobs looked for, only while it may send
    assert allows(status, Action.FAN_OUT) is fans_out
    assert allows(status, Action.RECONCILE) is reconciles


@pytest.mark.parametrize(
    ("status", "ended", "becomes"),
    [
        (S.RUNNING, False, None),
        (S.RUNNING, True, MessageStatus.EXPIRED),
        (S.PAUSED, True, MessageStatus.EXPIRED),
        (S.CANCELLED, False, MessageStatus.CANCELLED),
        (S.CANCELLED, True, MessageStatus.CANCELLED),
    ],
)
def test_pending_messages_are_cancelled_with_the_mailing_or_expire_at_its_end(
    status, ended, becomes
):
    # Given a mailing in `status`, its end passed or not
    # Then its pending messages stay, expire, or are cancelled
    assert pending_become(status, ended=ended) is becomes


@pytest.mark.parametrize(
    ("status", "fanout_done", "pending", "done"),
    [
        (S.RUNNING, True, 0, True),
        (S.RUNNING, True, 3, False),
        (S.RUNNING, False, 0, False),
        (S.CANCELLED, False, 0, True),
        (S.CANCELLED, False, 1, False),
    ],
)
def test_a_mailing_finishes_when_nothing_is_pending_and_its_audience_was_walked(
    status, fanout_done, pending, done
):
    # Given a mailing's status, fan-out and pending count
    # Then the scheduler may finish it only when nothing is left to do
    assert may_finish(status, fanout_done=fanout_done, pending=pending) is done


@pytest.mark.parametrize(
    ("status", "start_at", "frozen"),
    [
        (S.SCHEDULED, NOW - timedelta(minutes=1), False),
        (S.RUNNING, NOW + timedelta(minutes=1), True),
        (S.PAUSED, NOW - timedelta(minutes=1), True),
        (S.PAUSED, NOW + timedelta(minutes=1), False),
    ],
)
def test_start_and_audience_freeze_once_sending_began(status, start_at, frozen):
    # Given a mailing in `status` with its start at `start_at`
    # Then its start and audience may change only while sending has not begun
    assert audience_frozen(status, start_at, NOW) is frozen


@pytest.mark.parametrize(
    ("status", "sweep"),
    [
        (S.SCHEDULED, False),
        (S.RUNNING, True),
        (S.PAUSED, True),
    ],
)
def test_cancelling_a_mailing_that_may_have_messages_needs_a_sweep(status, sweep):
    # Given a mailing in `status`
    # Then cancelling it must sweep its pending messages only if it may have some
    assert may_have_fanned_out(status) is sweep
