"""An in-memory AuditTrail (chalicelib.storage.audit), newest first as DynamoDB lists them."""

from __future__ import annotations

import threading
from datetime import datetime

from chalicelib.domain.audit import AuditEntry
from chalicelib.domain.paging import PageOf
from chalicelib.storage.pagination import fingerprint, invalid_cursor


class MemoryAuditTrail:
    """Entries in a list; a cursor is the listing's digest and how many entries were read."""

    def __init__(self) -> None:
        self._entries: list[AuditEntry] = []
        self._lock = threading.Lock()

    def add(self, entry: AuditEntry, expires_at: datetime) -> AuditEntry:
        with self._lock:
            self._entries.append(entry)
        return entry

    def page(
        self, *, target: str | None, actor: str | None, limit: int, cursor: str | None
    ) -> PageOf[AuditEntry]:
        scope = fingerprint("audit", target, actor)
        start = _offset(cursor, scope)
        with self._lock:
            matching = [
                entry
                for entry in self._entries
                if (target is None or entry.target_id == target)
                and (actor is None or entry.actor.id == actor)
            ]
        matching.sort(key=lambda entry: (entry.id, entry.target_id), reverse=True)
        end = start + limit
        next_cursor = f"{scope}:{end}" if end < len(matching) else None
        return PageOf(matching[start:end], next_cursor)


def _offset(cursor: str | None, scope: str) -> int:
    if cursor is None:
        return 0
    given, _, offset = cursor.partition(":")
    if given != scope or not offset.isdigit():
        raise invalid_cursor()
    return int(offset)
