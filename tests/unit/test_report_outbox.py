"""The local stack's report outbox: a readable copy of each daily report e-mail."""

from __future__ import annotations

import email
from datetime import UTC, datetime
from pathlib import Path

from chalicelib.domain import MessageCounts
from chalicelib.services.reports import DailyReport, ReportRow
from devstack.outbox import ReportOutbox

UNTIL = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)


def report() -> DailyReport:
    row = ReportRow("m-1", "Winter sale", "done", UNTIL, UNTIL, MessageCounts(sent=9, failed=1))
    return DailyReport(
        UNTIL.replace(day=1), UNTIL, [row], ("ops@sms.example",), message_id="ses-id-1"
    )


def test_each_report_is_written_as_an_eml_and_an_html_page_named_after_its_id(tmp_path: Path):
    # Given the outbox REPORT_OUTBOX_DIR names, and a report SES has sent
    outbox = ReportOutbox.from_env({"REPORT_OUTBOX_DIR": str(tmp_path / "outbox")})
    assert outbox is not None
    sent = report()
    mime = sent.mime("reports@sms.example").as_bytes()

    # When the report reaches it
    outbox.deliver(sent, mime)

    # Then the folder holds the e-mail as sent and its page, named after the time and SES's id
    files = sorted((tmp_path / "outbox").iterdir())
    assert [f.name for f in files] == [
        "daily-report-20260302T060000-ses-id-1.eml",
        "daily-report-20260302T060000-ses-id-1.html",
    ]
    subject = email.message_from_bytes(files[0].read_bytes())["Subject"]
    assert " ".join(subject.split()) == sent.subject  # unfolded
    assert "m-1" in files[1].read_text()


def test_without_the_variable_there_is_no_outbox():
    assert ReportOutbox.from_env({}) is None
    assert ReportOutbox.from_env({"REPORT_OUTBOX_DIR": ""}) is None
