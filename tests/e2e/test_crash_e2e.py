"""Crash suite: the worker process is SIGKILLed mid fan-out and mid sending, then restarted.

The local stack runs the API, the scheduler tick, the fan-out worker and the sender in one
process; the AWS emulator and the sandbox gateway run in processes of their own
(tests/support/crash.py), so tables, queues and the gateway's ledger outlive the kill. After the
restart the mailing must complete with the invariants of docs/delivery.md, "Exactly once":

- every matching client has exactly one message record, and nobody else has one;
- every message ends in exactly one terminal state (here `sent`: the gateway is fault-free);
- the counters equal the messages listed under each status;
- the gateway accepted each message id once, except the documented window: the sender died after
  the gateway accepted a message and before its outcome was written. Such an id is accepted
  twice, once before the kill and once after the restart (when its SQS job comes back after the
  visibility timeout), and there are at most as many as the jobs a sender can hold in flight;
- the mailing ends `finished`.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter

from tests.support.crash import GATEWAY_TOKEN, RestartableStack, emulator, sandbox_gateway
from tests.support.local_stack import messages_with_status

pytestmark = pytest.mark.e2e

CLIENTS = 3_000
IN_FLIGHT_SLACK_SECONDS = 0.25
OPERATOR_CODES = ("900", "901", "916", "926")
TAG_NAMES = ("north", "south", "east", "west")
STATUSES = ("pending", "sent", "failed", "expired", "cancelled")
TERMINAL_STATUSES = ("sent", "failed", "expired", "cancelled")
# A sender holds at most SENDER_POLLERS batches of SENDER_BATCH_SIZE SQS messages, each of
# JOBS_PER_MESSAGE jobs: the most messages a kill can catch between the gateway and the outcome.
SENDER_POLLERS = 2
SENDER_BATCH_SIZE = 10
JOBS_PER_MESSAGE = 10
IN_FLIGHT_JOBS = SENDER_POLLERS * SENDER_BATCH_SIZE * JOBS_PER_MESSAGE
# A job in flight when the worker dies comes back after this (the least SQS allows for a
# sender whose timeout is 60 s) ...
SEND_VISIBILITY_TIMEOUT_SECONDS = 60
# ... and finds its claim lapsed (it must outlast the gateway's connect + read timeouts) ...
CLAIM_SECONDS = 20
# ... while the dead fan-out worker's lease lapses after this, and the restarted tick goes on.
LEASE_SECONDS = 10
SANDBOX_LATENCY_SECONDS = 0.05
# What the sender logs when it drops a job whose message id does not exist.
STALE_JOB_LOG = "job for a message that does not exist; dropped"
CREATE_WORKERS = 16
CREATE_ATTEMPTS = 3
POLL_SECONDS = 0.1
KILL_TIMEOUT_SECONDS = 60
# Generous: under `make test` another end-to-end suite shares the two CPUs with this one.
FINISH_TIMEOUT_SECONDS = SEND_VISIBILITY_TIMEOUT_SECONDS + 180
# A call the gateway received before the kill may be answered (and accepted) this much later.
ANSWER_SLACK_SECONDS = SANDBOX_LATENCY_SECONDS + 1.0


@dataclass
class CrashWorld:
    """One emulator and one sandbox gateway for the module, a stack to kill, its clients."""

    stack: RestartableStack
    sandbox_url: str
    clients: list[dict[str, Any]]
    tags: tuple[str, ...]


@pytest.fixture(scope="module")
def world() -> Iterator[CrashWorld]:
    with emulator() as aws_endpoint, sandbox_gateway() as sandbox_url:
        stack = RestartableStack(
            AWS_ENDPOINT_URL=aws_endpoint,
            TABLE_PREFIX=f"crash-{uuid.uuid4().hex[:8]}",
            SENDER_API_URL=sandbox_url,
            SENDER_API_TOKEN=GATEWAY_TOKEN,
            SEND_VISIBILITY_TIMEOUT_SECONDS=str(SEND_VISIBILITY_TIMEOUT_SECONDS),
            CLAIM_SECONDS=str(CLAIM_SECONDS),
            LEASE_SECONDS=str(LEASE_SECONDS),
            SENDER_POLLERS=str(SENDER_POLLERS),
            SENDER_BATCH_SIZE=str(SENDER_BATCH_SIZE),
            JOBS_PER_MESSAGE=str(JOBS_PER_MESSAGE),
            SCHEDULER_INTERVAL_SECONDS="1",
        )
        try:
            incarnation = stack.start()
            tags = tuple(f"{name}-{uuid.uuid4().hex[:6]}" for name in TAG_NAMES)
            started = time.monotonic()
            clients = create_clients(stack, tags)
            print(
                f"\ncrash suite: stack ready in {incarnation.startup_seconds:.1f} s; "
                f"{len(clients)} clients created in {time.monotonic() - started:.1f} s"
            )
            yield CrashWorld(stack, sandbox_url, clients, tags)
            stack.stop()
        finally:
            stack.close()


# ---------------------------------------------------------------- helpers


def session(stack: RestartableStack) -> requests.Session:
    http = requests.Session()
    http.headers.update(stack.auth)
    return http


def create_clients(stack: RestartableStack, tags: tuple[str, ...]) -> list[dict[str, Any]]:
    """CLIENTS clients over every operator code, stepping through `tags`; as listed by tag.

    Created concurrently over a few kept-alive connections. A POST whose connection broke is
    sent again: a 409 for its phone then means the first one was created.
    """

    def create(n: int) -> None:
        body = {
            "phone": f"7{OPERATOR_CODES[n % len(OPERATOR_CODES)]}{n:07d}",
            "tag": tags[(n // len(OPERATOR_CODES)) % len(tags)],
        }
        for attempt in range(CREATE_ATTEMPTS):
            try:
                response = http.post(f"{stack.url}/clients", json=body, timeout=10)
            except requests.ConnectionError:
                if attempt + 1 == CREATE_ATTEMPTS:
                    raise
                time.sleep(0.5)
                continue
            assert response.status_code == 201 or (attempt and response.status_code == 409), (
                response.text
            )
            return

    with session(stack) as http, ThreadPoolExecutor(CREATE_WORKERS) as pool:
        http.mount("http://", HTTPAdapter(pool_maxsize=CREATE_WORKERS, pool_block=True))
        list(pool.map(create, range(CLIENTS)))
        clients = [client for tag in tags for client in list_clients(http, stack.url, tag)]
    assert len(clients) == CLIENTS
    return clients


def list_clients(http: requests.Session, url: str, tag: str) -> list[dict[str, Any]]:
    clients: list[dict[str, Any]] = []
    params: dict[str, Any] = {"tag": tag, "limit": 500}
    while True:
        response = http.get(f"{url}/clients", params=params, timeout=10)
        assert response.status_code == 200, response.text
        page = response.json()
        clients += page["items"]
        if not page["next_cursor"]:
            return clients
        params["cursor"] = page["next_cursor"]


def create_mailing(http: requests.Session, url: str, tags: list[str]) -> dict[str, Any]:
    start_at = datetime.now(UTC)
    body = {
        "text": "Spring sale: 20% off until Sunday",
        "start_at": start_at.isoformat(),
        "end_at": (start_at + timedelta(hours=1)).isoformat(),
        "filter": {"tags": tags},
    }
    response = http.post(f"{url}/mailings", json=body, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def stats(http: requests.Session, url: str, mailing_id: str) -> dict[str, Any]:
    response = http.get(f"{url}/mailings/{mailing_id}/stats", params={"limit": 1}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(
    http: requests.Session,
    url: str,
    mailing_id: str,
    wanted: Callable[[dict[str, Any]], bool],
    too_late: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float,
) -> dict[str, Any]:
    """The mailing's stats once `wanted`; fails if `too_late` comes first or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        current = stats(http, url, mailing_id)
        if wanted(current):
            return current
        if too_late(current):
            pytest.fail(f"the moment to {what} passed unseen: {current}")
        if time.monotonic() > deadline:
            pytest.fail(f"no moment to {what} within {timeout:g} s: {current}")
        time.sleep(POLL_SECONDS)


def wait_until_finished(http: requests.Session, url: str, mailing_id: str) -> dict[str, Any]:
    return wait_for(
        http,
        url,
        mailing_id,
        lambda s: s["status"] == "finished",
        lambda s: s["status"] not in ("scheduled", "running", "finished"),
        "see it finished",
        FINISH_TIMEOUT_SECONDS,
    )


def reset_sandbox(world: CrashWorld, latency_seconds: float) -> None:
    """A fault-free gateway answering after `latency_seconds`, with an empty ledger."""
    profile = {"latency_seconds": latency_seconds}
    response = requests.post(f"{world.sandbox_url}/_sandbox/profile", json=profile, timeout=5)
    assert response.status_code == 200, response.text
    response = requests.post(f"{world.sandbox_url}/_sandbox/reset", timeout=5)
    assert response.status_code == 200, response.text


def ledger(world: CrashWorld) -> dict[str, Any]:
    response = requests.get(f"{world.sandbox_url}/_sandbox/ledger", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_a_call_in_flight(world: CrashWorld, expected: int) -> None:
    """Return while the gateway holds a call it received and has not answered yet."""
    deadline = time.monotonic() + KILL_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        book = ledger(world)
        if len(book["accepted"]) >= expected:
            break
        received = sum(request["outcome"] == "ok" for request in book["requests"])
        if received > len(book["accepted"]):
            return
    pytest.fail("the moment to kill while a gateway call is in flight passed unseen")


def matching_clients(world: CrashWorld, tags: list[str]) -> set[str]:
    return {client["id"] for client in world.clients if client["tag"] in tags}


@dataclass
class Crash:
    """One SIGKILL of the worker and its restart, in wall-clock time (as the ledger has it)."""

    killed_at: float
    restarted_at: float
    restart_seconds: float
    seen_before: dict[str, int]
    seen_after: dict[str, int]


def kill_and_restart(world: CrashWorld, mailing_id: str, before: dict[str, Any]) -> Crash:
    killed_at = world.stack.kill()
    incarnation = world.stack.start()
    with session(world.stack) as http:
        after = stats(http, incarnation.url, mailing_id)
    return Crash(
        killed_at,
        incarnation.started_at,
        incarnation.startup_seconds,
        before["stats"],
        after["stats"],
    )


def assert_completed_exactly_once(
    world: CrashWorld, mailing_id: str, matching: set[str], crash: Crash
) -> dict[str, Any]:
    """Check the crash suite's invariants on a finished mailing; the figures behind them."""
    url = world.stack.url
    expected = len(matching)
    with session(world.stack) as http:
        counts = stats(http, url, mailing_id)["stats"]
        listed = {
            status: messages_with_status(http, url, mailing_id, status) for status in STATUSES
        }

    # Every matching client has exactly one message record, and nobody else has one.
    every_message = [message for messages in listed.values() for message in messages]
    per_client = Counter(message["client_id"] for message in every_message)
    assert set(per_client) == matching, "messages for the wrong clients"
    assert max(per_client.values()) == 1, {c: n for c, n in per_client.items() if n > 1}
    assert counts["total"] == expected
    # Every message is listed under exactly one status, a terminal one: all sent, no fault.
    per_id = Counter(message["id"] for message in every_message)
    assert max(per_id.values()) == 1, {i: n for i, n in per_id.items() if n > 1}
    assert all(message["status"] == status for status in STATUSES for message in listed[status])
    assert {message["status"] for message in every_message} <= set(TERMINAL_STATUSES)
    assert len(listed["sent"]) == expected, {s: len(m) for s, m in listed.items()}
    # The counters equal the messages listed under each status.
    assert {status: counts[status] for status in STATUSES} == {
        status: len(messages) for status, messages in listed.items()
    }

    # The gateway accepted exactly this mailing's messages ...
    book = ledger(world)
    accepted = Counter(send["msg_id"] for send in book["accepted"])
    assert set(accepted) == set(per_id), "accepted ids differ from the mailing's message ids"
    # ... each once, but for those caught between the gateway and the outcome by the kill:
    # accepted twice, the first call received before the kill, the second after the restart.
    duplicates = sorted(msg_id for msg_id, times in accepted.items() if times > 1)
    assert all(accepted[msg_id] == 2 for msg_id in duplicates), {
        msg_id: accepted[msg_id] for msg_id in duplicates
    }
    assert len(duplicates) <= IN_FLIGHT_JOBS
    calls: dict[int, list[float]] = {msg_id: [] for msg_id in duplicates}
    for request in book["requests"]:
        if request["msg_id"] in calls and request["outcome"] == "ok":
            calls[request["msg_id"]].append(request["received_at"])
    acceptances: dict[int, list[float]] = {msg_id: [] for msg_id in duplicates}
    for send in book["accepted"]:
        if send["msg_id"] in acceptances:
            acceptances[send["msg_id"]].append(send["accepted_at"])
    for msg_id in duplicates:
        first, second = sorted(calls[msg_id])
        first_accepted, second_accepted = sorted(acceptances[msg_id])
        straddle = {
            "msg_id": msg_id,
            "calls_received": (first, second),
            "accepted": (first_accepted, second_accepted),
            "killed_at": crash.killed_at,
            "restarted_at": crash.restarted_at,
        }
        # A call the stack sent just before it died can reach the gateway a moment after the
        # kill was recorded (the request is already on the wire): allow that much, no more.
        assert first < crash.killed_at + IN_FLIGHT_SLACK_SECONDS, straddle
        assert crash.killed_at <= crash.restarted_at <= second, straddle
        assert first_accepted < crash.killed_at + ANSWER_SLACK_SECONDS, straddle
        assert second_accepted >= crash.restarted_at, straddle
    # Calls the gateway received before the kill and answered after it: the sender never saw
    # their answer, so they are the ones sent again.
    first_accepted_at = {}
    for send in book["accepted"]:
        first_accepted_at.setdefault(send["msg_id"], send["accepted_at"])
    in_flight = sorted(
        request["msg_id"]
        for request in book["requests"]
        if request["outcome"] == "ok"
        and request["received_at"] < crash.killed_at
        and first_accepted_at.get(request["msg_id"], 0.0) >= crash.killed_at
    )
    # Jobs of a fan-out page the kill kept from committing name ids that never became messages.
    restarted = world.stack.current
    stale_jobs = restarted.running.output.count(STALE_JOB_LOG) if restarted else 0
    return {
        "counts": counts,
        "duplicates": duplicates,
        "in_flight": in_flight,
        "stale_jobs": stale_jobs,
        "gateway_requests": sum(book["counts"].values()),
        "accepted": sum(accepted.values()),
    }


def report(
    name: str,
    figures: dict[str, Any],
    crash: Crash,
    kill_after: float,
    finished_after: float,
    posted: float,
) -> str:
    """What a crash test checked and measured; `posted` is when its mailing was created
    (monotonic clock)."""
    timings = {
        "killed after POST": kill_after,
        "restart": crash.restart_seconds,
        "finished after the kill": finished_after,
        "test": time.monotonic() - posted,
    }
    counts = figures["counts"]
    duplicates = figures["duplicates"]
    return (
        f"{name}: expected {counts['total']} messages; "
        + ", ".join(f"{s} {counts[s]}" for s in STATUSES)
        + f"\n  seen before the kill: {crash.seen_before}"
        + f"\n  seen after the restart: {crash.seen_after}"
        + f"\n  gateway: {figures['gateway_requests']} calls, {figures['accepted']} accepted, "
        f"{len(duplicates)} ids accepted twice (bound {IN_FLIGHT_JOBS}): {duplicates}; "
        f"calls in flight at the kill: {figures['in_flight']}; "
        f"stale jobs dropped after the restart: {figures['stale_jobs']}"
        + "\n  timings: "
        + ", ".join(f"{label} {seconds:.1f} s" for label, seconds in timings.items())
    )


# ---------------------------------------------------------------- tests


def test_worker_killed_in_the_middle_of_fan_out_completes_the_mailing_once(
    world: CrashWorld, invariants: Callable[[str], None]
) -> None:
    # Given 3,000 clients and a mailing to two tags of four (about 1,500 of them)
    stack = world.stack
    stack.ensure_running()
    reset_sandbox(world, latency_seconds=0.0)
    tags = list(world.tags[:2])
    matching = matching_clients(world, tags)
    expected = len(matching)
    assert 0 < expected < len(world.clients)

    # When the mailing starts and the worker is SIGKILLed once a third of the fan-out committed
    posted = time.monotonic()
    with session(stack) as http:
        mailing = create_mailing(http, stack.url, tags)
        before = wait_for(
            http,
            stack.url,
            mailing["id"],
            lambda s: expected // 3 <= s["stats"]["total"] < expected,
            lambda s: s["stats"]["total"] >= expected,
            "kill in the middle of fan-out",
            KILL_TIMEOUT_SECONDS,
        )
    kill_after = time.monotonic() - posted
    crash = kill_and_restart(world, mailing["id"], before)
    # (The kill did cut the fan-out short: the restarted stack finds it unfinished.)
    assert crash.seen_after["total"] < expected, crash

    # Then the restarted stack finishes the mailing
    with session(stack) as http:
        wait_until_finished(http, stack.url, mailing["id"])
    finished_after = time.time() - crash.killed_at
    # And every matching client got one message, sent once (twice only in the documented window)
    figures = assert_completed_exactly_once(world, mailing["id"], matching, crash)
    invariants(report("crash mid fan-out", figures, crash, kill_after, finished_after, posted))


def test_worker_killed_in_the_middle_of_sending_completes_the_mailing_once(
    world: CrashWorld, invariants: Callable[[str], None]
) -> None:
    # Given a gateway answering in 50 ms and a mailing to another tag (about 750 clients)
    stack = world.stack
    stack.ensure_running()
    reset_sandbox(world, latency_seconds=SANDBOX_LATENCY_SECONDS)
    tags = [world.tags[2]]
    matching = matching_clients(world, tags)
    expected = len(matching)
    assert 0 < expected < len(world.clients)

    # When every message exists, some are sent and a gateway call is in flight, the worker is
    # SIGKILLed
    posted = time.monotonic()
    with session(stack) as http:
        mailing = create_mailing(http, stack.url, tags)
        before = wait_for(
            http,
            stack.url,
            mailing["id"],
            lambda s: s["stats"]["total"] == expected and 0 < s["stats"]["sent"] < expected,
            lambda s: s["stats"]["sent"] >= expected,
            "kill in the middle of sending",
            KILL_TIMEOUT_SECONDS,
        )
    wait_for_a_call_in_flight(world, expected)
    kill_after = time.monotonic() - posted
    crash = kill_and_restart(world, mailing["id"], before)
    # (The kill did cut the sending short: the restarted stack finds messages pending.)
    assert crash.seen_after["pending"] > 0, crash

    # Then the restarted stack finishes the mailing
    with session(stack) as http:
        wait_until_finished(http, stack.url, mailing["id"])
    finished_after = time.time() - crash.killed_at
    # And every matching client got one message, sent once (twice only in the documented window)
    figures = assert_completed_exactly_once(world, mailing["id"], matching, crash)
    invariants(report("crash mid sending", figures, crash, kill_after, finished_after, posted))
