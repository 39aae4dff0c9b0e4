"""The audit trail: one entry per write through the API, kept AUDIT_RETENTION_DAYS.

Entries are written after the write they describe, best effort: a failed audit write never
undoes nor fails the caller's write (it is already stored); it is logged as an error and
counted as the `AuditWriteFailures` metric, which an alarm can watch.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from chalicelib.domain import PageOf
from chalicelib.metrics import MetricsWriter
from chalicelib.pagination import RawKey, Segment, fingerprint, paginate
from chalicelib.storage.models import AUDIT_LISTING_KEY, Models

logger = logging.getLogger(__name__)


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
    id: str = ""


@dataclass
class AuditLog:
    """Writes and lists audit entries."""

    models: Models
    clock: Callable[[], datetime]
    retention_days: int
    metrics: MetricsWriter | None = None
    _ids: Callable[[], str] = field(default=lambda: uuid.uuid4().hex[:12])

    def record(self, entry: AuditEntry) -> AuditEntry | None:
        """Store `entry` stamped with the time; None (logged, counted) when it cannot be."""
        at = self.clock()
        entry_key = f"{at.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}#{self._ids()}"
        item = self.models.AuditEntry(
            entry.target_id,
            entry_key,
            at=at,
            actor=entry.actor.id,
            role=entry.actor.role,
            auth_mode=entry.actor.auth_mode,
            action=entry.action,
            target_type=entry.target_type,
            request_id=entry.request_id,
            http_status=entry.http_status,
            fields=list(entry.fields),
            status=entry.status,
            listing_key=AUDIT_LISTING_KEY,
            expires_at=at + timedelta(days=self.retention_days),
        )
        try:
            item.save()
        except Exception:  # the write it describes is stored already; never fail the caller
            logger.exception(
                "audit entry not written",
                extra={"action": entry.action, "target_id": entry.target_id},
            )
            if self.metrics is not None:
                self.metrics.emit({"AuditWriteFailures": 1})
            return None
        return self._to_domain(item)

    def list(
        self, *, target: str | None, actor: str | None, limit: int, cursor: str | None
    ) -> PageOf:
        """A page of entries, newest first, for one target and/or one actor (else all)."""
        Entry = self.models.AuditEntry
        if target is not None:
            condition = Entry.actor == actor if actor is not None else None
            query = _newest_first(Entry.query, target, condition)
            keys: tuple[str, ...] = ("target_id", "entry_key")
        elif actor is not None:
            query = _newest_first(Entry.by_actor.query, actor)
            keys = ("actor", "entry_key", "target_id")
        else:
            query = _newest_first(Entry.by_time.query, AUDIT_LISTING_KEY)
            keys = ("listing_key", "entry_key", "target_id")
        items, next_cursor = paginate(
            [Segment(query, keys)],
            fingerprint("audit", target, actor),
            cursor,
            limit,
            self._to_domain,
        )
        return PageOf(items, next_cursor)

    @staticmethod
    def _to_domain(item: Any) -> AuditEntry:
        return AuditEntry(
            actor=Actor(item.actor, item.role, item.auth_mode),
            action=item.action,
            target_type=item.target_type,
            target_id=item.target_id,
            http_status=int(item.http_status),
            request_id=item.request_id,
            fields=tuple(item.fields or ()),
            status=item.status,
            at=item.at,
            id=item.entry_key,
        )


def _newest_first(
    method: Callable[..., Iterable[Any]], hash_key: str, condition: Any = None
) -> Callable[[RawKey | None, int], Iterable[Any]]:
    # PynamoDB counts `limit` after the filter and reads on until it has that many, so a page
    # filtered by actor is full whenever enough entries match.
    def query(last_key: RawKey | None, limit: int) -> Iterable[Any]:
        return method(
            hash_key,
            filter_condition=condition,
            scan_index_forward=False,
            limit=limit,
            page_size=limit,
            last_evaluated_key=last_key,
        )

    return query
