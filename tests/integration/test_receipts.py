"""Delivery receipts through the in-process pipeline: the scheduler, the sender and the sandbox
gateway on moto, with the gateway's receipts posted to `POST /delivery-receipts`."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest

from tests.conftest import API_TOKEN, GATEWAY_TOKEN, body
from tests.integration import test_delivery as delivery
from tests.support.pipeline import pipeline_settings

# The delivery suite's fixtures (moto, virtual SQS, the sandbox gateway, the pipeline driver).
gateway, gateway_client, sqs, services, pipeline = (
    delivery.gateway,
    delivery.gateway_client,
    delivery.sqs,
    delivery.services,
    delivery.pipeline,
)
add_client, create_mailing = delivery.add_client, delivery.create_mailing


@pytest.fixture
def settings(gateway, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """The pipeline's settings with delivery receipts on (a test may turn them off)."""
    monkeypatch.setenv("API_TOKENS", API_TOKEN)
    overrides = {"delivery_receipts": True, **getattr(request, "param", {})}
    return pipeline_settings(gateway.url, sender_api_token=GATEWAY_TOKEN, **overrides)


def receipt(api, message_id: int, status: str, **fields):
    return api.post("/delivery-receipts", {"id": message_id, "status": status, **fields})


def messages_by_phone(api, mailing_id: str) -> dict[str, dict]:
    answer = body(api.get(f"/mailings/{mailing_id}/stats?limit=500"))
    return {message["phone"]: message for message in answer["messages"]}


def assert_counters_match_receipts(api, pipeline, mailing_id: str) -> None:
    """The mailing's delivery counters equal its messages' receipts."""
    deliveries = Counter(
        m.delivery_status for m in pipeline.messages(mailing_id) if m.delivery_status
    )
    counted = body(api.get(f"/mailings/{mailing_id}"))["delivery"]
    assert counted["delivered"] == deliveries["delivered"]
    assert counted["undelivered"] == deliveries["undelivered"] + deliveries["expired"]


def test_receipts_count_once_through_duplicates_and_early_arrivals(
    api, pipeline, clock, gateway_client
):
    """The acceptance case: receipts, repeated, one of them before the sender wrote `sent`."""
    # Given three clients, and a gateway that reports the first message delivered while the
    # sender is still waiting for its answer (the receipt beats the outcome's write)
    phones = ["79000000001", "79000000002", "79000000003"]
    for phone in phones:
        add_client(api, phone)
    early: list[dict] = []
    status_then: list[str] = []
    make = gateway_client.make

    class QuickToReport:
        def __init__(self, inner):
            self._inner = inner

        def send(self, message_id, phone, text):
            answer = self._inner.send(message_id, phone, text)
            if phone == phones[0]:
                early.append(body(receipt(api, message_id, "delivered")))
                records = pipeline.messages(early[0]["mailing_id"])
                status_then.extend(m.status for m in records if m.message_id == message_id)
            return answer

    gateway_client.make = lambda: QuickToReport(make())

    # When the mailing is sent
    mailing = create_mailing(api, clock)
    pipeline.settle()

    # Then the early receipt was accepted while nothing was `sent` yet, and kept: the message
    # is `sent` and delivered
    assert early
    assert early[0]["duplicate"] is False
    assert status_then == ["pending"]
    sent = messages_by_phone(api, mailing["id"])
    assert {m["status"] for m in sent.values()} == {"sent"}
    assert sent[phones[0]]["delivery"]["status"] == "delivered"
    assert sent[phones[1]]["delivery"] is None

    # When the other receipts come, each twice, and the first message gets a late contrary one
    second, third = sent[phones[1]]["id"], sent[phones[2]]["id"]
    at = (clock() - timedelta(seconds=5)).isoformat()
    answers = [
        receipt(api, second, "delivered", at=at),
        receipt(api, second, "delivered", at=at),
        receipt(api, third, "expired", error="absent subscriber"),
        receipt(api, third, "undelivered"),
        receipt(api, sent[phones[0]]["id"], "undelivered"),
    ]

    # Then each message counts its first receipt once; repeats say so and change nothing
    assert [a.status_code for a in answers] == [200] * 5
    assert [body(a)["duplicate"] for a in answers] == [False, True, False, True, True]
    assert body(answers[4])["delivery"]["status"] == "delivered"
    final = messages_by_phone(api, mailing["id"])
    assert final[phones[1]]["delivery"]["at"] is not None
    assert final[phones[2]]["delivery"]["status"] == "expired"
    assert final[phones[2]]["delivery"]["error"] == "absent subscriber"
    assert {m["status"] for m in final.values()} == {"sent"}
    stats = body(api.get(f"/mailings/{mailing['id']}"))
    assert stats["delivery"] == {
        "delivered": 2,
        "undelivered": 1,
        "delivered_rate": pytest.approx(2 / 3),
    }
    assert body(api.get(f"/mailings/{mailing['id']}/stats"))["delivery"]["delivered"] == 2
    assert_counters_match_receipts(api, pipeline, mailing["id"])


def test_a_receipt_for_an_id_no_message_has_is_404_and_changes_nothing(api, pipeline, clock):
    # Given a mailing sent to one client
    add_client(api, "79000000001")
    mailing = create_mailing(api, clock)
    pipeline.settle()
    (message,) = messages_by_phone(api, mailing["id"]).values()

    # When receipts name ids that were never handed out (next to it, and far away)
    answers = [receipt(api, message["id"] + 1, "delivered"), receipt(api, 10**15, "delivered")]

    # Then they are 404s in the error shape, and nothing was counted
    assert [a.status_code for a in answers] == [404, 404]
    assert body(answers[0])["error"] == "not_found"
    assert body(api.get(f"/mailings/{mailing['id']}"))["delivery"]["delivered"] == 0


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"id": 1, "status": "read"}, "body.status"),
        ({"id": "1", "status": "delivered"}, "body.id"),
        ({"id": 0, "status": "delivered"}, "body.id"),
        ({"status": "delivered"}, "body.id"),
        ({"id": 1, "status": "delivered", "at": "yesterday"}, "body.at"),
        ({"id": 1, "status": "delivered", "error": "x" * 501}, "body.error"),
    ],
)
def test_a_malformed_receipt_is_a_422_naming_the_field(api, payload, field):
    # When a receipt is malformed, Then it is refused with the field at fault
    answer = api.post("/delivery-receipts", payload)
    assert answer.status_code == 422
    assert field in [d["field"] for d in body(answer)["details"]]


@pytest.mark.parametrize("settings", [{"delivery_receipts": False}], indirect=True)
def test_without_receipts_a_mailing_runs_as_before_and_receipts_are_404(api, pipeline, clock):
    # Given DELIVERY_RECEIPTS off (the default) and a mailing sent to two clients
    add_client(api, "79000000001")
    add_client(api, "79000000002")
    mailing = create_mailing(api, clock)
    pipeline.settle()

    # Then it was sent as ever, with no delivery on any message and zero counters
    read = body(api.get(f"/mailings/{mailing['id']}"))
    assert read["stats"]["sent"] == 2
    assert read["delivery"] == {"delivered": 0, "undelivered": 0, "delivered_rate": 0.0}
    messages = messages_by_phone(api, mailing["id"])
    assert all(m["delivery"] is None for m in messages.values())
    # ...and a receipt finds no message (no lookup was written for it)
    some_id = next(iter(messages.values()))["id"]
    assert receipt(api, some_id, "delivered").status_code == 404


def test_the_delivered_rate_shows_in_metrics_and_the_daily_report(api, pipeline, clock):
    # Given a running mailing: two clients inside its send window got their message, one
    # reported delivered; a third waits for its window (12:00 UTC: Tokyo is at 21:00)
    add_client(api, "79000000001", timezone="Asia/Tokyo")
    add_client(api, "79000000002", timezone="Asia/Tokyo")
    add_client(api, "79000000003", timezone="UTC")
    mailing = create_mailing(api, clock, send_window={"start": "20:00", "end": "22:00"})
    pipeline.kicks()
    pipeline.send_once()
    sent = [m for m in messages_by_phone(api, mailing["id"]).values() if m["status"] == "sent"]
    assert len(sent) == 2
    assert receipt(api, sent[0]["id"], "delivered").status_code == 200

    # When Prometheus scrapes, Then the running mailing's receipts and rate are there
    metrics = api.get("/metrics").body.decode()
    labels = f'mailing_id="{mailing["id"]}"'
    assert f"sms_mailing_delivered_rate{{{labels}}} 0.5" in metrics
    assert f'sms_mailing_delivery_receipts{{{labels},outcome="delivered"}} 1' in metrics

    # When the daily report is built, Then its row carries the receipts and the rate
    report = pipeline.services.reports.build()
    (row,) = [r for r in report.rows if r.mailing_id == mailing["id"]]
    assert (row.delivery.delivered, row.delivered_rate) == (1, 0.5)
    assert "delivered rate 50.0%" in report.text()
    assert "<h2>Delivery receipts</h2>" in report.html()
