"""Domain objects: what clients, mailings and messages are, independent of HTTP and storage."""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

Clock = Callable[[], datetime]
"""Returns the current time, timezone-aware; injected so time-dependent logic is testable."""


# How far ahead of now a mailing may start or end. Dates beyond it are mistakes (year 9999), and
# arithmetic on them overflows in every later scheduler tick.
MAILING_HORIZON = timedelta(days=366)


class MessageStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # the client opted out: never sent


class MailingStatus(StrEnum):
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    CANCELLED = "cancelled"


class ImportStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


def default_operator_code(phone: str) -> str:
    """Digits 2-4 of a 7XXXXXXXXXX number: the operator code when none is given."""
    return phone[1:4]


@dataclass(frozen=True)
class Client:
    id: str
    phone: str
    operator_code: str
    tag: str
    timezone: str
    created_at: datetime
    updated_at: datetime
    opted_out: bool = False


@dataclass(frozen=True)
class AudienceFilter:
    """Clients whose operator code is any of `operator_codes` and whose tag is any of `tags`."""

    operator_codes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    def matches(self, operator_code: str, tag: str) -> bool:
        return (not self.operator_codes or operator_code in self.operator_codes) and (
            not self.tags or tag in self.tags
        )


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


@dataclass(frozen=True)
class MessageCounts:
    pending: int = 0
    sent: int = 0
    failed: int = 0
    expired: int = 0
    cancelled: int = 0
    skipped: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, status.value) for status in MessageStatus)

    def __add__(self, other: MessageCounts) -> MessageCounts:
        return MessageCounts(
            **{
                status.value: getattr(self, status.value) + getattr(other, status.value)
                for status in MessageStatus
            }
        )


# Personalisation: the client fields a mailing's text may name, as `{tag}`.
PLACEHOLDERS = ("phone", "operator_code", "tag", "timezone")


def template_problems(text: str) -> list[str]:
    """What makes `text` unusable as a template (unknown or malformed placeholders)."""
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        return [f"malformed placeholder ({exc}); write {{{{ and }}}} for literal braces"]
    known = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
    problems = []
    for _, field_name, spec, conversion in parts:
        if field_name is None:
            continue
        if field_name not in PLACEHOLDERS:
            problems.append(f"unknown placeholder {{{field_name}}}; use {known}")
        elif spec or conversion:
            problems.append(f"placeholder {{{field_name}}} takes no format or conversion")
    return problems


def render(text: str, values: dict[str, str]) -> str:
    """The text a client receives: placeholders replaced by the client's fields. A text that
    is not a valid template (stored before templates existed) is sent as it is."""
    if "{" not in text and "}" not in text:
        return text
    if template_problems(text):
        return text
    return text.format_map(values)


@dataclass(frozen=True)
class Mailing:
    id: str
    text: str
    start_at: datetime
    end_at: datetime
    audience: AudienceFilter
    send_window: SendWindow | None
    status: MailingStatus
    counts: MessageCounts
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Message:
    id: int
    mailing_id: str
    client_id: str
    phone: str
    status: MessageStatus
    created_at: datetime
    sent_at: datetime | None
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class RowProblem:
    """What is wrong with one row of an imported file; `field` None: the row as a whole."""

    row: int
    field: str | None
    message: str


@dataclass(frozen=True)
class ClientImport:
    """A CSV import of clients: the file's counts, the outcome of its valid rows so far, and
    the problems found (the first `errors` of them, in row order; `errors_omitted` more)."""

    id: str
    status: ImportStatus
    rows: int
    valid: int
    invalid: int
    created: int
    updated: int
    unchanged: int
    failed: int
    errors: tuple[RowProblem, ...]
    errors_omitted: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class PageOf:
    """One page of a listing and the opaque cursor of the next (None at the end)."""

    items: list = field(default_factory=list)
    next_cursor: str | None = None
