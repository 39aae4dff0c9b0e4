"""Delivery receipts: what the gateway later says about a message it accepted.

`sent` means the gateway accepted a message; a receipt says whether the phone got it. A message
keeps its status and gains a `delivery`; its mailing counts `delivered` and `undelivered` (an
expired receipt is undelivered). The first receipt of a message is the one that counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

# What a message id's lookup item groups: ids `n * ID_BUCKET` to `(n + 1) * ID_BUCKET - 1`.
ID_BUCKET = 4096
# What a delivery's error keeps of a long one.
RECEIPT_ERROR_LIMIT = 500


class DeliveryStatus(StrEnum):
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    EXPIRED = "expired"

    @property
    def reached_phone(self) -> bool:
        return self is DeliveryStatus.DELIVERED


@dataclass(frozen=True)
class Delivery:
    """A message's delivery as its first receipt reported it."""

    status: DeliveryStatus
    # When the gateway says it happened (None: it did not say), and when the receipt came.
    at: datetime | None
    received_at: datetime
    error: str | None = None


@dataclass(frozen=True)
class DeliveryCounts:
    """A mailing's messages with a receipt, by outcome (an expired receipt is undelivered)."""

    delivered: int = 0
    undelivered: int = 0

    def rate(self, sent: int) -> float | None:
        """The share of the sent messages the phones got; None while none was sent."""
        if sent <= 0:
            return None
        return min(1.0, self.delivered / sent)


@dataclass(frozen=True)
class ReceiptOutcome:
    """What recording one receipt did: counted now, or a duplicate (the first one stays)."""

    message_id: int
    mailing_id: str
    delivery: Delivery
    duplicate: bool


def id_buckets(first_id: int, count: int) -> list[int]:
    """The lookup buckets ids `first_id` to `first_id + count - 1` fall into."""
    if count <= 0:
        return []
    return list(range(first_id // ID_BUCKET, (first_id + count - 1) // ID_BUCKET + 1))
