"""Delivery receipts as stored: the message-id lookup and each message's first receipt.

A receipt names a message by its id only, while a message is stored under (mailing, client).
With DELIVERY_RECEIPTS on, the fan-out writes one small lookup item per page (before the page's
commit, like its jobs): which clients the page's consecutive ids went to. A receipt reads the
lookup bucket of its id (one Query, newest page at or below the id) and then the message. Pages
that never committed, or lost a client to a message it already had, leave entries that name no
message with this id: the message read says so, and the receipt is unknown (404).

A receipt is recorded in one transaction: the message's `delivery_*` fields, on condition that it
has this id and no receipt yet, and the mailing's `delivered` or `undelivered` counter. The first
receipt counts; any later one for the message is a duplicate and changes nothing. A receipt that
comes before the sender wrote `sent` (the gateway was quicker than our write) is recorded all the
same: the outcome's write leaves the delivery fields alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from pynamodb.connection import Connection
from pynamodb.exceptions import TransactWriteError
from pynamodb.expressions.update import Action
from pynamodb.transactions import TransactWrite

from chalicelib.domain.receipt import (
    ID_BUCKET,
    RECEIPT_ERROR_LIMIT,
    Delivery,
    ReceiptOutcome,
    id_buckets,
)
from chalicelib.storage.errors import is_conditional_failure
from chalicelib.storage.messages import delivery_of
from chalicelib.storage.models import Models, message_id_sort, message_ids_key


class ReceiptRepository(Protocol):
    """Message ids' lookup and the messages' delivery receipts."""

    def register_ids(
        self,
        mailing_id: str,
        first_id: int,
        client_ids: Sequence[str],
        expires_at: datetime | None,
    ) -> None:
        """Remember that ids `first_id + n` went to `client_ids[n]` of the mailing."""
        ...

    def locate(self, message_id: int) -> tuple[str, str] | None:
        """The (mailing id, client id) the message id was given to, if registered."""
        ...

    def record(
        self, mailing_id: str, client_id: str, message_id: int, delivery: Delivery
    ) -> ReceiptOutcome | None:
        """Record the message's first receipt with its mailing's counter; a later one is a
        duplicate (the first stays). None when no message (mailing, client) has this id or its
        mailing is gone."""
        ...


class DynamoReceiptRepository:
    """`ReceiptRepository` on the stage's messages and mailings tables."""

    def __init__(self, models: Models, connection: Connection) -> None:
        self._models = models
        self._connection = connection

    def register_ids(
        self,
        mailing_id: str,
        first_id: int,
        client_ids: Sequence[str],
        expires_at: datetime | None,
    ) -> None:
        Page = self._models.MessageIdPage
        for bucket in id_buckets(first_id, len(client_ids)):
            Page(
                message_ids_key(bucket),
                message_id_sort(first_id),
                first_id=first_id,
                page_mailing_id=mailing_id,
                page_clients=list(client_ids),
                expires_at=expires_at,
            ).save()

    def locate(self, message_id: int) -> tuple[str, str] | None:
        if message_id < 0:
            return None
        Page = self._models.MessageIdPage
        pages = Page.query(
            message_ids_key(message_id // ID_BUCKET),
            Page.first_id_key <= message_id_sort(message_id),
            scan_index_forward=False,
            limit=1,
            consistent_read=True,
        )
        for page in pages:
            offset = message_id - int(page.first_id)
            clients = list(page.page_clients or [])
            if 0 <= offset < len(clients):
                return page.page_mailing_id, str(clients[offset])
        return None

    def record(
        self, mailing_id: str, client_id: str, message_id: int, delivery: Delivery
    ) -> ReceiptOutcome | None:
        Message, Mailing = self._models.Message, self._models.Mailing
        counter = (
            Mailing.count_delivered if delivery.status.reached_phone else Mailing.count_undelivered
        )
        actions: list[Action] = [
            Message.delivery_status.set(delivery.status.value),
            Message.delivery_received_at.set(delivery.received_at),
        ]
        if delivery.at is not None:
            actions.append(Message.delivery_at.set(delivery.at))
        if delivery.error is not None:
            actions.append(Message.delivery_error.set(delivery.error[:RECEIPT_ERROR_LIMIT]))
        try:
            with TransactWrite(connection=self._connection) as tx:
                tx.update(
                    Message(mailing_id, client_id),
                    actions=actions,
                    condition=(Message.message_id == message_id)
                    & Message.delivery_status.does_not_exist(),
                )
                tx.update(
                    Mailing(mailing_id),
                    actions=[counter.add(1)],
                    # ADD would otherwise resurrect a deleted mailing as a bare counter item.
                    condition=Mailing.mailing_id.exists(),
                )
        except TransactWriteError as exc:
            if not is_conditional_failure(exc):
                raise
            return self._as_it_is(mailing_id, client_id, message_id)
        return ReceiptOutcome(message_id, mailing_id, delivery, duplicate=False)

    def _as_it_is(self, mailing_id: str, client_id: str, message_id: int) -> ReceiptOutcome | None:
        """Why the receipt's write was refused: a duplicate (the first receipt), or unknown."""
        Message = self._models.Message
        found = list(
            Message.query(mailing_id, Message.client_id == client_id, consistent_read=True)
        )
        if not found or int(found[0].message_id) != message_id:
            return None
        first = delivery_of(found[0])
        if first is None:
            # The message is there without a receipt: its mailing is gone.
            return None
        return ReceiptOutcome(message_id, mailing_id, first, duplicate=True)
