"""The audit trail: who changed what, newest first."""

from __future__ import annotations

from chalicelib.api.http import ApiBlueprint
from chalicelib.api.mapping import page_limit
from chalicelib.api.security import bearer_auth
from chalicelib.container import services
from chalicelib.schemas import AuditActorOut, AuditEntryOut, AuditPage, AuditQuery
from chalicelib.services.audit import AuditEntry

api = ApiBlueprint(__name__, "audit", authorizer=bearer_auth)


@api.route(
    "/audit",
    "GET",
    summary="The audit trail",
    query=AuditQuery,
    response=AuditPage,
    errors=(400,),
)
def list_audit(query: AuditQuery) -> AuditPage:
    """Every write through the API (who, what, which target, when, the fields it set), newest
    first; `target` and `actor` narrow it. Entries are kept AUDIT_RETENTION_DAYS."""
    page = services().audit.list(
        target=query.target,
        actor=query.actor,
        limit=page_limit(query.limit, services().settings),
        cursor=query.cursor,
    )
    return AuditPage(items=[entry_out(e) for e in page.items], next_cursor=page.next_cursor)


def entry_out(entry: AuditEntry) -> AuditEntryOut:
    return AuditEntryOut(
        id=entry.id,
        at=entry.at,
        actor=AuditActorOut(
            id=entry.actor.id, role=entry.actor.role, auth_mode=entry.actor.auth_mode
        ),
        action=entry.action,
        target_type=entry.target_type,
        target_id=entry.target_id,
        request_id=entry.request_id,
        http_status=entry.http_status,
        fields=list(entry.fields),
        status=entry.status,
    )
