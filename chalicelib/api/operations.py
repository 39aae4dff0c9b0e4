"""For the people who run the service: Prometheus metrics and the daily report on demand."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError
from chalice import Response

from chalicelib.api.http import ApiBlueprint
from chalicelib.api.mapping import stats_out
from chalicelib.api.security import bearer_auth
from chalicelib.container import services
from chalicelib.errors import UpstreamFailed
from chalicelib.schemas import DailyReportOut, ReportMailing
from chalicelib.services.prometheus import CONTENT_TYPE, exposition

api = ApiBlueprint(__name__, "operations", authorizer=bearer_auth)


@api.route(
    "/metrics",
    "GET",
    summary="Business counters in Prometheus text format",
    produces="text/plain",
)
def metrics() -> Response:
    """Message counts by status (overall and per unfinished mailing), mailings by status and
    queue depths, read from storage at each scrape. Scrape every 30 to 60 s: each scrape reads
    every mailing's counters."""
    current = services()
    text = exposition(current.mailings.all(), current.queues.depths())
    return Response(body=text, status_code=200, headers={"Content-Type": CONTENT_TYPE})


@api.route(
    "/reports/daily",
    "POST",
    summary="Send the daily statistics e-mail now",
    response=DailyReportOut,
    errors=(409, 502),
)
def send_daily_report() -> DailyReportOut:
    """Builds the report of the last 24 hours (REPORT_WINDOW_HOURS) and e-mails it to
    REPORT_RECIPIENTS, exactly as the scheduled run does; 409 when reports are not configured,
    502 when SES refuses the e-mail (an unverified sender, for example)."""
    try:
        report = services().reports.send_daily(required=True)
    except (ClientError, BotoCoreError) as exc:
        error = getattr(exc, "response", {}).get("Error", {})
        detail = f"{error.get('Code', type(exc).__name__)}: {error.get('Message', exc)}"
        raise UpstreamFailed(f"SES did not accept the report ({detail})") from None
    return DailyReportOut(
        since=report.since,
        until=report.until,
        recipients=list(report.recipients),
        ses_message_id=report.message_id,
        mailings=[
            ReportMailing(
                id=row.mailing_id,
                status=row.status,
                start_at=row.start_at,
                end_at=row.end_at,
                stats=stats_out(row.counts),
                success_rate=row.success_rate,
            )
            for row in report.rows
        ],
        totals=stats_out(report.totals),
        success_rate=report.success_rate,
    )
