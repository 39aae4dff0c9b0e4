"""The daily statistics e-mail: the mailings active in the last 24 hours, with their figures.

Sent as one MIME message with a plain-text and an HTML part to each of the service's report
sinks, in order: SES in AWS; the local stack adds a folder of readable copies (devstack/outbox.py).
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Protocol

from chalicelib.domain import Clock, MessageCounts
from chalicelib.domain.receipt import DeliveryCounts
from chalicelib.errors import Conflict
from chalicelib.services.mailings import MailingService
from chalicelib.settings import Settings

logger = logging.getLogger(__name__)

_TEXT_PREVIEW = 60
# The figures of each row, in the order the text and HTML tables show them.
FIGURES = ("sent", "failed", "expired", "pending", "cancelled", "skipped", "total")


@dataclass(frozen=True)
class ReportRow:
    """One mailing's figures."""

    mailing_id: str
    text: str
    status: str
    start_at: datetime
    end_at: datetime
    counts: MessageCounts
    # Its delivery receipts (all zero for a gateway that sends none).
    delivery: DeliveryCounts = field(default_factory=DeliveryCounts)

    @property
    def success_rate(self) -> float | None:
        return success_rate(self.counts)

    @property
    def delivered_rate(self) -> float | None:
        return self.delivery.rate(self.counts.sent)


@dataclass
class DailyReport:
    since: datetime
    until: datetime
    rows: list[ReportRow]
    recipients: tuple[str, ...] = ()
    # The id the first sink that names its e-mails (SES) gave this one.
    message_id: str | None = None

    @property
    def totals(self) -> MessageCounts:
        total = MessageCounts()
        for row in self.rows:
            total = total + row.counts
        return total

    @property
    def success_rate(self) -> float | None:
        return success_rate(self.totals)

    def _table(self) -> list[tuple[ReportRow | None, list[int], float | None]]:
        """Each mailing's row, then the total (None): its FIGURES and success rate."""
        rows = [(row, row.counts) for row in self.rows] + [(None, self.totals)]
        return [
            (row, [getattr(counts, name) for name in FIGURES], success_rate(counts))
            for row, counts in rows
        ]

    @property
    def subject(self) -> str:
        counts = self.totals
        return (
            f"SMS campaigns, {self.until:%Y-%m-%d %H:%M} UTC: {len(self.rows)} mailing(s), "
            f"{counts.sent} sent, {counts.failed} failed, {counts.expired} expired"
        )

    # ---------------------------------------------------------------- rendering

    def text(self) -> str:
        lines = [
            f"Mailings active between {_when(self.since)} and {_when(self.until)} (UTC).",
            "",
        ]
        if not self.rows:
            lines.append("No mailing was active in this period.")
            return "\n".join(lines) + "\n"
        widths = [max(7, len(name)) for name in FIGURES]
        header = f"{'mailing':36}  {'status':9}  " + "  ".join(
            f"{name:>{width}}"
            for name, width in zip((*FIGURES, "success"), [*widths, 7], strict=True)
        )
        lines += [header, "-" * len(header)]
        for row, figures, rate in self._table():
            name, status = (row.mailing_id, row.status) if row else ("TOTAL", "")
            cells = [f"{n:>{width}}" for n, width in zip(figures, widths, strict=True)]
            lines.append(f"{name:36}  {status:9}  " + "  ".join([*cells, f"{_rate(rate):>7}"]))
        lines.append("")
        for row in self.rows:
            lines.append(f"{row.mailing_id}: {_preview(row.text)!r}")
            lines.append(f"  from {_when(row.start_at)} to {_when(row.end_at)}")
        lines += self._receipt_lines()
        return "\n".join(lines) + "\n"

    def _receipted(self) -> list[ReportRow]:
        """The mailings with a delivery receipt (none for a gateway that sends none)."""
        return [row for row in self.rows if row.delivery.delivered or row.delivery.undelivered]

    def _receipt_lines(self) -> list[str]:
        rows = self._receipted()
        if not rows:
            return []
        lines = ["", "Delivery receipts (delivered rate: delivered / sent):"]
        for row in rows:
            lines.append(
                f"  {row.mailing_id}: {row.delivery.delivered} delivered, "
                f"{row.delivery.undelivered} undelivered, "
                f"delivered rate {_rate(row.delivered_rate)}"
            )
        return lines

    def html(self) -> str:
        e = html.escape
        titles = ("Mailing", "Text", "Status", *(n.capitalize() for n in FIGURES), "Success rate")
        head = "".join(f"<th>{title}</th>" for title in titles)
        body = []
        for row, figures, rate in self._table():
            cells = (
                [e(row.mailing_id), e(_preview(row.text)), e(row.status)]
                if row
                else ["<strong>Total</strong>", "", ""]
            )
            cells += [str(n) for n in figures] + [_rate(rate)]
            tag = "tr" if row else 'tr class="total"'
            body.append(f"<{tag}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        table = (
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            if self.rows
            else "<p>No mailing was active in this period.</p>"
        )
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{e(self.subject)}</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "td:nth-child(-n+3),th:nth-child(-n+3){text-align:left}"
            ".total td{font-weight:bold}</style></head><body>"
            f"<h1>SMS campaigns: daily statistics</h1><p>Mailings active between "
            f"{e(_when(self.since))} and {e(_when(self.until))} (UTC).</p>{table}"
            f"{self._receipts_html()}</body></html>"
        )

    def _receipts_html(self) -> str:
        rows = self._receipted()
        if not rows:
            return ""
        body = "".join(
            f"<tr><td>{html.escape(row.mailing_id)}</td><td>{row.delivery.delivered}</td>"
            f"<td>{row.delivery.undelivered}</td><td>{_rate(row.delivered_rate)}</td></tr>"
            for row in rows
        )
        return (
            "<h2>Delivery receipts</h2><table><thead><tr><th>Mailing</th><th>Delivered</th>"
            f"<th>Undelivered</th><th>Delivered rate</th></tr></thead><tbody>{body}</tbody>"
            "</table>"
        )

    def mime(self, sender: str) -> EmailMessage:
        message = EmailMessage()
        message["Subject"] = self.subject
        message["From"] = sender
        message["To"] = ", ".join(self.recipients)
        message["Date"] = formatdate(self.until.timestamp(), usegmt=True)
        message["Message-ID"] = make_msgid(domain=sender.rsplit("@", 1)[-1])
        message.set_content(self.text())
        message.add_alternative(self.html(), subtype="html")
        return message


def success_rate(counts: MessageCounts) -> float | None:
    """Sent among the messages that have an outcome (sent, failed, expired); None when none
    has one yet. Cancelled, skipped (opted out) and pending messages are not counted against
    it."""
    decided = counts.sent + counts.failed + counts.expired
    return counts.sent / decided if decided else None


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M}"


def _rate(rate: float | None) -> str:
    return "—" if rate is None else f"{rate:.1%}"


def _preview(text: str) -> str:
    one_line = re.sub(r"\s+", " ", text).strip()
    return one_line if len(one_line) <= _TEXT_PREVIEW else one_line[: _TEXT_PREVIEW - 1] + "…"


class ReportSink(Protocol):
    """Where a report's e-mail goes."""

    def deliver(self, report: DailyReport, email: bytes) -> str | None:
        """Deliver `email` (the report as MIME bytes); the id it was given, if any."""
        ...


class RawEmailSender(Protocol):
    """What the SES sink needs of an SES client."""

    def send_raw_email(
        self, *, Source: str, Destinations: list[str], RawMessage: Mapping[str, bytes]
    ) -> Mapping[str, object]: ...


class SesReportSink:
    """E-mails the report through SES, from REPORT_SENDER to REPORT_RECIPIENTS."""

    def __init__(self, ses: RawEmailSender, sender: str) -> None:
        self._ses = ses
        self._sender = sender

    def deliver(self, report: DailyReport, email: bytes) -> str | None:
        answer = self._ses.send_raw_email(
            Source=self._sender,
            Destinations=list(report.recipients),
            RawMessage={"Data": email},
        )
        message_id = answer.get("MessageId")
        return message_id if isinstance(message_id, str) else None


class ReportService:
    """Builds the daily report from the mailings' counters and sends it to its sinks."""

    def __init__(
        self,
        mailings: MailingService,
        settings: Settings,
        clock: Clock,
        sinks: Sequence[ReportSink],
    ) -> None:
        self._mailings = mailings
        self._settings = settings
        self._clock = clock
        self._sinks = tuple(sinks)

    def build(self, until: datetime | None = None) -> DailyReport:
        until = until or self._clock()
        since = until - timedelta(hours=self._settings.report_window_hours)
        rows = [
            ReportRow(m.id, m.text, m.status.value, m.start_at, m.end_at, m.counts, m.delivery)
            for m in self._mailings.active_between(since, until)
        ]
        rows.sort(key=lambda row: (row.start_at, row.mailing_id))
        return DailyReport(since, until, rows, self._settings.report_recipients)

    def send_daily(self, *, required: bool = False) -> DailyReport:
        """Build and e-mail the report. Without recipients it is only logged (the scheduled
        run), or, with `required` (an operator asked for it), refused as a Conflict."""
        settings = self._settings
        report = self.build()
        if not settings.report_recipients or not settings.report_sender:
            if required:
                raise Conflict(
                    "daily reports are not configured: set REPORT_SENDER and REPORT_RECIPIENTS"
                )
            logger.warning("daily report not sent: REPORT_RECIPIENTS is not set")
            return report
        email = report.mime(settings.report_sender).as_bytes()
        for sink in self._sinks:
            # In order, so a later sink (the local outbox) names its copy after SES's id.
            given = sink.deliver(report, email)
            report.message_id = report.message_id or given
        logger.info(
            "daily report sent",
            extra={
                "ses_message_id": report.message_id,
                "mailings": len(report.rows),
                "recipients": len(report.recipients),
            },
        )
        return report
