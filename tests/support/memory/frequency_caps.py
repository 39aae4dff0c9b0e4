"""The clients' frequency-cap slots in memory: `FrequencyCapStore` with the DynamoDB item's
conditions (tests/integration/test_frequency_cap_repository.py runs both)."""

from __future__ import annotations

import threading

from chalicelib.domain.frequency_cap import CapSlot
from chalicelib.storage.frequency_caps import Slots


class MemoryFrequencyCaps:
    """One process's cap slots: every write is checked and applied under one lock."""

    def __init__(self) -> None:
        self._slots: dict[str, dict[int, CapSlot]] = {}
        self._lock = threading.Lock()

    def slots(self, client_id: str, limit: int) -> Slots:
        with self._lock:
            return self._seen(client_id, limit)

    def take(
        self, client_id: str, mailing_id: str, index: int, limit: int, now: float, until: float
    ) -> Slots | None:
        with self._lock:
            seen = self._seen(client_id, limit)
            free = seen[index] is None or not seen[index].busy(now)  # type: ignore[union-attr]
            held = any(s is not None and s.mailing_id == mailing_id and s.busy(now) for s in seen)
            if not free or held:
                return seen
            self._slots.setdefault(client_id, {})[index] = CapSlot(mailing_id, until)
            return None

    def give_back(self, client_id: str, mailing_id: str, index: int) -> bool:
        with self._lock:
            slots = self._slots.get(client_id, {})
            slot = slots.get(index)
            if slot is None or slot.mailing_id != mailing_id:
                return False
            del slots[index]
            return True

    def _seen(self, client_id: str, limit: int) -> Slots:
        slots = self._slots.get(client_id, {})
        return [slots.get(j) for j in range(limit)]
