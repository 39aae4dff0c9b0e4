"""A mailing's timeline as pure arithmetic: bucket widths, the bucket of a moment, and the points
read back from how the counters moved in each bucket."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from chalicelib.domain.mailing import MessageChange, MessageCounts, MessageStatus
from chalicelib.domain.timeline import (
    BUCKETS,
    SPAN,
    TimelineGrid,
    parts_until,
    points,
    rebuilt,
    step_for,
)

START = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def test_a_mailings_buckets_are_a_readable_width_that_covers_it_with_room_after_its_end():
    # Given mailings of a few minutes, an hour, a month and a year
    spans = [timedelta(minutes=2), timedelta(hours=1), timedelta(days=30), timedelta(days=366)]

    # When their bucket widths are chosen
    steps = [step_for(START, START + span) for span in spans]

    # Then each is a width people read (a second, half a minute, six hours, two days)...
    assert steps == [1, 30, 6 * 3600, 2 * 86400]
    # ...and SPAN buckets cover the whole mailing, leaving buckets for what follows its end
    assert BUCKETS > SPAN
    for span, step in zip(spans, steps, strict=True):
        assert SPAN * step >= span.total_seconds()


def test_a_change_is_counted_in_the_bucket_of_its_time_and_the_edges_take_the_rest():
    grid = TimelineGrid(START, 30)
    assert grid.bucket(START) == 0
    assert grid.bucket(START + timedelta(seconds=29.9)) == 0
    assert grid.bucket(START + timedelta(seconds=30)) == 1
    # Before the first bucket (a clock a little behind) and long after the last
    assert grid.bucket(START - timedelta(minutes=5)) == 0
    assert grid.bucket(START + timedelta(days=30)) == BUCKETS - 1


def test_a_read_asks_only_for_the_parts_that_can_hold_anything_yet():
    grid = TimelineGrid(START, 30)
    assert list(parts_until(grid, START + timedelta(minutes=1))) == [0]
    assert len(parts_until(grid, START + timedelta(days=365))) == BUCKETS // 16


def test_the_points_add_up_the_buckets_from_the_first_change_to_the_last():
    # Given 10 messages created in bucket 2, 6 sent in bucket 4 and 4 failed in bucket 6,
    # the last of them 12 seconds into bucket 6
    grid = TimelineGrid(START, 30)
    buckets = {
        2: MessageCounts(pending=10),
        4: MessageCounts(pending=-6, sent=6),
        6: MessageCounts(pending=-4, failed=4),
    }
    last_change = grid.start(6) + timedelta(seconds=12)

    # When the points are worked out, long after
    series = points(grid, buckets, last_change, START + timedelta(hours=1))

    # Then they start at the end of the first bucket that moved, with everything pending...
    assert series[0] == (grid.end(2), MessageCounts(pending=10))
    # ...hold each bucket's counts at its end, and end at the last change, with no point
    # at "now" (nothing is pending)
    assert [at for at, _ in series] == [grid.end(i) for i in range(2, 6)] + [last_change]
    assert series[2][1] == MessageCounts(pending=4, sent=6)
    assert series[-1][1] == MessageCounts(sent=6, failed=4)


def test_while_messages_are_pending_the_last_point_is_now():
    grid = TimelineGrid(START, 30)
    buckets = {0: MessageCounts(pending=5), 1: MessageCounts(pending=-2, sent=2)}
    now = START + timedelta(minutes=10)

    series = points(grid, buckets, grid.start(1) + timedelta(seconds=3), now)

    assert series[-1] == (now, MessageCounts(pending=3, sent=2))
    assert series[-2] == (grid.start(1) + timedelta(seconds=3), MessageCounts(pending=3, sent=2))


def test_a_last_change_at_the_very_start_of_its_bucket_is_one_point_not_two_at_one_moment():
    # Given the last change exactly where the bucket before it ended
    grid = TimelineGrid(START, 30)
    buckets = {0: MessageCounts(pending=2), 3: MessageCounts(pending=-2, sent=2)}

    series = points(grid, buckets, grid.start(3), START + timedelta(hours=1))

    # Then the moments only grow, and that moment shows the change
    moments = [at for at, _ in series]
    assert moments == sorted(set(moments))
    assert series[-1] == (grid.start(3), MessageCounts(sent=2))


def test_at_most_120_points_are_shown_evenly_the_first_and_last_included():
    # Given a change in every bucket
    grid = TimelineGrid(START, 1)
    buckets = {i: MessageCounts(pending=1) for i in range(BUCKETS)}

    series = points(grid, buckets, grid.start(BUCKETS - 1), START)

    assert len(series) == 120
    assert series[0] == (grid.end(0), MessageCounts(pending=1))
    assert series[-1] == (grid.start(BUCKETS - 1), MessageCounts(pending=BUCKETS))
    assert [at for at, _ in series] == sorted({at for at, _ in series})


def test_a_timeline_with_nothing_moved_has_no_points():
    grid = TimelineGrid(START, 30)
    assert points(grid, {}, None, START) == []
    assert points(grid, {3: MessageCounts()}, START, START) == []


def test_a_mailing_stored_before_timelines_is_rebuilt_from_its_message_records():
    # Given two messages created at the start, one sent a minute later, one still pending
    changes = [
        MessageChange(START, MessageStatus.SENT, START + timedelta(minutes=1)),
        MessageChange(START, MessageStatus.PENDING, None),
    ]

    series = rebuilt(changes, pending=1, now=START + timedelta(minutes=2))

    assert series[0] == (START, MessageCounts(pending=2))
    assert series[-1] == (START + timedelta(minutes=2), MessageCounts(pending=1, sent=1))
    assert len(series) == 120
