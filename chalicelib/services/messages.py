"""Message state changes: each one moves the mailing's counters in the same transaction.

A message leaves `pending` exactly once. The write that takes it out is conditional on it still
being pending (and on the caller's claim, or on nobody holding one), and it carries the matching
`ADD` on the mailing's counters, so the counters always equal the message records.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

from pynamodb.connection import Connection
from pynamodb.exceptions import TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from chalicelib.domain import MessageStatus
from chalicelib.models import Models, status_key
from chalicelib.services.storage import is_conditional_failure

logger = logging.getLogger(__name__)


def counter(models: Models, status: MessageStatus) -> Any:
    return getattr(models.Mailing, f"count_{status.value}")


class MessageStore:
    """Reads messages and performs their one-way status changes."""

    def __init__(self, models: Models, connection: Connection) -> None:
        self._models = models
        self._connection = connection

    def get_many(self, mailing_id: str, client_ids: list[str]) -> dict[str, Any]:
        """The messages of these clients in the mailing, by client id (missing ones absent)."""
        keys = [(mailing_id, client_id) for client_id in dict.fromkeys(client_ids)]
        found = self._models.Message.batch_get(keys, consistent_read=True)
        return {message.client_id: message for message in found}

    def claim(self, message: Any, now: datetime, seconds: int) -> str | None:
        """Take the message for one gateway call; None when it is not pending or claimed."""
        Message = self._models.Message
        claim_id = uuid.uuid4().hex
        try:
            message.update(
                actions=[
                    Message.claim_id.set(claim_id),
                    Message.claim_until.set(now + timedelta(seconds=seconds)),
                    Message.attempts.add(1),
                    Message.updated_at.set(now),
                ],
                condition=(Message.status == MessageStatus.PENDING.value)
                & (Message.claim_until.does_not_exist() | (Message.claim_until < now)),
            )
        except UpdateError as exc:
            if is_conditional_failure(exc):
                return None
            raise
        return claim_id

    def release(self, message: Any, claim_id: str, now: datetime, error: str | None) -> bool:
        """Give a claimed message back (still pending), noting why the call did not finish it."""
        Message = self._models.Message
        try:
            message.update(
                actions=[
                    Message.claim_id.remove(),
                    Message.claim_until.remove(),
                    Message.last_error.set(error),
                    Message.updated_at.set(now),
                ],
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
        client_id: str,
        status: MessageStatus,
        now: datetime,
        *,
        claim_id: str | None = None,
        error: str | None = None,
    ) -> bool:
        """Move a pending message to a final status with the mailing's counters, atomically.

        With `claim_id`, only the holder of that claim may do it; without, only while nobody
        holds a live claim. False when the message was not in a state to change (already done).
        """
        models = self._models
        Message, Mailing = models.Message, models.Mailing
        condition = Message.status == MessageStatus.PENDING.value
        if claim_id is not None:
            condition &= Message.claim_id == claim_id
        else:
            condition &= Message.claim_until.does_not_exist() | (Message.claim_until < now)
        actions = [
            Message.status.set(status.value),
            Message.status_key.set(status_key(mailing_id, status.value)),
            Message.updated_at.set(now),
            Message.claim_id.remove(),
            Message.claim_until.remove(),
        ]
        if status is MessageStatus.SENT:
            actions.append(Message.sent_at.set(now))
        if error is not None:
            actions.append(Message.last_error.set(error[:500]))
        try:
            with TransactWrite(connection=self._connection) as tx:
                tx.update(Message(mailing_id, client_id), actions=actions, condition=condition)
                tx.update(
                    Mailing(mailing_id),
                    actions=[
                        counter(models, MessageStatus.PENDING).add(-1),
                        counter(models, status).add(1),
                    ],
                    # ADD would otherwise resurrect a deleted mailing as a bare counter item.
                    condition=Mailing.mailing_id.exists(),
                )
        except TransactWriteError as exc:
            if is_conditional_failure(exc):
                return False
            raise
        return True

    def pending_client_ids(self, mailing_id: str, limit: int) -> list[str]:
        """Up to `limit` clients whose message in this mailing is still pending."""
        index = self._models.Message.by_status
        key = status_key(mailing_id, MessageStatus.PENDING.value)
        return [item.client_id for item in index.query(key, limit=limit, page_size=limit)]
