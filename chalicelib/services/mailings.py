"""Mailings: scheduling what to send to whom and when, and reading their statistics."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from chalicelib.domain import (
    MAILING_HORIZON,
    Action,
    AudienceFilter,
    Clock,
    Mailing,
    MailingStatus,
    Message,
    MessageCounts,
    MessageStatus,
    PageOf,
    SendWindow,
    timeline,
)
from chalicelib.domain.mailing import (
    MailingChanged,
    MailingNotFound,
    Schedule,
    Statistics,
    audience_frozen,
    may_have_fanned_out,
    transition,
    was_active,
)
from chalicelib.domain.variants import Variant
from chalicelib.errors import Conflict, ServiceUnavailable, ValidationFailed
from chalicelib.services.messages import MessageStore
from chalicelib.services.parts import PartsCounter
from chalicelib.services.queues import SQS_MAX_DELAY_SECONDS, Queues, job_batches
from chalicelib.services.reconciler import LOST_JOB_AFTER
from chalicelib.storage.errors import PATIENT, Retry, looks_like_id
from chalicelib.storage.mailings import MailingRepository

logger = logging.getLogger(__name__)

# A timeline stored before timelines were kept is rebuilt from at most this many messages.
TIMELINE_MAX_MESSAGES = 50_000
# Failed messages queued again per transaction (DynamoDB allows 100 items with the mailing and
# its timeline's part).
RETRY_PAGE = 98
# What a caller whose retry-failed could not queue its jobs is told to wait before asking again.
RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True)
class MailingFields:
    """What a caller sets on a mailing."""

    text: str
    start_at: datetime
    end_at: datetime
    audience: AudienceFilter
    send_window: SendWindow | None
    # The most SMS parts a message may take; None: the default (MAX_PARTS_DEFAULT).
    max_parts: int | None = None
    # A service message: the frequency cap neither stops it nor counts it.
    frequency_cap_exempt: bool = False
    # A/B texts (`text` is the first one's) and the share of the audience held out.
    variants: tuple[Variant, ...] = ()
    holdout_percent: int = 0


class MailingService:
    """Mailings and their message statistics."""

    def __init__(
        self,
        clock: Clock,
        queues: Queues,
        messages: MessageStore,
        jobs_per_message: int,
        *,
        mailings: MailingRepository,
        retry: Retry = PATIENT,
        parts: PartsCounter | None = None,
    ) -> None:
        self._parts = parts
        self._retry = retry
        self._mailings = mailings
        self._jobs_per_message = jobs_per_message
        self._clock = clock
        self._queues = queues
        self._messages = messages

    # ---------------------------------------------------------------- writes

    def create(self, fields: MailingFields) -> Mailing:
        """Schedule a mailing; its end must be in the future."""
        self._check(fields)
        now = self._clock()
        mailing = Mailing(
            id=str(uuid.uuid4()),
            text=fields.text,
            start_at=fields.start_at.astimezone(UTC),
            end_at=fields.end_at.astimezone(UTC),
            audience=fields.audience,
            send_window=fields.send_window,
            frequency_cap_exempt=fields.frequency_cap_exempt,
            variants=fields.variants,
            holdout_percent=fields.holdout_percent,
            status=MailingStatus.SCHEDULED,
            counts=MessageCounts(),
            created_at=now,
            updated_at=now,
            schedule=Schedule(due=True),
        )
        mailing = self._with_parts(mailing, fields)
        mailing = timeline.with_step(mailing)
        self._mailings.add(mailing)
        logger.info("mailing created", extra={"mailing_id": mailing.id})
        self._kick_if_starting_soon(mailing)
        return mailing

    def replace(self, mailing_id: str, fields: MailingFields) -> Mailing:
        """Overwrite every field of a mailing (PUT)."""
        current = self._load(mailing_id)
        self._check(fields)
        mailing = self._save(current, fields)
        logger.info("mailing replaced", extra={"mailing_id": mailing_id})
        return mailing

    def update(self, mailing_id: str, changes: Mapping[str, object]) -> Mailing:
        """Change only the given fields (PATCH)."""
        mailing = self._load(mailing_id)
        fields = replace(_fields_of(mailing), **changes)
        fields = _text_of_variants(fields, changes)
        if fields.end_at <= fields.start_at:
            raise ValidationFailed(
                "end_at must be after start_at",
                [{"field": "body.end_at", "message": "must be after start_at", "type": "range"}],
            )
        self._check(fields, changes)
        saved = self._save(mailing, fields)
        logger.info(
            "mailing updated: %s", ", ".join(sorted(changes)), extra={"mailing_id": mailing_id}
        )
        return saved

    def cancel(self, mailing_id: str) -> Mailing:
        """Stop sending; messages not yet sent become `cancelled`, statistics stay."""
        mailing = self._load(mailing_id)
        target = transition(mailing_id, mailing.status, Action.CANCEL)
        if target is mailing.status:
            return mailing
        started = may_have_fanned_out(mailing.status)
        try:
            # Nothing was created yet if it never started: no sweep needed, and it never
            # needs the scheduler again.
            cancelled = self._mailings.set_status(
                mailing_id, mailing.status, target, self._clock(), off_due=not started
            )
        except MailingChanged:
            return self.cancel(mailing_id)
        logger.info("mailing cancelled", extra={"mailing_id": mailing_id})
        if started:
            self._kick(mailing_id, 0)
        return cancelled

    def pause(self, mailing_id: str) -> Mailing:
        """Stop sending (jobs wait, no attempt spent) until `resume`; idempotent."""
        mailing = self._load(mailing_id)
        target = transition(mailing_id, mailing.status, Action.PAUSE)
        if target is mailing.status:
            return mailing
        paused = self._set_status(mailing, target)
        logger.info("mailing paused", extra={"mailing_id": mailing_id})
        return paused

    def resume(self, mailing_id: str) -> Mailing:
        """Continue a paused mailing where it stopped; jobs waiting come back within seconds."""
        mailing = self._load(mailing_id)
        started = mailing.started(self._clock())
        target = transition(mailing_id, mailing.status, Action.RESUME, started=started)
        resumed = self._set_status(mailing, target)
        logger.info("mailing resumed", extra={"mailing_id": mailing_id})
        if started:
            self._kick(mailing_id, 0)  # continue the fan-out now, not at the next tick
        else:
            self._kick_if_starting_soon(resumed)
        return resumed

    def retry_failed(self, mailing_id: str, budget_seconds: float = 20.0) -> tuple[int, bool]:
        """Queue the mailing's failed messages again, with the same message ids; the number
        queued, and whether failed messages are left (the time budget ran out: call again).

        Each page turns pending in one transaction first, then its jobs go out: a job never
        names a message that is not pending, and a commit that fails (or is slow) strands
        nothing. If the jobs cannot go after the commit, the messages are pending with no job;
        the scheduler's reconciler queues them once the mailing has been quiet a while, and the
        caller gets ServiceUnavailable saying so."""
        mailing = self._load(mailing_id)
        # A finished mailing runs again: the requeue's transaction reopens it.
        reopen = transition(mailing_id, mailing.status, Action.RETRY_FAILED) is not mailing.status
        if mailing.ended(self._clock()):
            raise Conflict(f"mailing {mailing_id} has ended; failed messages can no longer go")
        started, queued, after = time.monotonic(), 0, None
        while time.monotonic() - started < budget_seconds:
            page = self._messages.with_status(
                mailing_id, MessageStatus.FAILED, RETRY_PAGE, after=after
            )
            if not page:
                return queued, False
            now, token = self._clock(), uuid.uuid4().hex
            committed = replace(
                self._retry,
                remaining=lambda: budget_seconds - (time.monotonic() - started),
                what="making failed messages pending again",
                log={"mailing_id": mailing_id},
            )(
                lambda page=page, now=now, reopen=reopen, token=token: (
                    self._messages.requeue_failed(
                        mailing_id,
                        page,
                        now,
                        reopen=reopen,
                        token=token,
                        timeline=timeline.grid_of(mailing),
                    )
                )
            )
            if not committed:
                raise Conflict(f"mailing {mailing_id} changed meanwhile; retry the request")
            try:
                self._queues.enqueue(job_batches(mailing_id, page, now, self._jobs_per_message))
            except Exception as exc:
                logger.warning(
                    "retried messages are pending but their jobs could not be queued",
                    exc_info=True,
                    extra={"mailing_id": mailing_id, "messages": len(page)},
                )
                minutes = math.ceil(LOST_JOB_AFTER.total_seconds() / 60)
                raise ServiceUnavailable(
                    f"{queued + len(page)} failed messages of mailing {mailing_id} are pending "
                    f"again, but the send jobs of the last {len(page)} could not be queued; the "
                    f"scheduler queues them within about {minutes} minutes of the mailing going "
                    "quiet. Call again to retry any failed messages still left.",
                    retry_after=RETRY_AFTER_SECONDS,
                ) from exc
            queued, reopen, after = queued + len(page), False, page[-1][1]
        left = self._messages.with_status(mailing_id, MessageStatus.FAILED, 1, after=after)
        return queued, bool(left)

    def _set_status(self, mailing: Mailing, target: MailingStatus) -> Mailing:
        try:
            return self._mailings.set_status(mailing.id, mailing.status, target, self._clock())
        except MailingChanged:
            raise Conflict(
                f"mailing {mailing.id} changed meanwhile; read it again and retry"
            ) from None

    def delete(self, mailing_id: str) -> None:
        """Remove a mailing; every send of it stops, in-flight jobs included."""
        self._load(mailing_id)
        self._mailings.delete(mailing_id)
        logger.info("mailing deleted", extra={"mailing_id": mailing_id})

    # ---------------------------------------------------------------- reads

    def get(self, mailing_id: str) -> Mailing:
        return self._load(mailing_id)

    def list(self, *, limit: int, cursor: str | None) -> PageOf[Mailing]:
        """One page of mailings, newest first."""
        return self._mailings.page(limit=limit, cursor=cursor)

    def messages(
        self, mailing_id: str, *, status: MessageStatus | None, limit: int, cursor: str | None
    ) -> tuple[Mailing, PageOf[Message]]:
        """The mailing (with its counters) and one page of its messages, optionally by status."""
        mailing = self.get(mailing_id)
        return mailing, self._messages.page(mailing_id, status=status, limit=limit, cursor=cursor)

    def timeline(
        self, mailing_id: str, *, points: int = timeline.POINTS
    ) -> tuple[Mailing, list[tuple[datetime, MessageCounts]], bool]:
        """The mailing's message counts by status over time: up to `points` moments from its
        first message to its last change (or now while some are pending), each with the
        counts as they stood then; True as the third value when only part of it was read.

        Read from the timeline its counter updates keep (one BatchGetItem, whatever the number
        of messages). A mailing stored before timelines were kept has none: it is rebuilt from
        its first TIMELINE_MAX_MESSAGES message records, as it always was."""
        mailing = self.get(mailing_id)
        now = self._clock()
        grid = timeline.grid_of(mailing)
        if grid is None:
            changes, truncated = self._messages.history(mailing_id, limit=TIMELINE_MAX_MESSAGES)
            pending = mailing.counts.pending
            return mailing, timeline.rebuilt(changes, pending, now, points), truncated
        activity = self._mailings.timeline(mailing_id, grid, now)
        series = timeline.points(grid, activity.buckets, activity.last_change, now, points)
        return mailing, series, False

    def due(self, now: datetime, *, limit: int = 100) -> list[Mailing]:
        """Mailings whose start has come and whose audience is not fully enqueued yet."""
        return self._mailings.get_many(self._mailings.due_ids(now, limit=limit))

    def overview(
        self, *, limit: int, cursor: str | None
    ) -> tuple[int, MessageCounts, PageOf[Mailing]]:
        """Number of mailings, counts over all of them, and one page of per-mailing counts."""
        overall = self.statistics()
        return overall.mailing_count, overall.counts, self.list(limit=limit, cursor=cursor)

    def statistics(self) -> Statistics:
        """Messages and mailings by status over every mailing, and the unsettled mailings
        (/stats and /metrics): the all-time totals item plus the mailings not yet settled,
        so the cost grows with the mailings still open, never with history or messages."""
        return self._mailings.statistics()

    def active_between(self, since: datetime, until: datetime) -> Sequence[Mailing]:
        """The mailings that could send between `since` and `until` (the daily report): read
        from those whose end is at or after `since`, never every mailing."""
        return [m for m in self._mailings.ending_since(since) if was_active(m, since, until)]

    # ---------------------------------------------------------------- helpers

    def _check(self, fields: MailingFields, given: Iterable[str] = ("start_at", "end_at")) -> None:
        """The dates are sane: the end in the future, both within the horizon; a start before
        the horizon only matters when the caller gives it (a running mailing keeps its own)."""
        now = self._clock()
        if fields.end_at <= now:
            raise ValidationFailed(
                "end_at is in the past: the mailing could never send anything",
                [{"field": "body.end_at", "message": "must be in the future", "type": "range"}],
            )
        latest, earliest = now + MAILING_HORIZON, now - MAILING_HORIZON
        days = MAILING_HORIZON.days
        details = []
        if fields.start_at > latest or ("start_at" in given and fields.start_at < earliest):
            details.append(
                {
                    "field": "body.start_at",
                    "message": f"must be within {days} days of now "
                    f"({earliest.isoformat()} to {latest.isoformat()})",
                    "type": "range",
                }
            )
        if fields.end_at > latest:
            details.append(
                {
                    "field": "body.end_at",
                    "message": f"must be at most {days} days ahead (by {latest.isoformat()})",
                    "type": "range",
                }
            )
        if details:
            raise ValidationFailed(f"a mailing may be scheduled at most {days} days ahead", details)

    def _save(self, mailing: Mailing, fields: MailingFields) -> Mailing:
        self._check_editable(mailing, fields)
        now = self._clock()
        changed = _with_fields(mailing, fields, now)
        if _parts_may_change(mailing, fields):
            changed = self._with_parts(changed, fields)
        if not audience_frozen(mailing.status, mailing.start_at, now):
            # No message exists yet: the timeline's buckets follow the new dates.
            changed = timeline.with_step(changed)
        try:
            saved = self._mailings.save_fields(changed, before=mailing.updated_at)
        except MailingChanged:
            raise Conflict(
                f"mailing {mailing.id} was changed, started or deleted by another "
                "request; read it again and retry"
            ) from None
        self._kick_if_starting_soon(saved)
        return saved

    def _check_editable(self, mailing: Mailing, fields: MailingFields) -> None:
        transition(mailing.id, mailing.status, Action.EDIT)
        if audience_frozen(mailing.status, mailing.start_at, self._clock()):
            current = _fields_of(mailing)
            frozen = [
                name
                for name, old, new in (
                    ("start_at", current.start_at, fields.start_at),
                    ("filter", current.audience, fields.audience),
                    # Who gets which text, and who is held out, stay as they were assigned.
                    ("variants", _shares(current), _shares(fields)),
                    ("holdout_percent", current.holdout_percent, fields.holdout_percent),
                )
                if old != new
            ]
            if frozen:
                raise Conflict(
                    f"mailing {mailing.id} is running: {', '.join(frozen)} can no longer "
                    "change (text, end_at and send_window still can)",
                    [
                        {
                            "field": f"body.{name}",
                            "message": "frozen once sending starts",
                            "type": "frozen",
                        }
                        for name in frozen
                    ],
                )

    def _with_parts(self, mailing: Mailing, fields: MailingFields) -> Mailing:
        """The mailing with its max_parts and its text's parts over its audience, estimated
        now; ValidationFailed when a message would take more than max_parts."""
        if self._parts is None:
            return mailing
        max_parts = fields.max_parts or self._parts.max_parts_default
        estimate = self._parts.for_mailing(_text_shares(fields), fields.audience, max_parts)
        return replace(mailing, max_parts=max_parts, parts=estimate)

    def _kick_if_starting_soon(self, mailing: Mailing) -> None:
        # Start on time, not at the next scheduler tick: a delayed kick lands at start_at.
        wait = (mailing.start_at - self._clock()).total_seconds()
        if mailing.schedule.due and wait <= SQS_MAX_DELAY_SECONDS:
            self._kick(mailing.id, max(0, math.ceil(wait)))

    def _kick(self, mailing_id: str, delay: int) -> None:
        if not self._queues.can_kick:
            return
        try:
            self._queues.kick([mailing_id], delay)
        except Exception:
            # The scheduler's next tick starts it anyway; the caller's change is saved.
            logger.warning(
                "could not kick the scheduler", exc_info=True, extra={"mailing_id": mailing_id}
            )

    def _load(self, mailing_id: str) -> Mailing:
        if not looks_like_id(mailing_id):
            raise MailingNotFound(mailing_id)
        return self._mailings.get(mailing_id)


def _fields_of(mailing: Mailing) -> MailingFields:
    return MailingFields(
        text=mailing.text,
        start_at=mailing.start_at,
        end_at=mailing.end_at,
        audience=mailing.audience,
        send_window=mailing.send_window,
        max_parts=mailing.max_parts,
        frequency_cap_exempt=mailing.frequency_cap_exempt,
        variants=mailing.variants,
        holdout_percent=mailing.holdout_percent,
    )


def _parts_may_change(mailing: Mailing, fields: MailingFields) -> bool:
    """Whether the parts must be counted again: the text, filter or max_parts change, or the
    mailing has no estimate yet (stored before parts were counted)."""
    return (
        mailing.parts is None
        or fields.text != mailing.text
        or fields.audience != mailing.audience
        or fields.max_parts != mailing.max_parts
        or fields.variants != mailing.variants
        or fields.holdout_percent != mailing.holdout_percent
    )


def _text_shares(fields: MailingFields) -> list[tuple[str, float]]:
    """Each text the mailing sends and the share of its audience that gets it."""
    sent = 1 - fields.holdout_percent / 100
    if not fields.variants:
        return [(fields.text, sent)]
    weights = sum(v.weight for v in fields.variants)
    return [(v.text, sent * v.weight / weights) for v in fields.variants]


def _shares(fields: MailingFields) -> tuple[int, ...]:
    """The variants' weights: what decides which client gets which text."""
    return tuple(v.weight for v in fields.variants)


def _text_of_variants(fields: MailingFields, changes: Mapping[str, object]) -> MailingFields:
    """A PATCH's fields with `text` kept as the first variant's; a text alone cannot change on
    a mailing with variants (its variants are what is sent)."""
    if not fields.variants:
        return fields
    text_alone = "text" in changes and "variants" not in changes
    if text_alone and fields.text != fields.variants[0].text:
        raise ValidationFailed(
            "this mailing has A/B variants: change their texts with `variants`",
            [
                {
                    "field": "body.text",
                    "message": "change `variants` instead",
                    "type": "variants_text",
                }
            ],
        )
    return replace(fields, text=fields.variants[0].text)


def _with_fields(mailing: Mailing, fields: MailingFields, now: datetime) -> Mailing:
    """The mailing with the caller's fields (dates in UTC, as stored) changed `now`."""
    return replace(
        mailing,
        text=fields.text,
        start_at=fields.start_at.astimezone(UTC),
        end_at=fields.end_at.astimezone(UTC),
        audience=fields.audience,
        send_window=fields.send_window,
        frequency_cap_exempt=fields.frequency_cap_exempt,
        variants=fields.variants,
        holdout_percent=fields.holdout_percent,
        updated_at=now,
    )
