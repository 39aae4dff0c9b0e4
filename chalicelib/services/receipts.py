"""Delivery receipts: the gateway's word on whether a phone got a message it accepted.

Optional: with DELIVERY_RECEIPTS off (the default) the fan-out writes no id lookup and nothing
changes for a gateway that sends no receipts. With it on, each fan-out page also writes one small
lookup item (storage/receipts.py), and `POST /delivery-receipts` records each message's first
receipt with its mailing's `delivered` or `undelivered` counter. A receipt for an id nobody
was given is NotFound; a second one for a message changes nothing and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from chalicelib.domain import Clock
from chalicelib.domain.receipt import Delivery, DeliveryStatus, ReceiptOutcome
from chalicelib.errors import NotFound
from chalicelib.storage.errors import Retry, busy_if_transient
from chalicelib.storage.receipts import ReceiptRepository

logger = logging.getLogger(__name__)

# A receipt's transaction moves its mailing's counters, as the sender's outcomes do: while the
# mailing is sending, the two meet on that item and one is cancelled. A few quick tries absorb
# it; what is left is a 503, and the gateway sends the receipt again.
WEBHOOK_WRITES = Retry(attempts=5, first_pause=0.05, max_pause=0.5)


class UnknownMessage(NotFound):
    """No message has this id (or its mailing is gone)."""

    def __init__(self, message_id: int) -> None:
        super().__init__(f"no message has the id {message_id}")


class DeliveryReceipts:
    """Records delivery receipts, and the fan-out's id lookup they need."""

    def __init__(self, receipts: ReceiptRepository, clock: Clock, *, enabled: bool) -> None:
        self._receipts = receipts
        self._clock = clock
        self.enabled = enabled

    def register_ids(
        self,
        mailing_id: str,
        first_id: int,
        client_ids: Sequence[str],
        expires_at: datetime | None,
    ) -> None:
        """Remember which clients a fan-out page's ids went to (only with receipts on)."""
        if self.enabled and client_ids:
            self._receipts.register_ids(mailing_id, first_id, client_ids, expires_at)

    def record(
        self,
        message_id: int,
        status: DeliveryStatus,
        *,
        error: str | None = None,
        at: datetime | None = None,
    ) -> ReceiptOutcome:
        """Record a message's receipt (the first one counts); UnknownMessage when no message
        has the id."""
        with busy_if_transient():
            where = self._receipts.locate(message_id)
            if where is None:
                raise UnknownMessage(message_id)
            mailing_id, client_id = where
            delivery = Delivery(status=status, at=at, received_at=self._clock(), error=error)
            outcome = replace(
                WEBHOOK_WRITES,
                what="recording a delivery receipt",
                log={"mailing_id": mailing_id, "message_id": message_id},
            )(lambda: self._receipts.record(mailing_id, client_id, message_id, delivery))
        if outcome is None:
            raise UnknownMessage(message_id)
        logger.info(
            "delivery receipt %s%s",
            status.value,
            " (duplicate, the first one stays)" if outcome.duplicate else "",
            extra={
                "mailing_id": mailing_id,
                "client_id": client_id,
                "message_id": message_id,
                "delivery": outcome.delivery.status.value,
            },
        )
        return outcome
