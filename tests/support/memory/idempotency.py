"""In-memory IdempotencyKeys (chalicelib.storage.idempotency), with DynamoDB's conditions."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime

from chalicelib.domain.idempotency import KeyClaim, SavedResponse, UsedKey


@dataclass
class _Stored:
    claim: KeyClaim
    response: SavedResponse | None = None


class MemoryIdempotencyKeys:
    """Keys in a dict; each operation is atomic, as a conditional write is."""

    def __init__(self) -> None:
        self._keys: dict[str, _Stored] = {}
        self._lock = threading.Lock()

    def claim(self, claim: KeyClaim, now: datetime) -> bool:
        with self._lock:
            held = self._keys.get(claim.scope)
            free = (
                held is None
                or held.claim.expires_at < now
                or (
                    held.response is None
                    and held.claim.claimed_until < now
                    and held.claim.fingerprint == claim.fingerprint
                )
            )
            if free:
                self._keys[claim.scope] = _Stored(claim)
            return free

    def find(self, scope: str) -> UsedKey | None:
        with self._lock:
            held = self._keys.get(scope)
            return None if held is None else UsedKey(held.claim.fingerprint, held.response)

    def save_response(self, scope: str, attempt: str, response: SavedResponse) -> bool:
        with self._lock:
            held = self._keys.get(scope)
            if held is None or held.claim.attempt != attempt:
                return False
            held.response = response
            return True

    def release(self, scope: str, attempt: str) -> bool:
        with self._lock:
            held = self._keys.get(scope)
            if held is None or held.claim.attempt != attempt:
                return False
            del self._keys[scope]
            return True
