"""The audit trail: one entry per write through the API, kept AUDIT_RETENTION_DAYS.

Entries are written after the write they describe, best effort: a failed audit write never
undoes nor fails the caller's write (it is already stored); it is logged as an error and
counted as the `AuditWriteFailures` metric, which an alarm can watch.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from chalicelib.domain import PageOf
from chalicelib.domain.audit import Actor, AuditEntry
from chalicelib.metrics import MetricsWriter
from chalicelib.storage.audit import AuditTrail

__all__ = ["Actor", "AuditEntry", "AuditLog"]

logger = logging.getLogger(__name__)


@dataclass
class AuditLog:
    """Writes and lists audit entries."""

    trail: AuditTrail
    clock: Callable[[], datetime]
    retention_days: int
    metrics: MetricsWriter | None = None
    _ids: Callable[[], str] = field(default=lambda: uuid.uuid4().hex[:12])

    def record(self, entry: AuditEntry) -> AuditEntry | None:
        """Store `entry` stamped with the time; None (logged, counted) when it cannot be."""
        at = self.clock()
        stamped = replace(entry, at=at, id=f"{at.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}#{self._ids()}")
        try:
            return self.trail.add(stamped, expires_at=at + timedelta(days=self.retention_days))
        except Exception:  # the write it describes is stored already; never fail the caller
            logger.exception(
                "audit entry not written",
                extra={"action": entry.action, "target_id": entry.target_id},
            )
            if self.metrics is not None:
                self.metrics.emit({"AuditWriteFailures": 1})
            return None

    def list(
        self, *, target: str | None, actor: str | None, limit: int, cursor: str | None
    ) -> PageOf[AuditEntry]:
        """A page of entries, newest first, for one target and/or one actor (else all)."""
        return self.trail.page(target=target, actor=actor, limit=limit, cursor=cursor)
