"""The audit trail's values: who made a write through the API, and what it changed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Actor:
    """Who made a request: a token id (never the token) or an OIDC `sub`, and its role."""

    id: str
    role: str | None = None
    auth_mode: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One write: who did what to which target, when, and which fields it set."""

    actor: Actor
    action: str
    target_type: str
    target_id: str
    http_status: int
    request_id: str | None = None
    fields: tuple[str, ...] = ()
    status: str | None = None
    at: datetime | None = None
    # The time, then a random suffix: orders a target's entries (set when it is recorded).
    id: str = ""
