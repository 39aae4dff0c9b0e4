"""The send window: local-time hours in which a client may receive a message."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class SendWindow:
    """A local time-of-day window [start, end); end before start wraps past midnight."""

    start: time
    end: time

    def contains(self, local: time) -> bool:
        local = local.replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def next_opening(self, now: datetime, zone: ZoneInfo) -> datetime:
        """The first moment at or after `now` (aware) at which the window is open in `zone`."""
        local = now.astimezone(zone)
        if self.contains(local.timetz()):
            return now
        for days in range(3):
            day = local.date() + timedelta(days=days)
            opening = datetime.combine(day, self.start, tzinfo=zone)
            # A start inside a DST gap does not exist locally; fromutc(utc) normalises it.
            opening = opening.astimezone(now.tzinfo).astimezone(zone)
            if opening > local:
                return opening.astimezone(now.tzinfo)
        raise AssertionError("a daily window opens within two days")  # pragma: no cover

    def open_throughout(self, zone: ZoneInfo, since: datetime, until: datetime) -> bool:
        """Whether the window was open in `zone` at every minute from `since` to `until`."""
        moment = since
        while moment < until:
            if not self.contains(moment.astimezone(zone).timetz()):
                return False
            moment += timedelta(minutes=1)
        return self.contains(until.astimezone(zone).timetz())

    @staticmethod
    def parse(value: str) -> time:
        hours, minutes = value.split(":")
        return time(int(hours), int(minutes))

    @staticmethod
    def format(value: time) -> str:
        return f"{value.hour:02d}:{value.minute:02d}"

    @classmethod
    def from_minutes(cls, start: int, end: int) -> SendWindow:
        return cls(time(start // 60, start % 60), time(end // 60, end % 60))

    def to_minutes(self) -> tuple[int, int]:
        return self.start.hour * 60 + self.start.minute, self.end.hour * 60 + self.end.minute
