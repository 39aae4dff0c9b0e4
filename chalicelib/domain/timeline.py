"""A mailing's timeline: how its message counters moved, kept in a fixed number of buckets of
time as they move, so reading it costs the same whatever the number of messages.

A mailing's buckets have one width (its `step`), fixed while no message can exist yet (when it
is created or its dates are edited before it starts), wide enough that `SPAN` buckets cover its
start to its end; the buckets after those take what happens after the end (the sweep that
expires the rest). A change at or past the last bucket is counted in the last one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from chalicelib.domain.mailing import Mailing, MessageChange, MessageCounts, MessageStatus

# The most buckets a mailing has.
BUCKETS = 256
# Buckets stored together (one item each, small enough to cost one write unit).
BUCKETS_PER_PART = 16
# Buckets that cover a mailing's start to its end; the rest is room for what follows its end.
SPAN = 200
# The most points a timeline shows.
POINTS = 120
# Bucket widths in seconds: each one a width a person reads easily on a chart's axis.
_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200)
_DAY = 86400

_NOTHING = MessageCounts()
_FINAL = [status for status in MessageStatus if status is not MessageStatus.PENDING]


def step_for(origin: datetime, end: datetime) -> int:
    """The bucket width, in seconds, for a mailing that may send from `origin` to `end`: the
    first readable width at which `SPAN` buckets cover it, at least a second."""
    needed = max(1.0, (end - origin).total_seconds() / SPAN)
    for step in _STEPS:
        if step >= needed:
            return step
    return math.ceil(needed / _DAY) * _DAY


def origin_of(mailing: Mailing) -> datetime:
    """Where the mailing's first bucket starts: its start, or its creation if it was created
    later (nothing happens to it before either)."""
    return max(mailing.start_at, mailing.created_at)


@dataclass(frozen=True)
class TimelineGrid:
    """A mailing's buckets: the first starts at `origin`, each is `step` seconds wide."""

    origin: datetime
    step: int

    def bucket(self, at: datetime) -> int:
        """The bucket a change at `at` is counted in (the first or last when outside)."""
        index = math.floor((at - self.origin).total_seconds() / self.step)
        return min(max(index, 0), BUCKETS - 1)

    def start(self, bucket: int) -> datetime:
        return self.origin + timedelta(seconds=bucket * self.step)

    def end(self, bucket: int) -> datetime:
        return self.start(bucket + 1)


def grid_of(mailing: Mailing) -> TimelineGrid | None:
    """The mailing's buckets; None for one stored before timelines were kept (it has no step)."""
    if mailing.timeline_step is None:
        return None
    return TimelineGrid(origin_of(mailing), mailing.timeline_step)


def with_step(mailing: Mailing) -> Mailing:
    """The mailing with the bucket width its dates call for (only while no message can exist:
    once it has buckets, their width never changes)."""
    return replace(mailing, timeline_step=step_for(origin_of(mailing), mailing.end_at))


def part_of(bucket: int) -> int:
    """The stored part that holds `bucket`."""
    return bucket // BUCKETS_PER_PART


def parts_until(grid: TimelineGrid, now: datetime) -> range:
    """The parts that can hold anything by `now` (a read never asks for more)."""
    return range(part_of(grid.bucket(now)) + 1)


def moved(changes: Mapping[MessageStatus, int]) -> MessageCounts:
    """Counts from how many messages moved into (positive) or out of each status."""
    return MessageCounts(**{status.value: n for status, n in changes.items()})


def points(
    grid: TimelineGrid,
    buckets: Mapping[int, MessageCounts],
    last_change: datetime | None,
    now: datetime,
    limit: int = POINTS,
) -> list[tuple[datetime, MessageCounts]]:
    """The counts as they stood over time, from how they moved in each bucket: a point at the
    end of each bucket from the first that moved, the last at the last change (then `now`
    while messages are pending), at most `limit` of them, evenly picked, the last kept."""
    used = sorted(index for index, change in buckets.items() if change != _NOTHING)
    if not used:
        return []
    first, last = used[0], used[-1]
    series: list[tuple[datetime, MessageCounts]] = []
    total = _NOTHING
    for index in range(first, last + 1):
        total += buckets.get(index, _NOTHING)
        series.append((grid.end(index), total))
    # The last bucket's point is at its last change, within the bucket (the last bucket is open).
    final_at = grid.end(last)
    if last_change is not None:
        final_at = max(last_change, grid.start(last))
        if last < BUCKETS - 1:
            final_at = min(final_at, grid.end(last))
    series[-1] = (final_at, total)
    if len(series) > 1 and series[-2][0] >= final_at:
        del series[-2]  # the bucket before ended at the very moment of the last change
    if total.pending > 0 and now > final_at:
        series.append((now, total))
    return _evenly(series, limit)


def _evenly(
    series: list[tuple[datetime, MessageCounts]], limit: int
) -> list[tuple[datetime, MessageCounts]]:
    """At most `limit` of `series`, evenly spread, the first and the last included."""
    if len(series) <= limit:
        return series
    if limit < 2:
        return series[-limit:] if limit > 0 else []
    step = (len(series) - 1) / (limit - 1)
    return [series[round(k * step)] for k in range(limit)]


def rebuilt(
    changes: list[MessageChange], pending: int, now: datetime, limit: int = POINTS
) -> list[tuple[datetime, MessageCounts]]:
    """The counts over time rebuilt from the message records themselves (a mailing stored
    before timelines were kept): at most `limit` moments, at least a second apart, from its
    first message to its last change (or `now` while `pending`)."""
    events: list[tuple[datetime, str]] = []  # (created_at, "created"), (changed at, status)
    for change in changes:
        events.append((change.created_at, "created"))
        if change.changed_at is not None:
            events.append((change.changed_at, change.status.value))
    if not events:
        return []
    events.sort(key=lambda event: event[0])
    first = events[0][0]
    last = events[-1][0] if pending == 0 else max(events[-1][0], now)
    count = max(2, min(limit, int((last - first).total_seconds()) + 1))
    moments = [first]
    if last > first:
        moments = [first + (last - first) * i / (count - 1) for i in range(count)]
    series: list[tuple[datetime, MessageCounts]] = []
    seen: dict[str, int] = {}
    index = 0
    for moment in moments:
        while index < len(events) and events[index][0] <= moment:
            seen[events[index][1]] = seen.get(events[index][1], 0) + 1
            index += 1
        done = {s.value: seen.get(s.value, 0) for s in _FINAL}
        left = seen.get("created", 0) - sum(done.values())
        series.append((moment, MessageCounts(pending=max(left, 0), **done)))
    return series
