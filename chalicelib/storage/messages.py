"""Messages as stored, and their one-way status changes: each final status moves the mailing's
counters in the same transaction, so the counters always equal the message records.

A message leaves `pending` exactly once: the write that takes it out is conditional on it still
being pending (and on the caller's claim, or on nobody holding one). A failed condition is an
answer (someone else did it: `False` or no claim); anything else is raised, a conflict or a
throttle as what `errors.is_transient` recognises, for the caller's `Retry`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, cast

from botocore.exceptions import ClientError
from pynamodb.attributes import NumberAttribute
from pynamodb.connection import Connection
from pynamodb.exceptions import DoesNotExist, TransactWriteError, UpdateError
from pynamodb.expressions.condition import Condition
from pynamodb.expressions.update import Action
from pynamodb.transactions import TransactWrite

from chalicelib.domain import MailingStatus, Message, MessageStatus
from chalicelib.domain.mailing import MessageChange, SkipReason
from chalicelib.domain.paging import PageOf
from chalicelib.domain.receipt import Delivery, DeliveryStatus
from chalicelib.domain.timeline import TimelineGrid
from chalicelib.storage.errors import is_conditional_failure
from chalicelib.storage.models import DUE_KEY, MessageRecord, Models, status_key
from chalicelib.storage.pagination import (
    QueryFn,
    RawKey,
    Segment,
    fingerprint,
    index_query,
    paginate,
)
from chalicelib.storage.timeline import part_updates

# What a message's last error keeps of a long one.
ERROR_LIMIT = 500
# Items per Query page when the mailing's partition is read with a status filter.
PARTITION_PAGE = 500


@dataclass(frozen=True)
class Outcome:
    """The final status a message should get, and the claim under which it may."""

    client_id: str
    status: MessageStatus
    claim_id: str | None = None
    error: str | None = None
    message_id: int | None = None  # for the log line only
    skip_reason: SkipReason | None = None  # why a `skipped` message was not sent
    variant: int | None = None  # the A/B variant a `sent` message carried


@dataclass(frozen=True)
class Claim:
    """A claim's outcome: its id when taken, else the message as the failed condition saw it
    (None: not there)."""

    claim_id: str | None
    message: Message | None = None


class MessageRepository(Protocol):
    """The messages of the mailings, keyed by (mailing id, client id)."""

    def get(self, mailing_id: str, client_id: str) -> Message | None:
        """The message as it is now (None: not there)."""
        ...

    def claim(
        self,
        mailing_id: str,
        client_id: str,
        message_id: int,
        claim_id: str,
        now: datetime,
        until: datetime,
    ) -> Claim:
        """Take the message for one gateway call as `claim_id` until `until`, counting an
        attempt; refused (with the message as it was) when it is not there with this id, not
        pending, or held by a claim still live at `now`."""
        ...

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
        """Give a claimed message back (still pending) with `error`; without `called` the
        claim's attempt is undone. False when it is not pending under that claim."""
        ...

    def finish(
        self,
        mailing_id: str,
        outcomes: Sequence[Outcome],
        now: datetime,
        timeline: TimelineGrid | None = None,
    ) -> bool:
        """Move pending messages of one mailing to their final statuses with the mailing's
        counters and its `timeline` at `now`, all in one transaction; False (nothing written)
        when any is not ours to finish (done, claimed by another) or the mailing is gone."""
        ...

    def fail_orphan(self, mailing_id: str, outcome: Outcome, now: datetime) -> bool:
        """Finish a pending message whose mailing cannot keep counters (missing or unusable),
        without them; False when it is not ours to finish."""
        ...

    def with_status(
        self, mailing_id: str, status: MessageStatus, limit: int, after: int | None = None
    ) -> list[tuple[str, int]]:
        """Up to `limit` (client id, message id) pairs with `status`, by message id (after
        `after`, when given)."""
        ...

    def pending(
        self, mailing_id: str, limit: int, after: str | None = None
    ) -> list[tuple[str, int]]:
        """Up to `limit` (client id, message id) pairs of pending messages, by client id (after
        client `after`, when given): each call reads only as far as its page."""
        ...

    def page(
        self, mailing_id: str, *, status: MessageStatus | None, limit: int, cursor: str | None
    ) -> PageOf[Message]:
        """One page of the mailing's messages, optionally only those with `status`; a cursor
        this listing did not hand out is a MalformedRequest."""
        ...

    def history(self, mailing_id: str, *, limit: int) -> tuple[list[MessageChange], bool]:
        """The changes of up to `limit` of the mailing's messages; True when it has more."""
        ...

    def touch_if_lost(
        self, mailing_id: str, client_id: str, message_id: int, now: datetime, since: datetime
    ) -> bool:
        """Mark the message touched `now` if it is still pending, unclaimed and untouched
        after `since` (its job was lost); False otherwise (a live job or a sender has it)."""
        ...

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
        """Make failed messages pending again with the mailing's counters and its `timeline`
        at `now`, in one transaction (with `reopen`, a finished mailing runs again; every try
        of one change carries the same `token`). False when any is no longer failed or the
        mailing was cancelled or deleted."""
        ...


class DynamoMessageRepository:
    """`MessageRepository` on the stage's messages and mailings tables."""

    def __init__(self, models: Models, connection: Connection) -> None:
        self._models = models
        self._connection = connection

    def get(self, mailing_id: str, client_id: str) -> Message | None:
        try:
            record = self._models.Message.get(mailing_id, client_id, consistent_read=True)
        except DoesNotExist:
            return None
        return message_of(record)

    def claim(
        self,
        mailing_id: str,
        client_id: str,
        message_id: int,
        claim_id: str,
        now: datetime,
        until: datetime,
    ) -> Claim:
        Message = self._models.Message
        request = Message(mailing_id, client_id).get_update_kwargs_from_instance(
            actions=[
                Message.claim_id.set(claim_id),
                Message.claim_until.set(until),
                Message.attempts.add(1),
                Message.updated_at.set(now),
            ],
            condition=(Message.message_id == message_id)
            & (Message.status == MessageStatus.PENDING.value)
            & (Message.claim_until.does_not_exist() | (Message.claim_until < now)),
            return_values_on_condition_failure="ALL_OLD",
        )
        try:
            # PynamoDB's Model.update cannot ask for the item a failed condition saw.
            self._connection.dispatch("UpdateItem", request)
        except ClientError as exc:
            if is_conditional_failure(exc):
                seen = getattr(exc.__cause__, "response", {}).get("Item")
                return Claim(None, message_of(Message.from_raw_data(seen)) if seen else None)
            raise
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
        Message = self._models.Message
        actions: list[Action] = [
            Message.claim_id.remove(),
            Message.claim_until.remove(),
            # None clears the last error, as it always has (the attribute is nullable).
            Message.last_error.set(error),  # type: ignore[arg-type]
            Message.updated_at.set(now),
        ]
        if not called:
            actions.append(Message.attempts.add(-1))
        try:
            Message(mailing_id, client_id).update(
                actions=actions,
                condition=(Message.claim_id == claim_id)
                & (Message.status == MessageStatus.PENDING.value),
            )
        except UpdateError as exc:
            if is_conditional_failure(exc):
                return False
            raise
        return True

    def finish(
        self,
        mailing_id: str,
        outcomes: Sequence[Outcome],
        now: datetime,
        timeline: TimelineGrid | None = None,
    ) -> bool:
        models = self._models
        Message, Mailing = models.Message, models.Mailing
        moved = Counter(outcome.status for outcome in outcomes)
        moves = [(MessageStatus.PENDING, -len(outcomes)), *moved.items()]
        counters: list[Action] = [self._counter(status).add(n) for status, n in moves]
        counters += self._skip_counters(outcomes)
        counters += self._variant_counters(outcomes)
        try:
            with TransactWrite(connection=self._connection) as tx:
                for outcome in outcomes:
                    tx.update(
                        Message(mailing_id, outcome.client_id),
                        actions=self._final_actions(mailing_id, outcome, now),
                        condition=self._still_ours(outcome.claim_id, now),
                    )
                tx.update(
                    Mailing(mailing_id),
                    actions=counters,
                    # ADD would otherwise resurrect a deleted mailing as a bare counter item.
                    condition=Mailing.mailing_id.exists(),
                )
                timed = [(now, status, n) for status, n in moves]
                for part, actions in part_updates(Mailing, mailing_id, timeline, timed):
                    tx.update(part, actions=actions)
        except TransactWriteError as exc:
            if is_conditional_failure(exc):
                return False
            raise
        return True

    def fail_orphan(self, mailing_id: str, outcome: Outcome, now: datetime) -> bool:
        Message = self._models.Message
        try:
            Message(mailing_id, outcome.client_id).update(
                actions=self._final_actions(mailing_id, outcome, now),
                condition=self._still_ours(None, now),
            )
        except UpdateError as exc:
            if is_conditional_failure(exc):
                return False
            raise
        return True

    def page(
        self, mailing_id: str, *, status: MessageStatus | None, limit: int, cursor: str | None
    ) -> PageOf[Message]:
        message = self._models.Message
        key = None if status is None else status_key(mailing_id, status.value)
        if key is None:
            # All of them, or a status the index does not hold: the mailing's partition, by
            # client id, filtered on the status (DynamoDB reads past the others).
            query = self._partition_query(mailing_id, status)
            segments = [Segment(query, ("mailing_id", "client_id"))]
            scope = fingerprint("messages", mailing_id, None if status is None else status.value)
            return PageOf(*paginate(segments, scope, cursor, limit, message_of))
        # The status index holds keys only (cheaper status changes); fetch the page's records.
        assert status is not None
        query = index_query(message.by_status.query, key)
        segments = [Segment(query, ("status_key", "message_id", "mailing_id", "client_id"))]
        scope = fingerprint("messages", mailing_id, status.value)
        keys, next_cursor = paginate(segments, scope, cursor, limit, lambda k: k.client_id)
        found = {m.client_id: m for m in message.batch_get([(mailing_id, c) for c in keys])}
        # A message may change status between the two reads; list it as it is now.
        return PageOf([message_of(found[c]) for c in keys if c in found], next_cursor)

    def history(self, mailing_id: str, *, limit: int) -> tuple[list[MessageChange], bool]:
        records = self._models.Message.query(
            mailing_id,
            attributes_to_get=["client_id", "status", "created_at", "updated_at", "sent_at"],
            page_size=1000,
        )
        changes: list[MessageChange] = []
        for record in records:
            if len(changes) >= limit:
                return changes, True
            status = MessageStatus(record.status)
            # A message that left `pending` changed when it was sent, else at its last update.
            pending = status is MessageStatus.PENDING
            changed_at = None if pending else record.sent_at or record.updated_at
            changes.append(MessageChange(record.created_at, status, changed_at))
        return changes, False

    def touch_if_lost(
        self, mailing_id: str, client_id: str, message_id: int, now: datetime, since: datetime
    ) -> bool:
        Message = self._models.Message
        try:
            Message(mailing_id, client_id).update(
                actions=[Message.updated_at.set(now)],
                condition=(Message.message_id == message_id)
                & (Message.status == MessageStatus.PENDING.value)
                & (Message.updated_at <= since)
                & (Message.claim_until.does_not_exist() | (Message.claim_until < now)),
            )
        except UpdateError as exc:
            if is_conditional_failure(exc):
                return False
            raise
        return True

    def with_status(
        self, mailing_id: str, status: MessageStatus, limit: int, after: int | None = None
    ) -> list[tuple[str, int]]:
        Message = self._models.Message
        condition = None if after is None else Message.message_id > after
        key = status_key(mailing_id, status.value)
        if key is not None:
            return [
                (item.client_id, int(item.message_id))
                for item in Message.by_status.query(key, condition, limit=limit, page_size=limit)
            ]
        # Pending or sent: not indexed (that saves an index write per message), so the mailing's
        # partition is read with a filter and ordered here. Its callers (the reconciler of a
        # quiet mailing, the sweep at the end) are rare and find few pending messages.
        wanted = Message.status == status.value
        if condition is not None:
            wanted &= condition
        found = sorted(
            (int(item.message_id), item.client_id)
            for item in Message.query(
                mailing_id,
                filter_condition=wanted,
                attributes_to_get=["client_id", "message_id"],
                page_size=PARTITION_PAGE,
            )
        )
        return [(client_id, message_id) for message_id, client_id in found[:limit]]

    def pending(
        self, mailing_id: str, limit: int, after: str | None = None
    ) -> list[tuple[str, int]]:
        Message = self._models.Message
        return [
            (item.client_id, int(item.message_id))
            for item in Message.query(
                mailing_id,
                None if after is None else Message.client_id > after,
                filter_condition=Message.status == MessageStatus.PENDING.value,
                attributes_to_get=["client_id", "message_id"],
                limit=limit,
                page_size=max(limit, PARTITION_PAGE),
            )
        ]

    def _partition_query(self, mailing_id: str, status: MessageStatus | None) -> QueryFn:
        Message = self._models.Message
        wanted = None if status is None else Message.status == status.value

        def query(last_key: RawKey | None, limit: int) -> Iterable[MessageRecord]:
            return Message.query(
                mailing_id,
                filter_condition=wanted,
                limit=limit,
                # A filter applies after the read: ask for more than the page needs at once.
                page_size=limit if wanted is None else max(limit, PARTITION_PAGE),
                last_evaluated_key=last_key,
            )

        return query

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
        models = self._models
        Message, Mailing = models.Message, models.Mailing
        pending = MessageStatus.PENDING.value
        mailing_actions: list[Action] = [
            self._counter(MessageStatus.FAILED).add(-len(messages)),
            self._counter(MessageStatus.PENDING).add(len(messages)),
            Mailing.updated_at.set(now),
        ]
        if reopen:
            mailing_actions += [
                Mailing.status.set(MailingStatus.RUNNING.value),
                Mailing.due_key.set(DUE_KEY),
            ]
        try:
            with TransactWrite(connection=self._connection, client_request_token=token) as tx:
                for client_id, _ in messages:
                    tx.update(
                        Message(mailing_id, client_id),
                        actions=[
                            Message.status.set(pending),
                            # Pending messages are not in the status index.
                            Message.status_key.remove(),
                            Message.updated_at.set(now),
                        ],
                        condition=Message.status == MessageStatus.FAILED.value,
                    )
                tx.update(
                    Mailing(mailing_id),
                    actions=mailing_actions,
                    condition=Mailing.mailing_id.exists()
                    & (Mailing.status != MailingStatus.CANCELLED.value),
                )
                moves = [(now, MessageStatus.FAILED, -len(messages))]
                moves.append((now, MessageStatus.PENDING, len(messages)))
                for part, actions in part_updates(Mailing, mailing_id, timeline, moves):
                    tx.update(part, actions=actions)
        except TransactWriteError as exc:
            if is_conditional_failure(exc):
                return False
            raise
        return True

    def _counter(self, status: MessageStatus) -> NumberAttribute:
        counter: NumberAttribute = getattr(self._models.Mailing, f"count_{status.value}")
        return counter

    def _skip_counters(self, outcomes: Sequence[Outcome]) -> list[Action]:
        """The mailing's skipped-by-reason counters the `outcomes` move."""
        reasons = Counter(o.skip_reason for o in outcomes if o.skip_reason is not None)
        Mailing = self._models.Mailing
        return [
            cast(NumberAttribute, getattr(Mailing, f"skipped_{reason.value}")).add(n)
            for reason, n in reasons.items()
        ]

    def _variant_counters(self, outcomes: Sequence[Outcome]) -> list[Action]:
        """The mailing's sent-per-variant counters the `outcomes` move."""
        sent = Counter(
            o.variant for o in outcomes if o.variant is not None and o.status is MessageStatus.SENT
        )
        Mailing = self._models.Mailing
        return [
            cast(NumberAttribute, getattr(Mailing, f"variant_sent_{index}")).add(n)
            for index, n in sent.items()
        ]

    def _still_ours(self, claim_id: str | None, now: datetime) -> Condition:
        Message = self._models.Message
        pending = Message.status == MessageStatus.PENDING.value
        if claim_id is not None:
            return cast(Condition, pending & (Message.claim_id == claim_id))
        free = Message.claim_until.does_not_exist() | (Message.claim_until < now)
        return cast(Condition, pending & free)

    def _final_actions(self, mailing_id: str, outcome: Outcome, now: datetime) -> list[Action]:
        Message = self._models.Message
        actions: list[Action] = [
            Message.status.set(outcome.status.value),
            Message.updated_at.set(now),
            Message.claim_id.remove(),
            Message.claim_until.remove(),
        ]
        key = status_key(mailing_id, outcome.status.value)
        if key is not None:
            # Leaving pending (never indexed): one index put, not a delete and a put.
            actions.append(Message.status_key.set(key))
        if outcome.status is MessageStatus.SENT:
            actions.append(Message.sent_at.set(now))
        if outcome.error is not None:
            actions.append(Message.last_error.set(outcome.error[:ERROR_LIMIT]))
        if outcome.skip_reason is not None:
            actions.append(Message.skip_reason.set(outcome.skip_reason.value))
        if outcome.variant is not None:
            actions.append(Message.variant.set(outcome.variant))
        return actions


def message_of(record: MessageRecord) -> Message:
    """The domain message of a stored one."""
    return Message(
        id=int(record.message_id),
        mailing_id=record.mailing_id,
        client_id=record.client_id,
        phone=record.phone,
        status=MessageStatus(record.status),
        created_at=record.created_at,
        sent_at=record.sent_at,
        attempts=int(record.attempts or 0),
        last_error=record.last_error,
        skip_reason=_skip_reason(record.skip_reason),
        variant=None if record.variant is None else int(record.variant),
        delivery=delivery_of(record),
    )


def delivery_of(record: MessageRecord) -> Delivery | None:
    """The message's delivery as its first receipt reported it (None: no receipt yet)."""
    if record.delivery_status is None or record.delivery_received_at is None:
        return None
    return Delivery(
        status=DeliveryStatus(record.delivery_status),
        at=record.delivery_at,
        received_at=record.delivery_received_at,
        error=record.delivery_error,
    )


def _skip_reason(value: str | None) -> SkipReason | None:
    """A stored skip reason (None: none, or one this code does not know)."""
    try:
        return None if value is None else SkipReason(value)
    except ValueError:
        return None
