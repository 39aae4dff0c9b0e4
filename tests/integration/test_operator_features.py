"""Operator features on the in-process pipeline: audience preview, pause and resume, retry of
failed messages, opt-out, and personalised texts (moto DynamoDB, the sandbox gateway over HTTP,
the test's clock)."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import datetime, timedelta

import pytest

from devstack.gateway import FaultProfile
from tests.conftest import body
from tests.integration import test_delivery as delivery
from tests.support.pipeline import SEND_URL

# The delivery suite's fixtures (moto, virtual SQS, the sandbox gateway, the pipeline driver).
gateway, gateway_client, settings, sqs, services, pipeline = (
    delivery.gateway,
    delivery.gateway_client,
    delivery.settings,
    delivery.sqs,
    delivery.services,
    delivery.pipeline,
)
add_client, create_mailing, sent_phones = (
    delivery.add_client,
    delivery.create_mailing,
    delivery.sent_phones,
)


def sent_ids(gateway) -> Counter:
    return Counter(send.msg_id for send in gateway.accepted())


# ---------------------------------------------------------------- audience preview


def test_preview_counts_the_audience_and_samples_it_without_creating_anything(api, services):
    # Given clients of two operators and tags, one of them opted out
    for n in range(7):
        add_client(api, f"7916000000{n}", tag="vip" if n < 5 else "new")
    add_client(api, "79030000001", tag="vip")
    add_client(api, "79160000009", tag="vip", opted_out=True)

    # When an operator previews a filter
    response = api.post(
        "/mailings/preview",
        {"filter": {"operator_codes": ["916"], "tags": ["vip"]}, "sample_size": 3},
    )

    # Then the count is what a mailing would reach, with the opted-out ones counted apart
    assert response.status_code == 200, response.body
    preview = body(response)
    assert preview["count"] == 6
    assert preview["opted_out"] == 1
    assert len(preview["sample"]) == 3
    assert all(c["operator_code"] == "916" and c["tag"] == "vip" for c in preview["sample"])
    # ...and nothing was created
    assert body(api.get("/mailings"))["items"] == []
    everyone = body(api.post("/mailings/preview", {"sample_size": 0}))
    # ...and an audience this small is counted exactly, and says so
    assert everyone == {
        "count": 9,
        "opted_out": 1,
        "approximate": False,
        "count_low": 9,
        "count_high": 9,
        "sample": [],
        # (no text was given: no SMS parts to count)
        "parts": None,
        "cost_estimate": None,
    }


@pytest.mark.parametrize(
    "payload",
    [
        {"sample_size": 51},
        {"sample_size": -1},
        {"filter": {"tags": ["x"] * 500}},
        {"x": 1},
        {"exact": "maybe"},
    ],
)
def test_a_bad_preview_request_is_a_clear_4xx(api, services, payload):
    """Given a preview request with a bad sample size, an oversized filter or an unknown field,
    when it is sent, then the answer is a 400 or 422 with a message."""
    response = api.post("/mailings/preview", payload)
    assert response.status_code in (400, 422)
    assert body(response)["message"]


# ---------------------------------------------------------------- pause and resume


# Ten jobs an SQS message, so the first message leaves twenty of the thirty pending.
@pytest.mark.parametrize("settings", [{"jobs_per_message": 10}], indirect=True)
def test_pause_stops_sends_and_resume_sends_the_rest_exactly_once(
    api, pipeline, clock, gateway, sqs
):
    # Given 30 clients and a mailing whose first SQS message (10 jobs) has been sent
    for n in range(30):
        add_client(api, f"79160000{n:03d}")
    mailing = create_mailing(api, clock, end=timedelta(hours=2))
    pipeline.tick()
    pipeline.kicks()
    [first] = sqs.take_ready(SEND_URL, 1)
    from chalicelib.services.queues import JobBatch

    pipeline.services.sender.deliver(JobBatch.model_validate_json(first.body))
    assert len(gateway.accepted()) == 10

    # When the operator pauses it
    paused = api.post(f"/mailings/{mailing['id']}/pause")
    assert paused.status_code == 200
    assert body(paused)["status"] == "paused"
    assert body(api.post(f"/mailings/{mailing['id']}/pause"))["status"] == "paused"  # idempotent
    pipeline.run(until=clock() + timedelta(minutes=1), step=timedelta(seconds=5))

    # Then nothing more is sent, nothing is spent, and it stays paused
    assert len(gateway.accepted()) == 10
    statuses = pipeline.statuses(mailing["id"])
    assert statuses == {"sent": 10, "pending": 20}
    assert all(
        int(m.attempts) == 0 for m in pipeline.messages(mailing["id"]) if m.status == "pending"
    )
    assert pipeline.mailing_status(mailing["id"]) == "paused"

    # When it is resumed, the rest go out once each, within seconds of the resume
    resumed = body(api.post(f"/mailings/{mailing['id']}/resume"))
    assert resumed["status"] == "running"
    pipeline.run(until=clock() + timedelta(seconds=20), step=timedelta(seconds=1))
    assert len(gateway.accepted()) == 30
    pipeline.settle()
    assert max(sent_ids(gateway).values()) == 1
    assert pipeline.statuses(mailing["id"]) == {"sent": 30}
    assert pipeline.counters(mailing["id"]) == pipeline.statuses(mailing["id"])
    assert pipeline.mailing_status(mailing["id"]) == "finished"


def test_a_long_pause_costs_few_queue_trips_and_a_resume_still_sends_everything(
    api, pipeline, clock, gateway, sqs
):
    # Given a mailing paused right after its fan-out, for two hours
    for n in range(10):
        add_client(api, f"791600000{n:02d}")
    mailing = create_mailing(api, clock, end=timedelta(hours=4))
    pipeline.tick()
    pipeline.kicks()
    api.post(f"/mailings/{mailing['id']}/pause")
    before = sqs.calls["SendMessageBatch"]
    pipeline.run(until=clock() + timedelta(hours=2), step=timedelta(seconds=5))

    # Then its one SQS message of jobs came back rarely, not every ten seconds (720 times)
    trips = sqs.calls["SendMessageBatch"] - before
    assert 5 <= trips <= 60, trips
    assert gateway.accepted() == []

    # When it is resumed, everything is sent within the longest recheck interval
    api.post(f"/mailings/{mailing['id']}/resume")
    pipeline.run(until=clock() + timedelta(minutes=7), step=timedelta(seconds=5))
    assert len(gateway.accepted()) == 10
    assert max(sent_ids(gateway).values()) == 1


def test_a_mailing_paused_before_its_start_starts_only_when_resumed(api, pipeline, clock, gateway):
    """Given a mailing paused before its start, when its start passes, then nothing is created or
    sent; when it is resumed, then it runs and sends."""
    add_client(api, "79160000001")
    mailing = create_mailing(api, clock, start=timedelta(minutes=5), end=timedelta(hours=1))
    api.post(f"/mailings/{mailing['id']}/pause")

    pipeline.run(until=clock() + timedelta(minutes=15))
    assert gateway.accepted() == []
    assert pipeline.messages(mailing["id"]) == []
    assert pipeline.mailing_status(mailing["id"]) == "paused"

    assert body(api.post(f"/mailings/{mailing['id']}/resume"))["status"] == "running"
    pipeline.settle()
    assert sent_phones(gateway) == ["79160000001"]


def test_the_end_still_applies_while_paused(api, pipeline, clock, gateway):
    """Given a mailing paused after its fan-out, when its end passes, then nothing was sent, its
    messages expired, it is finished, and resuming it is a 409."""
    for n in range(5):
        add_client(api, f"7916000000{n}")
    mailing = create_mailing(api, clock, end=timedelta(minutes=30))
    pipeline.tick()
    pipeline.kicks()
    api.post(f"/mailings/{mailing['id']}/pause")

    pipeline.run(until=clock() + timedelta(minutes=40))

    assert gateway.accepted() == []
    assert pipeline.statuses(mailing["id"]) == {"expired": 5}
    assert pipeline.mailing_status(mailing["id"]) == "finished"
    assert api.post(f"/mailings/{mailing['id']}/resume").status_code == 409


def test_pause_and_resume_refuse_what_makes_no_sense(api, pipeline, clock):
    """Given a scheduled mailing, when it is resumed, or paused once cancelled, then the answer is
    a 409 saying why; pausing an unknown mailing is a 404."""
    mailing = create_mailing(api, clock)
    assert api.post(f"/mailings/{mailing['id']}/resume").status_code == 409
    api.post(f"/mailings/{mailing['id']}/cancel")
    refused = api.post(f"/mailings/{mailing['id']}/pause")
    assert refused.status_code == 409
    assert "cancelled" in body(refused)["message"]
    assert api.post("/mailings/00000000-0000-4000-8000-000000000000/pause").status_code == 404


def test_a_paused_mailing_can_be_cancelled(api, pipeline, clock, gateway):
    """Given a paused mailing with queued jobs, when it is cancelled, then nothing is sent and
    every message is cancelled."""
    for n in range(3):
        add_client(api, f"7916000000{n}")
    mailing = create_mailing(api, clock)
    pipeline.tick()
    pipeline.kicks()
    api.post(f"/mailings/{mailing['id']}/pause")
    assert body(api.post(f"/mailings/{mailing['id']}/cancel"))["status"] == "cancelled"
    pipeline.settle()
    assert gateway.accepted() == []
    assert pipeline.statuses(mailing["id"]) == {"cancelled": 3}


# ---------------------------------------------------------------- retry failed


def test_retry_failed_sends_the_failed_messages_again_with_the_same_ids(
    api, pipeline, clock, gateway
):
    # Given a finished mailing whose messages to numbers ending in 7 were rejected
    for n in range(10):
        add_client(api, f"791600000{n}7" if n < 3 else f"791600000{n}0")
    gateway.set_profile(FaultProfile(reject_phone_suffixes=("7",)))
    mailing = create_mailing(api, clock, end=timedelta(hours=2))
    pipeline.settle()
    assert pipeline.statuses(mailing["id"]) == {"sent": 7, "failed": 3}
    assert pipeline.mailing_status(mailing["id"]) == "finished"
    failed_ids = {m.message_id for m in pipeline.messages(mailing["id"]) if m.status == "failed"}

    # When the gateway accepts them again and the operator retries the failed ones
    gateway.set_profile(FaultProfile())
    response = api.post(f"/mailings/{mailing['id']}/retry-failed")

    # Then they are queued again and sent, with the ids they had
    assert response.status_code == 200, response.body
    result = body(response)
    assert result["requeued"] == 3
    assert result["more"] is False
    assert result["mailing"]["status"] == "running"
    assert result["mailing"]["stats"]["pending"] == 3
    pipeline.settle()
    assert pipeline.statuses(mailing["id"]) == {"sent": 10}
    assert pipeline.counters(mailing["id"]) == pipeline.statuses(mailing["id"])
    resent = [send.msg_id for send in gateway.accepted() if send.msg_id in failed_ids]
    assert sorted(resent) == sorted(failed_ids)
    assert max(sent_ids(gateway).values()) == 1
    assert pipeline.mailing_status(mailing["id"]) == "finished"

    # And a second request finds nothing left to retry
    assert body(api.post(f"/mailings/{mailing['id']}/retry-failed"))["requeued"] == 0


def test_retry_failed_queues_more_failed_messages_than_one_sqs_message_holds(
    api, pipeline, clock, gateway
):
    # Given 60 failed messages (one SQS message holds at most 50 jobs)
    for n in range(60):
        add_client(api, f"7916{n:06d}7")
    gateway.set_profile(FaultProfile(reject_phone_suffixes=("7",)))
    mailing = create_mailing(api, clock, end=timedelta(hours=2))
    pipeline.settle()
    assert pipeline.statuses(mailing["id"]) == {"failed": 60}

    # When they are retried against a gateway that accepts them
    gateway.set_profile(FaultProfile())
    result = body(api.post(f"/mailings/{mailing['id']}/retry-failed"))

    # Then all 60 go out, once each
    assert result["requeued"] == 60
    pipeline.settle()
    assert pipeline.statuses(mailing["id"]) == {"sent": 60}
    assert max(sent_ids(gateway).values()) == 1


def test_retry_failed_is_refused_after_the_end_and_for_a_cancelled_mailing(
    api, pipeline, clock, gateway
):
    """Given a mailing past its end with a failed message, and a cancelled one, when their failed
    messages are retried, then both answers are a 409 and nothing changes."""
    add_client(api, "79160000007")
    gateway.set_profile(FaultProfile(reject_phone_suffixes=("7",)))
    ended = create_mailing(api, clock, end=timedelta(minutes=10))
    pipeline.settle()
    clock.advance(minutes=15)
    refused = api.post(f"/mailings/{ended['id']}/retry-failed")
    assert refused.status_code == 409
    assert "ended" in body(refused)["message"]
    assert pipeline.statuses(ended["id"]) == {"failed": 1}

    cancelled = create_mailing(api, clock)
    api.post(f"/mailings/{cancelled['id']}/cancel")
    assert api.post(f"/mailings/{cancelled['id']}/retry-failed").status_code == 409


# ---------------------------------------------------------------- opt-out


def test_opted_out_clients_are_never_sent_to_and_are_counted_as_skipped(
    api, pipeline, clock, gateway
):
    # Given three clients, one of whom replied STOP
    for n in range(3):
        add_client(api, f"7916000000{n}")
    response = api.post("/opt-outs", {"phone": "79160000001"})
    assert response.status_code == 200, response.body
    assert body(response)["opted_out"] is True
    assert body(api.post("/opt-outs", {"phone": "79160000001"}))["opted_out"] is True

    # When a mailing runs
    mailing = create_mailing(api, clock)
    pipeline.settle()

    # Then that client got nothing, and the statistics say so
    assert sorted(sent_phones(gateway)) == ["79160000000", "79160000002"]
    stats = body(api.get(f"/mailings/{mailing['id']}/stats"))["stats"]
    assert stats["skipped"] == 1
    assert stats["sent"] == 2
    assert stats["total"] == 3
    assert pipeline.counters(mailing["id"]) == pipeline.statuses(mailing["id"])
    assert pipeline.mailing_status(mailing["id"]) == "finished"


def test_an_opt_out_after_the_fan_out_still_stops_the_send(api, pipeline, clock, gateway):
    """Given a queued job, when its client opts out before it runs, then nothing is sent and the
    message is skipped."""
    client = add_client(api, "79160000001")
    mailing = create_mailing(api, clock)
    pipeline.tick()
    pipeline.kicks()
    # The job is queued; the client opts out before it is processed (API flag this time)
    changed = api.patch(f"/clients/{client['id']}", {"opted_out": True})
    assert body(changed)["opted_out"] is True
    pipeline.settle()
    assert gateway.accepted() == []
    assert pipeline.statuses(mailing["id"]) == {"skipped": 1}


def test_a_client_can_opt_back_in(api, pipeline, clock, gateway):
    """Given an opted-out client, when it opts back in, then the next mailing reaches it."""
    client = add_client(api, "79160000001", opted_out=True)
    assert body(api.patch(f"/clients/{client['id']}", {"opted_out": False}))["opted_out"] is False
    create_mailing(api, clock)
    pipeline.settle()
    assert sent_phones(gateway) == ["79160000001"]


@pytest.mark.parametrize(
    ("payload", "status"),
    [({"phone": "79990000000"}, 404), ({"phone": "12345"}, 422), ({}, 422), ({"phone": 7}, 422)],
)
def test_a_bad_opt_out_is_a_clear_4xx(api, services, payload, status):
    """Given an opt-out for an unknown or malformed phone, when it is sent, then the answer is a
    404 or 422 with a message."""
    response = api.post("/opt-outs", payload)
    assert response.status_code == status
    assert body(response)["message"]


# ---------------------------------------------------------------- personalisation


def test_placeholders_are_filled_with_each_clients_fields(api, pipeline, clock, gateway):
    """Given a text with placeholders and escaped braces, when it is sent to two clients, then each
    gets it filled with its own fields."""
    add_client(api, "79160000001", tag="gold", timezone="Europe/Moscow")
    add_client(api, "79030000002", tag="silver")
    create_mailing(api, clock, text="{tag} member {phone} ({operator_code}, {timezone}): {{50%}}")
    pipeline.settle()

    texts = {send.phone: send.text for send in gateway.accepted()}
    assert texts == {
        79160000001: "gold member 79160000001 (916, Europe/Moscow): {50%}",
        79030000002: "silver member 79030000002 (903, UTC): {50%}",
    }


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Hi {name}", "unknown placeholder {name}"),
        ("Hi {}", "unknown placeholder {}"),
        ("Hi {tag", "malformed placeholder"),
        ("Hi {tag:>10}", "takes no format"),
        ("Hi {tag!r}", "takes no format"),
    ],
)
def test_an_unusable_placeholder_is_refused_at_creation_and_on_edit(
    api, services, clock, text, problem
):
    """Given a text with an unknown, malformed or formatted placeholder, when a mailing is created
    or edited with it, then the answer is a 422 naming body.text and nothing changes."""
    payload = {
        "text": text,
        "start_at": clock().isoformat(),
        "end_at": (clock() + timedelta(hours=1)).isoformat(),
    }
    refused = api.post("/mailings", payload)
    assert refused.status_code == 422
    [detail] = body(refused)["details"]
    assert detail["field"] == "body.text"
    assert problem in detail["message"]
    assert body(api.get("/mailings"))["items"] == []

    mailing = create_mailing(api, clock)
    edited = api.patch(f"/mailings/{mailing['id']}", {"text": text})
    assert edited.status_code == 422
    assert body(api.get(f"/mailings/{mailing['id']}"))["text"] == "Hello"


# ---------------------------------------------------------------- timeline


# Ten jobs an SQS message, so the twelve messages go in two batches.
@pytest.mark.parametrize("settings", [{"jobs_per_message": 10}], indirect=True)
def test_the_timeline_rebuilds_the_counts_over_time_from_the_messages(
    api, pipeline, clock, gateway
):
    # Given a mailing whose messages were sent over several minutes, some rejected
    for n in range(12):
        add_client(api, f"7916{n:06d}" + ("0" if n % 4 else "7"))
    gateway.set_profile(FaultProfile(reject_phone_suffixes=("7",)))
    mailing = create_mailing(api, clock, end=timedelta(hours=2))
    pipeline.tick()
    pipeline.kicks()
    clock.advance(minutes=1)  # messages created now; the first are sent a minute later
    for _ in range(2):  # one SQS message of 10 jobs, then the rest three minutes later
        ready = pipeline.sqs.take_ready(SEND_URL, 1)
        for message in ready:
            from chalicelib.services.queues import JobBatch

            pipeline.services.sender.deliver(JobBatch.model_validate_json(message.body))
        clock.advance(minutes=3)
    pipeline.settle()

    # When the operator opens its timeline
    response = api.get(f"/mailings/{mailing['id']}/timeline")

    # Then it starts with everything pending and ends with the counts of the records
    assert response.status_code == 200, response.body
    timeline = body(response)
    points = timeline["points"]
    assert timeline["truncated"] is False
    assert 2 <= len(points) <= 120
    assert points[0]["stats"]["pending"] == 12
    assert points[0]["stats"]["sent"] == 0
    final = body(api.get(f"/mailings/{mailing['id']}/stats"))["stats"]
    assert points[-1]["stats"] == final
    assert final["failed"] == 3
    # ...and in between the counts only grow, and the first batch shows before the second
    for earlier, later in itertools.pairwise(points):
        assert datetime.fromisoformat(earlier["at"]) < datetime.fromisoformat(later["at"])
        for status in ("sent", "failed", "expired", "cancelled", "skipped"):
            assert earlier["stats"][status] <= later["stats"][status]
    assert any(p["stats"]["pending"] == 2 for p in points)  # between the two batches


def test_the_timeline_of_a_mailing_without_messages_is_empty_and_unknown_ones_are_404(
    api, services, clock
):
    """Given a mailing without messages, when its timeline is read, then it has no points; an
    unknown mailing's timeline is a 404."""
    mailing = create_mailing(api, clock, start=timedelta(hours=1))
    assert body(api.get(f"/mailings/{mailing['id']}/timeline"))["points"] == []
    missing = api.get("/mailings/00000000-0000-4000-8000-000000000000/timeline")
    assert missing.status_code == 404
