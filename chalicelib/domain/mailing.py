"""A mailing and its messages: statuses, the lifecycle, counters and the horizon of its dates.

The lifecycle is one table, `LIFECYCLE`: for each status and each thing that can happen to a
mailing, the status it moves to or why it is refused. The services ask `transition` (and the few
predicates below, read off the same rules) instead of comparing statuses themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from chalicelib.domain.audience import AudienceFilter
from chalicelib.domain.receipt import Delivery, DeliveryCounts
from chalicelib.domain.send_window import SendWindow
from chalicelib.domain.sms_parts import PartsEstimate
from chalicelib.domain.variants import Variant
from chalicelib.errors import Conflict, NotFound

# How far ahead of now a mailing may start or end. Dates beyond it are mistakes (year 9999), and
# arithmetic on them overflows in every later scheduler tick.
MAILING_HORIZON = timedelta(days=366)


class MessageStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # never sent, for the message's `skip_reason`


class SkipReason(StrEnum):
    """Why a `skipped` message was never sent."""

    OPTED_OUT = "opted_out"  # the client opted out
    FREQUENCY_CAP = "frequency_cap"  # the client had its FREQUENCY_CAP of messages already
    HOLDOUT = "holdout"  # the client is in the mailing's holdout group


@dataclass(frozen=True)
class SkipCounts:
    """A mailing's skipped messages by reason (they add up to its `skipped` counter, for the
    messages skipped since reasons were kept)."""

    opted_out: int = 0
    frequency_cap: int = 0
    holdout: int = 0

    def as_dict(self) -> dict[str, int]:
        return {reason.value: getattr(self, reason.value) for reason in SkipReason}


class MailingStatus(StrEnum):
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    CANCELLED = "cancelled"


class Action(StrEnum):
    """What can happen to a mailing, from a caller or from the scheduler."""

    START = "start"  # the scheduler takes a due mailing's lease; a scheduled one starts running
    FAN_OUT = "fan_out"  # its audience is walked and the messages created
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    EDIT = "edit"
    RETRY_FAILED = "retry_failed"  # its failed messages go again; a finished one runs again
    EXPIRE = "expire"  # its end passed: the messages still pending expire
    RECONCILE = "reconcile"  # pending messages whose job was lost are queued again
    FINISH = "finish"  # nothing is pending and the audience was walked (or it was cancelled)


@dataclass(frozen=True)
class Refused:
    """The action is refused in this status; `reason` may name `{id}` and `{status}`."""

    reason: str


@dataclass(frozen=True)
class ByStart:
    """The next status depends on whether the mailing's start has come."""

    before: MailingStatus
    after: MailingStatus


Next = MailingStatus | ByStart | Refused

_S = MailingStatus
_CHANGES_NO_MORE = Refused("mailing {id} is {status}; it can no longer change")
_NOT_SENDING = Refused("mailing {id} is {status}; nothing is sent any more")

LIFECYCLE: Mapping[tuple[MailingStatus, Action], Next] = {
    # scheduled: created, its start not yet taken up by the scheduler
    (_S.SCHEDULED, Action.START): _S.RUNNING,
    (_S.SCHEDULED, Action.FAN_OUT): _S.RUNNING,
    (_S.SCHEDULED, Action.PAUSE): _S.PAUSED,
    (_S.SCHEDULED, Action.RESUME): Refused("mailing {id} is {status}, not paused"),
    (_S.SCHEDULED, Action.CANCEL): _S.CANCELLED,
    (_S.SCHEDULED, Action.EDIT): _S.SCHEDULED,
    (_S.SCHEDULED, Action.RETRY_FAILED): _S.SCHEDULED,
    (_S.SCHEDULED, Action.EXPIRE): _S.SCHEDULED,
    (_S.SCHEDULED, Action.RECONCILE): Refused("mailing {id} is {status}; no job was queued yet"),
    (_S.SCHEDULED, Action.FINISH): _S.FINISHED,
    # running: its fan-out has begun
    (_S.RUNNING, Action.START): _S.RUNNING,
    (_S.RUNNING, Action.FAN_OUT): _S.RUNNING,
    (_S.RUNNING, Action.PAUSE): _S.PAUSED,
    (_S.RUNNING, Action.RESUME): Refused("mailing {id} is {status}, not paused"),
    (_S.RUNNING, Action.CANCEL): _S.CANCELLED,
    (_S.RUNNING, Action.EDIT): _S.RUNNING,
    (_S.RUNNING, Action.RETRY_FAILED): _S.RUNNING,
    (_S.RUNNING, Action.EXPIRE): _S.RUNNING,
    (_S.RUNNING, Action.RECONCILE): _S.RUNNING,
    (_S.RUNNING, Action.FINISH): _S.FINISHED,
    # paused: jobs wait (no attempt spent) until resume; the end is still watched
    (_S.PAUSED, Action.START): _S.PAUSED,
    (_S.PAUSED, Action.FAN_OUT): Refused("mailing {id} is {status}; resume continues it"),
    (_S.PAUSED, Action.PAUSE): _S.PAUSED,
    (_S.PAUSED, Action.RESUME): ByStart(before=_S.SCHEDULED, after=_S.RUNNING),
    (_S.PAUSED, Action.CANCEL): _S.CANCELLED,
    (_S.PAUSED, Action.EDIT): _S.PAUSED,
    (_S.PAUSED, Action.RETRY_FAILED): _S.PAUSED,
    (_S.PAUSED, Action.EXPIRE): _S.PAUSED,
    (_S.PAUSED, Action.RECONCILE): Refused("mailing {id} is {status}; its jobs wait on purpose"),
    (_S.PAUSED, Action.FINISH): _S.FINISHED,
    # finished: every message settled; only retry-failed opens it again
    (_S.FINISHED, Action.START): Refused("mailing {id} is {status}; it is no longer due"),
    (_S.FINISHED, Action.FAN_OUT): Refused("mailing {id} is {status}; its audience was walked"),
    (_S.FINISHED, Action.PAUSE): Refused("mailing {id} is {status}; there is nothing to pause"),
    (_S.FINISHED, Action.RESUME): Refused("mailing {id} is {status}, not paused"),
    (_S.FINISHED, Action.CANCEL): Refused(
        "mailing {id} has finished; there is nothing left to cancel"
    ),
    (_S.FINISHED, Action.EDIT): _CHANGES_NO_MORE,
    (_S.FINISHED, Action.RETRY_FAILED): _S.RUNNING,
    (_S.FINISHED, Action.EXPIRE): _S.FINISHED,
    (_S.FINISHED, Action.RECONCILE): Refused("mailing {id} is {status}; nothing is pending"),
    (_S.FINISHED, Action.FINISH): _S.FINISHED,
    # cancelled: its pending messages are cancelled (not expired), then it stays so for good
    (_S.CANCELLED, Action.START): _S.CANCELLED,
    (_S.CANCELLED, Action.FAN_OUT): _NOT_SENDING,
    (_S.CANCELLED, Action.PAUSE): Refused("mailing {id} is {status}; there is nothing to pause"),
    (_S.CANCELLED, Action.RESUME): Refused("mailing {id} is {status}, not paused"),
    (_S.CANCELLED, Action.CANCEL): _S.CANCELLED,
    (_S.CANCELLED, Action.EDIT): _CHANGES_NO_MORE,
    (_S.CANCELLED, Action.RETRY_FAILED): Refused(
        "mailing {id} is cancelled; nothing is sent any more"
    ),
    (_S.CANCELLED, Action.EXPIRE): Refused("mailing {id} is {status}; its messages are cancelled"),
    (_S.CANCELLED, Action.RECONCILE): _NOT_SENDING,
    (_S.CANCELLED, Action.FINISH): _S.CANCELLED,
}


class TransitionRefused(Conflict):
    """The mailing's status does not allow the action (HTTP 409 when a caller asked)."""


def allows(status: MailingStatus, action: Action) -> bool:
    """Whether `action` may happen to a mailing in `status`."""
    return not isinstance(LIFECYCLE[status, action], Refused)


def transition(
    mailing_id: str, status: MailingStatus, action: Action, *, started: bool = True
) -> MailingStatus:
    """The status `action` moves a mailing to (the same one when it changes nothing);
    TransitionRefused when the status does not allow it. `started`: its start has come."""
    step = LIFECYCLE[status, action]
    if isinstance(step, Refused):
        raise TransitionRefused(step.reason.format(id=mailing_id, status=status.value))
    if isinstance(step, ByStart):
        return step.after if started else step.before
    return step


def moves(status: MailingStatus, action: Action, *, started: bool = True) -> MailingStatus | None:
    """The new status `action` moves a mailing to; None when it stays as it is or the action
    is refused (the scheduler's view: it acts on what it finds, it never refuses a caller)."""
    step = LIFECYCLE[status, action]
    if isinstance(step, Refused):
        return None
    target = step if isinstance(step, MailingStatus) else (step.after if started else step.before)
    return None if target is status else target


def may_have_fanned_out(status: MailingStatus) -> bool:
    """Whether messages may exist: cancelling it then needs a sweep of the pending ones (a
    mailing paused before its start counts too, as it keeps its place on the due index)."""
    return status in (MailingStatus.RUNNING, MailingStatus.PAUSED)


def audience_frozen(status: MailingStatus, start_at: datetime, now: datetime) -> bool:
    """Whether its start and audience can no longer change: sending has begun (or would have,
    for a mailing paused after its start)."""
    return status is MailingStatus.RUNNING or (status is MailingStatus.PAUSED and start_at <= now)


def pending_become(status: MailingStatus, *, ended: bool) -> MessageStatus | None:
    """What the mailing's unclaimed pending messages become now: cancelled once it is
    cancelled, expired once its end passed; None while they may still be sent."""
    if status is MailingStatus.CANCELLED:
        return MessageStatus.CANCELLED
    if ended:
        return MessageStatus.EXPIRED
    return None


def may_finish(status: MailingStatus, *, fanout_done: bool, pending: int) -> bool:
    """Whether nothing is left to do: no message pending, and the audience walked (a
    cancelled mailing walks no more of it)."""
    return pending == 0 and (fanout_done or status is MailingStatus.CANCELLED)


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

    def __sub__(self, other: MessageCounts) -> MessageCounts:
        return MessageCounts(
            **{
                status.value: getattr(self, status.value) - getattr(other, status.value)
                for status in MessageStatus
            }
        )


@dataclass(frozen=True)
class Schedule:
    """The scheduler's bookkeeping on a mailing (never shown to callers)."""

    # On the due index: its audience still has to be walked, or it has not finished yet.
    due: bool = False
    # Where the fan-out stopped last (an opaque audience cursor); None before it starts.
    fanout_cursor: str | None = None
    fanout_done: bool = False
    # The reconciler: the counters as last seen, since when they have not moved, and where a
    # pass over the pending messages stands (a message id).
    quiet_mark: str | None = None
    quiet_since: datetime | None = None
    reconcile_after: int | None = None


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
    schedule: Schedule = Schedule()
    # The width in seconds of its timeline's buckets (domain/timeline.py); None when it was
    # stored before timelines were kept.
    timeline_step: int | None = None
    # The most SMS parts one of its messages may take (domain/sms_parts.py), and its text's
    # parts and cost over its audience as estimated when the text or the filter was last set;
    # None when it was stored before parts were counted.
    max_parts: int | None = None
    parts: PartsEstimate | None = None
    # Its messages with a delivery receipt, by outcome (all zero for a gateway that sends none).
    delivery: DeliveryCounts = field(default_factory=DeliveryCounts)
    # A service message: the FREQUENCY_CAP neither stops it nor counts it.
    frequency_cap_exempt: bool = False
    skip_counts: SkipCounts = SkipCounts()
    # A/B texts (domain/variants.py; `text` is the first one's) and the share of clients held
    # out; `variant_sent` counts the sent messages of each variant.
    variants: tuple[Variant, ...] = ()
    holdout_percent: int = 0
    variant_sent: tuple[int, ...] = ()

    def started(self, now: datetime) -> bool:
        """Whether its start has come."""
        return self.start_at <= now

    def ended(self, now: datetime) -> bool:
        """Whether its end has come: nothing may be sent any more."""
        return now >= self.end_at


class MailingNotFound(NotFound):
    """No mailing has this id (HTTP 404 when a caller asked)."""

    def __init__(self, mailing_id: str) -> None:
        super().__init__(f"mailing {mailing_id} not found")
        self.mailing_id = mailing_id


class MailingUnusable(Exception):
    """The stored mailing cannot be sent from: its record is corrupt or of an older schema.
    `problem` says what is wrong, in words an operator reads on the failed message."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class MailingChanged(Exception):
    """A conditional write found the mailing other than expected: another request or worker
    changed it meanwhile, holds its lease, or it is gone. An answer, never worth a retry."""


class MessagesExist(Exception):
    """A fan-out page was not committed because some of its clients already have a message of
    the mailing (a client met again in a later segment after its tag or operator changed)."""

    def __init__(self, client_ids: frozenset[str]) -> None:
        super().__init__(f"{len(client_ids)} of the page's clients already have a message")
        self.client_ids = client_ids


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
    # What the gateway's delivery receipt said (None: no receipt came, or none ever will).
    delivery: Delivery | None = None
    skip_reason: SkipReason | None = None  # only on a `skipped` message
    variant: int | None = None  # the A/B variant a sent message carried


@dataclass(frozen=True)
class MessageChange:
    """A message's history as its record keeps it: when it was created and, once it left
    `pending`, to what status and when (the timeline is rebuilt from these)."""

    created_at: datetime
    status: MessageStatus
    changed_at: datetime | None


# ---------------------------------------------------------------- statistics over all mailings


@dataclass(frozen=True)
class Settled:
    """What one mailing adds to the all-time totals: its counts and status when it last
    settled (finished, or cancelled before it started). A mailing that runs again (retry-failed)
    keeps it, so the totals change only by the difference when it settles again."""

    counts: MessageCounts
    status: MailingStatus
    times: int  # how many times it settled: the mark the next settling write is conditioned on


@dataclass(frozen=True)
class Totals:
    """The all-time totals item: the sum of every stored mailing's `Settled` part."""

    counts: MessageCounts = MessageCounts()
    mailings: Mapping[MailingStatus, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Statistics:
    """Messages and mailings by status over every stored mailing, and the mailings that can
    still change (not settled: listed one by one)."""

    counts: MessageCounts
    mailings: Mapping[MailingStatus, int]
    unsettled: list[Mailing]

    @property
    def mailing_count(self) -> int:
        return sum(self.mailings.values())


def statistics(totals: Totals, unsettled: Sequence[tuple[Mailing, Settled | None]]) -> Statistics:
    """The totals with each unsettled mailing's live figures in place of what it last settled
    with (a mailing running again after retry-failed is in both)."""
    counts = totals.counts
    by_status = {status: totals.mailings.get(status, 0) for status in MailingStatus}
    for mailing, settled in unsettled:
        counts = counts + mailing.counts
        by_status[mailing.status] += 1
        if settled is not None:
            counts = counts - settled.counts
            by_status[settled.status] -= 1
    return Statistics(counts, by_status, [mailing for mailing, _ in unsettled])


def was_active(mailing: Mailing, since: datetime, until: datetime) -> bool:
    """Whether the mailing could send anything between `since` and `until`."""
    if mailing.start_at > until or mailing.end_at < since:
        return False
    # Cancelled before it started and nothing was ever created: nothing was processed.
    return not (mailing.status is MailingStatus.CANCELLED and mailing.counts.total == 0)


def settling(
    settled: Settled | None, counts: MessageCounts, status: MailingStatus
) -> tuple[MessageCounts, dict[MailingStatus, int]]:
    """What settling a mailing now (with `counts`, in `status`) adds to the totals: the message
    counts and mailings by status, as differences from what it settled with before."""
    delta = counts if settled is None else counts - settled.counts
    mailings = {status: 1}
    if settled is not None:
        mailings[settled.status] = mailings.get(settled.status, 0) - 1
    return delta, {s: n for s, n in mailings.items() if n}
