"""Skip reasons and the frequency cap through the in-process pipeline: a client gets at most
FREQUENCY_CAP messages within the window across all mailings, even when mailings race for it;
a message that is never sent gives its place back; service mailings are exempt."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest

from chalicelib.services.queues import JobBatch
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
assert_counters_match_records = delivery.assert_counters_match_records

ONE_A_DAY = pytest.mark.parametrize("settings", [{"frequency_cap": "1/24h"}], indirect=True)


def stats(api, mailing_id: str) -> dict:
    response = api.get(f"/mailings/{mailing_id}/stats")
    assert response.status_code == 200, response.body
    return body(response)


def skip_reasons(api, mailing_id: str) -> Counter:
    """The skip reasons of the mailing's skipped messages, as the API lists them."""
    messages = stats(api, mailing_id)["messages"]
    return Counter(m["skip_reason"] for m in messages if m["status"] == "skipped")


# ---------------------------------------------------------------- skip reasons


def test_an_opted_out_client_is_skipped_with_the_reason_opted_out(api, pipeline, clock, gateway):
    # Given one client who opted out and one who did not (no frequency cap)
    add_client(api, "79000000001", opted_out=True)
    add_client(api, "79000000002")

    # When a mailing reaches both
    mailing = create_mailing(api, clock)
    pipeline.settle()

    # Then the opted-out client's message is skipped with its reason, and counted as such
    assert sent_phones(gateway) == ["79000000002"]
    assert skip_reasons(api, mailing["id"]) == Counter({"opted_out": 1})
    out = stats(api, mailing["id"])
    assert out["stats"]["skipped"] == 1
    assert out["skipped_by_reason"] == {"opted_out": 1, "frequency_cap": 0, "holdout": 0}
    assert body(api.get(f"/mailings/{mailing['id']}"))["skipped_by_reason"]["opted_out"] == 1
    assert_counters_match_records(pipeline, mailing["id"])


# ---------------------------------------------------------------- the frequency cap


@ONE_A_DAY
def test_two_mailings_running_at_once_send_once_per_client_within_the_window(
    api, pipeline, clock, gateway
):
    # Given a cap of one message a day, six clients and a gateway slow enough for senders to
    # overlap
    gateway.set_profile(FaultProfile(latency_seconds=0.05))
    phones = [f"7900000000{n}" for n in range(6)]
    for phone in phones:
        add_client(api, phone)

    # When two teams' mailings start at the same moment and their send jobs are delivered by two
    # senders at once
    first = create_mailing(api, clock, text="Team A")
    second = create_mailing(api, clock, text="Team B")
    pipeline.kicks()
    batches = [JobBatch.model_validate_json(m.body) for m in pipeline.sqs.take_ready(SEND_URL)]
    assert {b.mailing_id for b in batches} == {first["id"], second["id"]}
    barrier = threading.Barrier(len(batches))

    def sender(batch: JobBatch) -> None:
        barrier.wait()
        pipeline.services.sender.deliver(batch)

    threads = [threading.Thread(target=sender, args=(b,)) for b in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pipeline.settle()

    # Then every client got exactly one message, from one mailing or the other
    assert sorted(sent_phones(gateway)) == phones
    # And each other message is skipped for the frequency cap, never sent, and counted
    capped = skip_reasons(api, first["id"]) + skip_reasons(api, second["id"])
    assert capped == Counter({"frequency_cap": 6})
    by_reason = [stats(api, m["id"])["skipped_by_reason"]["frequency_cap"] for m in (first, second)]
    sent = [stats(api, m["id"])["stats"]["sent"] for m in (first, second)]
    assert sum(by_reason) == 6
    assert sum(sent) == 6
    assert [s + c for s, c in zip(sent, by_reason, strict=True)] == [6, 6]
    for mailing in (first, second):
        assert_counters_match_records(pipeline, mailing["id"])


@ONE_A_DAY
def test_a_capped_client_gets_mail_again_once_the_window_has_passed(api, pipeline, clock, gateway):
    # Given a cap of one a day and a client sent a mailing now
    add_client(api, "79000000001")
    create_mailing(api, clock, text="Monday")
    pipeline.settle()

    # When a second mailing comes an hour later and a third a day and an hour later
    later = create_mailing(
        api, clock, start=timedelta(hours=1), end=timedelta(hours=3), text="Same day"
    )
    next_day = create_mailing(
        api, clock, start=timedelta(hours=25), end=timedelta(hours=27), text="Tuesday"
    )
    pipeline.run(until=clock() + timedelta(hours=26), step=timedelta(minutes=30))
    pipeline.settle()

    # Then the same-day one is skipped for the cap, and the next day's is sent
    assert [s.text for s in gateway.accepted()] == ["Monday", "Tuesday"]
    assert skip_reasons(api, later["id"]) == Counter({"frequency_cap": 1})
    assert stats(api, next_day["id"])["stats"]["sent"] == 1


@ONE_A_DAY
def test_a_service_mailing_is_exempt_and_uses_up_nothing(api, pipeline, clock, gateway):
    # Given a cap of one a day and a client who got a campaign today
    add_client(api, "79000000001")
    create_mailing(api, clock, text="Campaign")
    pipeline.settle()

    # When a service message marked exempt goes to the same client, then another campaign
    service = create_mailing(api, clock, text="Your code is 1234", frequency_cap_exempt=True)
    pipeline.settle()
    campaign = create_mailing(api, clock, text="Another campaign")
    pipeline.settle()

    # Then the service message is sent despite the cap, and the second campaign is capped
    assert service["frequency_cap_exempt"] is True
    assert [s.text for s in gateway.accepted()] == ["Campaign", "Your code is 1234"]
    assert skip_reasons(api, campaign["id"]) == Counter({"frequency_cap": 1})


@ONE_A_DAY
def test_an_exempt_flag_can_be_changed_and_is_refused_when_not_a_boolean(api, clock):
    # Given a mailing
    add_client(api, "79000000001")
    mailing = create_mailing(api, clock, start=timedelta(hours=1))

    # When an operator marks it exempt, then sends a bad value
    changed = api.patch(f"/mailings/{mailing['id']}", {"frequency_cap_exempt": True})
    refused = api.patch(f"/mailings/{mailing['id']}", {"frequency_cap_exempt": "maybe"})

    # Then the first change holds, and the bad value is a 422 naming the field that changes nothing
    assert changed.status_code == 200, changed.body
    assert body(changed)["frequency_cap_exempt"] is True
    assert refused.status_code == 422, refused.body
    assert "frequency_cap_exempt" in refused.body.decode()
    assert body(api.get(f"/mailings/{mailing['id']}"))["frequency_cap_exempt"] is True


@ONE_A_DAY
def test_a_message_the_gateway_refuses_gives_the_clients_place_back(api, pipeline, clock, gateway):
    # Given a cap of one a day and a gateway that refuses the first campaign's message for good
    add_client(api, "79000000001")
    gateway.set_profile(FaultProfile(reject_phone_suffixes=("01",)))
    refused = create_mailing(api, clock, text="Refused")
    pipeline.settle()

    # When the gateway takes the client's messages again and a second campaign goes out
    gateway.set_profile(FaultProfile())
    second = create_mailing(api, clock, text="Second")
    pipeline.settle()

    # Then the refused message failed, and the client still got the second: a message never
    # sent does not use up the cap
    assert stats(api, refused["id"])["stats"]["failed"] == 1
    assert [s.text for s in gateway.accepted()] == ["Second"]
    assert stats(api, second["id"])["stats"]["sent"] == 1


@ONE_A_DAY
def test_a_retried_message_keeps_its_place_and_is_counted_once(api, pipeline, clock, gateway):
    # Given a cap of one a day and a gateway failing (5xx) the first campaign's first attempt
    add_client(api, "79000000001")
    gateway.set_profile(FaultProfile(error_rate=1.0, seed=1))
    first = create_mailing(api, clock, text="First", end=timedelta(days=1))
    pipeline.kicks()
    pipeline.send_once()
    assert stats(api, first["id"])["stats"]["pending"] == 1

    # When a second campaign goes out while the first waits for its retry, then the gateway
    # recovers and the retry goes out
    gateway.set_profile(FaultProfile())
    second = create_mailing(api, clock, text="Second")
    pipeline.kicks()
    pipeline.send_once()
    pipeline.settle(limit=timedelta(hours=2))

    # Then the first campaign's message was sent on its retry, and the second was capped: the
    # attempt the gateway might have taken kept the client's place (no double count either)
    assert [s.text for s in gateway.accepted()] == ["First"]
    assert skip_reasons(api, second["id"]) == Counter({"frequency_cap": 1})
    assert stats(api, first["id"])["stats"]["sent"] == 1


@ONE_A_DAY
def test_a_message_given_back_before_its_call_gives_its_place_back(api, pipeline, clock, gateway):
    # Given a cap of one a day and a gateway that asks every sender to slow down (429)
    add_client(api, "79000000001")
    gateway.set_profile(FaultProfile(rate_limit_rate=1.0, retry_after_seconds=60, seed=1))
    slowed = create_mailing(api, clock, text="Slowed", end=timedelta(minutes=30))
    pipeline.kicks()
    pipeline.send_once()
    assert stats(api, slowed["id"])["stats"]["pending"] == 1

    # When the gateway recovers and a second campaign is sent before the first one's job is back
    gateway.set_profile(FaultProfile())
    second = create_mailing(api, clock, text="Second")
    pipeline.kicks()
    clock.now = clock() + timedelta(seconds=61)  # past the gateway's pause
    ready = [JobBatch.model_validate_json(m.body) for m in pipeline.sqs.take_ready(SEND_URL)]
    for batch in sorted(ready, key=lambda b: b.mailing_id != second["id"]):
        pipeline.services.sender.deliver(batch)
    pipeline.settle()

    # Then the second got the client's place (the 429 sent nothing), and the first is capped
    assert [s.text for s in gateway.accepted()] == ["Second"]
    assert skip_reasons(api, slowed["id"]) == Counter({"frequency_cap": 1})


@ONE_A_DAY
def test_a_retried_message_that_expires_unsent_gives_its_place_back(api, pipeline, clock, gateway):
    # Given a cap of one a day and a campaign whose first attempt failed (5xx): its message
    # keeps the client's place for its retry
    add_client(api, "79000000001")
    gateway.set_profile(FaultProfile(error_rate=1.0, seed=1))
    expiring = create_mailing(api, clock, text="Expiring", end=timedelta(minutes=30))
    pipeline.kicks()
    pipeline.send_once()
    assert stats(api, expiring["id"])["stats"]["pending"] == 1

    # When its retry comes back only after the end (the sender expires it, never sent), and a
    # second campaign goes out afterwards
    gateway.set_profile(FaultProfile())
    clock.now = clock() + timedelta(minutes=31)
    pipeline.send_once()
    second = create_mailing(api, clock, text="Second")
    pipeline.settle()

    # Then the expired message gave the place back, and the client got the second campaign
    assert stats(api, expiring["id"])["stats"]["expired"] == 1
    assert [s.text for s in gateway.accepted()] == ["Second"]
    assert stats(api, second["id"])["stats"]["sent"] == 1
