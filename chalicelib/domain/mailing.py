"""A mailing and its messages: statuses, counters and the horizon of its dates."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from chalicelib.domain.audience import AudienceFilter
from chalicelib.domain.send_window import SendWindow

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
