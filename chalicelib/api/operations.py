"""For the people who run the service: Prometheus metrics, the gateway's back-pressure state and
the daily report on demand."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError
from chalice import Response

from chalicelib.api.http import ApiBlueprint, caller_role
from chalicelib.api.mapping import gateway_status_out, stats_out
from chalicelib.api.security import bearer_auth
from chalicelib.container import services
from chalicelib.errors import UpstreamFailed
from chalicelib.schemas import (
    DailyReportOut,
    DeliveryStats,
    GatewayStatusOut,
    ReportMailing,
    WhoAmI,
)
from chalicelib.services.prometheus import CONTENT_TYPE, exposition, receipts_exposition

api = ApiBlueprint(__name__, "operations", authorizer=bearer_auth)


@api.route("/me", "GET", summary="The caller's role", response=WhoAmI)
def me() -> WhoAmI:
    """The role of the bearer token; the admin UI shows only what this role may do."""
    request = api.blueprint.current_request
    context = (request.context or {}).get("authorizer") or {}
    return WhoAmI(role=caller_role(request) or "", auth_mode=context.get("auth_mode", ""))


@api.route(
    "/metrics",
    "GET",
    summary="Business counters in Prometheus text format",
    produces="text/plain",
)
def metrics() -> Response:
    """Message counts by status (overall and per unfinished mailing), mailings by status, queue
    depths and the gateway's back-pressure state (`sms_gateway_*`), read from storage at each
    scrape, with the live mailings' delivery receipts (`sms_mailing_delivery_receipts`,
    `sms_mailing_delivered_rate`) and inbound SMS counts (`sms_inbound_messages`). Each scrape
    reads the all-time totals and the unfinished mailings' counters."""
    current = services()
    stats = current.mailings.statistics()
    text = exposition(stats, current.queues.depths(), current.throttle.status())
    # Delivery receipts of the live mailings, and the inbound SMS counts (one more read).
    text += receipts_exposition(stats.unsettled, current.inbound.counts())
    return Response(body=text, status_code=200, headers={"Content-Type": CONTENT_TYPE})


@api.route(
    "/gateway",
    "GET",
    summary="Why sending is slow: the gateway's back-pressure state",
    response=GatewayStatusOut,
)
def gateway_status() -> GatewayStatusOut:
    """The rate every sender may use now against the configured one, whether sending is slowed,
    paused or probing a gateway that seems down and why, and the gateway's answers over the last
    two minutes. One read of the senders' shared item; the admin UI polls it."""
    return gateway_status_out(services().throttle.status())


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
                delivery=DeliveryStats(
                    delivered=row.delivery.delivered,
                    undelivered=row.delivery.undelivered,
                    delivered_rate=row.delivered_rate,
                ),
            )
            for row in report.rows
        ],
        totals=stats_out(report.totals),
        success_rate=report.success_rate,
    )
