"""Mailing routes."""

from __future__ import annotations

from chalicelib.api.http import ApiBlueprint
from chalicelib.api.mapping import (
    audience,
    client_out,
    cost_out,
    delivery_stats_out,
    mailing_changes,
    mailing_fields,
    mailing_out,
    message_out,
    page_limit,
    parts_out,
    skipped_by_reason,
    stats_out,
    variants_out,
)
from chalicelib.api.security import bearer_auth
from chalicelib.container import services
from chalicelib.schemas import (
    AudiencePreviewIn,
    AudiencePreviewOut,
    MailingCreate,
    MailingOut,
    MailingPage,
    MailingPatch,
    MailingStatsOut,
    MessageListQuery,
    PageQuery,
    RetryFailedOut,
    TimelineOut,
    TimelinePoint,
)

api = ApiBlueprint(__name__, "mailings", authorizer=bearer_auth)


@api.route(
    "/mailings",
    "POST",
    summary="Create a mailing",
    body=MailingCreate,
    response=MailingOut,
    status=201,
    errors=(400, 409, 413, 415, 422),
    idempotent=True,
)
def create_mailing(body: MailingCreate) -> MailingOut:
    """Schedule a mailing to every client its filter selects, between start_at and end_at."""
    return mailing_out(services().mailings.create(mailing_fields(body)))


@api.route(
    "/mailings",
    "GET",
    summary="List mailings",
    query=PageQuery,
    response=MailingPage,
    errors=(400,),
)
def list_mailings(query: PageQuery) -> MailingPage:
    """Mailings a page at a time, newest first, each with its message counts."""
    page = services().mailings.list(
        limit=page_limit(query.limit, services().settings), cursor=query.cursor
    )
    return MailingPage(items=[mailing_out(m) for m in page.items], next_cursor=page.next_cursor)


@api.route(
    "/mailings/{mailing_id}", "GET", summary="Get a mailing", response=MailingOut, errors=(404,)
)
def get_mailing(mailing_id: str) -> MailingOut:
    return mailing_out(services().mailings.get(mailing_id))


@api.route(
    "/mailings/{mailing_id}",
    "PUT",
    summary="Replace a mailing",
    body=MailingCreate,
    response=MailingOut,
    errors=(400, 404, 409, 413, 415, 422),
)
def replace_mailing(mailing_id: str, body: MailingCreate) -> MailingOut:
    """Replace every field; omitted optional fields take their defaults."""
    return mailing_out(services().mailings.replace(mailing_id, mailing_fields(body)))


@api.route(
    "/mailings/{mailing_id}",
    "PATCH",
    summary="Change some fields of a mailing",
    body=MailingPatch,
    response=MailingOut,
    errors=(400, 404, 409, 413, 415, 422),
)
def patch_mailing(mailing_id: str, body: MailingPatch) -> MailingOut:
    """Change the given fields only; `send_window: null` removes the window."""
    return mailing_out(services().mailings.update(mailing_id, mailing_changes(body)))


@api.route(
    "/mailings/{mailing_id}", "DELETE", summary="Delete a mailing", status=204, errors=(404,)
)
def delete_mailing(mailing_id: str) -> None:
    """Delete a mailing and stop all of its sends, jobs already queued included."""
    services().mailings.delete(mailing_id)


@api.route(
    "/mailings/{mailing_id}/cancel",
    "POST",
    summary="Cancel a mailing",
    response=MailingOut,
    errors=(404, 409),
)
def cancel_mailing(mailing_id: str) -> MailingOut:
    """Stop sending at once; messages not yet sent become `cancelled`, statistics stay."""
    return mailing_out(services().mailings.cancel(mailing_id))


@api.route(
    "/mailings/preview",
    "POST",
    summary="Count the audience of a filter",
    body=AudiencePreviewIn,
    response=AudiencePreviewOut,
    errors=(400, 413, 415, 422),
    audited=False,  # a read: nothing is created
)
def preview_audience(body: AudiencePreviewIn) -> AudiencePreviewOut:
    """How many clients a mailing with this filter would reach, how many of them opted out,
    and a sample; nothing is created. A large audience is estimated from a bounded read
    (`approximate`, with a 95 % interval) unless `exact` asks to count every client. With a
    `text`, also its SMS `parts` over the audience (and `cost_estimate` with prices set)."""
    preview = services().clients.preview(
        audience(body.filter), body.sample_size, exact=body.exact, text=body.text
    )
    return AudiencePreviewOut(
        count=preview.count,
        opted_out=preview.opted_out,
        approximate=preview.approximate,
        count_low=preview.count_low,
        count_high=preview.count_high,
        sample=[client_out(c) for c in preview.sample],
        parts=parts_out(preview.parts),
        cost_estimate=cost_out(preview.parts),
    )


@api.route(
    "/mailings/{mailing_id}/pause",
    "POST",
    summary="Pause a mailing",
    response=MailingOut,
    errors=(404, 409),
)
def pause_mailing(mailing_id: str) -> MailingOut:
    """Stop sending within seconds: calls in progress finish, every other message waits (no
    attempt spent). The end still applies: messages not sent by then expire."""
    return mailing_out(services().mailings.pause(mailing_id))


@api.route(
    "/mailings/{mailing_id}/resume",
    "POST",
    summary="Resume a paused mailing",
    response=MailingOut,
    errors=(404, 409),
)
def resume_mailing(mailing_id: str) -> MailingOut:
    """Continue where the mailing stopped, without duplicates. Waiting messages go out within
    10 seconds of a short pause's end, or a sixth of a longer pause's length (5 minutes at most).
    """
    return mailing_out(services().mailings.resume(mailing_id))


@api.route(
    "/mailings/{mailing_id}/retry-failed",
    "POST",
    summary="Send the failed messages again",
    response=RetryFailedOut,
    errors=(400, 404, 409, 422),
    idempotent=True,
)
def retry_failed(mailing_id: str) -> RetryFailedOut:
    """Queue the mailing's `failed` messages again, with the same message ids, before its end.
    A finished mailing runs again until they are done. With very many failed messages the
    request stops after about 20 seconds with `more: true`: call it again."""
    current = services()
    requeued, more = current.mailings.retry_failed(mailing_id)
    return RetryFailedOut(
        requeued=requeued, more=more, mailing=mailing_out(current.mailings.get(mailing_id))
    )


@api.route(
    "/mailings/{mailing_id}/stats",
    "GET",
    summary="A mailing's statistics and messages",
    query=MessageListQuery,
    response=MailingStatsOut,
    errors=(400, 404),
)
def mailing_stats(mailing_id: str, query: MessageListQuery) -> MailingStatsOut:
    """Message counts by status and the mailing's messages, a page at a time."""
    mailing, page = services().mailings.messages(
        mailing_id,
        status=query.status,
        limit=page_limit(query.limit, services().settings),
        cursor=query.cursor,
    )
    return MailingStatsOut(
        mailing_id=mailing.id,
        status=mailing.status,
        stats=stats_out(mailing.counts),
        skipped_by_reason=skipped_by_reason(mailing),
        variants=variants_out(mailing),
        messages=[message_out(m) for m in page.items],
        next_cursor=page.next_cursor,
        delivery=delivery_stats_out(mailing),
    )


@api.route(
    "/mailings/{mailing_id}/timeline",
    "GET",
    summary="A mailing's counts over time",
    response=TimelineOut,
    errors=(404,),
)
def mailing_timeline(mailing_id: str) -> TimelineOut:
    """Counts by status at up to 120 moments from the first message to the last change, read
    from the timeline the counter updates keep (a fixed number of reads)."""
    mailing, series, truncated = services().mailings.timeline(mailing_id)
    return TimelineOut(
        mailing_id=mailing.id,
        status=mailing.status,
        points=[TimelinePoint(at=at, stats=stats_out(counts)) for at, counts in series],
        truncated=truncated,
    )
