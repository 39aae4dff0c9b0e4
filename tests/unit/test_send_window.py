"""Send windows in the client's local time: inside or not, and when they open next."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from chalicelib.domain import SendWindow

DAY = SendWindow(time(9), time(21))
NIGHT = SendWindow(time(22), time(6))


@pytest.mark.parametrize(
    ("window", "local", "inside"),
    [
        (DAY, time(9), True),
        (DAY, time(20, 59), True),
        (DAY, time(21), False),
        (DAY, time(8, 59), False),
        (NIGHT, time(23), True),
        (NIGHT, time(0, 30), True),
        (NIGHT, time(5, 59), True),
        (NIGHT, time(6), False),
        (NIGHT, time(12), False),
    ],
)
def test_window_contains_local_times(window, local, inside):
    """Given a send window (some over midnight), when a local time is checked, then it is inside or
    outside as the table says."""
    assert window.contains(local) is inside


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@pytest.mark.parametrize(
    ("window", "now", "zone", "opens"),
    [
        # Already inside: now
        (DAY, "2026-11-22T12:00:00+00:00", "UTC", "2026-11-22T12:00:00+00:00"),
        # Before opening today, in the client's zone (Moscow is UTC+3)
        (DAY, "2026-11-22T04:00:00+00:00", "Europe/Moscow", "2026-11-22T09:00:00+03:00"),
        # After closing: tomorrow morning, local
        (DAY, "2026-11-22T19:00:00+00:00", "Europe/Moscow", "2026-11-23T09:00:00+03:00"),
        # A wrapping window opens in the evening
        (NIGHT, "2026-11-22T12:00:00+00:00", "UTC", "2026-11-22T22:00:00+00:00"),
        # Across a DST change: New York moves to UTC-4 on 2026-03-08
        (DAY, "2026-03-08T03:00:00+00:00", "America/New_York", "2026-03-08T09:00:00-04:00"),
    ],
)
def test_next_opening_is_the_next_local_start(window, now, zone, opens):
    """Given a window, a moment and a client's time zone, when the next opening is asked, then it
    is the next local start of the window."""
    assert window.next_opening(at(now), ZoneInfo(zone)) == at(opens)


def test_next_opening_is_inside_the_window():
    """Given moments over two days in several time zones, when the next opening is asked, then it
    is never earlier than the moment and always inside the window."""
    now = datetime(2026, 11, 22, 0, 0, tzinfo=UTC)
    for hours in range(0, 48, 5):
        moment = now + timedelta(hours=hours)
        for zone in ("Asia/Vladivostok", "America/Los_Angeles", "Asia/Kathmandu"):
            opening = NIGHT.next_opening(moment, ZoneInfo(zone))
            assert opening >= moment
            assert NIGHT.contains(opening.astimezone(ZoneInfo(zone)).time())


@pytest.mark.parametrize(
    ("since", "until", "open_all_along"),
    [
        ("2026-11-22T10:00:00+00:00", "2026-11-22T11:00:00+00:00", True),
        # The window closes at 21:00 in the middle of the span
        ("2026-11-22T20:30:00+00:00", "2026-11-22T21:30:00+00:00", False),
        # Closed at the very end: the last moment counts
        ("2026-11-22T20:00:00+00:00", "2026-11-22T21:00:00+00:00", False),
        ("2026-11-22T08:00:00+00:00", "2026-11-22T10:00:00+00:00", False),
    ],
)
def test_a_window_is_open_throughout_a_span_only_if_open_at_every_minute(
    since, until, open_all_along
):
    # Given a 09:00-21:00 window in UTC and a span of time
    # When asked whether it was open all along
    answer = DAY.open_throughout(ZoneInfo("UTC"), at(since), at(until))

    # Then it says so only when no minute of the span fell outside
    assert answer is open_all_along
