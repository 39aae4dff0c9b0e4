"""Mailings: scheduling what to send to whom and when, and reading their statistics."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from pynamodb.exceptions import DeleteError, DoesNotExist, PutError

from chalicelib.domain import (
    AudienceFilter,
    Clock,
    Mailing,
    MailingStatus,
    Message,
    MessageCounts,
    MessageStatus,
    PageOf,
    SendWindow,
)
from chalicelib.errors import Conflict, NotFound, ValidationFailed
from chalicelib.models import DUE_KEY, MAILING_LISTING_KEY, Models, status_key
from chalicelib.pagination import Segment, fingerprint, index_query, paginate
from chalicelib.services.storage import is_conditional_failure, looks_like_id

_MAILING_LISTING_KEYS = ("listing_key", "created_at", "mailing_id")


@dataclass(frozen=True)
class MailingFields:
    """What a caller sets on a mailing."""

    text: str
    start_at: datetime
    end_at: datetime
    audience: AudienceFilter
    send_window: SendWindow | None


class MailingService:
    """Mailings and their message statistics."""

    def __init__(self, models: Models, clock: Clock) -> None:
        self._models = models
        self._clock = clock

    # ---------------------------------------------------------------- writes

    def create(self, fields: MailingFields) -> Mailing:
        """Schedule a mailing; its end must be in the future."""
        self._check(fields)
        now = self._clock()
        item = self._models.Mailing(
            str(uuid.uuid4()),
            status=MailingStatus.SCHEDULED.value,
            created_at=now,
            listing_key=MAILING_LISTING_KEY,
            due_key=DUE_KEY,
        )
        self._apply(item, fields, now)
        item.save(condition=self._models.Mailing.mailing_id.does_not_exist())
        return self._to_domain(item)

    def replace(self, mailing_id: str, fields: MailingFields) -> Mailing:
        """Overwrite every field of a mailing (PUT)."""
        item = self._load(mailing_id)
        self._check(fields)
        return self._save(item, fields)

    def update(self, mailing_id: str, changes: dict[str, Any]) -> Mailing:
        """Change only the given fields (PATCH)."""
        item = self._load(mailing_id)
        current = self._fields_of(item)
        fields = replace(current, **changes)
        if fields.end_at <= fields.start_at:
            raise ValidationFailed(
                "end_at must be after start_at",
                [{"field": "body.end_at", "message": "must be after start_at", "type": "range"}],
            )
        self._check(fields)
        return self._save(item, fields)

    def delete(self, mailing_id: str) -> None:
        """Remove a mailing."""
        item = self._load(mailing_id)
        try:
            item.delete()
        except DeleteError as exc:
            if is_conditional_failure(exc):
                raise Conflict(
                    f"mailing {mailing_id} was changed by another request; retry"
                ) from None
            raise

    # ---------------------------------------------------------------- reads

    def get(self, mailing_id: str) -> Mailing:
        return self._to_domain(self._load(mailing_id))

    def list(self, *, limit: int, cursor: str | None) -> PageOf:
        """One page of mailings, newest first."""
        segments = [self._all_mailings_segment()]
        return PageOf(*paginate(segments, fingerprint("mailings"), cursor, limit, self._to_domain))

    def messages(
        self, mailing_id: str, *, status: MessageStatus | None, limit: int, cursor: str | None
    ) -> tuple[Mailing, PageOf]:
        """The mailing (with its counters) and one page of its messages, optionally by status."""
        mailing = self.get(mailing_id)
        message = self._models.Message
        if status is None:
            query = index_query(message.query, mailing_id)
            segments = [Segment(query, ("mailing_id", "client_id"))]
            scope = fingerprint("messages", mailing_id, None)
            return mailing, PageOf(*paginate(segments, scope, cursor, limit, _message_to_domain))
        # The status index holds keys only (cheaper status changes); fetch the page's records.
        query = index_query(message.by_status.query, status_key(mailing_id, status.value))
        segments = [Segment(query, ("status_key", "message_id", "mailing_id", "client_id"))]
        scope = fingerprint("messages", mailing_id, status.value)
        keys, next_cursor = paginate(segments, scope, cursor, limit, lambda k: k.client_id)
        found = {m.client_id: m for m in message.batch_get([(mailing_id, c) for c in keys])}
        # A message may change status between the two reads; list it as it is now.
        items = [_message_to_domain(found[c]) for c in keys if c in found]
        return mailing, PageOf(items, next_cursor)

    def due(self, now: datetime, *, limit: int = 100) -> list[Mailing]:
        """Mailings whose start has come and whose audience is not fully enqueued yet."""
        Mailing = self._models.Mailing
        items = Mailing.due.query(
            DUE_KEY, Mailing.start_at <= now.astimezone(UTC), limit=limit, page_size=limit
        )
        return [self._to_domain(item) for item in items]

    def overview(self, *, limit: int, cursor: str | None) -> tuple[int, MessageCounts, PageOf]:
        """Number of mailings, counts over all of them, and one page of per-mailing counts."""
        total = MessageCounts()
        count = 0
        # Counters live on the mailing items: the cost grows with mailings, never with messages.
        for item in self._models.Mailing.by_created.query(
            MAILING_LISTING_KEY,
            attributes_to_get=[
                "mailing_id",
                "count_pending",
                "count_sent",
                "count_failed",
                "count_expired",
                "count_cancelled",
            ],
        ):
            count += 1
            total = total + _counts_of(item)
        return count, total, self.list(limit=limit, cursor=cursor)

    # ---------------------------------------------------------------- helpers

    def _all_mailings_segment(self) -> Segment:
        query = index_query(
            self._models.Mailing.by_created.query, MAILING_LISTING_KEY, forward=False
        )
        return Segment(query, _MAILING_LISTING_KEYS)

    def _check(self, fields: MailingFields) -> None:
        if fields.end_at <= self._clock():
            raise ValidationFailed(
                "end_at is in the past: the mailing could never send anything",
                [{"field": "body.end_at", "message": "must be in the future", "type": "range"}],
            )

    def _save(self, item: Any, fields: MailingFields) -> Mailing:
        self._apply(item, fields, self._clock())
        try:
            item.save()
        except PutError as exc:
            if is_conditional_failure(exc):
                raise Conflict(
                    f"mailing {item.mailing_id} was changed or deleted by another request; "
                    "read it again and retry"
                ) from None
            raise
        return self._to_domain(item)

    @staticmethod
    def _apply(item: Any, fields: MailingFields, now: datetime) -> None:
        item.text = fields.text
        item.start_at = fields.start_at.astimezone(UTC)
        item.end_at = fields.end_at.astimezone(UTC)
        item.operator_codes = list(fields.audience.operator_codes)
        item.tags = list(fields.audience.tags)
        if fields.send_window is None:
            item.window_start = item.window_end = None
        else:
            item.window_start, item.window_end = fields.send_window.to_minutes()
        item.updated_at = now

    def _load(self, mailing_id: str) -> Any:
        if not looks_like_id(mailing_id):
            raise NotFound(f"mailing {mailing_id} not found")
        try:
            return self._models.Mailing.get(mailing_id, consistent_read=True)
        except DoesNotExist:
            raise NotFound(f"mailing {mailing_id} not found") from None

    @staticmethod
    def _fields_of(item: Any) -> MailingFields:
        window = None
        if item.window_start is not None and item.window_end is not None:
            window = SendWindow.from_minutes(int(item.window_start), int(item.window_end))
        return MailingFields(
            text=item.text,
            start_at=item.start_at,
            end_at=item.end_at,
            audience=AudienceFilter(tuple(item.operator_codes or ()), tuple(item.tags or ())),
            send_window=window,
        )

    def _to_domain(self, item: Any) -> Mailing:
        fields = self._fields_of(item)
        return Mailing(
            id=item.mailing_id,
            text=fields.text,
            start_at=fields.start_at,
            end_at=fields.end_at,
            audience=fields.audience,
            send_window=fields.send_window,
            status=MailingStatus(item.status),
            counts=_counts_of(item),
            created_at=item.created_at,
            updated_at=item.updated_at,
        )


def _counts_of(item: Any) -> MessageCounts:
    return MessageCounts(
        pending=int(item.count_pending or 0),
        sent=int(item.count_sent or 0),
        failed=int(item.count_failed or 0),
        expired=int(item.count_expired or 0),
        cancelled=int(item.count_cancelled or 0),
    )


def _message_to_domain(item: Any) -> Message:
    return Message(
        id=int(item.message_id),
        mailing_id=item.mailing_id,
        client_id=item.client_id,
        phone=item.phone,
        status=MessageStatus(item.status),
        created_at=item.created_at,
        sent_at=item.sent_at,
        attempts=int(item.attempts or 0),
        last_error=item.last_error,
    )
