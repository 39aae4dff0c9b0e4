"""The daily statistics e-mail (SES, read back from moto) and the Prometheus endpoint."""

from __future__ import annotations

import email
import re
from datetime import timedelta
from email.message import Message
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chalicelib.settings import Settings, SettingsError
from tests.conftest import API_TOKEN, body

SENDER = "reports@sms.example"
RECIPIENTS = ("ops@sms.example", "lead@sms.example")
ACCOUNT = "123456789012"  # moto's default account


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, request):
    monkeypatch.setenv("API_TOKENS", API_TOKEN)
    values = dict(
        table_prefix="sms-test",
        api_tokens=(API_TOKEN,),
        report_sender=SENDER,
        report_recipients=RECIPIENTS,
    )
    values.update(getattr(request, "param", {}))
    return Settings(**values)


@pytest.fixture
def ses(aws) -> Any:
    import boto3

    client = boto3.client("ses", region_name="us-east-1")
    client.verify_email_identity(EmailAddress=SENDER)
    return client


def sent_mail() -> list[Message]:
    from moto.ses.models import ses_backends

    backend = ses_backends[ACCOUNT]["us-east-1"]
    return [email.message_from_string(m.raw_data) for m in backend.sent_messages]


def parts(message: Message) -> tuple[str, str]:
    text = html = ""
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            text = part.get_payload(decode=True).decode()
        elif part.get_content_type() == "text/html":
            html = part.get_payload(decode=True).decode()
    return text, html


def make_mailing(api, services, clock, *, start: timedelta, end: timedelta, **counts: int) -> str:
    """Given: a mailing between start and end (relative to now) with these message counts."""
    response = api.post(
        "/mailings",
        {
            "text": "Winter sale",
            "start_at": (clock() + start).isoformat(),
            "end_at": (clock() + end).isoformat(),
        },
    )
    assert response.status_code == 201, response.body
    mailing_id = body(response)["id"]
    Mailing = services.models.Mailing
    if counts:
        Mailing(mailing_id).update(
            actions=[getattr(Mailing, f"count_{name}").set(n) for name, n in counts.items()]
        )
    return mailing_id


@pytest.fixture
def mailings(api, services, clock) -> dict[str, str]:
    """Mailings inside and outside the last 24 hours; the clock then moves past their ends."""
    made = {
        "yesterday": make_mailing(
            api,
            services,
            clock,
            start=timedelta(hours=1),
            end=timedelta(hours=5),
            sent=90,
            failed=6,
            expired=4,
        ),
        "running": make_mailing(
            api,
            services,
            clock,
            start=timedelta(hours=20),
            end=timedelta(hours=40),
            sent=10,
            pending=30,
            failed=2,
        ),
        "long_ago": make_mailing(
            api, services, clock, start=timedelta(hours=1), end=timedelta(hours=2), sent=500
        ),
        "future": make_mailing(
            api, services, clock, start=timedelta(hours=30), end=timedelta(hours=31)
        ),
    }
    # "long_ago" ended 25 hours before the report; move it back rather than the clock.
    Mailing = services.models.Mailing
    clock.advance(hours=27)
    item = Mailing.get(made["long_ago"])
    item.update(
        actions=[
            Mailing.start_at.set(clock() - timedelta(hours=30)),
            Mailing.end_at.set(clock() - timedelta(hours=25)),
        ]
    )
    return made


def row_of(text: str, mailing_id: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(mailing_id))
    return line.split()


# ---------------------------------------------------------------- daily e-mail


def test_daily_report_email_figures_equal_the_stored_data(api, ses, mailings, services):
    # When an operator asks for the report
    response = api.post("/reports/daily")

    # Then it was e-mailed once to the configured recipients, as text and HTML
    assert response.status_code == 200, response.body
    report = body(response)
    [message] = sent_mail()
    assert message["From"] == SENDER
    assert sorted(a.strip() for a in message["To"].split(",")) == sorted(RECIPIENTS)
    assert message.is_multipart()
    text, html = parts(message)
    assert text
    assert html.startswith("<!doctype html>")
    assert report["ses_message_id"]

    # ...with exactly the mailings active in the last 24 hours
    listed = {m["id"] for m in report["mailings"]}
    assert listed == {mailings["yesterday"], mailings["running"]}
    assert mailings["long_ago"] not in text
    assert mailings["future"] not in text

    # ...and each figure equals what storage holds
    for mailing_id in listed:
        stored = services.models.Mailing.get(mailing_id)
        expected = {
            s: int(getattr(stored, f"count_{s}") or 0)
            for s in ("sent", "failed", "expired", "pending", "cancelled", "skipped")
        }
        row = row_of(text, mailing_id)
        _, status, sent, failed, expired, pending, cancelled, skipped, total, rate = row
        assert status == stored.status
        figures = (sent, failed, expired, pending, cancelled, skipped)
        assert tuple(int(n) for n in figures) == (
            expected["sent"],
            expected["failed"],
            expected["expired"],
            expected["pending"],
            expected["cancelled"],
            expected["skipped"],
        )
        assert int(total) == sum(expected.values())
        decided = expected["sent"] + expected["failed"] + expected["expired"]
        assert rate == f"{expected['sent'] / decided:.1%}"
        cells = re.search(rf"<tr><td>{mailing_id}</td>(.*?)</tr>", html).group(1)
        numbers = re.findall(r"<td>(\d+)</td>", cells)
        assert numbers == [*figures, total]
    assert row_of(text, "TOTAL")[1:8] == ["100", "8", "4", "30", "0", "0", "142"]
    assert report["totals"]["total"] == 142
    assert report["success_rate"] == pytest.approx(100 / 112)
    subject = " ".join(message["Subject"].split())  # unfolded
    assert "2 mailing(s), 100 sent, 8 failed, 4 expired" in subject


def test_the_local_outbox_keeps_a_copy_of_each_email(api, ses, mailings, services, clock, tmp_path):
    from chalicelib.container import Services, use_services
    from devstack.outbox import ReportOutbox

    # Given the services as the local stack wires them: SES, then its outbox folder
    outbox = tmp_path / "outbox"
    use_services(
        Services.build(services.settings, clock=clock, report_sinks=[ReportOutbox(outbox)])
    )

    # When an operator asks for the report
    api.post("/reports/daily")

    # Then the outbox holds a readable copy of the e-mail SES sent
    files = sorted(outbox.iterdir())
    assert [f.suffix for f in files] == [".eml", ".html"]
    saved = email.message_from_bytes(files[0].read_bytes())
    assert saved["Subject"] == sent_mail()[0]["Subject"]
    assert mailings["yesterday"] in files[1].read_text()


def test_the_scheduled_lambda_sends_the_same_report(api, ses, mailings):
    """Given yesterday's mailings, when the scheduled daily_report Lambda runs, then it sends one
    report naming them to both recipients."""
    from chalice.test import Client

    from app import app

    with Client(app, stage_name="dev") as client:
        result = client.lambda_.invoke(
            "daily_report", client.events.generate_cw_event("Scheduled Event", "aws.events", {}, [])
        )
    assert result.payload == {"mailings": 2, "recipients": 2}
    [message] = sent_mail()
    text, _ = parts(message)
    assert mailings["yesterday"] in text


@pytest.mark.parametrize(
    "settings", [{"report_recipients": (), "report_sender": None}], indirect=True
)
def test_without_recipients_the_request_is_a_clear_409_and_nothing_is_sent(api, ses, mailings):
    """Given no report recipients, when the report is asked for, then the answer is a 409 naming
    REPORT_RECIPIENTS and nothing is sent."""
    response = api.post("/reports/daily")
    assert response.status_code == 409
    assert "REPORT_RECIPIENTS" in body(response)["message"]
    assert sent_mail() == []


def test_an_unverified_sender_is_a_502_naming_ses_s_reason(api, aws, mailings):
    # Given SES has not verified the sender (no `ses` fixture)
    response = api.post("/reports/daily")
    assert response.status_code == 502
    error = body(response)
    assert error["error"] == "upstream_error"
    assert "MessageRejected" in error["message"]


def test_an_empty_day_is_still_reported(api, ses):
    """Given no mailing active yesterday, when the report is asked for, then one is sent saying so
    in text and HTML."""
    response = api.post("/reports/daily")
    assert response.status_code == 200
    text, html = parts(sent_mail()[0])
    assert "No mailing was active" in text
    assert "No mailing was active" in html


def test_report_requires_a_token(api, ses):
    """Given no token, when the report is asked for, then the answer is a 401 and nothing is
    sent."""
    response = api.post("/reports/daily", headers={"Content-Type": "application/json"})
    assert response.status_code == 401
    assert sent_mail() == []


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({"REPORT_RECIPIENTS": "ops@sms.example"}, "REPORT_SENDER"),
        ({"REPORT_SENDER": "a@b.c", "REPORT_RECIPIENTS": "ops@, x@y.z"}, "REPORT_RECIPIENTS"),
        ({"REPORT_SENDER": "not-an-address"}, "REPORT_SENDER"),
        ({"REPORT_WINDOW_HOURS": "0"}, "REPORT_WINDOW_HOURS"),
    ],
)
def test_bad_report_settings_are_refused_by_name(environ, problem):
    """Given a bad report setting, when the settings are read, then they are refused naming the
    problem."""
    with pytest.raises(SettingsError, match=problem):
        Settings.from_env(environ)


# ---------------------------------------------------------------- Prometheus


def families(text: str) -> dict[str, list[Any]]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_metrics_endpoint_is_prometheus_text_with_the_stored_counters(api, mailings, services):
    """Given mailings with stored counters, when /metrics is read, then it is Prometheus text whose
    message, mailing and per-mailing counts are the stored ones."""
    response = api.get("/metrics")

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    parsed = families(response.body.decode())
    messages = {s.labels["status"]: s.value for s in parsed["sms_messages"]}
    assert messages == {
        "pending": 30,
        "sent": 600,
        "failed": 8,
        "expired": 4,
        "cancelled": 0,
        "skipped": 0,
    }
    statuses = {s.labels["status"]: s.value for s in parsed["sms_mailings"]}
    assert sum(statuses.values()) == 4
    assert statuses["scheduled"] == 4  # no scheduler ran in this test
    per_mailing = {
        (s.labels["mailing_id"], s.labels["status"]): s.value
        for s in parsed["sms_mailing_messages"]
    }
    assert per_mailing[(mailings["running"], "pending")] == 30
    assert per_mailing[(mailings["yesterday"], "sent")] == 90


def test_metrics_include_queue_depths(api, services, aws):
    """Given services whose queues hold one dead letter, when /metrics is read, then the queue
    depths show it for the send, dead-letter and fan-out queues."""
    import boto3

    from chalicelib.container import Services, use_services

    sqs = boto3.client("sqs", region_name="us-east-1")
    urls = {name: sqs.create_queue(QueueName=f"q-{name}")["QueueUrl"] for name in ("s", "d", "f")}
    sqs.send_message(QueueUrl=urls["d"], MessageBody="{}")
    settings = services.settings.model_copy(
        update={
            "send_queue_url": urls["s"],
            "send_dlq_url": urls["d"],
            "fanout_queue_url": urls["f"],
        }
    )
    use_services(Services.build(settings))

    parsed = families(api.get("/metrics").body.decode())

    depth = {(s.labels["queue"], s.labels["state"]): s.value for s in parsed["sms_queue_messages"]}
    assert depth[("dead_letter", "visible")] == 1
    assert depth[("send", "visible")] == 0
    assert set(q for q, _ in depth) == {"send", "dead_letter", "fanout"}


def test_metrics_require_a_token(api):
    """Given no token, when /metrics is read, then the answer is a 401."""
    assert api.get("/metrics", headers={}).status_code == 401
