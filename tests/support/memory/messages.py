"""Messages in memory: `MessageRepository` with the DynamoDB tables' conditions and the
mailing's counters (tests/integration/test_message_repository.py runs both)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from chalicelib.domain import MailingStatus, Message, MessageStatus
from chalicelib.domain.mailing import MessageChange
from chalicelib.domain.paging import PageOf
from chalicelib.domain.timeline import TimelineGrid
from chalicelib.storage.messages import ERROR_LIMIT, Claim, Outcome
from chalicelib.storage.models import status_key
from chalicelib.storage.pagination import invalid_cursor
from tests.support.memory.timeline import MemoryTimelines


@dataclass
class _Stored:
    message: Message
    claim_id: str | None = None
    claim_until: datetime | None = None
    # When a write last changed it (None: when it was created).
    updated_at: datetime | None = None


@dataclass
class _Mailing:
    status: MailingStatus
    counts: Counter[MessageStatus] = field(default_factory=Counter)
    due: bool = False


class MemoryMessageRepository:
    """One process's messages and mailing counters; every change is checked and applied under
    one lock, all of a transaction or none of it."""

    def __init__(self, timelines: MemoryTimelines | None = None) -> None:
        # Shared with the in-memory mailings when both stand for one stage's tables.
        self.timelines = timelines or MemoryTimelines()
        self._messages: dict[tuple[str, str], _Stored] = {}
        self._mailings: dict[str, _Mailing] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- what tests set up

    def add_mailing(self, mailing_id: str, status: MailingStatus) -> None:
        with self._lock:
            self._mailings[mailing_id] = _Mailing(status)

    def add_message(self, message: Message) -> None:
        with self._lock:
            self._messages[(message.mailing_id, message.client_id)] = _Stored(message)
            self._mailings[message.mailing_id].counts[message.status] += 1

    def delete_mailing(self, mailing_id: str) -> None:
        with self._lock:
            del self._mailings[mailing_id]

    def mailing(self, mailing_id: str) -> tuple[MailingStatus, dict[MessageStatus, int]]:
        with self._lock:
            mailing = self._mailings[mailing_id]
            return mailing.status, {s: mailing.counts[s] for s in MessageStatus}

    # ---------------------------------------------------------------- the repository

    def get(self, mailing_id: str, client_id: str) -> Message | None:
        with self._lock:
            stored = self._messages.get((mailing_id, client_id))
            return stored.message if stored else None

    def claim(
        self,
        mailing_id: str,
        client_id: str,
        message_id: int,
        claim_id: str,
        now: datetime,
        until: datetime,
    ) -> Claim:
        with self._lock:
            stored = self._messages.get((mailing_id, client_id))
            if stored is None:
                return Claim(None, None)
            message = stored.message
            if (
                message.id != message_id
                or message.status is not MessageStatus.PENDING
                or (stored.claim_until is not None and stored.claim_until >= now)
            ):
                return Claim(None, message)
            stored.message = replace(message, attempts=message.attempts + 1)
            stored.claim_id, stored.claim_until = claim_id, until
            stored.updated_at = now
            return Claim(claim_id)

    def release(
        self,
        mailing_id: str,
        client_id: str,
        claim_id: str,
        now: datetime,
        error: str | None,
        *,
        called: bool = True,
    ) -> bool:
        with self._lock:
            stored = self._messages.get((mailing_id, client_id))
            if (
                stored is None
                or stored.claim_id != claim_id
                or stored.message.status is not MessageStatus.PENDING
            ):
                return False
            attempts = stored.message.attempts - (0 if called else 1)
            stored.message = replace(stored.message, last_error=error, attempts=attempts)
            stored.claim_id = stored.claim_until = None
            stored.updated_at = now
            return True

    def finish(
        self,
        mailing_id: str,
        outcomes: Sequence[Outcome],
        now: datetime,
        timeline: TimelineGrid | None = None,
    ) -> bool:
        with self._lock:
            mailing = self._mailings.get(mailing_id)
            if mailing is None or not all(self._ours(mailing_id, o, now) for o in outcomes):
                return False
            for outcome in outcomes:
                self._final(mailing_id, outcome, now)
                mailing.counts[MessageStatus.PENDING] -= 1
                mailing.counts[outcome.status] += 1
            moves = [(now, MessageStatus.PENDING, -len(outcomes))]
            moves += [(now, outcome.status, 1) for outcome in outcomes]
            self.timelines.add(mailing_id, timeline, moves)
            return True

    def fail_orphan(self, mailing_id: str, outcome: Outcome, now: datetime) -> bool:
        with self._lock:
            if not self._ours(mailing_id, replace(outcome, claim_id=None), now):
                return False
            self._final(mailing_id, outcome, now)
            return True

    def touch_if_lost(
        self, mailing_id: str, client_id: str, message_id: int, now: datetime, since: datetime
    ) -> bool:
        with self._lock:
            stored = self._messages.get((mailing_id, client_id))
            if (
                stored is None
                or stored.message.id != message_id
                or stored.message.status is not MessageStatus.PENDING
                or (stored.updated_at or stored.message.created_at) > since
                or (stored.claim_until is not None and stored.claim_until >= now)
            ):
                return False
            stored.updated_at = now
            return True

    def with_status(
        self, mailing_id: str, status: MessageStatus, limit: int, after: int | None = None
    ) -> list[tuple[str, int]]:
        with self._lock:
            found = sorted(
                (s.message.id, s.message.client_id)
                for (mailing, _), s in self._messages.items()
                if mailing == mailing_id
                and s.message.status is status
                and (after is None or s.message.id > after)
            )
            return [(client_id, message_id) for message_id, client_id in found[:limit]]

    def pending(
        self, mailing_id: str, limit: int, after: str | None = None
    ) -> list[tuple[str, int]]:
        with self._lock:
            found = sorted(
                (s.message.client_id, s.message.id)
                for (mailing, _), s in self._messages.items()
                if mailing == mailing_id
                and s.message.status is MessageStatus.PENDING
                and (after is None or s.message.client_id > after)
            )
        return found[:limit]

    def page(
        self, mailing_id: str, *, status: MessageStatus | None, limit: int, cursor: str | None
    ) -> PageOf[Message]:
        # By client id, as the table's sort key orders them; the cursor is the last one listed.
        with self._lock:
            listed = sorted(
                (s.message for (mailing, _), s in self._messages.items() if mailing == mailing_id),
                key=lambda message: message.client_id,
            )
        if status is not None:
            listed = [m for m in listed if m.status is status]
            if status_key(mailing_id, status.value) is not None:
                # The status index orders by message id; the others stay by client id.
                listed = sorted(listed, key=lambda m: m.id)
        keys = [m.client_id for m in listed]
        start = 0
        if cursor is not None:
            if cursor not in keys:
                raise invalid_cursor()
            start = keys.index(cursor) + 1
        items = listed[start : start + limit]
        more = start + limit < len(listed)
        return PageOf(items, items[-1].client_id if more and items else None)

    def history(self, mailing_id: str, *, limit: int) -> tuple[list[MessageChange], bool]:
        with self._lock:
            stored = [s for (mailing, _), s in self._messages.items() if mailing == mailing_id]
        changes = [
            MessageChange(
                s.message.created_at,
                s.message.status,
                None
                if s.message.status is MessageStatus.PENDING
                else s.message.sent_at or s.updated_at or s.message.created_at,
            )
            for s in stored
        ]
        return changes[:limit], len(changes) > limit

    def requeue_failed(
        self,
        mailing_id: str,
        messages: Sequence[tuple[str, int]],
        now: datetime,
        *,
        reopen: bool,
        token: str | None = None,
        timeline: TimelineGrid | None = None,
    ) -> bool:
        with self._lock:
            mailing = self._mailings.get(mailing_id)
            stored = [self._messages.get((mailing_id, client_id)) for client_id, _ in messages]
            if (
                mailing is None
                or mailing.status is MailingStatus.CANCELLED
                or any(s is None or s.message.status is not MessageStatus.FAILED for s in stored)
            ):
                return False
            for s in stored:
                assert s is not None
                s.message = replace(s.message, status=MessageStatus.PENDING)
                s.updated_at = now
            mailing.counts[MessageStatus.FAILED] -= len(messages)
            mailing.counts[MessageStatus.PENDING] += len(messages)
            moved = len(messages)
            moves = [(now, MessageStatus.FAILED, -moved), (now, MessageStatus.PENDING, moved)]
            self.timelines.add(mailing_id, timeline, moves)
            if reopen:
                mailing.status, mailing.due = MailingStatus.RUNNING, True
            return True

    def _ours(self, mailing_id: str, outcome: Outcome, now: datetime) -> bool:
        stored = self._messages.get((mailing_id, outcome.client_id))
        if stored is None or stored.message.status is not MessageStatus.PENDING:
            return False
        if outcome.claim_id is not None:
            return stored.claim_id == outcome.claim_id
        return stored.claim_until is None or stored.claim_until < now

    def _final(self, mailing_id: str, outcome: Outcome, now: datetime) -> None:
        stored = self._messages[(mailing_id, outcome.client_id)]
        message = replace(stored.message, status=outcome.status)
        if outcome.status is MessageStatus.SENT:
            message = replace(message, sent_at=now)
        if outcome.error is not None:
            message = replace(message, last_error=outcome.error[:ERROR_LIMIT])
        if outcome.skip_reason is not None:
            message = replace(message, skip_reason=outcome.skip_reason)
        if outcome.variant is not None:
            message = replace(message, variant=outcome.variant)
        stored.message, stored.claim_id, stored.claim_until = message, None, None
        stored.updated_at = now
