"""Idempotency keys in DynamoDB: conditional claims, saved responses, and give-backs."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from pynamodb.exceptions import DeleteError, PutError, UpdateError

from chalicelib.domain.idempotency import KeyClaim, SavedResponse, UsedKey
from chalicelib.storage.errors import is_conditional_failure
from chalicelib.storage.models import IdempotencyRecord


class IdempotencyKeys(Protocol):
    """Where Idempotency-Keys are claimed and their first responses kept."""

    def claim(self, claim: KeyClaim, now: datetime) -> bool:
        """Store `claim` unless its key is held; whether it was stored. A key is free when
        absent, expired (`expires_at` before `now`), or claimed for the same request by a run
        that never answered and whose claim ran out before `now`."""
        ...

    def find(self, scope: str) -> UsedKey | None:
        """What is stored under the key (read consistently); None when nothing is."""
        ...

    def save_response(self, scope: str, attempt: str, response: SavedResponse) -> bool:
        """Keep `response` under the key while `attempt` holds it; whether it did."""
        ...

    def release(self, scope: str, attempt: str) -> bool:
        """Remove the key while `attempt` holds it; whether it did."""
        ...


class DynamoIdempotencyKeys:
    """IdempotencyKeys on the stage's idempotency table."""

    def __init__(self, record: type[IdempotencyRecord]) -> None:
        self._record = record

    def claim(self, claim: KeyClaim, now: datetime) -> bool:
        record = self._record
        item = record(
            claim.scope,
            fingerprint=claim.fingerprint,
            attempt=claim.attempt,
            claimed_until=claim.claimed_until,
            expires_at=claim.expires_at,
        )
        abandoned = (
            record.response_status.does_not_exist()
            & (record.claimed_until < now)
            & (record.fingerprint == claim.fingerprint)
        )
        try:
            item.save(record.scope.does_not_exist() | (record.expires_at < now) | abandoned)
        except PutError as exc:
            if not is_conditional_failure(exc):
                raise
            return False
        return True

    def find(self, scope: str) -> UsedKey | None:
        record = self._record
        try:
            item = record.get(scope, consistent_read=True)
        except record.DoesNotExist:
            return None
        response = None
        if item.response_status is not None:
            response = SavedResponse(
                int(item.response_status), item.response_body or "", item.response_content_type
            )
        return UsedKey(item.fingerprint, response)

    def save_response(self, scope: str, attempt: str, response: SavedResponse) -> bool:
        record = self._record
        content_type = record.response_content_type
        try:
            record(scope).update(
                actions=[
                    record.response_status.set(response.status),
                    record.response_body.set(response.body),
                    content_type.remove()
                    if response.content_type is None
                    else content_type.set(response.content_type),
                ],
                condition=record.attempt == attempt,
            )
        except UpdateError as exc:
            if not is_conditional_failure(exc):
                raise
            return False
        return True

    def release(self, scope: str, attempt: str) -> bool:
        record = self._record
        try:
            record(scope).delete(condition=record.attempt == attempt)
        except DeleteError as exc:
            if not is_conditional_failure(exc):
                raise
            return False
        return True
