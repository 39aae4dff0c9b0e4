"""Service-wide statistics."""

from __future__ import annotations

from chalicelib.api.http import ApiBlueprint
from chalicelib.api.mapping import mailing_summary, page_limit, stats_out
from chalicelib.api.security import bearer_auth
from chalicelib.container import services
from chalicelib.schemas import OverallStats, PageQuery

api = ApiBlueprint(__name__, "statistics", authorizer=bearer_auth)


@api.route(
    "/stats",
    "GET",
    summary="Statistics over all mailings",
    query=PageQuery,
    response=OverallStats,
    errors=(400,),
)
def overall_stats(query: PageQuery) -> OverallStats:
    """Number of mailings, message counts by status overall, and a page of per-mailing counts."""
    count, totals, page = services().mailings.overview(
        limit=page_limit(query.limit, services().settings), cursor=query.cursor
    )
    return OverallStats(
        mailings=count,
        messages=stats_out(totals),
        per_mailing=[mailing_summary(m) for m in page.items],
        next_cursor=page.next_cursor,
    )
