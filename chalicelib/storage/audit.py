"""The audit trail in DynamoDB: entries under their target, listed newest first."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Protocol

from chalicelib.domain.audit import Actor, AuditEntry
from chalicelib.domain.paging import PageOf
from chalicelib.storage.models import AUDIT_LISTING_KEY, AuditEntryRecord
from chalicelib.storage.pagination import RawKey, Segment, fingerprint, paginate


class AuditTrail(Protocol):
    """Where audit entries are kept."""

    def add(self, entry: AuditEntry, expires_at: datetime) -> AuditEntry:
        """Store `entry` (stamped: its `at` and `id` are set) until `expires_at`; as stored."""
        ...

    def page(
        self, *, target: str | None, actor: str | None, limit: int, cursor: str | None
    ) -> PageOf[AuditEntry]:
        """A page of entries, newest first, for one target and/or one actor (else all);
        MalformedRequest for a cursor of another listing."""
        ...


class DynamoAuditTrail:
    """AuditTrail on the stage's audit table."""

    def __init__(self, record: type[AuditEntryRecord]) -> None:
        self._record = record

    def add(self, entry: AuditEntry, expires_at: datetime) -> AuditEntry:
        item = self._record(
            entry.target_id,
            entry.id,
            at=entry.at,
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
            expires_at=expires_at,
        )
        item.save()
        return _entry(item)

    def page(
        self, *, target: str | None, actor: str | None, limit: int, cursor: str | None
    ) -> PageOf[AuditEntry]:
        Entry = self._record
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
            [Segment(query, keys)], fingerprint("audit", target, actor), cursor, limit, _entry
        )
        return PageOf(items, next_cursor)


def _entry(item: AuditEntryRecord) -> AuditEntry:
    return AuditEntry(
        actor=Actor(item.actor, item.role, item.auth_mode),
        action=item.action,
        target_type=item.target_type,
        target_id=item.target_id,
        http_status=int(item.http_status),
        request_id=item.request_id,
        fields=tuple(str(name) for name in item.fields or ()),
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
