"""Small helpers shared by the services' data access."""

from __future__ import annotations

import uuid

_CONDITION_FAILURES = ("ConditionalCheckFailedException", "TransactionCanceledException")


def is_conditional_failure(exc: Exception) -> bool:
    """True when a PynamoDB write failed on its condition (or a transaction was cancelled)."""
    return getattr(exc, "cause_response_code", None) in _CONDITION_FAILURES


def looks_like_id(value: str) -> bool:
    """Server ids are UUIDs; anything else cannot name a record (and never reaches DynamoDB)."""
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False
