"""Message state changes: each one moves the mailing's counters in the same transaction.

A message leaves `pending` exactly once. The write that takes it out is conditional on it still
being pending (and on the caller's claim, or on nobody holding one), and it carries the matching
`ADD` on the mailing's counters, so the counters always equal the message records.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError
from pynamodb.connection import Connection
from pynamodb.exceptions import TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from chalicelib.domain import MailingStatus, MessageStatus
from chalicelib.storage.errors import ONCE, Retry, is_conditional_failure
from chalicelib.storage.models import DUE_KEY, Models, status_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """The final status a message should get, and the claim under which it may."""

    client_id: str
    status: MessageStatus
    claim_id: str | None = None
    error: str | None = None
    message_id: int | None = None  # for the log line only


@dataclass(frozen=True)
class Claim:
    """A claim's outcome: its id when taken, else the message as it was (None: not there)."""

    claim_id: str | None
    message: Any | None = None


def _ids(mailing_id: str, client_id: str, message_id: int | None = None, **more: Any) -> dict:
    """A log line's `extra`: the message's ids (a None id comes from the bound context)."""
    ids = {"mailing_id": mailing_id, "client_id": client_id, "message_id": message_id}
    return {key: value for key, value in {**ids, **more}.items() if value is not None}


def _log_final(mailing_id: str, outcome: Outcome) -> None:
    level = logging.INFO if outcome.status is MessageStatus.SENT else logging.WARNING
    logger.log(
        level,
        "message %s",
        outcome.status.value,
        extra=_ids(
            mailing_id,
            outcome.client_id,
            outcome.message_id,
            status=outcome.status.value,
            error=outcome.error,
        ),
    )


def counter(models: Models, status: MessageStatus) -> Any:
    return getattr(models.Mailing, f"count_{status.value}")


class MessageStore:
    """Reads messages and performs their one-way status changes."""

    def __init__(self, models: Models, connection: Connection) -> None:
        self._models = models
        self._connection = connection

    def claim(
        self, mailing_id: str, client_id: str, message_id: int, now: datetime, seconds: int
    ) -> Claim:
        """Take the message for one gateway call.

        No claim when it is not there with this id, not pending, or claimed by a live claim;
        then the message as the failed condition saw it, with no second read.
        """
        Message = self._models.Message
        claim_id = uuid.uuid4().hex
        request = Message(mailing_id, client_id).get_update_kwargs_from_instance(
            actions=[
                Message.claim_id.set(claim_id),
                Message.claim_until.set(now + timedelta(seconds=seconds)),
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
                return Claim(None, Message.from_raw_data(seen) if seen else None)
            raise
        logger.info(
            "message claimed for a gateway call",
            extra=_ids(mailing_id, client_id, message_id, claim_seconds=seconds),
        )
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
        """Give a claimed message back (still pending), noting why the call did not finish it.

        Without `called` (the gateway was not called after all) the claim's attempt is undone.
        """
        Message = self._models.Message
        actions = [
            Message.claim_id.remove(),
            Message.claim_until.remove(),
            Message.last_error.set(error),
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
        logger.info(
            "message released, still pending" if called else "claim given back, attempt undone",
            extra=_ids(mailing_id, client_id, status="pending", error=error),
        )
        return True

    def finish(
        self,
        mailing_id: str,
        client_id: str,
        status: MessageStatus,
        now: datetime,
        *,
        claim_id: str | None = None,
        error: str | None = None,
        message_id: int | None = None,
        retry: Retry = ONCE,
    ) -> bool:
        """Move a pending message to a final status with the mailing's counters, atomically.

        With `claim_id`, only the holder of that claim may do it; without, only while nobody
        holds a live claim. False when the message was not in a state to change (already done).
        """
        outcome = Outcome(client_id, status, claim_id, error, message_id)
        return bool(retry(lambda: self._commit(mailing_id, [outcome], now)))

    def finish_many(
        self,
        mailing_id: str,
        outcomes: list[Outcome],
        now: datetime,
        *,
        retry: Retry = ONCE,
    ) -> set[str]:
        """Finish several messages of one mailing in one transaction (one counter update for
        all); the clients whose message was finished. Falls back to one transaction each when
        any of them cannot be (its claim lapsed and another sender took it). Each transaction
        goes through `retry`: a conflict or a throttle is never read as "already done"."""
        if not outcomes:
            return set()
        done = retry(lambda: self._commit(mailing_id, outcomes, now))
        if done or len(outcomes) == 1:
            return done
        return {
            o.client_id for o in outcomes if retry(lambda o=o: self._commit(mailing_id, [o], now))
        }

    def _commit(self, mailing_id: str, outcomes: list[Outcome], now: datetime) -> set[str]:
        models = self._models
        Message, Mailing = models.Message, models.Mailing
        moved = Counter(outcome.status for outcome in outcomes)
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
                    actions=[counter(models, MessageStatus.PENDING).add(-len(outcomes))]
                    + [counter(models, status).add(n) for status, n in moved.items()],
                    # ADD would otherwise resurrect a deleted mailing as a bare counter item.
                    condition=Mailing.mailing_id.exists(),
                )
        except TransactWriteError as exc:
            if is_conditional_failure(exc):
                return set()
            raise
        for outcome in outcomes:
            _log_final(mailing_id, outcome)
        return {outcome.client_id for outcome in outcomes}

    def _still_ours(self, claim_id: str | None, now: datetime) -> Any:
        Message = self._models.Message
        condition = Message.status == MessageStatus.PENDING.value
        if claim_id is not None:
            return condition & (Message.claim_id == claim_id)
        return condition & (Message.claim_until.does_not_exist() | (Message.claim_until < now))

    def _final_actions(self, mailing_id: str, outcome: Outcome, now: datetime) -> list[Any]:
        Message = self._models.Message
        actions = [
            Message.status.set(outcome.status.value),
            Message.status_key.set(status_key(mailing_id, outcome.status.value)),
            Message.updated_at.set(now),
            Message.claim_id.remove(),
            Message.claim_until.remove(),
        ]
        if outcome.status is MessageStatus.SENT:
            actions.append(Message.sent_at.set(now))
        if outcome.error is not None:
            actions.append(Message.last_error.set(outcome.error[:500]))
        return actions

    def fail_orphan(self, mailing_id: str, client_id: str, reason: str, now: datetime) -> bool:
        """Fail a pending message whose mailing cannot keep counters (missing or unusable)."""
        Message = self._models.Message
        outcome = Outcome(client_id, MessageStatus.FAILED, None, reason)
        try:
            Message(mailing_id, client_id).update(
                actions=self._final_actions(mailing_id, outcome, now),
                condition=self._still_ours(None, now),
            )
        except UpdateError as exc:
            if is_conditional_failure(exc):
                return False
            raise
        _log_final(mailing_id, outcome)
        return True

    def pending(self, mailing_id: str, limit: int) -> list[tuple[str, int]]:
        """Up to `limit` (client id, message id) pairs whose message is still pending."""
        return self.with_status(mailing_id, MessageStatus.PENDING, limit)

    def with_status(
        self, mailing_id: str, status: MessageStatus, limit: int, after: int | None = None
    ) -> list[tuple[str, int]]:
        """Up to `limit` (client id, message id) pairs with `status`, by message id (after
        `after`, when given)."""
        Message = self._models.Message
        key = status_key(mailing_id, status.value)
        condition = None if after is None else Message.message_id > after
        return [
            (item.client_id, int(item.message_id))
            for item in Message.by_status.query(key, condition, limit=limit, page_size=limit)
        ]

    def requeue_failed(
        self,
        mailing_id: str,
        messages: list[tuple[str, int]],
        now: datetime,
        *,
        reopen: bool,
        token: str | None = None,
    ) -> bool:
        """Make these failed messages pending again (same ids), with the mailing's counters,
        in one transaction; with `reopen`, a finished mailing runs again. False when any of
        them is no longer failed or the mailing was cancelled or deleted meanwhile.

        Give every try of one change the same `token`: a try after a 500 whose first try was
        applied after all then succeeds instead of failing its conditions."""
        models = self._models
        Message, Mailing = models.Message, models.Mailing
        pending = MessageStatus.PENDING.value
        mailing_actions = [
            counter(models, MessageStatus.FAILED).add(-len(messages)),
            counter(models, MessageStatus.PENDING).add(len(messages)),
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
                            Message.status_key.set(status_key(mailing_id, pending)),
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
        except TransactWriteError as exc:
            if is_conditional_failure(exc):
                return False
            raise
        for client_id, message_id in messages:
            logger.info(
                "failed message queued again, pending",
                extra=_ids(mailing_id, client_id, message_id, status=pending),
            )
        return True
