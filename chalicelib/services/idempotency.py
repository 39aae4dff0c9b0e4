"""Idempotency-Key for creates (the IETF draft "The Idempotency-Key HTTP Header Field").

The first request with a key claims it by a conditional put; the response is saved on the
claim and replayed to every later request with the same key and the same fingerprint (method,
path and body). Keys are scoped to the caller and expire `ttl` after the first request: DynamoDB's
TTL removes the item some time later, so an expired item is treated as absent here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from pynamodb.exceptions import DeleteError, PutError, UpdateError

from chalicelib.errors import IdempotencyKeyReused, RequestInProgress
from chalicelib.storage.errors import is_conditional_failure
from chalicelib.storage.models import Models

# Longer than API Gateway's 29 s integration timeout: a claim older than this belongs to a run
# that died (its Lambda timed out), so a retry may take the key over instead of waiting a day.
CLAIM_SECONDS = 60
_SCOPE_SEPARATOR = "\x1f"


@dataclass(frozen=True)
class SavedResponse:
    """The first response to a request with a key, as replayed."""

    status: int
    body: str
    content_type: str | None


@dataclass(frozen=True)
class Claim:
    """The right to run the request once and save its response."""

    scope: str
    attempt: str


class IdempotencyStore:
    """Claims keys, saves first responses and finds them again."""

    def __init__(self, models: Models, clock: Callable[[], datetime], ttl: timedelta) -> None:
        self._record = models.IdempotencyRecord
        self._clock = clock
        self._ttl = ttl

    def claim(self, caller: str, key: str, fingerprint: str) -> Claim | SavedResponse:
        """A claim to run the request, or the saved response to replay.

        Raises IdempotencyKeyReused for another request under the key, RequestInProgress while
        the first one runs.
        """
        record = self._record
        scope = f"{caller}{_SCOPE_SEPARATOR}{key}"
        now = self._clock()
        item = record(
            scope,
            fingerprint=fingerprint,
            attempt=uuid.uuid4().hex,
            claimed_until=now + timedelta(seconds=CLAIM_SECONDS),
            expires_at=now + self._ttl,
        )
        abandoned = (
            record.response_status.does_not_exist()
            & (record.claimed_until < now)
            & (record.fingerprint == fingerprint)
        )
        try:
            item.save(record.scope.does_not_exist() | (record.expires_at < now) | abandoned)
            return Claim(scope, item.attempt)
        except PutError as exc:
            if not is_conditional_failure(exc):
                raise
        try:
            first = record.get(scope, consistent_read=True)
        except record.DoesNotExist:
            first = None  # given back (its run failed) since our put: that run is not over
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
        if first.response_status is None:
            raise self._in_progress()
        return SavedResponse(
            first.response_status, first.response_body or "", first.response_content_type
        )

    @staticmethod
    def _in_progress() -> RequestInProgress:
        return RequestInProgress(
            "the first request with this Idempotency-Key is still in progress; "
            "retry it in a moment to get its response"
        )

    def save(self, claim: Claim, response: SavedResponse) -> None:
        """Keep the response for replays (unless the claim was lost meanwhile)."""
        record = self._record
        try:
            record(claim.scope).update(
                actions=[
                    record.response_status.set(response.status),
                    record.response_body.set(response.body),
                    record.response_content_type.set(response.content_type),
                ],
                condition=record.attempt == claim.attempt,
            )
        except UpdateError as exc:
            if not is_conditional_failure(exc):
                raise

    def release(self, claim: Claim) -> None:
        """Give the key back: the request failed on our side and may be sent again."""
        record = self._record
        try:
            record(claim.scope).delete(condition=record.attempt == claim.attempt)
        except DeleteError as exc:
            if not is_conditional_failure(exc):
                raise
