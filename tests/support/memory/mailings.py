"""An in-memory MailingRepository: the same answers as DynamoDB's, conditions included."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from chalicelib.domain.mailing import (
    Mailing,
    MailingChanged,
    MailingNotFound,
    MailingStatus,
    Message,
    MessageCounts,
    MessagesExist,
    MessageStatus,
    Statistics,
    Totals,
    statistics,
)
from chalicelib.domain.paging import PageOf
from chalicelib.domain.timeline import TimelineGrid
from chalicelib.storage.timeline import Activity
from tests.support.memory.timeline import MemoryTimelines


@dataclass
class _Stored:
    mailing: Mailing
    lease_owner: str | None = None
    lease_until: datetime | None = None


class MemoryMailingRepository:
    """MailingRepository in a dict; each method does what its DynamoDB request would."""

    def __init__(self, timelines: MemoryTimelines | None = None) -> None:
        # Shared with the in-memory messages when both stand for one stage's tables.
        self.timelines = timelines or MemoryTimelines()
        self._items: dict[str, _Stored] = {}
        self.messages: dict[tuple[str, str], Message] = {}
        self._sequence = 0

    # ---------------------------------------------------------------- reads

    def get(self, mailing_id: str) -> Mailing:
        stored = self._items.get(mailing_id)
        if stored is None:
            raise MailingNotFound(mailing_id)
        return stored.mailing

    def get_for_sending(self, mailing_id: str) -> Mailing:
        # A mailing kept in memory is always a whole domain value: never unusable.
        return self.get(mailing_id)

    def get_many(self, mailing_ids: Sequence[str]) -> list[Mailing]:
        return [self._items[i].mailing for i in mailing_ids if i in self._items]

    def counts(self, mailing_ids: Sequence[str]) -> list[MessageCounts]:
        return [mailing.counts for mailing in self.get_many(mailing_ids)]

    def ids(self) -> list[str]:
        newest_first = sorted(
            self._items.values(), key=lambda s: (s.mailing.created_at, s.mailing.id), reverse=True
        )
        return [stored.mailing.id for stored in newest_first]

    def page(self, *, limit: int, cursor: str | None) -> PageOf[Mailing]:
        ids = self.ids()
        start = ids.index(cursor) + 1 if cursor in ids else 0
        chosen = ids[start : start + limit]
        more = start + limit < len(ids)
        return PageOf(self.get_many(chosen), chosen[-1] if more and chosen else None)

    def due_ids(self, now: datetime, *, limit: int | None = None) -> list[str]:
        due = sorted(
            (s.mailing for s in self._items.values() if s.mailing.schedule.due),
            key=lambda m: m.start_at,
        )
        ids = [m.id for m in due if m.start_at <= now]
        return ids if limit is None else ids[:limit]

    def statistics(self) -> Statistics:
        # Nothing to keep bounded in memory: the totals are the sum of every mailing.
        mailings = [stored.mailing for stored in self._items.values()]
        every = statistics(Totals(), [(mailing, None) for mailing in mailings])
        return replace(every, unsettled=[m for m in mailings if m.schedule.due])

    def ending_since(self, since: datetime) -> list[Mailing]:
        ending = [s.mailing for s in self._items.values() if s.mailing.end_at >= since]
        return sorted(ending, key=lambda m: m.end_at)

    def timeline(self, mailing_id: str, grid: TimelineGrid, now: datetime) -> Activity:
        return self.timelines.read(mailing_id, grid, now)

    def backfill_totals(self) -> int:
        return 0  # the totals are never stored apart

    # ---------------------------------------------------------------- a caller's writes

    def add(self, mailing: Mailing) -> None:
        if mailing.id in self._items:
            raise MailingChanged(f"mailing {mailing.id} exists")
        self._items[mailing.id] = _Stored(mailing)

    def save_fields(self, mailing: Mailing, *, before: datetime) -> Mailing:
        stored = self._where(
            mailing.id,
            lambda s: s.mailing.updated_at == before and s.mailing.status is mailing.status,
        )
        return self._set(
            stored,
            text=mailing.text,
            start_at=mailing.start_at,
            end_at=mailing.end_at,
            audience=mailing.audience,
            send_window=mailing.send_window,
            updated_at=mailing.updated_at,
            timeline_step=mailing.timeline_step or stored.mailing.timeline_step,
            max_parts=mailing.max_parts or stored.mailing.max_parts,
            parts=mailing.parts or stored.mailing.parts,
        )

    def set_status(
        self,
        mailing_id: str,
        current: MailingStatus,
        target: MailingStatus,
        now: datetime,
        *,
        off_due: bool = False,
    ) -> Mailing:
        stored = self._where(mailing_id, lambda s: s.mailing.status is current)
        mailing = self._set(stored, status=target, updated_at=now)
        return self._schedule(stored, due=False) if off_due else mailing

    def delete(self, mailing_id: str) -> None:
        self._items.pop(mailing_id, None)
        self.timelines.drop(mailing_id)

    # ---------------------------------------------------------------- the scheduler's writes

    def take_lease(
        self,
        mailing_id: str,
        owner: str,
        now: datetime,
        until: datetime,
        *,
        current: MailingStatus,
        start: MailingStatus | None,
    ) -> Mailing:
        def free(s: _Stored) -> bool:
            lease_free = s.lease_until is None or s.lease_until < now or s.lease_owner == owner
            status_held = start is None or s.mailing.status is current
            return s.mailing.schedule.due and lease_free and status_held

        stored = self._where(mailing_id, free)
        stored.lease_owner, stored.lease_until = owner, until
        return self._set(stored, status=start) if start is not None else stored.mailing

    def release_lease(self, mailing_id: str, owner: str) -> None:
        stored = self._leased(mailing_id, owner)
        stored.lease_owner = stored.lease_until = None

    def close_fan_out(self, mailing_id: str, owner: str) -> Mailing:
        return self._schedule(self._leased(mailing_id, owner), fanout_done=True)

    def commit_fan_out_page(
        self,
        mailing_id: str,
        owner: str,
        *,
        cursor: str | None,
        next_cursor: str | None,
        messages: Sequence[Message],
        expires_at: datetime,
        lease_until: datetime,
        token: str,
        timeline: TimelineGrid | None = None,
    ) -> None:
        stored = self._leased(mailing_id, owner)
        if stored.mailing.schedule.fanout_cursor != cursor:
            raise MailingChanged(f"mailing {mailing_id}: the checkpoint moved")
        existing = frozenset(
            m.client_id for m in messages if (mailing_id, m.client_id) in self.messages
        )
        if existing:
            raise MessagesExist(existing)
        for message in messages:
            self.messages[mailing_id, message.client_id] = message
        created = [(m.created_at, MessageStatus.PENDING, 1) for m in messages]
        self.timelines.add(mailing_id, timeline, created)
        stored.lease_until = lease_until
        counts = stored.mailing.counts
        self._set(stored, counts=replace(counts, pending=counts.pending + len(messages)))
        if next_cursor is None:
            self._schedule(stored, fanout_done=True)
        else:
            self._schedule(stored, fanout_cursor=next_cursor)

    def finish(self, mailing_id: str, owner: str, final: MailingStatus) -> None:
        stored = self._where(
            mailing_id, lambda s: s.lease_owner == owner and s.mailing.counts.pending == 0
        )
        self._set(stored, status=final)
        self._schedule(stored, due=False, fanout_done=True)

    def reserve_message_ids(self, count: int) -> int:
        self._sequence += count
        return self._sequence - count + 1

    def save_quiet(self, mailing_id: str, owner: str, mark: str, since: datetime) -> Mailing:
        stored = self._leased(mailing_id, owner)
        return self._schedule(stored, quiet_mark=mark, quiet_since=since, reconcile_after=None)

    def save_reconcile_position(self, mailing_id: str, owner: str, after: int) -> Mailing:
        return self._schedule(self._leased(mailing_id, owner), reconcile_after=after)

    # ---------------------------------------------------------------- conditions

    def _where(self, mailing_id: str, condition: Callable[[_Stored], bool]) -> _Stored:
        """The stored mailing if `condition` holds for it; MailingChanged otherwise (a
        missing item fails every condition, as in DynamoDB)."""
        stored = self._items.get(mailing_id)
        if stored is None or not condition(stored):
            raise MailingChanged(f"mailing {mailing_id} is not as expected")
        return stored

    def _leased(self, mailing_id: str, owner: str) -> _Stored:
        return self._where(mailing_id, lambda s: s.lease_owner == owner)

    @staticmethod
    def _set(stored: _Stored, **changes: object) -> Mailing:
        stored.mailing = replace(stored.mailing, **changes)  # type: ignore[arg-type]
        return stored.mailing

    @staticmethod
    def _schedule(stored: _Stored, **changes: object) -> Mailing:
        schedule = replace(stored.mailing.schedule, **changes)  # type: ignore[arg-type]
        stored.mailing = replace(stored.mailing, schedule=schedule)
        return stored.mailing
