"""Idempotency-Key values: a claim on a key, and the first response saved under it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


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


@dataclass(frozen=True)
class KeyClaim:
    """A claim as stored: held by `attempt` until `claimed_until`, the key kept until
    `expires_at`, for the request `fingerprint` names."""

    scope: str
    fingerprint: str
    attempt: str
    claimed_until: datetime
    expires_at: datetime


@dataclass(frozen=True)
class UsedKey:
    """What is stored under a key: its request's fingerprint and, once answered, the response."""

    fingerprint: str
    response: SavedResponse | None = None
