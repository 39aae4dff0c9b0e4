"""Delivery receipts in memory: `ReceiptRepository` with the DynamoDB one's conditions
(tests/integration/test_receipt_repository.py runs both)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from chalicelib.domain.receipt import RECEIPT_ERROR_LIMIT, Delivery, ReceiptOutcome


class MemoryReceiptRepository:
    """Id pages, messages (id and receipt) and mailings' delivery counters, under one lock."""

    def __init__(self) -> None:
        self._pages: dict[int, tuple[str, list[str]]] = {}
        self._messages: dict[tuple[str, str], tuple[int, Delivery | None]] = {}
        self._counters: dict[str, Counter[str]] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- what tests set up

    def add_mailing(self, mailing_id: str) -> None:
        with self._lock:
            self._counters[mailing_id] = Counter()

    def add_message(self, mailing_id: str, client_id: str, message_id: int) -> None:
        with self._lock:
            self._messages[(mailing_id, client_id)] = (message_id, None)

    def delete_mailing(self, mailing_id: str) -> None:
        with self._lock:
            del self._counters[mailing_id]

    def counters(self, mailing_id: str) -> tuple[int, int]:
        counts = self._counters[mailing_id]
        return counts["delivered"], counts["undelivered"]

    # ---------------------------------------------------------------- the contract

    def register_ids(
        self,
        mailing_id: str,
        first_id: int,
        client_ids: Sequence[str],
        expires_at: datetime | None,
    ) -> None:
        with self._lock:
            self._pages[first_id] = (mailing_id, list(client_ids))

    def locate(self, message_id: int) -> tuple[str, str] | None:
        with self._lock:
            starts = [first for first in self._pages if first <= message_id]
            if not starts:
                return None
            first = max(starts)
            mailing_id, clients = self._pages[first]
        offset = message_id - first
        return (mailing_id, clients[offset]) if offset < len(clients) else None

    def record(
        self, mailing_id: str, client_id: str, message_id: int, delivery: Delivery
    ) -> ReceiptOutcome | None:
        with self._lock:
            found = self._messages.get((mailing_id, client_id))
            if found is None or found[0] != message_id:
                return None
            if found[1] is not None:
                return ReceiptOutcome(message_id, mailing_id, found[1], duplicate=True)
            if mailing_id not in self._counters:
                return None
            if delivery.error is not None:
                delivery = replace(delivery, error=delivery.error[:RECEIPT_ERROR_LIMIT])
            self._messages[(mailing_id, client_id)] = (message_id, delivery)
            outcome = "delivered" if delivery.status.reached_phone else "undelivered"
            self._counters[mailing_id][outcome] += 1
        return ReceiptOutcome(message_id, mailing_id, delivery, duplicate=False)
