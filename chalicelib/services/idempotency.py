"""Idempotency-Key for creates (the IETF draft "The Idempotency-Key HTTP Header Field").

The first request with a key claims it by a conditional put; the response is saved on the
claim and replayed to every later request with the same key and the same fingerprint (method,
path and body). Keys are scoped to the caller and expire `ttl` after the first request: DynamoDB's
TTL removes the item some time later, so an expired item is treated as absent here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from chalicelib.domain.idempotency import Claim, KeyClaim, SavedResponse
from chalicelib.errors import IdempotencyKeyReused, RequestInProgress
from chalicelib.storage.idempotency import IdempotencyKeys

__all__ = ["CLAIM_SECONDS", "Claim", "IdempotencyStore", "SavedResponse"]

# Longer than API Gateway's 29 s integration timeout: a claim older than this belongs to a run
# that died (its Lambda timed out), so a retry may take the key over instead of waiting a day.
CLAIM_SECONDS = 60
_SCOPE_SEPARATOR = "\x1f"


class IdempotencyStore:
    """Claims keys, saves first responses and finds them again."""

    def __init__(
        self, keys: IdempotencyKeys, clock: Callable[[], datetime], ttl: timedelta
    ) -> None:
        self._keys = keys
        self._clock = clock
        self._ttl = ttl

    def claim(self, caller: str, key: str, fingerprint: str) -> Claim | SavedResponse:
        """A claim to run the request, or the saved response to replay.

        Raises IdempotencyKeyReused for another request under the key, RequestInProgress while
        the first one runs.
        """
        scope = f"{caller}{_SCOPE_SEPARATOR}{key}"
        now = self._clock()
        claim = KeyClaim(
            scope,
            fingerprint=fingerprint,
            attempt=uuid.uuid4().hex,
            claimed_until=now + timedelta(seconds=CLAIM_SECONDS),
            expires_at=now + self._ttl,
        )
        if self._keys.claim(claim, now):
            return Claim(scope, claim.attempt)
        # Gone again since our claim failed: given back (its run failed), that run is not over.
        first = self._keys.find(scope)
        if first is None:
            raise self._in_progress()
        if first.fingerprint != fingerprint:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was already used with another request body; "
                "send a new key for a new request",
                [
                    {
                        "field": "header.Idempotency-Key",
                        "message": "already used with another request body",
                        "type": "idempotency_key_reused",
                    }
                ],
            )
        if first.response is None:
            raise self._in_progress()
        return first.response

    @staticmethod
    def _in_progress() -> RequestInProgress:
        return RequestInProgress(
            "the first request with this Idempotency-Key is still in progress; "
            "retry it in a moment to get its response"
        )

    def save(self, claim: Claim, response: SavedResponse) -> None:
        """Keep the response for replays (unless the claim was lost meanwhile)."""
        self._keys.save_response(claim.scope, claim.attempt, response)

    def release(self, claim: Claim) -> None:
        """Give the key back: the request failed on our side and may be sent again."""
        self._keys.release(claim.scope, claim.attempt)
