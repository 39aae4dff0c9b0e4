"""The delivery pipeline end to end, in-process: scheduler → jobs → sender → sandbox gateway.

DynamoDB is moto's, the gateway is the real sandbox HTTP server, time is the test's clock.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import threading
from collections import Counter
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from chalicelib.services.queues import JobBatch
from devstack.gateway import FaultProfile, SandboxGateway
from tests.conftest import API_TOKEN, GATEWAY_TOKEN, body
from tests.support.in_process import sqs_event as lambda_sqs_event
from tests.support.pipeline import (
    DLQ_URL,
    FANOUT_URL,
    SEND_URL,
    Pipeline,
    VirtualSqs,
    pipeline_settings,
)


@pytest.fixture
def gateway(sandbox):
    return sandbox


@pytest.fixture
def settings(gateway, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    monkeypatch.setenv("API_TOKENS", API_TOKEN)
    overrides = getattr(request, "param", {})  # indirect parametrisation
    return pipeline_settings(gateway.url, **{"sender_api_token": GATEWAY_TOKEN, **overrides})


@pytest.fixture
def sqs(clock):
    return VirtualSqs(clock)


class GatewaySwitch:
    """The sender's gateway client, as Services.build(gateway=...) takes it: a test wraps or
    replaces `make` to watch or change what the gateway answers."""

    def __init__(self, make):
        self.make = make

    def __call__(self):
        return self.make()


@pytest.fixture
def gateway_client(settings) -> GatewaySwitch:
    from chalicelib.container import gateway_factory

    return GatewaySwitch(gateway_factory(settings))


@pytest.fixture
def services(aws, settings, clock, sqs, gateway_client, request: pytest.FixtureRequest):
    from chalicelib.container import Services, use_services
    from chalicelib.storage.models import create_tables

    wiring = {
        "clock": clock,
        "sqs": sqs,
        "gateway": gateway_client,
        "rng": random.Random(7),
        "wait_until": clock.wait_until,
        **getattr(request, "param", {}),  # indirect parametrisation: Services.build's arguments
    }
    built = Services.build(settings, **wiring)
    create_tables(built.models)
    use_services(built)
    yield built
    use_services(None)


@pytest.fixture
def pipeline(services, sqs, clock):
    return Pipeline(services, sqs, clock)


@pytest.fixture
def calls(gateway_client, clock) -> list[tuple[datetime, int]]:
    """(test-clock time, message id) of every call the sender makes to the gateway."""
    recorded: list[tuple[datetime, int]] = []
    make = gateway_client.make

    class Recording:
        def __init__(self, inner):
            self._inner = inner

        def send(self, message_id, phone, text):
            recorded.append((clock(), message_id))
            return self._inner.send(message_id, phone, text)

    gateway_client.make = lambda: Recording(make())
    return recorded


def add_client(api, phone: str, **fields) -> dict:
    response = api.post("/clients", {"phone": phone, **fields})
    assert response.status_code == 201, response.body
    return body(response)


def create_mailing(api, clock, *, start=timedelta(0), end=timedelta(hours=2), **fields) -> dict:
    payload = {
        "text": fields.pop("text", "Hello"),
        "start_at": (clock() + start).isoformat(),
        "end_at": (clock() + end).isoformat(),
        **fields,
    }
    response = api.post("/mailings", payload)
    assert response.status_code == 201, response.body
    return body(response)


def sent_phones(gateway: SandboxGateway) -> list[str]:
    return [str(send.phone) for send in gateway.accepted()]


def assert_counters_match_records(pipeline: Pipeline, mailing_id: str) -> None:
    assert pipeline.counters(mailing_id) == pipeline.statuses(mailing_id)


# ---------------------------------------------------------------- audience and timing


def test_mailing_reaches_exactly_the_matching_clients_right_away(api, pipeline, clock, gateway):
    # Given clients of several operators and tags
    matching = {
        add_client(api, "79000000001", tag="vip")["phone"],
        add_client(api, "79010000002", tag="new")["phone"],
    }
    add_client(api, "79000000003", tag="other")  # tag does not match
    add_client(api, "79020000004", tag="vip")  # operator does not match
    add_client(api, "79990000005")

    # When a mailing for operators 900/901 and tags vip/new is created with its start now
    mailing = create_mailing(
        api, clock, filter={"operator_codes": ["900", "901"], "tags": ["vip", "new"]}
    )
    # The kick reaches the scheduler without waiting for a tick
    pipeline.kicks()
    pipeline.send_once()

    # Then exactly the matching clients got one message each, before any scheduler tick
    assert sorted(sent_phones(gateway)) == sorted(matching)
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 2})
    assert_counters_match_records(pipeline, mailing["id"])
    stats = body(api.get(f"/mailings/{mailing['id']}/stats"))["stats"]
    assert stats["sent"] == 2
    assert stats["total"] == 2
    # And the last message out asks the scheduler to finish the mailing, again without a tick
    pipeline.kicks()
    assert pipeline.mailing_status(mailing["id"]) == "finished"


def test_future_mailing_sends_nothing_before_its_start_and_everything_after(
    api, pipeline, clock, gateway
):
    """Given a mailing starting in an hour, when time runs to just before and then past its start,
    then nothing is sent before it, every client gets the message after it, and it finishes."""
    for n in range(3):
        add_client(api, f"7900000000{n}")
    start = timedelta(hours=1)
    mailing = create_mailing(api, clock, start=start, end=timedelta(hours=3))

    pipeline.run(until=clock() + start - timedelta(seconds=1))
    assert gateway.accepted() == []
    assert pipeline.mailing_status(mailing["id"]) == "scheduled"

    pipeline.run(until=clock() + timedelta(minutes=2))
    assert len(gateway.accepted()) == 3
    assert all(send.accepted_at for send in gateway.accepted())
    pipeline.tick()
    assert pipeline.mailing_status(mailing["id"]) == "finished"


def test_each_client_is_sent_to_once_however_often_the_scheduler_runs(
    api, pipeline, clock, gateway
):
    """Given a mailing to five clients, when the scheduler runs three times over, then each client
    gets one message and the gateway sees no duplicate."""
    for n in range(5):
        add_client(api, f"7900000000{n}")
    mailing = create_mailing(api, clock)
    for _ in range(3):
        pipeline.tick()
        pipeline.kicks()
    pipeline.settle()
    assert len(pipeline.messages(mailing["id"])) == 5
    assert gateway.duplicates() == []
    assert len(gateway.accepted()) == 5


@pytest.mark.parametrize("settings", [{"fanout_page_size": 10}], indirect=True)
def test_fan_out_resumes_from_its_checkpoint_across_invocations(
    api, pipeline, services, clock, gateway
):
    # Given an audience larger than one page and a worker that runs out of time after a page
    for n in range(25):
        add_client(api, f"790000000{n:02d}")
    mailing = create_mailing(api, clock, start=timedelta(minutes=5))
    clock.advance(minutes=5)
    pipeline.sqs.queues[FANOUT_URL].clear()  # the start kick; this test drives the tick itself
    budget = iter([60.0, 60.0, 5.0] + [60.0] * 100)
    services.scheduler.tick(lambda: next(budget))
    # Then the first invocation stopped at a checkpoint and asked to be continued
    assert len(pipeline.messages(mailing["id"])) == 10
    assert pipeline.sqs.depth(FANOUT_URL) == 1
    # When the continuation runs, every client gets exactly one message
    pipeline.settle()
    assert len(pipeline.messages(mailing["id"])) == 25
    assert sorted(gateway.accepted_ids().values()) == [1] * 25


@pytest.mark.parametrize("settings", [{"fanout_page_size": 7}], indirect=True)
def test_fan_out_over_many_pages_and_every_shard_gives_each_client_one_message(
    api, pipeline, services, clock
):
    # Given more clients than fit on several pages, spread over all 16 shards of the index
    phones = [f"790000001{n:02d}" for n in range(60)]
    clients = {add_client(api, phone)["id"]: phone for phone in phones}
    # When the fan-out walks them, reading each next page while the last one commits
    mailing = create_mailing(api, clock)
    pipeline.kicks()
    # Then every client has exactly one message, addressed to its own phone
    messages = pipeline.messages(mailing["id"])
    assert {m.client_id: m.phone for m in messages} == clients
    assert len(messages) == len({m.message_id for m in messages}) == len(clients)
    assert pipeline.counters(mailing["id"]) == Counter({"pending": 60})


def test_message_ids_are_unique_integers_across_mailings(api, pipeline, clock):
    """Given two mailings to the same four clients, when both are sent, then their eight message
    ids are distinct positive 64-bit integers."""
    for n in range(4):
        add_client(api, f"7900000000{n}")
    first = create_mailing(api, clock)
    second = create_mailing(api, clock)
    pipeline.settle()
    ids = [m.message_id for mid in (first["id"], second["id"]) for m in pipeline.messages(mid)]
    assert len(ids) == len(set(ids)) == 8
    assert all(isinstance(i, int) and 0 < i < 2**63 for i in ids)


# ---------------------------------------------------------------- end time and windows


def test_jobs_still_queued_when_the_end_passes_expire_and_are_never_sent(
    api, pipeline, clock, gateway
):
    # Given a mailing whose messages are created but whose sender is not running
    for n in range(4):
        add_client(api, f"7900000000{n}")
    mailing = create_mailing(api, clock, end=timedelta(minutes=10))
    pipeline.kicks()
    assert pipeline.sqs.depth(SEND_URL) > 0

    # When the end passes before the sender gets to them
    clock.advance(minutes=11)
    pipeline.send_once()
    pipeline.tick()

    # Then they are expired, nothing reached the gateway, and the mailing is finished
    assert gateway.accepted() == []
    assert pipeline.statuses(mailing["id"]) == Counter({"expired": 4})
    assert_counters_match_records(pipeline, mailing["id"])
    assert pipeline.mailing_status(mailing["id"]) == "finished"


def test_send_window_is_the_clients_local_time_and_deferred_clients_get_it_when_it_opens(
    api, pipeline, clock, gateway, calls
):
    """Given clients in three time zones and a 09:00-18:00 window, when the mailing runs for 30
    hours, then every call falls inside the client's local window, and clients outside it get
    theirs when it opens."""
    # It is 12:00 UTC: 15:00 in Moscow, 21:00 in Vladivostok, 07:00 in New York
    clients = {
        "Europe/Moscow": add_client(api, "79000000001", timezone="Europe/Moscow"),
        "Asia/Vladivostok": add_client(api, "79000000002", timezone="Asia/Vladivostok"),
        "America/New_York": add_client(api, "79000000003", timezone="America/New_York"),
    }
    mailing = create_mailing(
        api, clock, end=timedelta(days=2), send_window={"start": "09:00", "end": "18:00"}
    )

    pipeline.run(until=clock() + timedelta(hours=30), step=timedelta(minutes=15))

    # Every client got its message, and every gateway call was inside 09:00-18:00 local time
    assert len(gateway.accepted()) == 3
    zone_of = {
        m.message_id: ZoneInfo(zone)
        for zone, client in clients.items()
        for m in pipeline.messages(mailing["id"])
        if m.client_id == client["id"]
    }
    assert len(calls) == 3
    for at, message_id in calls:
        local = at.astimezone(zone_of[message_id]).time()
        assert time(9) <= local < time(18), (zone_of[message_id], local)
    # Moscow was inside its window at once; the others waited for theirs
    sent = {m.client_id: m.sent_at for m in pipeline.messages(mailing["id"])}
    start = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    assert sent[clients["Europe/Moscow"]["id"]] - start < timedelta(minutes=1)
    assert sent[clients["Asia/Vladivostok"]["id"]] - start > timedelta(hours=10)
    assert sent[clients["America/New_York"]["id"]] - start > timedelta(hours=1)


def test_window_that_wraps_midnight_is_honoured(api, pipeline, clock):
    """Given a window from 22:00 to 02:00, when the mailing runs, then its message is sent inside
    those hours."""
    client = add_client(api, "79000000001", timezone="UTC")
    mailing = create_mailing(
        api, clock, end=timedelta(days=1), send_window={"start": "22:00", "end": "02:00"}
    )
    pipeline.run(until=clock() + timedelta(hours=12), step=timedelta(minutes=15))
    [message] = pipeline.messages(mailing["id"])
    assert message.client_id == client["id"]
    assert message.status == "sent"
    assert message.sent_at.hour in (22, 23, 0, 1)


def test_window_that_never_opens_before_the_end_expires_the_message(api, pipeline, clock, gateway):
    """Given a window that does not open before the mailing ends, when it runs, then nothing is
    sent and the message expires, naming the window."""
    add_client(api, "79000000001", timezone="UTC")
    mailing = create_mailing(
        api, clock, end=timedelta(hours=3), send_window={"start": "20:00", "end": "21:00"}
    )
    pipeline.settle()
    assert gateway.accepted() == []
    [message] = pipeline.messages(mailing["id"])
    assert message.status == "expired"
    assert "window" in message.last_error


# ---------------------------------------------------------------- gateway faults


def test_rejected_message_fails_at_once_with_the_reason(api, pipeline, clock, gateway):
    """Given a gateway rejecting one phone, when the mailing runs, then that message fails on its
    first attempt naming the 400, and the other is sent."""
    gateway.set_profile(FaultProfile(reject_phone_suffixes=("13",)))
    add_client(api, "79000000013")
    add_client(api, "79000000014")
    mailing = create_mailing(api, clock)
    pipeline.settle()
    by_phone = {m.phone: m for m in pipeline.messages(mailing["id"])}
    assert by_phone["79000000013"].status == "failed"
    assert "400" in by_phone["79000000013"].last_error
    assert by_phone["79000000013"].attempts == 1
    assert by_phone["79000000014"].status == "sent"


# Answers of 0.8 s outlast a 0.5 s read timeout.
@pytest.mark.parametrize("settings", [{"gateway_read_timeout": 0.5}], indirect=True)
@pytest.mark.parametrize(
    "profile",
    [
        FaultProfile(error_rate=1.0, seed=1),
        FaultProfile(malformed_rate=1.0, seed=1),
        FaultProfile(slow_rate=1.0, slow_seconds=0.8, seed=1),
    ],
    ids=["5xx", "malformed", "timeout"],
)
def test_persistent_transient_faults_end_in_failed_and_the_dead_letter_queue(
    api, pipeline, clock, gateway, profile
):
    """Given a gateway failing every call (5xx, malformed or too slow), when the mailing runs for
    hours, then the message fails after 8 attempts, its job lands in the dead-letter queue, and
    the counters match."""
    gateway.set_profile(profile)
    add_client(api, "79000000001")
    mailing = create_mailing(api, clock, end=timedelta(days=1))
    pipeline.run(until=clock() + timedelta(hours=4), step=timedelta(minutes=2))
    [message] = pipeline.messages(mailing["id"])
    assert message.status == "failed"
    assert message.attempts == 8
    assert "gave up after 8 attempts" in message.last_error
    [dead] = pipeline.sqs.queues[DLQ_URL]
    assert JobBatch.model_validate_json(dead.body).jobs[0].message_id == message.message_id
    assert_counters_match_records(pipeline, mailing["id"])


def test_gateway_outage_of_a_minute_delays_but_loses_nothing(api, pipeline, clock, gateway):
    """Given a gateway down for a minute, when it comes back, then every message is sent once and
    the counters match."""
    for n in range(6):
        add_client(api, f"7900000000{n}")
    gateway.start_outage(3600)  # down until the test ends it
    mailing = create_mailing(api, clock)
    pipeline.run(until=clock() + timedelta(minutes=1), step=timedelta(seconds=10))
    assert gateway.accepted() == []
    gateway.end_outage()
    pipeline.run(until=clock() + timedelta(minutes=30), step=timedelta(minutes=1))
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 6})
    assert gateway.duplicates() == []
    assert_counters_match_records(pipeline, mailing["id"])


def test_a_rate_limiting_gateway_slows_sending_without_spending_attempts(
    api, pipeline, clock, gateway, calls
):
    # Given a gateway that answers every call with 429
    gateway.set_profile(FaultProfile(rate_limit_rate=1.0, seed=1))
    add_client(api, "79000000001")
    mailing = create_mailing(api, clock, end=timedelta(minutes=10))
    # When the mailing runs to its end
    pipeline.run(until=clock() + timedelta(minutes=11), step=timedelta(seconds=1))
    # Then the message was never given up as failed: it waited and expired at the end
    [message] = pipeline.messages(mailing["id"])
    assert message.status == "expired"
    assert "429" in message.last_error
    assert pipeline.sqs.queues[DLQ_URL] == []
    # And no attempt was spent on the 429s
    assert int(message.attempts or 0) == 0
    # And every call waited for the Retry-After (1 s) of the 429 before it: at most one a second
    gaps = [(b - a).total_seconds() for (a, _), (b, _) in itertools.pairwise(calls)]
    assert min(gaps) >= 1.0
    assert len(calls) <= 10 * 60
    assert_counters_match_records(pipeline, mailing["id"])


def test_an_outage_is_probed_not_hammered_and_sending_resumes_at_full_speed(
    api, pipeline, clock, gateway, calls
):
    # Given 40 clients and a gateway that is down for the first minute
    for n in range(40):
        add_client(api, f"790000000{n:02d}")
    gateway.start_outage(3600)
    mailing = create_mailing(api, clock)
    pipeline.run(until=clock() + timedelta(minutes=1), step=timedelta(seconds=1))
    during = len(calls)
    gateway.end_outage()
    recovered_at = clock()
    pipeline.run(until=clock() + timedelta(minutes=5), step=timedelta(seconds=1))
    # Then the senders saw the outage within its first calls (twenty in a row failed, a batch
    # more in flight) and from then on only probed it, one call a second at most
    probes = sorted(at for at, _ in calls[:during])[30:]
    assert probes
    assert min((b - a).total_seconds() for a, b in itertools.pairwise(probes)) >= 0.99
    messages = pipeline.messages(mailing["id"])
    assert max(int(m.attempts) for m in messages) <= 4
    # And once it is back, everything goes within seconds, once each
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 40})
    assert gateway.duplicates() == []
    assert calls[-1][0] - recovered_at < timedelta(seconds=90)
    assert_counters_match_records(pipeline, mailing["id"])


def densest_second(times: list[datetime]) -> int:
    """The most calls in any one-second window (on the senders' clock)."""
    times = sorted(times)
    return max(
        (
            sum(1 for t in times[i:] if t - start < timedelta(seconds=1))
            for i, start in enumerate(times)
        ),
        default=0,
    )


# One thread per SQS message: the batch's calls leave one after the other, as their slots say.
@pytest.mark.parametrize("settings", [{"sender_concurrency": 1}], indirect=True)
def test_a_batch_stops_calling_a_gateway_that_refuses_its_connections(
    api, pipeline, clock, gateway, calls
):
    # Given ten clients (one batch of jobs) and a gateway that refuses every connection
    for n in range(10):
        add_client(api, f"790000000{n:02d}")
    gateway.start_outage(3600, "refuse")
    mailing = create_mailing(api, clock)
    # When the batch is delivered
    pipeline.run(until=clock() + timedelta(seconds=1), step=timedelta(seconds=1))
    # Then after two calls in a row got no answer at all (and one already leaving), the others
    # waited instead of following them (before any sender had counted twenty failures), no
    # attempt spent
    assert len(calls) <= 3
    messages = pipeline.messages(mailing["id"])
    assert Counter(m.status for m in messages) == Counter({"pending": 10})
    assert sum(int(m.attempts or 0) for m in messages) <= 3


def test_while_the_gateway_is_down_only_the_probe_is_claimed(
    api, pipeline, services, clock, gateway, calls, monkeypatch
):
    # Given 100 clients and a gateway that is down
    for n in range(100):
        add_client(api, f"79000000{n:03d}")
    gateway.start_outage(3600)
    claims = []
    claim = services.messages.claim
    monkeypatch.setattr(
        services.messages, "claim", lambda *a, **k: claims.append(a) or claim(*a, **k)
    )
    mailing = create_mailing(api, clock)
    # When the senders have probed it for half a minute
    pipeline.run(until=clock() + timedelta(seconds=30), step=timedelta(seconds=1))
    # Then the messages that waited for a probe slot were not claimed for nothing: about one
    # claim per call (a claim and its undo are two writes per message each time it comes round)
    assert pipeline.statuses(mailing["id"]) == Counter({"pending": 100})
    assert len(claims) <= len(calls) + 10


@pytest.mark.parametrize("settings", [{"gateway_rate_per_second": 2.0}], indirect=True)
def test_jobs_over_the_shared_rate_go_back_in_whole_batches(
    api, pipeline, services, clock, monkeypatch
):
    # Given 40 clients (ten jobs to an SQS message) and a limit of 2 calls a second
    for n in range(40):
        add_client(api, f"790000000{n:02d}")
    requeued: list[list[int]] = []
    enqueue = services.queues.enqueue

    def recording(items):
        requeued.append([len(item.batch.jobs) for item in items])
        return enqueue(items)

    monkeypatch.setattr(services.queues, "enqueue", recording)
    mailing = create_mailing(api, clock)
    # When the senders send them all, four calls to a batch's two seconds of slots
    pipeline.settle()
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 40})
    # Then the jobs of a batch that got no slot went back in one SQS message, not one per job:
    # a backlog split into single jobs costs a sender invocation per job when sending resumes
    sender = requeued[1:]  # the first is the fan-out's
    assert sender
    assert all(len(messages) == 1 for messages in sender)


# One sender thread: on the shared test clock, one thread's wait moves time for all of them.
@pytest.mark.parametrize(
    "settings", [{"gateway_rate_per_second": 20.0, "sender_concurrency": 1}], indirect=True
)
def test_the_gateway_never_sees_more_than_the_configured_rate(api, pipeline, clock, calls):
    # Given 150 clients and a limit of 20 calls a second
    for n in range(150):
        add_client(api, f"7900000{n:04d}")
    mailing = create_mailing(api, clock)
    pipeline.settle()
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 150})
    # Then no one-second window (on the senders' clock) holds more than 20 calls
    times = sorted(at for at, _ in calls)
    assert densest_second(times) <= 20
    # And the limit was used, not just respected: 150 calls took about 150 / 20 s
    assert (times[-1] - times[0]).total_seconds() < 150 / 20 + 2


# One sender thread: on the shared test clock, one thread's wait moves time for all of them.
@pytest.mark.parametrize(
    "settings",
    [
        {
            "gateway_rate_per_second": 50.0,
            "sender_concurrency": 1,
            "gateway_rate_per_operator": (("903", 2.0), ("916", 20.0)),
        }
    ],
    indirect=True,
)
def test_a_slow_operator_keeps_its_rate_and_does_not_hold_back_the_others(
    api, pipeline, clock, calls
):
    # Given a gateway limit of 50 calls a second, of which operator 903 may take 2 and operator
    # 916 may take 20, and 20 clients of 903, 60 of 916 and 60 of 900 (no limit of its own),
    # mixed in every batch
    for n in range(60):
        add_client(api, f"7916{n:07d}")
        add_client(api, f"7900{n:07d}")
        if n < 20:
            add_client(api, f"7903{n:07d}")
    mailing = create_mailing(api, clock)
    # When the mailing runs
    pipeline.settle()
    # Then every message is sent once, and none spent more than the one attempt that sent it:
    # the jobs that waited for their operator's slots went back to the queue without spending one
    messages = pipeline.messages(mailing["id"])
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 140})
    assert {int(m.attempts) for m in messages} == {1}
    assert pipeline.sqs.queues[DLQ_URL] == []
    operator_of = {int(m.message_id): m.phone[1:4] for m in messages}
    times: dict[str, list[datetime]] = {"900": [], "903": [], "916": []}
    for at, message_id in calls:
        times[operator_of[message_id]].append(at)
    assert len(calls) == 140
    # And the gateway never saw more than an operator's rate (within 10%) in any second, nor
    # more than 50 calls a second in all
    assert densest_second(times["903"]) <= 2 * 1.1
    assert densest_second(times["916"]) <= 20 * 1.1
    assert densest_second([at for at, _ in calls]) <= 50
    # And the slow operator did not hold back the others: operator 900's 60 calls were done
    # about as soon as the global rate allows, long before 903's 20 calls at 2 a second
    first = min(at for at, _ in calls)
    done_900 = (max(times["900"]) - first).total_seconds()
    done_903 = (max(times["903"]) - first).total_seconds()
    assert done_900 < 60 / 20 + 2
    assert done_903 >= 19 / 2
    assert_counters_match_records(pipeline, mailing["id"])


@pytest.mark.parametrize(
    "settings", [{"gateway_rate_per_operator": (("903", 2.0),)}], indirect=True
)
def test_an_operators_slots_that_cannot_be_reserved_cost_its_jobs_no_attempt(
    api, pipeline, clock, gateway, monkeypatch
):
    from botocore.exceptions import ClientError

    from chalicelib.services.throttle import GatewayThrottle

    # Given clients of operator 903 (limited) and 900, and the 903 slots item throttled by
    # DynamoDB beyond the SDK's retries
    for n in range(3):
        add_client(api, f"7903{n:07d}")
        add_client(api, f"7900{n:07d}")

    def throttled(*args, **kwargs):
        error = {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}
        raise ClientError(error, "UpdateItem")

    working = GatewayThrottle.admit_operator
    monkeypatch.setattr(GatewayThrottle, "admit_operator", throttled)
    mailing = create_mailing(api, clock)
    # When the batch is delivered once
    pipeline.kicks()
    pipeline.send_once()
    # Then operator 900's messages are sent, and 903's wait in the queue with no attempt spent
    messages = pipeline.messages(mailing["id"])
    assert sorted(m.phone[1:4] for m in messages if m.status == "sent") == ["900"] * 3
    waiting = [m for m in messages if m.status == "pending"]
    assert sorted(m.phone[1:4] for m in waiting) == ["903"] * 3
    assert {int(m.attempts or 0) for m in waiting} == {0}
    assert pipeline.sqs.depth(SEND_URL) >= 1
    # And once the item answers again, they are sent
    monkeypatch.setattr(GatewayThrottle, "admit_operator", working)
    pipeline.settle()
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 6})


def test_retries_beyond_the_shared_budget_are_deferred_without_spending_attempts(
    api, pipeline, clock, gateway, calls
):
    # Given 40 clients and a gateway that fails every call with a 500 (no Retry-After)
    for n in range(40):
        add_client(api, f"790000000{n:02d}")
    gateway.set_profile(FaultProfile(error_rate=1.0, seed=2))
    started = clock()
    mailing = create_mailing(api, clock)
    # When the senders keep at it for a few minutes
    pipeline.run(until=clock() + timedelta(minutes=2), step=timedelta(seconds=1))
    # Then attempts were spent on about a fifth of the calls (plus a reserve of ten per
    # two-minute window), not on every one: the rest were deferred without spending one
    messages = pipeline.messages(mailing["id"])
    spent = sum(int(m.attempts or 0) for m in messages)
    windows = (clock() - started) / timedelta(minutes=2) + 1
    assert spent <= 0.2 * len(calls) + 10 * windows
    assert max(int(m.attempts or 0) for m in messages) < 8
    assert pipeline.sqs.queues[DLQ_URL] == []
    # And once the gateway works again, every message is sent
    gateway.set_profile(FaultProfile())
    pipeline.run(until=clock() + timedelta(minutes=20), step=timedelta(seconds=10))
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 40})
    assert_counters_match_records(pipeline, mailing["id"])


def test_a_bad_luck_failure_is_retried_within_seconds_not_after_retry_base_seconds(
    api, pipeline, services, clock, gateway, calls, gateway_client
):
    # Given the default RETRY_BASE_SECONDS (5 s) and a gateway that just accepted 30 messages
    assert services.settings.retry_base_seconds == 5
    for n in range(30):
        add_client(api, f"790000000{n:02d}", tag="earlier")
    create_mailing(api, clock, filter={"tags": ["earlier"]})
    pipeline.settle()
    add_client(api, "79000000100", tag="later")
    calls.clear()
    # When it fails the next message's first call with a 500 (bad luck: most calls succeed,
    # the retry budget has room) and works again right after it
    gateway.set_profile(FaultProfile(error_rate=1.0, seed=4))
    make = gateway_client.make

    class HealedAfterOneCall:
        def __init__(self, inner):
            self._inner = inner

        def send(self, message_id, phone, text):
            result = self._inner.send(message_id, phone, text)
            gateway.set_profile(FaultProfile())
            return result

    gateway_client.make = lambda: HealedAfterOneCall(make())
    mailing = create_mailing(api, clock, filter={"tags": ["later"]})
    pipeline.run(until=clock() + timedelta(seconds=30), step=timedelta(seconds=1))
    # Then it is sent with its second call, within two seconds of the first: the shared rate
    # had room, so the retry did not wait out a backoff from RETRY_BASE_SECONDS
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 1})
    [(failed_at, _), (sent_at, _)] = calls
    assert sent_at - failed_at <= timedelta(seconds=2)


def test_a_gateway_failing_for_minutes_does_not_spend_a_lone_message_s_attempts(
    api, pipeline, clock, gateway, calls
):
    # Given one client and a gateway that answers every call with a 500 (too few calls to tell
    # an outage from bad luck by their count)
    add_client(api, "79000000001")
    gateway.set_profile(FaultProfile(error_rate=1.0, seed=5))
    mailing = create_mailing(api, clock)
    # When it keeps failing for two minutes
    pipeline.run(until=clock() + timedelta(minutes=2), step=timedelta(seconds=1))
    # Then the message still waits, most of its attempts left: the retries backed off as
    # RETRY_BASE_SECONDS says, since nothing showed that the gateway works
    [message] = pipeline.messages(mailing["id"])
    assert message.status == "pending"
    assert int(message.attempts) <= 6
    assert pipeline.sqs.queues[DLQ_URL] == []


def test_retries_never_go_past_the_end(api, pipeline, clock, gateway, calls):
    """Given a gateway failing every call and a mailing ending in 40 s, when it runs, then no call
    is made after the end and the message expires."""
    gateway.set_profile(FaultProfile(error_rate=1.0, seed=3))
    add_client(api, "79000000001")
    end = clock() + timedelta(seconds=40)
    mailing = create_mailing(api, clock, end=timedelta(seconds=40))
    pipeline.run(until=clock() + timedelta(minutes=30), step=timedelta(seconds=5))
    [message] = pipeline.messages(mailing["id"])
    assert message.status == "expired"
    assert "HTTP 5" in message.last_error
    assert len(calls) >= 2
    assert all(at < end for at, _ in calls)


@pytest.mark.parametrize("settings", [{"sender_api_token": None}], indirect=True)
def test_wrong_gateway_token_keeps_messages_pending_and_retries_later(
    api, pipeline, services, clock, gateway, gateway_client
):
    """Given a gateway client with a wrong token, when the mailing runs, then its message waits
    with the 401; when the token is fixed, then it is sent."""
    from pydantic import SecretStr

    from chalicelib.gateway import GatewayClient

    wrong = GatewayClient(
        gateway.url, SecretStr("not-the-token"), connect_timeout=0.5, read_timeout=0.5
    )
    right = GatewayClient(
        gateway.url, SecretStr(GATEWAY_TOKEN), connect_timeout=0.5, read_timeout=0.5
    )
    current = {"client": wrong}
    gateway_client.make = lambda: current["client"]
    add_client(api, "79000000001")
    mailing = create_mailing(api, clock, end=timedelta(days=1))
    pipeline.run(until=clock() + timedelta(minutes=20), step=timedelta(minutes=1))
    [message] = pipeline.messages(mailing["id"])
    assert message.status == "pending"
    assert "401" in message.last_error
    # When the operator fixes the token, the message goes out
    current["client"] = right
    pipeline.run(until=clock() + timedelta(minutes=20), step=timedelta(minutes=1))
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 1})


# The read timeout leaves a normal answer a second, so that on a loaded machine (the suite beside
# other work) only the deliberately slow answers outlast it.
@pytest.mark.parametrize("settings", [{"gateway_read_timeout": 1.0}], indirect=True)
def test_mixed_faults_end_in_terminal_states_with_exact_counters(api, pipeline, clock, gateway):
    gateway.set_profile(
        FaultProfile(
            error_rate=0.3,
            malformed_rate=0.1,
            slow_rate=0.1,
            slow_seconds=1.6,
            reject_phone_suffixes=("7",),
            seed=11,
        )
    )
    for n in range(30):
        add_client(api, f"790000000{n:02d}")
    mailing = create_mailing(api, clock, end=timedelta(hours=6))
    pipeline.run(until=clock() + timedelta(hours=7), step=timedelta(minutes=2))
    statuses = pipeline.statuses(mailing["id"])
    assert statuses["pending"] == 0
    assert sum(statuses.values()) == 30
    assert statuses["failed"] >= 3  # the numbers ending in 7 are rejected
    # A message is accepted twice only after an answer slower than the read timeout: the
    # gateway accepted it while the sender had given up, and the retry has the same message id
    # (the gateway can deduplicate it).
    timed_out = {r.msg_id for r in gateway.requests() if r.outcome == "slow"}
    assert set(gateway.duplicates()) <= timed_out
    assert_counters_match_records(pipeline, mailing["id"])
    assert pipeline.mailing_status(mailing["id"]) == "finished"


# ---------------------------------------------------------------- exactly once


def test_a_job_delivered_twice_is_sent_once(api, pipeline, clock, gateway):
    """Given a job, when the sender is handed it twice, then the gateway accepts the message
    once."""
    add_client(api, "79000000001")
    create_mailing(api, clock)
    pipeline.kicks()
    [message] = pipeline.sqs.take_ready(SEND_URL)
    batch = JobBatch.model_validate_json(message.body)
    pipeline.services.sender.deliver(batch)
    pipeline.services.sender.deliver(batch)
    assert len(gateway.accepted()) == 1


def test_two_racing_senders_send_once(api, pipeline, clock, gateway):
    """Given a batch of five jobs, when two senders deliver it at the same moment, then each
    message is accepted once."""
    gateway.set_profile(FaultProfile(latency_seconds=0.2))
    for n in range(5):
        add_client(api, f"7900000000{n}")
    create_mailing(api, clock)
    pipeline.kicks()
    [message] = pipeline.sqs.take_ready(SEND_URL)
    batch = JobBatch.model_validate_json(message.body)
    barrier = threading.Barrier(2)

    def race() -> None:
        barrier.wait()
        pipeline.services.sender.deliver(batch)

    threads = [threading.Thread(target=race) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(gateway.accepted_ids().values()) == [1] * 5


# ---------------------------------------------------------------- changes while running


def test_text_and_end_changed_while_running_apply_to_unsent_messages(api, pipeline, clock, gateway):
    """Given a running mailing whose job is queued, when its text and end are changed, then the
    message goes out with the new text."""
    add_client(api, "79000000001")
    mailing = create_mailing(api, clock, end=timedelta(minutes=30))
    pipeline.kicks()  # fan-out done, job queued, nothing sent yet
    response = api.patch(
        f"/mailings/{mailing['id']}",
        {"text": "Updated text", "end_at": (clock() + timedelta(hours=5)).isoformat()},
    )
    assert response.status_code == 200, response.body
    pipeline.settle()
    assert [s.text for s in gateway.accepted()] == ["Updated text"]


def test_filter_and_start_cannot_change_once_running(api, pipeline, clock):
    """Given a running mailing, when its filter or start is changed, then the answer is a 409
    naming the field."""
    add_client(api, "79000000001")
    mailing = create_mailing(api, clock)
    pipeline.kicks()
    assert body(api.get(f"/mailings/{mailing['id']}"))["status"] == "running"
    response = api.patch(f"/mailings/{mailing['id']}", {"filter": {"tags": ["vip"]}})
    assert response.status_code == 409, response.body
    assert body(response)["details"][0]["field"] == "body.filter"
    earlier = (clock() - timedelta(minutes=1)).isoformat()
    response = api.patch(f"/mailings/{mailing['id']}", {"start_at": earlier})
    assert response.status_code == 409


def test_deleting_a_mailing_stops_its_queued_jobs(api, pipeline, clock, gateway):
    """Given a mailing with queued jobs, when it is deleted, then none of them is sent."""
    for n in range(3):
        add_client(api, f"7900000000{n}")
    mailing = create_mailing(api, clock)
    pipeline.kicks()
    assert api.delete(f"/mailings/{mailing['id']}").status_code == 204
    pipeline.settle()
    assert gateway.accepted() == []


def test_a_deleted_client_is_never_sent_to(api, pipeline, clock, gateway):
    """Given a client deleted after the fan-out, when the jobs run, then only the other client is
    sent to, the deleted one's message fails saying why, and the counters match."""
    keep = add_client(api, "79000000001")
    gone = add_client(api, "79000000002")
    mailing = create_mailing(api, clock)
    pipeline.kicks()
    api.delete(f"/clients/{gone['id']}")
    pipeline.settle()
    assert sent_phones(gateway) == [keep["phone"]]
    by_client = {m.client_id: m for m in pipeline.messages(mailing["id"])}
    assert by_client[keep["id"]].status == "sent"
    assert by_client[gone["id"]].status == "failed"
    assert by_client[gone["id"]].last_error == "client record is missing (the client was deleted)"
    assert_counters_match_records(pipeline, mailing["id"])


def test_cancel_stops_sending_and_keeps_statistics(api, pipeline, clock, gateway):
    """Given a mailing with one message sent, when it is cancelled, then the rest are cancelled,
    nothing more is sent, and the stats show both."""
    for n in range(4):
        add_client(api, f"7900000000{n}", timezone="UTC")
    mailing = create_mailing(api, clock, end=timedelta(days=1))
    pipeline.kicks()
    # One message goes out before the cancel
    [first] = pipeline.sqs.take_ready(SEND_URL, 1)
    batch = JobBatch.model_validate_json(first.body)
    pipeline.services.sender.deliver(batch.model_copy(update={"jobs": batch.jobs[:1]}))
    pipeline.sqs.put_back(SEND_URL, first, 0)

    response = api.post(f"/mailings/{mailing['id']}/cancel")
    assert response.status_code == 200
    assert body(response)["status"] == "cancelled"
    pipeline.settle()

    assert len(gateway.accepted()) == 1
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 1, "cancelled": 3})
    assert_counters_match_records(pipeline, mailing["id"])
    stats = body(api.get(f"/mailings/{mailing['id']}/stats"))
    assert stats["status"] == "cancelled"
    assert stats["stats"]["sent"] == 1
    assert stats["stats"]["cancelled"] == 3


def test_cancel_of_a_finished_mailing_is_409(api, pipeline, clock):
    """Given a finished mailing, when it is cancelled or edited, then the answer is a 409."""
    add_client(api, "79000000001")
    mailing = create_mailing(api, clock)
    pipeline.settle()
    pipeline.tick()
    assert pipeline.mailing_status(mailing["id"]) == "finished"
    assert api.post(f"/mailings/{mailing['id']}/cancel").status_code == 409
    assert api.patch(f"/mailings/{mailing['id']}", {"text": "x"}).status_code == 409


# ---------------------------------------------------------------- the SQS handler and crashes


def sqs_event(bodies: list[str]) -> dict:
    """A Lambda SQS event from the send queue."""
    return lambda_sqs_event(bodies, "arn:aws:sqs:us-east-1:123456789012:send")


@pytest.fixture
def send_lambda(services, monkeypatch: pytest.MonkeyPatch):
    """Chalice's test client, its Lambda contexts counting down from the sender's configured
    timeout as Lambda's do (Chalice's own test contexts give every function 3 s)."""
    import chalice.test
    from chalice.local import LambdaContext
    from chalice.test import Client

    from app import app

    config = json.loads((Path(__file__).parents[2] / ".chalice" / "config.json").read_text())
    timeout_ms = config["lambda_functions"]["send_messages"]["lambda_timeout"] * 1000
    context = functools.partial(LambdaContext, max_runtime_ms=timeout_ms)
    monkeypatch.setattr(chalice.test, "LambdaContext", context)
    with Client(app) as client:
        yield client.lambda_


def queued_batches(pipeline: Pipeline) -> list[str]:
    pipeline.kicks()
    return [m.body for m in pipeline.sqs.take_ready(SEND_URL, 100)]


@pytest.mark.parametrize("settings", [{"jobs_per_message": 2}], indirect=True)
def test_one_failing_record_is_reported_alone_and_its_siblings_are_not_sent_again(
    api, pipeline, services, clock, gateway, monkeypatch, send_lambda
):
    # Given three SQS messages of jobs, the second of which hits a storage error
    for n in range(6):
        add_client(api, f"7900000000{n}")
    create_mailing(api, clock)
    bodies = queued_batches(pipeline)
    assert len(bodies) == 3
    broken = JobBatch.model_validate_json(bodies[1]).jobs[0].client_id
    original = services.clients.find_many

    def flaky(client_ids, **kwargs):
        if broken in client_ids:
            raise RuntimeError("DynamoDB hiccup")
        return original(client_ids, **kwargs)

    monkeypatch.setattr(services.clients, "find_many", flaky)

    # When the send Lambda handles the batch
    response = send_lambda.invoke("send_messages", sqs_event(bodies))

    # Then only the failing record is reported, so SQS re-delivers only it
    assert response.payload == {"batchItemFailures": [{"itemIdentifier": "record-1"}]}
    assert len(gateway.accepted()) == 4
    # And when SQS re-delivers it (the storage is fine again), only its jobs are sent
    monkeypatch.setattr(services.clients, "find_many", original)
    again = send_lambda.invoke("send_messages", sqs_event([bodies[1]]))
    assert again.payload == {"batchItemFailures": []}
    assert sorted(gateway.accepted_ids().values()) == [1] * 6
    # Even a full re-delivery of every record would send nothing twice
    send_lambda.invoke("send_messages", sqs_event(bodies))
    assert sorted(gateway.accepted_ids().values()) == [1] * 6


def test_malformed_job_is_dropped_without_failing_its_batch(
    api, pipeline, clock, gateway, send_lambda
):
    """Given a batch with a malformed record and a good one, when the send Lambda handles it, then
    no record is reported failed and the good one is sent."""
    add_client(api, "79000000001")
    create_mailing(api, clock)
    bodies = queued_batches(pipeline)
    response = send_lambda.invoke("send_messages", sqs_event(['{"jobs": "garbage"}', *bodies]))
    assert response.payload == {"batchItemFailures": []}
    assert len(gateway.accepted()) == 1


class Crash(Exception):
    """A worker dying at a chosen point."""


def crash_once(monkeypatch, target, name: str) -> None:
    original = getattr(target, name)
    state = {"crashed": False}

    def crashing(*args, **kwargs):
        if not state["crashed"]:
            state["crashed"] = True
            raise Crash(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, crashing)


@pytest.mark.parametrize(
    ("where", "expected_sends"),
    [
        ("before the claim", 1),
        ("after the claim, before the gateway call", 1),
        ("after the outcome is recorded, before SQS hears of it", 1),
        ("after the gateway accepted, before the outcome is recorded", 2),
    ],
)
def test_a_worker_dying_anywhere_sends_twice_only_in_the_documented_window(
    api, pipeline, services, clock, gateway, monkeypatch, where, expected_sends
):
    """Given a worker that dies at some point of a delivery, when SQS shows the job again, then the
    message is sent, twice only if the worker died between the gateway's accept and the
    outcome's write."""
    add_client(api, "79000000001")
    mailing = create_mailing(api, clock)
    [body_text] = queued_batches(pipeline)
    batch = JobBatch.model_validate_json(body_text)
    sender, store = services.sender, services.messages
    if where == "before the claim":
        crash_once(monkeypatch, store, "claim")
    elif where == "after the claim, before the gateway call":
        real_claim = store.claim

        def claim_then_die(*args, **kwargs):
            real_claim(*args, **kwargs)
            raise Crash("after claim")

        monkeypatch.setattr(store, "claim", claim_then_die)
    elif where == "after the gateway accepted, before the outcome is recorded":
        crash_once(monkeypatch, store, "finish_many")
    else:
        real_deliver = sender.deliver

        def deliver_then_die(b):
            real_deliver(b)
            raise Crash("after recording")

        monkeypatch.setattr(sender, "deliver", deliver_then_die)

    # The worker dies; SQS shows the job again after its visibility timeout (6 minutes)
    with pytest.raises(Crash):
        sender.deliver(batch)
    monkeypatch.undo()
    clock.advance(minutes=6)
    services.sender.deliver(batch)

    [message] = pipeline.messages(mailing["id"])
    assert message.status == "sent"
    assert gateway.accepted_ids()[message.message_id] == expected_sends
    # The only double send carries the same message id, so the gateway can deduplicate it
    assert set(gateway.accepted_ids()) == {message.message_id}
    assert_counters_match_records(pipeline, mailing["id"])


def test_fan_out_dying_between_enqueue_and_commit_loses_and_duplicates_nothing(
    api, pipeline, services, clock, gateway, monkeypatch
):
    for n in range(5):
        add_client(api, f"7900000000{n}")
    mailing = create_mailing(api, clock, start=timedelta(minutes=1))
    clock.advance(minutes=1)
    pipeline.sqs.queues[FANOUT_URL].clear()
    # The jobs of the first page reach SQS, then the worker dies before its commit
    import pynamodb.transactions

    crash_once(monkeypatch, pynamodb.transactions.TransactWrite, "__exit__")
    with pytest.raises(Crash):
        services.scheduler.advance(mailing["id"], lambda: 60.0)
    monkeypatch.undo()
    assert pipeline.messages(mailing["id"]) == []
    orphan_jobs = pipeline.sqs.depth(SEND_URL)
    assert orphan_jobs > 0
    # The lease runs out, the next tick redoes the page; the orphan jobs are dropped
    clock.advance(minutes=4)
    pipeline.settle()
    assert len(pipeline.messages(mailing["id"])) == 5
    assert sorted(gateway.accepted_ids().values()) == [1] * 5
    assert_counters_match_records(pipeline, mailing["id"])


@pytest.mark.parametrize(
    "settings", [{"sender_concurrency": 16, "jobs_per_message": 40}], indirect=True
)
# Time stands still, so all 16 threads finish together (one thread's wait for its rate slot
# would move the shared test clock past the others' slots).
@pytest.mark.parametrize("services", [{"wait_until": lambda moment: None}], indirect=True)
def test_counters_stay_exact_when_many_senders_finish_messages_at_once(
    api, pipeline, services, clock, monkeypatch
):
    """Given 40 jobs in one batch and 16 sender threads, when they all finish together, then every
    message is sent and the counters match the records."""
    for n in range(40):
        add_client(api, f"790000000{n:02d}")
    mailing = create_mailing(api, clock)
    pipeline.kicks()
    pipeline.send_once()
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 40})
    assert_counters_match_records(pipeline, mailing["id"])


@pytest.mark.parametrize("settings", [{"fanout_page_size": 10}], indirect=True)
def test_a_mailing_deleted_during_fan_out_stops_it_and_the_others_go_on(
    api, pipeline, services, clock, gateway, monkeypatch
):
    """Given two mailings fanning out in pages of 10, when one is deleted after its first page,
    then it gets no more messages and the other sends to all 30 clients."""
    for n in range(30):
        add_client(api, f"790000000{n:02d}")
    doomed = create_mailing(api, clock, start=timedelta(minutes=1), text="doomed")
    other = create_mailing(api, clock, start=timedelta(minutes=1), text="other")
    clock.advance(minutes=1)
    pipeline.sqs.queues[FANOUT_URL].clear()
    # The doomed mailing is deleted right after its first page is committed (a page commits in
    # one transaction that also moves the mailing's fan-out checkpoint)
    import botocore.client

    original = botocore.client.BaseClient._make_api_call
    state = {"pages": 0}

    def moves_checkpoint_of(params, mailing_id: str) -> bool:
        keys = [part["Update"]["Key"] for part in params["TransactItems"] if "Update" in part]
        return {"mailing_id": {"S": mailing_id}} in keys

    def commit_then_delete(client, operation, params):
        answer = original(client, operation, params)
        if operation == "TransactWriteItems" and moves_checkpoint_of(params, doomed["id"]):
            state["pages"] += 1
            if state["pages"] == 1:
                services.models.Mailing(doomed["id"]).delete()
        return answer

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", commit_then_delete)
    services.scheduler.tick(lambda: 60.0)
    monkeypatch.undo()
    pipeline.settle()

    assert len(pipeline.messages(doomed["id"])) == 10  # nothing after the delete
    assert {s.text for s in gateway.accepted()} == {"other"}
    assert pipeline.statuses(other["id"]) == Counter({"sent": 30})


# ---------------------------------------------------------------- bad data at rest


def raw_table(services, kind: str):
    import boto3

    return boto3.resource("dynamodb").Table(services.settings.table_name(kind))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            {"timezone": "Mars/Olympus_Mons"},
            "client record is corrupt: timezone is missing or unknown",
        ),
        ({"phone": "12345"}, "client record is corrupt: phone is not 7XXXXXXXXXX"),
        # 79000000002 as a 7 then Arabic-Indic digits, as a record written before the API refused
        # them holds it: int() would send it to the gateway as the ASCII number.
        (
            {"phone": "7\u0669\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0662"},
            "client record is corrupt: phone is not 7XXXXXXXXXX",
        ),
        ("remove timezone", "client record is corrupt: timezone is missing or unknown"),
    ],
    ids=[
        "unknown timezone",
        "bad phone",
        "phone of non-ASCII digits",
        "older schema without timezone",
    ],
)
def test_a_corrupt_client_record_fails_its_message_and_spares_the_batch(
    api, pipeline, services, clock, gateway, damage, reason
):
    """Given a client record damaged in storage, when the batch is sent, then its message fails
    with the reason and the other client's is sent."""
    good = add_client(api, "79000000001")
    bad = add_client(api, "79000000002")
    mailing = create_mailing(api, clock)
    table = raw_table(services, "clients")
    if damage == "remove timezone":
        table.update_item(
            Key={"client_id": bad["id"]},
            UpdateExpression="REMOVE #tz",
            ExpressionAttributeNames={"#tz": "timezone"},
        )
    else:
        [(name, value)] = damage.items()
        table.update_item(
            Key={"client_id": bad["id"]},
            UpdateExpression="SET #f = :v",
            ExpressionAttributeNames={"#f": name},
            ExpressionAttributeValues={":v": value},
        )
    pipeline.settle()
    by_client = {m.client_id: m for m in pipeline.messages(mailing["id"])}
    assert by_client[good["id"]].status == "sent"
    assert by_client[bad["id"]].status == "failed"
    assert by_client[bad["id"]].last_error == reason
    assert sent_phones(gateway) == [good["phone"]]
    assert_counters_match_records(pipeline, mailing["id"])


def test_a_corrupt_mailing_record_fails_its_messages_with_the_reason(
    api, pipeline, services, clock, gateway
):
    """Given a mailing record whose text was removed in storage, when its jobs run, then nothing is
    sent and every message fails saying the text is missing."""
    for n in range(3):
        add_client(api, f"7900000000{n}")
    mailing = create_mailing(api, clock)
    pipeline.kicks()
    raw_table(services, "mailings").update_item(
        Key={"mailing_id": mailing["id"]},
        UpdateExpression="REMOVE #t",
        ExpressionAttributeNames={"#t": "text"},
    )
    pipeline.send_once()
    assert gateway.accepted() == []
    assert pipeline.statuses(mailing["id"]) == Counter({"failed": 3})
    assert {m.last_error for m in pipeline.messages(mailing["id"])} == {
        "mailing record is corrupt: text is missing"
    }
    assert_counters_match_records(pipeline, mailing["id"])


def test_an_unreadable_mailing_record_fails_its_messages_without_crashing(
    api, pipeline, services, clock, gateway
):
    """Given a mailing record whose end is not a date, when its job runs, then the message fails as
    unreadable, nothing is sent, and the job is not put back."""
    add_client(api, "79000000001")
    mailing = create_mailing(api, clock)
    pipeline.kicks()
    raw_table(services, "mailings").update_item(
        Key={"mailing_id": mailing["id"]},
        UpdateExpression="SET end_at = :v",
        ExpressionAttributeValues={":v": "not a date"},
    )
    handled = pipeline.send_once()
    assert handled == 1
    assert pipeline.sqs.depth(SEND_URL) == 0  # nothing put back for a retry that cannot help
    [message] = pipeline.messages(mailing["id"])
    assert message.status == "failed"
    assert message.last_error.startswith("mailing record is unreadable")
    assert gateway.accepted() == []


def test_jobs_of_a_deleted_mailing_leave_their_messages_failed_with_the_reason(
    api, pipeline, clock, gateway
):
    """Given a mailing deleted after its fan-out, when its job runs, then nothing is sent and the
    message fails saying the mailing was deleted."""
    add_client(api, "79000000001")
    mailing = create_mailing(api, clock)
    pipeline.kicks()
    api.delete(f"/mailings/{mailing['id']}")
    pipeline.send_once()
    [message] = pipeline.messages(mailing["id"])
    assert message.status == "failed"
    assert message.last_error == "mailing record is missing (the mailing was deleted)"
    assert gateway.accepted() == []


# Claims that outlast five slow claims and then a call and its outcome's write.
@pytest.mark.parametrize("settings", [{"claim_seconds": 10}], indirect=True)
def test_slow_claims_cost_no_trip_through_the_queue(
    api, pipeline, services, clock, gateway, monkeypatch
):
    # Given a batch whose claims are slow: each takes half a second, far longer than the rate
    # slots of a batch (10 ms apart) last; slots are reserved once the claims are done
    for n in range(5):
        add_client(api, f"790000000{n:02d}")
    mailing = create_mailing(api, clock)
    claim = services.messages.claim

    def slow_claim(*args, **kwargs):
        clock.advance(seconds=0.5)
        return claim(*args, **kwargs)

    monkeypatch.setattr(services.messages, "claim", slow_claim)
    # When the batch is delivered once
    pipeline.kicks()
    pipeline.send_once()
    # Then every call went out on its slot instead of a trip back through the queue
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 5})
    assert pipeline.sqs.depth(SEND_URL) == 0
    assert gateway.duplicates() == []
    assert {int(m.attempts) for m in pipeline.messages(mailing["id"])} == {1}


# The defaults: a batch's ten calls under way at once.
@pytest.mark.parametrize("settings", [{"sender_concurrency": 10}], indirect=True)
def test_a_batchs_outcomes_are_written_in_one_transaction(
    api, pipeline, clock, gateway, monkeypatch
):
    # Given ten clients, whose jobs go out in one batch, all called at once
    for n in range(10):
        add_client(api, f"790000001{n:02d}")
    import botocore.client

    original = botocore.client.BaseClient._make_api_call
    outcome_writes: list[int] = []

    def counting(client, operation, params):
        if operation == "TransactWriteItems":
            names = [
                part["Update"]["TableName"] for part in params["TransactItems"] if "Update" in part
            ]
            sent = sum(name.endswith("-messages") for name in names)
            if sent and all("-messages" in n or "-mailings" in n for n in names):
                outcome_writes.append(sent)
        return original(client, operation, params)

    # When the mailing is created and its batch delivered (on a loaded machine the ten calls
    # may take longer than the quarter second an outcome waits for its siblings: the grouping is
    # what is checked here, so it may wait longer; it still writes as soon as none is out)
    import chalicelib.services.delivery as delivery_module

    mailing = create_mailing(api, clock)
    monkeypatch.setattr(delivery_module, "OUTCOME_LINGER_SECONDS", 5.0)
    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", counting)
    pipeline.kicks()
    pipeline.send_once()
    monkeypatch.undo()

    # Then all ten are sent, their outcomes and the counters in one transaction (two write
    # units a transaction item: one counter update for the batch, not one per outcome or two)
    assert pipeline.statuses(mailing["id"]) == Counter({"sent": 10})
    assert outcome_writes == [10]
    assert_counters_match_records(pipeline, mailing["id"])
