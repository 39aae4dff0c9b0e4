"""The mailings table behind a repository that speaks domain `Mailing`s.

Every write here is the one request the services made before (the same conditions, the same
actions in the same order, counters as ADD), so the table sees the same traffic. A failed
condition becomes `MailingChanged` and a missing item `MailingNotFound`; a transient error (a
throttle, a transaction conflict, a 500) is raised as it came, for the caller's `Retry`.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol, cast

from pynamodb.attributes import NumberAttribute, UnicodeAttribute
from pynamodb.connection import Connection
from pynamodb.exceptions import (
    DeleteError,
    DoesNotExist,
    PutError,
    TransactWriteError,
    UpdateError,
)
from pynamodb.expressions.condition import Condition
from pynamodb.expressions.update import Action
from pynamodb.transactions import TransactWrite

from chalicelib.domain.audience import AudienceFilter
from chalicelib.domain.mailing import (
    Mailing,
    MailingChanged,
    MailingNotFound,
    MailingStatus,
    MailingUnusable,
    Message,
    MessageCounts,
    MessagesExist,
    MessageStatus,
    Schedule,
    Settled,
    SkipCounts,
    SkipReason,
    Statistics,
    Totals,
    settling,
    statistics,
)
from chalicelib.domain.paging import PageOf
from chalicelib.domain.receipt import DeliveryCounts
from chalicelib.domain.send_window import SendWindow
from chalicelib.domain.sms_parts import GSM7, UCS2, PartsEstimate
from chalicelib.domain.timeline import TimelineGrid
from chalicelib.domain.variants import Variant
from chalicelib.storage import timeline as _timeline
from chalicelib.storage.errors import CONDITION_FAILED, is_conditional_failure, is_transient
from chalicelib.storage.models import (
    DUE_KEY,
    MAILING_LISTING_KEY,
    MESSAGE_ID_SEQUENCE,
    TOTALS_KEY,
    MailingRecord,
    Models,
    status_key,
)
from chalicelib.storage.pagination import Segment, fingerprint, index_query, paginate
from chalicelib.storage.timeline import Activity

logger = logging.getLogger(__name__)

_COUNTER_ATTRIBUTES = ["mailing_id", *(f"count_{status.value}" for status in MessageStatus)]
_LISTING_KEYS = ("listing_key", "created_at", "mailing_id")


class MailingRepository(Protocol):
    """Where mailings live; every method is one request (or one transaction)."""

    def add(self, mailing: Mailing) -> None:
        """Store a new mailing; MailingChanged if its id is taken."""

    def get(self, mailing_id: str) -> Mailing:
        """The mailing as it is now (a consistent read); MailingNotFound if there is none."""

    def get_for_sending(self, mailing_id: str) -> Mailing:
        """As `get`, for a sender: MailingUnusable, naming what is wrong, when the stored
        record cannot be sent from (corrupt or of an older schema)."""

    def get_many(self, mailing_ids: Sequence[str]) -> list[Mailing]:
        """The mailings with these ids, in the order given; missing ones are left out."""

    def counts(self, mailing_ids: Sequence[str]) -> list[MessageCounts]:
        """The message counters of these mailings (only those are read)."""

    def ids(self) -> list[str]:
        """Every mailing's id, newest first."""

    def page(self, *, limit: int, cursor: str | None) -> PageOf[Mailing]:
        """One page of mailings, newest first."""

    def statistics(self) -> Statistics:
        """Messages and mailings by status over every stored mailing: the totals item and the
        unsettled mailings (the due index), so the cost grows with the mailings still open,
        never with the finished ones."""

    def ending_since(self, since: datetime) -> list[Mailing]:
        """The mailings whose end is at or after `since` (the by_end index), earliest end first."""

    def timeline(self, mailing_id: str, grid: TimelineGrid, now: datetime) -> Activity:
        """How the mailing's counters moved in each bucket of `grid` up to `now`, and when they
        last moved: a fixed number of reads, whatever the number of its messages."""

    def backfill_totals(self) -> int:
        """Add to the totals every settled mailing that is not in them yet (a stage whose
        mailings finished before the totals existed); the number added. Safe to run again."""

    def due_ids(self, now: datetime, *, limit: int | None = None) -> list[str]:
        """The ids of due mailings whose start is at or before `now`, earliest first."""

    def save_fields(self, mailing: Mailing, *, before: datetime) -> Mailing:
        """Write the fields a caller sets (text, dates, audience, window, `updated_at`), if
        it is unchanged since `before` and still in its status; MailingChanged otherwise."""

    def set_status(
        self,
        mailing_id: str,
        current: MailingStatus,
        target: MailingStatus,
        now: datetime,
        *,
        off_due: bool = False,
    ) -> Mailing:
        """Move it from `current` to `target` (`off_due`: the scheduler never needs it
        again); MailingChanged if it is no longer in `current`."""

    def delete(self, mailing_id: str) -> None:
        """Remove the mailing and its timeline (its messages stay until their expiry)."""

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
        """Hold the due mailing's lease for `owner` until `until` (free, expired, or its own
        already); with `start`, move it from `current` to `start` in the same write.
        MailingChanged if the lease is held, it is no longer due, or its status moved."""

    def release_lease(self, mailing_id: str, owner: str) -> None:
        """Give `owner`'s lease back; MailingChanged if `owner` no longer holds it."""

    def close_fan_out(self, mailing_id: str, owner: str) -> Mailing:
        """Mark its audience walked (nobody more is added); MailingChanged without the lease."""

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
        """One transaction: create `messages` (each only if new), add them to the pending
        counter and to the `timeline` at their creation, move the checkpoint from `cursor` to
        `next_cursor` (None: the fan-out is done) and extend the lease. MailingChanged if the
        lease or the checkpoint moved or a message exists. Tries with the same `token` are
        applied once."""

    def finish(self, mailing_id: str, owner: str, final: MailingStatus) -> None:
        """Settle it in `final` and take it off the due index, if `owner` holds the lease and
        nothing is pending; MailingChanged otherwise. Its counts go into the totals item in
        the same transaction (only the difference, when it had settled before)."""

    def reserve_message_ids(self, count: int) -> int:
        """Reserve `count` consecutive message ids nobody else gets; the first of them."""

    def save_quiet(self, mailing_id: str, owner: str, mark: str, since: datetime) -> Mailing:
        """Count the mailing quiet from `since` at counters `mark`, with no reconciler pass
        under way; MailingChanged if `owner` no longer holds the lease."""

    def save_reconcile_position(self, mailing_id: str, owner: str, after: int) -> Mailing:
        """Where the reconciler's pass stands (a message id); MailingChanged without the lease."""


class DynamoMailingRepository:
    """MailingRepository on the stage's DynamoDB tables."""

    def __init__(self, models: Models, connection: Connection) -> None:
        self._record = models.Mailing
        self._message = models.Message
        self._sequence = models.Sequence
        self._connection = connection

    # ---------------------------------------------------------------- reads

    def get(self, mailing_id: str) -> Mailing:
        try:
            return _to_domain(self._record.get(mailing_id, consistent_read=True))
        except DoesNotExist:
            raise MailingNotFound(mailing_id) from None

    def get_for_sending(self, mailing_id: str) -> Mailing:
        try:
            record = self._record.get(mailing_id, consistent_read=True)
        except DoesNotExist:
            raise MailingNotFound(mailing_id) from None
        except Exception as exc:
            if is_transient(exc):
                raise
            # Corrupt beyond deserialising.
            raise MailingUnusable(f"mailing record is unreadable: {type(exc).__name__}") from None
        problem = _record_problem(record)
        if problem:
            raise MailingUnusable(problem)
        return _to_domain(record)

    def get_many(self, mailing_ids: Sequence[str]) -> list[Mailing]:
        return [_to_domain(record) for record in self._records(mailing_ids)]

    def counts(self, mailing_ids: Sequence[str]) -> list[MessageCounts]:
        return [_counts_of(r) for r in self._records(mailing_ids, _COUNTER_ATTRIBUTES)]

    def ids(self) -> list[str]:
        keys = self._record.by_created.query(MAILING_LISTING_KEY, scan_index_forward=False)
        return [key.mailing_id for key in keys]

    def statistics(self) -> Statistics:
        ids = [key.mailing_id for key in self._record.due.query(DUE_KEY)]
        # One BatchGetItem for the totals and the open mailings (100 keys a request).
        found = {record.mailing_id: record for record in self._record.batch_get([TOTALS_KEY, *ids])}
        unsettled = [(_to_domain(found[i]), _settled_of(found[i])) for i in ids if i in found]
        return statistics(_totals_of(found.get(TOTALS_KEY)), unsettled)

    def ending_since(self, since: datetime) -> list[Mailing]:
        keys = self._record.by_end.query(
            MAILING_LISTING_KEY, self._record.end_at >= since.astimezone(UTC)
        )
        return self.get_many([key.mailing_id for key in keys])

    def timeline(self, mailing_id: str, grid: TimelineGrid, now: datetime) -> Activity:
        return _timeline.read(self._connection, self._record.Meta.table_name, mailing_id, grid, now)

    def backfill_totals(self) -> int:
        M, added = self._record, 0
        for record in self._records(self.ids()):
            if record.due_key is not None or record.settled_times is not None:
                continue
            try:
                self._settle(record, MailingStatus(record.status), [], M.due_key.does_not_exist())
            except MailingChanged:
                continue  # it moved meanwhile (deleted, reopened, settled): a rerun sees it
            added += 1
        return added

    def page(self, *, limit: int, cursor: str | None) -> PageOf[Mailing]:
        query = index_query(self._record.by_created.query, MAILING_LISTING_KEY, forward=False)
        ids, next_cursor = paginate(
            [Segment(query, _LISTING_KEYS)], fingerprint("mailings"), cursor, limit, _mailing_id
        )
        return PageOf(self.get_many(ids), next_cursor)

    def due_ids(self, now: datetime, *, limit: int | None = None) -> list[str]:
        condition = self._record.start_at <= now.astimezone(UTC)
        if limit is None:
            keys = self._record.due.query(DUE_KEY, condition)
        else:
            keys = self._record.due.query(DUE_KEY, condition, limit=limit, page_size=limit)
        return [key.mailing_id for key in keys]

    def _records(
        self, mailing_ids: Sequence[str], attributes: list[str] | None = None
    ) -> list[MailingRecord]:
        """Records by id, in the order given (the listing indexes hold keys only)."""
        found = {
            record.mailing_id: record
            for record in self._record.batch_get(mailing_ids, attributes_to_get=attributes)
        }
        return [found[i] for i in mailing_ids if i in found]

    # ---------------------------------------------------------------- a caller's writes

    def add(self, mailing: Mailing) -> None:
        record = self._record(
            mailing.id,
            status=mailing.status.value,
            created_at=mailing.created_at,
            listing_key=MAILING_LISTING_KEY,
            due_key=DUE_KEY if mailing.schedule.due else None,
            timeline_step=mailing.timeline_step,
        )
        _set_fields(record, mailing)
        _set_parts(record, mailing)
        with _changed(PutError):
            record.save(condition=self._record.mailing_id.does_not_exist())

    def save_fields(self, mailing: Mailing, *, before: datetime) -> Mailing:
        M = self._record
        record = M(mailing.id)
        _set_fields(record, mailing)
        # Only the caller's fields, never a whole-item save: senders move the counters meanwhile.
        actions: list[Action] = [
            M.text.set(record.text),
            M.start_at.set(record.start_at),
            M.end_at.set(record.end_at),
            M.operator_codes.set(record.operator_codes),
            M.tags.set(record.tags),
            M.updated_at.set(record.updated_at),
        ]
        if record.window_start is None or record.window_end is None:
            actions += [M.window_start.remove(), M.window_end.remove()]
        else:
            actions += [
                M.window_start.set(record.window_start),
                M.window_end.set(record.window_end),
            ]
        if mailing.timeline_step is not None:
            actions.append(M.timeline_step.set(mailing.timeline_step))
        actions += _parts_actions(M, mailing)
        actions.append(_exempt_action(M, mailing))
        actions += _variant_actions(M, record)
        condition = (M.updated_at == before) & (M.status == mailing.status.value)
        return self._update(record, actions, condition)

    def set_status(
        self,
        mailing_id: str,
        current: MailingStatus,
        target: MailingStatus,
        now: datetime,
        *,
        off_due: bool = False,
    ) -> Mailing:
        M = self._record
        actions: list[Action] = [M.status.set(target.value), M.updated_at.set(now)]
        if not off_due:
            return self._update(M(mailing_id), actions, M.status == current.value)
        # Off the due index for good (cancelled before it started): it settles now.
        record = self._existing(mailing_id)
        self._settle(record, target, [*actions, M.due_key.remove()], M.status == current.value)
        mailing = _to_domain(record)
        return replace(
            mailing, status=target, updated_at=now, schedule=replace(mailing.schedule, due=False)
        )

    def delete(self, mailing_id: str) -> None:
        M = self._record
        for _ in range(_DELETE_TRIES):
            try:
                record = M.get(mailing_id, consistent_read=True)
            except DoesNotExist:
                return
            settled = _settled_of(record)
            parts = _timeline.part_keys(mailing_id) if record.timeline_step is not None else []
            try:
                if settled is None:
                    with _changed(DeleteError):
                        record.delete(condition=M.settled_times.does_not_exist())
                    self._delete_timeline(mailing_id, parts)
                    return
                # Settled: what it added to the totals goes out with it, and its timeline.
                take_back = _totals_actions(
                    M, MessageCounts() - settled.counts, {settled.status: -1}
                )
                token = _token("delete", mailing_id, settled.times)
                with (
                    _changed(TransactWriteError),
                    TransactWrite(connection=self._connection, client_request_token=token) as tx,
                ):
                    tx.delete(M(mailing_id), condition=M.settled_times == settled.times)
                    tx.update(M(TOTALS_KEY), actions=take_back)
                    for part in parts:
                        tx.delete(M(part))
                return
            except MailingChanged:
                continue  # settled (or settled again) meanwhile: read it again
        raise MailingChanged(f"mailing {mailing_id} kept changing while being deleted")

    def _delete_timeline(self, mailing_id: str, parts: Sequence[str]) -> None:
        """Remove the timeline of a mailing just deleted (one transaction of deletes: no write
        can add to it any more, each needs the mailing). Should this fail, the parts stay
        behind unseen: nothing lists them, and no mailing has that id any more."""
        if not parts:
            return
        M = self._record
        try:
            with TransactWrite(connection=self._connection) as tx:
                for part in parts:
                    tx.delete(M(part))
        except Exception:
            logger.warning(
                "the timeline of a deleted mailing could not be removed; it stays unseen",
                exc_info=True,
                extra={"mailing_id": mailing_id},
            )

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
        M = self._record
        actions: list[Action] = [M.lease_owner.set(owner), M.lease_until.set(until)]
        # Ours already: a retried write whose first try was applied after all (a 500).
        condition = M.due_key.exists() & (
            M.lease_until.does_not_exist() | (M.lease_until < now) | (M.lease_owner == owner)
        )
        if start is not None:
            actions.append(M.status.set(start.value))
            condition &= M.status == current.value
        return self._update(M(mailing_id), actions, condition)

    def release_lease(self, mailing_id: str, owner: str) -> None:
        M = self._record
        with _changed(UpdateError):
            M(mailing_id).update(
                actions=[M.lease_owner.remove(), M.lease_until.remove()],
                condition=M.lease_owner == owner,
            )

    def close_fan_out(self, mailing_id: str, owner: str) -> Mailing:
        M = self._record
        return self._update(M(mailing_id), [M.fanout_done.set(True)], M.lease_owner == owner)

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
        M, Record = self._record, self._message
        records = [
            Record(
                mailing_id,
                message.client_id,
                message_id=message.id,
                phone=message.phone,
                status=message.status.value,
                status_key=status_key(mailing_id, message.status.value),
                created_at=message.created_at,
                updated_at=message.created_at,
                attempts=message.attempts,
                expires_at=expires_at,
            )
            for message in messages
        ]
        checkpoint = (
            M.fanout_cursor.does_not_exist() if cursor is None else M.fanout_cursor == cursor
        )
        actions: list[Action] = [M.count_pending.add(len(records)), M.lease_until.set(lease_until)]
        if next_cursor is None:
            actions.append(M.fanout_done.set(True))
        else:
            actions.append(M.fanout_cursor.set(next_cursor))
        try:
            with TransactWrite(connection=self._connection, client_request_token=token) as tx:
                for record in records:
                    tx.save(record, condition=Record.client_id.does_not_exist())
                tx.update(
                    M(mailing_id), actions=actions, condition=(M.lease_owner == owner) & checkpoint
                )
                created = [(m.created_at, MessageStatus.PENDING, 1) for m in messages]
                for part, part_actions in _timeline.part_updates(M, mailing_id, timeline, created):
                    tx.update(part, actions=part_actions)
        except TransactWriteError as exc:
            if not is_conditional_failure(exc):
                raise
            # The reasons come in the items' order: the messages, the mailing, its timeline.
            failed = [
                getattr(reason, "code", None) == CONDITION_FAILED
                for reason in exc.cancellation_reasons or ()
            ]
            mailing_failed = len(failed) <= len(records) or failed[len(records)]
            if not mailing_failed and any(failed[: len(records)]):
                raise MessagesExist(
                    frozenset(r.client_id for r, no in zip(records, failed, strict=False) if no)
                ) from None
            raise MailingChanged(str(exc)) from None

    def finish(self, mailing_id: str, owner: str, final: MailingStatus) -> None:
        M = self._record
        record = self._existing(mailing_id)
        if record.lease_owner != owner or int(record.count_pending or 0) != 0:
            raise MailingChanged(f"mailing {mailing_id} is not leased by {owner} or has pending")
        self._settle(
            record,
            final,
            [M.status.set(final.value), M.due_key.remove(), M.fanout_done.set(True)],
            (M.lease_owner == owner) & (M.count_pending == 0),
            owner,
        )

    def _existing(self, mailing_id: str) -> MailingRecord:
        """The record (a consistent read); MailingChanged when it is gone, as a failed
        condition on a missing item would say."""
        try:
            return self._record.get(mailing_id, consistent_read=True)
        except DoesNotExist:
            raise MailingChanged(f"mailing {mailing_id} is gone") from None

    def _settle(
        self,
        record: MailingRecord,
        status: MailingStatus,
        actions: Sequence[Action],
        condition: Condition,
        *salt: str,
    ) -> None:
        """One transaction: `actions` on the mailing, marked settled in `status` with its
        counts as read in `record`, and the difference added to the totals item. Conditioned
        on `condition`, the counts and the settle mark as read: a counter that moved meanwhile,
        or a concurrent settling, fails it (MailingChanged). Each settling is written once: a
        try repeated after a lost answer carries the same token; one repeated after a fresh
        read finds the counts already in and adds nothing."""
        M = self._record
        counts, settled = _counts_of(record), _settled_of(record)
        times = 0 if settled is None else settled.times
        delta, mailings = settling(settled, counts, status)
        mark: list[Action] = [
            M.settled_times.set(times + 1),
            M.settled_status.set(status.value),
            *(_settled_attribute(M, s).set(getattr(counts, s.value)) for s in MessageStatus),
        ]
        unchanged = M.mailing_id.exists() & (
            M.settled_times.does_not_exist() if settled is None else M.settled_times == times
        )
        for s in MessageStatus:
            value = getattr(counts, s.value)
            counter = _counter_attribute(M, s)
            unchanged &= (
                (counter == value) if value else (counter.does_not_exist() | (counter == 0))
            )
        token = _token("settle", record.mailing_id, times, status.value, str(counts), *salt)
        with (
            _changed(TransactWriteError),
            TransactWrite(connection=self._connection, client_request_token=token) as tx,
        ):
            tx.update(
                M(record.mailing_id), actions=[*actions, *mark], condition=condition & unchanged
            )
            totals = _totals_actions(M, delta, mailings)
            if totals:
                tx.update(M(TOTALS_KEY), actions=totals)

    def reserve_message_ids(self, count: int) -> int:
        S = self._sequence
        sequence = S(MESSAGE_ID_SEQUENCE)
        sequence.update(actions=[S.value.add(count)])
        return int(sequence.value) - count + 1

    def save_quiet(self, mailing_id: str, owner: str, mark: str, since: datetime) -> Mailing:
        M = self._record
        actions = [M.quiet_mark.set(mark), M.quiet_since.set(since), M.reconcile_after.remove()]
        return self._update(M(mailing_id), actions, M.lease_owner == owner)

    def save_reconcile_position(self, mailing_id: str, owner: str, after: int) -> Mailing:
        M = self._record
        return self._update(M(mailing_id), [M.reconcile_after.set(after)], M.lease_owner == owner)

    def _update(
        self, record: MailingRecord, actions: Sequence[Action], condition: Condition
    ) -> Mailing:
        """One conditional UpdateItem; the mailing as the write left it."""
        with _changed(UpdateError):
            record.update(actions=list(actions), condition=condition)
        return _to_domain(record)


@contextmanager
def _changed(error: type[Exception]) -> Iterator[None]:
    """A failed condition of `error` becomes MailingChanged; anything else goes on as it is."""
    try:
        yield
    except error as exc:
        if is_conditional_failure(exc):
            raise MailingChanged(str(exc)) from None
        raise


def _set_fields(record: MailingRecord, mailing: Mailing) -> None:
    record.text = mailing.text
    record.start_at = mailing.start_at.astimezone(UTC)
    record.end_at = mailing.end_at.astimezone(UTC)
    record.operator_codes = _as_stored(mailing.audience.operator_codes)
    record.tags = _as_stored(mailing.audience.tags)
    if mailing.send_window is None:
        record.window_start = record.window_end = None
    else:
        record.window_start, record.window_end = mailing.send_window.to_minutes()
    record.updated_at = mailing.updated_at
    record.frequency_cap_exempt = mailing.frequency_cap_exempt or None
    record.variants = _variants_stored(mailing.variants)
    record.holdout_percent = mailing.holdout_percent or None


# ---------------------------------------------------------------- parts and cost


def _set_parts(record: MailingRecord, mailing: Mailing) -> None:
    record.max_parts = mailing.max_parts
    record.parts_estimate = None if mailing.parts is None else _parts_json(mailing.parts)


def _parts_actions(M: type[MailingRecord], mailing: Mailing) -> list[Action]:
    """A caller's save keeps the parts it does not give (an older writer gives none)."""
    actions: list[Action] = []
    if mailing.max_parts is not None:
        actions.append(M.max_parts.set(mailing.max_parts))
    if mailing.parts is not None:
        actions.append(M.parts_estimate.set(_parts_json(mailing.parts)))
    return actions


def _parts_json(parts: PartsEstimate) -> str:
    return json.dumps(
        {
            "encoding": parts.encoding,
            "min": parts.per_message_min,
            "max": parts.per_message_max,
            "total": parts.total,
            "approximate": parts.approximate,
            "cost": parts.cost,
            "currency": parts.currency,
        },
        separators=(",", ":"),
    )


def _parts_of(stored: str | None) -> PartsEstimate | None:
    """The stored estimate; None when absent or unreadable (it is only ever shown)."""
    if not stored:
        return None
    try:
        raw = json.loads(stored)
        cost = raw.get("cost")
        return PartsEstimate(
            encoding=UCS2 if raw["encoding"] == UCS2 else GSM7,
            per_message_min=int(raw["min"]),
            per_message_max=int(raw["max"]),
            total=int(raw["total"]),
            approximate=bool(raw["approximate"]),
            cost=None if cost is None else float(cost),
            currency=None if raw.get("currency") is None else str(raw["currency"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _record_problem(record: MailingRecord) -> str | None:
    """What makes a stored mailing unusable for sending (corrupt or older schema), if anything."""
    problems = []
    text: object = record.text
    if not isinstance(text, str) or not text.strip():
        problems.append("text is missing")
    start_at: object = record.start_at
    end_at: object = record.end_at
    if not isinstance(start_at, datetime) or not isinstance(end_at, datetime):
        problems.append("start or end is missing")
    if record.status not in {status.value for status in MailingStatus}:
        problems.append("status is unknown")
    window: tuple[object, object] = (record.window_start, record.window_end)
    if window != (None, None) and not all(
        isinstance(m, (int, float)) and 0 <= m < 24 * 60 for m in window
    ):
        problems.append("send window is invalid")
    if not problems:
        return None
    return "mailing record is corrupt: " + ", ".join(problems)


def _to_domain(record: MailingRecord) -> Mailing:
    window = None
    if record.window_start is not None and record.window_end is not None:
        window = SendWindow.from_minutes(int(record.window_start), int(record.window_end))
    return Mailing(
        id=record.mailing_id,
        text=record.text,
        start_at=record.start_at,
        end_at=record.end_at,
        audience=AudienceFilter(_strings(record.operator_codes), _strings(record.tags)),
        send_window=window,
        status=MailingStatus(record.status),
        counts=_counts_of(record),
        created_at=record.created_at,
        updated_at=record.updated_at,
        schedule=Schedule(
            due=record.due_key is not None,
            fanout_cursor=record.fanout_cursor,
            fanout_done=bool(record.fanout_done),
            quiet_mark=record.quiet_mark,
            quiet_since=record.quiet_since,
            reconcile_after=(
                None if record.reconcile_after is None else int(record.reconcile_after)
            ),
        ),
        timeline_step=None if record.timeline_step is None else int(record.timeline_step),
        max_parts=None if record.max_parts is None else int(record.max_parts),
        parts=_parts_of(record.parts_estimate),
        delivery=_delivery_counts_of(record),
        frequency_cap_exempt=bool(record.frequency_cap_exempt),
        skip_counts=_skip_counts_of(record),
        variants=_variants_of(record.variants),
        holdout_percent=int(record.holdout_percent or 0),
        variant_sent=tuple(
            int(getattr(record, f"variant_sent_{i}") or 0)
            for i in range(len(_variants_of(record.variants)))
        ),
    )


def _delivery_counts_of(record: MailingRecord) -> DeliveryCounts:
    return DeliveryCounts(
        delivered=int(record.count_delivered or 0),
        undelivered=int(record.count_undelivered or 0),
    )


def _variants_stored(variants: tuple[Variant, ...]) -> str | None:
    if not variants:
        return None
    return json.dumps([{"text": v.text, "weight": v.weight} for v in variants])


def _variants_of(stored: str | None) -> tuple[Variant, ...]:
    """The stored A/B texts (none: a single text, or a value this code cannot read)."""
    if not stored:
        return ()
    try:
        return tuple(Variant(str(v["text"]), int(v["weight"])) for v in json.loads(stored))
    except (ValueError, TypeError, KeyError):
        return ()


def _variant_actions(M: type[MailingRecord], record: MailingRecord) -> list[Action]:
    """The writes of the mailing's A/B texts and holdout share (removed when not set)."""
    variants, holdout = record.variants, record.holdout_percent
    return [
        M.variants.remove() if variants is None else M.variants.set(variants),
        M.holdout_percent.remove() if holdout is None else M.holdout_percent.set(holdout),
    ]


def _exempt_action(M: type[MailingRecord], mailing: Mailing) -> Action:
    """The write of the mailing's frequency-cap exemption (absent when not exempt)."""
    if mailing.frequency_cap_exempt:
        return M.frequency_cap_exempt.set(True)
    return M.frequency_cap_exempt.remove()


def _skip_counts_of(record: MailingRecord) -> SkipCounts:
    """The skipped messages by reason, as the mailing's counters keep them."""
    return SkipCounts(
        **{r.value: int(getattr(record, f"skipped_{r.value}") or 0) for r in SkipReason}
    )


def _as_stored(values: tuple[str, ...]) -> list[UnicodeAttribute]:
    # PynamoDB types a ListAttribute(of=UnicodeAttribute) as a list of attributes; it holds str.
    return cast("list[UnicodeAttribute]", list(values))


def _strings(values: list[UnicodeAttribute] | None) -> tuple[str, ...]:
    return tuple(cast("list[str]", values or []))


def _counts_of(record: MailingRecord) -> MessageCounts:
    return MessageCounts(
        **{s.value: int(getattr(record, f"count_{s.value}") or 0) for s in MessageStatus}
    )


_DELETE_TRIES = 5


def _token(*parts: object) -> str:
    """A transaction's idempotency token: the same for the same write (36 characters)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(str(part) for part in parts)))


def _counter_attribute(M: type[MailingRecord], status: MessageStatus) -> NumberAttribute:
    return cast(NumberAttribute, getattr(M, f"count_{status.value}"))


def _settled_attribute(M: type[MailingRecord], status: MessageStatus) -> NumberAttribute:
    return cast(NumberAttribute, getattr(M, f"settled_{status.value}"))


def _totals_actions(
    M: type[MailingRecord], counts: MessageCounts, mailings: Mapping[MailingStatus, int]
) -> list[Action]:
    """ADDs to the totals item: message counts and mailings by status (zeros left out)."""
    actions: list[Action] = [
        _counter_attribute(M, s).add(getattr(counts, s.value))
        for s in MessageStatus
        if getattr(counts, s.value)
    ]
    actions += [
        cast(NumberAttribute, getattr(M, f"mailings_{status.value}")).add(n)
        for status, n in mailings.items()
        if n
    ]
    return actions


def _settled_of(record: MailingRecord) -> Settled | None:
    if record.settled_times is None or record.settled_status is None:
        return None
    counts = MessageCounts(
        **{s.value: int(getattr(record, f"settled_{s.value}") or 0) for s in MessageStatus}
    )
    return Settled(counts, MailingStatus(record.settled_status), int(record.settled_times))


def _totals_of(record: MailingRecord | None) -> Totals:
    if record is None:
        return Totals()
    mailings = {s: int(getattr(record, f"mailings_{s.value}") or 0) for s in MailingStatus}
    return Totals(_counts_of(record), mailings)


def _mailing_id(key: MailingRecord) -> str:
    return key.mailing_id
