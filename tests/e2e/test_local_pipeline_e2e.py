"""The delivery pipeline of the local stack, end to end: HTTP in, SMS out at the sandbox gateway.

One stack serves the module (a scheduler tick every second, a sandbox answering in ~5 ms, retry
backoff from 1 s). What the gateway accepted is read from the sandbox's ledger over HTTP; the
sandbox's address comes from the stack's `SANDBOX <url>` line.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from chalicelib.services.delivery import UNCOMMITTED_RETRY_SECONDS
from tests.support.local_stack import (
    Stack,
    aws_faults_injected,
    messages_with_status,
    running_stack,
)

pytestmark = pytest.mark.e2e

OPERATOR_CODES = ("900", "901", "916", "926")
TIMEZONES = ("Europe/Moscow", "Asia/Vladivostok", "Europe/Kaliningrad", "UTC")
STATUSES = ("pending", "sent", "failed", "expired", "cancelled")
SANDBOX_LATENCY_SECONDS = 0.005
DELIVERY_TIMEOUT_SECONDS = 60
POLL_SECONDS = 0.2
# Three digits of the phone number that tell one test's clients from another's.
_PHONE_BLOCKS = itertools.count(100)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(
        SCHEDULER_INTERVAL_SECONDS="1",
        SANDBOX_LATENCY_MS=str(int(SANDBOX_LATENCY_SECONDS * 1000)),
        # The default 5 s backoff base would make the retry test take minutes.
        RETRY_BASE_SECONDS="1",
    ) as started:
        assert started.sandbox_url, f"no SANDBOX line:\n{started.running.output}"
        yield started


@pytest.fixture
def http(stack: Stack) -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers.update(stack.auth)
        yield session


# ---------------------------------------------------------------- helpers


def create_clients(
    http: requests.Session, url: str, count: int, tags: tuple[str, ...]
) -> list[dict[str, Any]]:
    """`count` clients over every operator code, stepping through `tags`; returned as created."""
    block = next(_PHONE_BLOCKS)
    created = []
    for n in range(count):
        code = OPERATOR_CODES[n % len(OPERATOR_CODES)]
        body = {
            "phone": f"7{code}{block:03d}{n:04d}",
            "tag": tags[(n // len(OPERATOR_CODES)) % len(tags)],
            "timezone": TIMEZONES[n % len(TIMEZONES)],
        }
        response = http.post(f"{url}/clients", json=body, timeout=5)
        assert response.status_code == 201, response.text
        created.append(response.json())
    return created


def create_mailing(
    http: requests.Session, url: str, start_at: datetime, audience: dict[str, list[str]]
) -> dict[str, Any]:
    body = {
        "text": "Spring sale: 20% off until Sunday",
        "start_at": start_at.isoformat(),
        "end_at": (start_at + timedelta(hours=1)).isoformat(),
        "filter": audience,
    }
    response = http.post(f"{url}/mailings", json=body, timeout=5)
    assert response.status_code == 201, response.text
    return response.json()


def stats(http: requests.Session, url: str, mailing_id: str) -> dict[str, Any]:
    response = http.get(f"{url}/mailings/{mailing_id}/stats", params={"limit": 1}, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def wait_until_delivered(
    http: requests.Session, url: str, mailing_id: str, expected: int, timeout: float
) -> dict[str, Any]:
    """The mailing's stats once all `expected` messages exist and none is pending."""
    deadline = time.monotonic() + timeout
    while True:
        current = stats(http, url, mailing_id)
        counts = current["stats"]
        if counts["total"] == expected and counts["pending"] == 0:
            return current
        if time.monotonic() > deadline:
            pytest.fail(f"not delivered within {timeout:g} s: {current}")
        time.sleep(POLL_SECONDS)


def wait_for_status(
    http: requests.Session, url: str, mailing_id: str, status: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while (current := stats(http, url, mailing_id))["status"] != status:
        if time.monotonic() > deadline:
            pytest.fail(f"mailing not {status} within {timeout:g} s: {current}")
        time.sleep(POLL_SECONDS)


def ledger(stack: Stack) -> dict[str, Any]:
    response = requests.get(f"{stack.sandbox_url}/_sandbox/ledger", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def accepted_for(stack: Stack, clients: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ledger's accepted sends to these clients' phones, in the order accepted."""
    phones = {int(client["phone"]) for client in clients}
    return [send for send in ledger(stack)["accepted"] if send["phone"] in phones]


def set_sandbox_profile(stack: Stack, **profile: Any) -> None:
    response = requests.post(f"{stack.sandbox_url}/_sandbox/profile", json=profile, timeout=5)
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------- tests


def test_mailing_reaches_exactly_its_audience_once(
    stack: Stack, http: requests.Session, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given 30 clients over four operator codes and four tags
    run = uuid.uuid4().hex[:6]
    vip, new, regular = f"vip-{run}", f"new-{run}", f"regular-{run}"
    clients = create_clients(http, stack.url, 30, (vip, new, regular, ""))
    audience = {"operator_codes": ["900", "916"], "tags": [vip, new]}
    matching = [
        c for c in clients if c["operator_code"] in ("900", "916") and c["tag"] in (vip, new)
    ]
    assert 0 < len(matching) < len(clients)

    # When a mailing starting now selects those with code 900 or 916 AND tag vip or new
    posted = time.monotonic()
    mailing = create_mailing(http, stack.url, datetime.now(UTC), audience)
    delivered = wait_until_delivered(
        http, stack.url, mailing["id"], len(matching), DELIVERY_TIMEOUT_SECONDS
    )
    elapsed = time.monotonic() - posted

    # Then every matching client got exactly one message and nobody else got any
    assert delivered["stats"]["sent"] == len(matching)
    sends = accepted_for(stack, clients)
    assert Counter(send["phone"] for send in sends) == Counter(
        int(client["phone"]) for client in matching
    )
    # And no message id was accepted twice, and they are the mailing's messages
    assert ledger(stack)["duplicates"] == []
    listed = messages_with_status(http, stack.url, mailing["id"], "sent")
    assert sorted(send["msg_id"] for send in sends) == sorted(m["id"] for m in listed)
    # And the mailing finishes
    wait_for_status(http, stack.url, mailing["id"], "finished", timeout=10)
    with capsys.disabled():
        print(f"\npipeline: {len(matching)} messages from POST to all sent in {elapsed:.2f} s")


def test_mailing_starting_later_sends_nothing_before_its_start(
    stack: Stack, http: requests.Session
) -> None:
    # Given clients and a mailing for them that starts in 3 seconds
    tag = f"later-{uuid.uuid4().hex[:6]}"
    clients = create_clients(http, stack.url, 8, (tag,))
    start_at = datetime.now(UTC) + timedelta(seconds=3)
    mailing = create_mailing(http, stack.url, start_at, {"tags": [tag]})

    # When the start is half a second away, nothing has been sent
    time.sleep(max(0.0, start_at.timestamp() - 0.5 - time.time()))
    assert accepted_for(stack, clients) == []

    # Then everything is sent within a few seconds after the start, none of it before
    wait_until_delivered(http, stack.url, mailing["id"], len(clients), timeout=20)
    sends = accepted_for(stack, clients)
    assert len(sends) == len(clients)
    accepted_at = [send["accepted_at"] for send in sends]
    assert min(accepted_at) >= start_at.timestamp()
    # A job that reaches the sender before its fan-out page commits waits for it once.
    assert max(accepted_at) - start_at.timestamp() < UNCOMMITTED_RETRY_SECONDS + 3


def test_failing_gateway_is_retried_until_all_are_sent_once(
    stack: Stack, http: requests.Session
) -> None:
    # Given a gateway failing 30% of the sends with a 5xx
    set_sandbox_profile(stack, error_rate=0.3, seed=1, latency_seconds=SANDBOX_LATENCY_SECONDS)
    try:
        tag = f"retry-{uuid.uuid4().hex[:6]}"
        clients = create_clients(http, stack.url, 20, (tag,))

        # When a mailing to 20 clients runs
        mailing = create_mailing(http, stack.url, datetime.now(UTC), {"tags": [tag]})
        delivered = wait_until_delivered(
            http, stack.url, mailing["id"], len(clients), DELIVERY_TIMEOUT_SECONDS
        )
    finally:
        set_sandbox_profile(stack, latency_seconds=SANDBOX_LATENCY_SECONDS)

    # Then every client ends `sent`, each exactly once at the gateway
    assert delivered["stats"]["sent"] == len(clients)
    sends = accepted_for(stack, clients)
    assert sorted(send["phone"] for send in sends) == sorted(int(c["phone"]) for c in clients)
    assert len({send["msg_id"] for send in sends}) == len(sends)
    # And the gateway did fail some of them, so retries happened
    msg_ids = {send["msg_id"] for send in sends}
    failures = [
        r for r in ledger(stack)["requests"] if r["msg_id"] in msg_ids and r["outcome"] == "5xx"
    ]
    assert failures
    # And the counters equal the messages listed under each status
    listed = {
        status: len(messages_with_status(http, stack.url, mailing["id"], status))
        for status in STATUSES
    }
    counts = stats(http, stack.url, mailing["id"])["stats"]
    assert listed == {status: counts[status] for status in STATUSES}
    assert counts["total"] == sum(listed.values()) == len(clients)


def test_aws_faults_the_sdk_absorbs_leave_every_message_sent_once() -> None:
    # Given a stack whose service's DynamoDB calls are throttled now and then (with seed 7,
    # the 9th attempt is the first throttled: any mailing makes more)
    faults = "throttle=0.05,seed=7"
    with running_stack(
        SCHEDULER_INTERVAL_SECONDS="1", RETRY_BASE_SECONDS="1", AWS_FAULTS=faults
    ) as faulty:
        assert f"faults: {faults})" in faulty.running.output
        with requests.Session() as http:
            http.headers.update(faulty.auth)
            tag = f"faults-{uuid.uuid4().hex[:6]}"
            clients = create_clients(http, faulty.url, 12, (tag,))

            # When a mailing to them starts now
            mailing = create_mailing(http, faulty.url, datetime.now(UTC), {"tags": [tag]})
            delivered = wait_until_delivered(
                http, faulty.url, mailing["id"], len(clients), DELIVERY_TIMEOUT_SECONDS
            )

            # Then every client got exactly one message
            assert delivered["stats"]["sent"] == len(clients)
            sends = accepted_for(faulty, clients)
            assert sorted(send["phone"] for send in sends) == sorted(
                int(client["phone"]) for client in clients
            )
            assert ledger(faulty)["duplicates"] == []

    # And faults were injected, as the stack reports when it stops
    assert aws_faults_injected(faulty).get("throttle", 0) > 0
