"""The sandbox SMS gateway: the real gateway's API on loopback, faults on demand, a ledger."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from devstack.gateway import FaultProfile, SandboxGateway

TOKEN = "gateway-token-0123456789"
PHONE = 79_001_234_567
OK = {"code": 0, "message": "OK"}

StartGateway = Callable[..., SandboxGateway]


class FakeMonotonic:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def start_gateway() -> Iterator[StartGateway]:
    started: list[SandboxGateway] = []

    def start(profile: FaultProfile | None = None, **kwargs: Any) -> SandboxGateway:
        gateway = SandboxGateway(TOKEN, profile, **kwargs)
        gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def gateway(start_gateway: StartGateway) -> SandboxGateway:
    return start_gateway()


def send(
    gateway: SandboxGateway,
    msg_id: int = 1,
    phone: Any = PHONE,
    text: Any = "Hello",
    token: str = TOKEN,
    timeout: float = 2.0,
) -> requests.Response:
    return requests.post(
        f"{gateway.url}/v1/send/{msg_id}",
        json={"id": msg_id, "phone": phone, "text": text},
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout,
    )


def is_success(response: requests.Response) -> bool:
    """The service's rule: HTTP 200 with a JSON body whose code is 0."""
    if response.status_code != 200:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("code") == 0


# ---------------------------------------------------------------- the happy path


def test_a_valid_send_is_answered_ok_and_recorded(gateway: SandboxGateway) -> None:
    # Given a sandbox with no faults
    before = time.time()

    # When a valid message is sent
    response = send(gateway, msg_id=42, text="Sale today")

    # Then it is answered like the real gateway and the ledger holds it
    assert response.status_code == 200
    assert response.json() == OK
    [record] = gateway.accepted()
    assert (record.msg_id, record.phone, record.text) == (42, PHONE, "Sale today")
    assert before <= record.accepted_at <= time.time()
    assert gateway.counts()["ok"] == 1


def test_the_url_is_loopback_without_the_version_prefix(gateway: SandboxGateway) -> None:
    # Given a started sandbox, Then its base URL is loopback with the bound port and no /v1
    assert gateway.url == f"http://127.0.0.1:{gateway.port}"
    assert gateway.port > 0
    assert gateway.is_alive()


# ---------------------------------------------------------------- strict validation


@pytest.mark.parametrize(
    "authorization",
    [None, f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", TOKEN],
    ids=["missing", "wrong-token", "empty-token", "wrong-scheme", "no-scheme"],
)
def test_a_missing_or_wrong_token_gets_401(
    gateway: SandboxGateway, authorization: str | None
) -> None:
    # Given a request without the right bearer token
    headers = {"Authorization": authorization} if authorization else {}

    # When it is sent
    response = requests.post(
        f"{gateway.url}/v1/send/1",
        json={"id": 1, "phone": PHONE, "text": "Hello"},
        headers=headers,
        timeout=2,
    )

    # Then it is refused as unauthorized and nothing is accepted
    assert response.status_code == 401
    assert response.json()["code"] != 0
    assert gateway.accepted() == []
    assert gateway.counts()["401"] == 1


_VALID = {"id": 7, "phone": PHONE, "text": "Hello"}


@pytest.mark.parametrize(
    ("path_id", "body", "content_type"),
    [
        ("abc", _VALID, None),
        ("7.0", _VALID, None),
        ("99999999999999999999", _VALID, None),
        ("7", {**_VALID, "id": 8}, None),
        ("7", {**_VALID, "id": "7"}, None),
        ("7", {**_VALID, "phone": "79001234567"}, None),
        ("7", {**_VALID, "phone": 89001234567}, None),
        ("7", {**_VALID, "phone": 7900123456}, None),
        ("7", {**_VALID, "phone": 79001234567.0}, None),
        ("7", {**_VALID, "phone": True}, None),
        ("7", {**_VALID, "text": ""}, None),
        ("7", {**_VALID, "text": "   "}, None),
        ("7", {**_VALID, "text": 5}, None),
        ("7", {"id": 7, "phone": PHONE}, None),
        ("7", {**_VALID, "priority": "high"}, None),
        ("7", [_VALID], None),
        ("7", b'{"id": 7, "phone": 79001234567, "text": "Hi"', None),
        ("7", b'{"id": 7, "phone": 79001234567, "text": "Hi"} garbage', None),
        ("7", b'{"id": 7, "id": 7, "phone": 79001234567, "text": "Hi"}', None),
        ("7", b"", None),
        ("7", _VALID, "text/plain"),
    ],
    ids=[
        "path-id-not-a-number",
        "path-id-fraction",
        "path-id-beyond-int64",
        "id-differs-from-path",
        "id-as-string",
        "phone-as-string",
        "phone-not-starting-with-7",
        "phone-too-short",
        "phone-as-float",
        "phone-as-bool",
        "text-empty",
        "text-blank",
        "text-not-a-string",
        "text-missing",
        "extra-field",
        "body-not-an-object",
        "invalid-json",
        "trailing-garbage",
        "duplicate-key",
        "empty-body",
        "not-json-content-type",
    ],
)
def test_each_invalid_request_gets_400_with_a_json_reason(
    gateway: SandboxGateway, path_id: str, body: Any, content_type: str | None
) -> None:
    # Given a request the real gateway would reject
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": content_type or "application/json",
    }

    # When it is sent
    response = requests.post(
        f"{gateway.url}/v1/send/{path_id}", data=data, headers=headers, timeout=2
    )

    # Then it is rejected with a JSON reason and not accepted
    assert response.status_code == 400
    reply = response.json()
    assert reply["code"] != 0
    assert reply["message"]
    assert gateway.accepted() == []


def test_unknown_paths_get_404_and_other_methods_405(gateway: SandboxGateway) -> None:
    # Given a sandbox, When a caller strays from POST /v1/send/{msgId}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    unknown = requests.post(f"{gateway.url}/v2/send/1", json=_VALID, headers=auth, timeout=2)
    nested = requests.post(f"{gateway.url}/v1/send/1/x", json=_VALID, headers=auth, timeout=2)
    wrong_method = requests.get(f"{gateway.url}/v1/send/1", headers=auth, timeout=2)

    # Then unknown paths are not found and the send resource only allows POST
    assert (unknown.status_code, nested.status_code) == (404, 404)
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "POST"
    assert gateway.accepted() == []


def test_a_rejected_subscriber_gets_400_and_is_not_accepted(
    start_gateway: StartGateway,
) -> None:
    # Given a sandbox that rejects phones ending in 13
    gateway = start_gateway(FaultProfile(reject_phone_suffixes=("13",)))

    # When one rejected and one ordinary subscriber are sent to
    rejected = send(gateway, msg_id=1, phone=79_000_000_013)
    ordinary = send(gateway, msg_id=2, phone=79_000_000_014)

    # Then only the ordinary one is accepted
    assert rejected.status_code == 400
    assert rejected.json() == {"code": 1, "message": "subscriber rejected"}
    assert ordinary.json() == OK
    assert [record.msg_id for record in gateway.accepted()] == [2]


def test_the_sandbox_binds_loopback_only_unless_told_otherwise() -> None:
    # Given a non-loopback address, When a sandbox is built on it, Then it refuses
    with pytest.raises(ValueError, match="allow_remote"):
        SandboxGateway(TOKEN, host="0.0.0.0")
    # ... and when remote binding is allowed explicitly, local callers still use loopback
    remote = SandboxGateway(TOKEN, host="0.0.0.0", port=8123, allow_remote=True)
    assert remote.url == "http://127.0.0.1:8123"


# ---------------------------------------------------------------- faults


def test_an_error_rate_of_one_always_answers_5xx(start_gateway: StartGateway) -> None:
    # Given a sandbox that fails every request
    gateway = start_gateway(FaultProfile(error_rate=1.0, seed=3))

    # When ten messages are sent
    statuses = [send(gateway, msg_id=i).status_code for i in range(10)]

    # Then every answer is a server error and nothing is accepted
    assert set(statuses) <= {500, 502, 503, 504}
    assert gateway.accepted() == []
    assert gateway.counts()["5xx"] == 10


def test_a_malformed_rate_of_one_answers_200s_that_are_not_a_success(
    start_gateway: StartGateway,
) -> None:
    # Given a sandbox whose every answer is malformed
    gateway = start_gateway(FaultProfile(malformed_rate=1.0, seed=5))

    # When twelve messages are sent
    responses = [send(gateway, msg_id=i) for i in range(12)]

    # Then each is HTTP 200 yet not a success by the "JSON body with code 0" rule
    assert all(response.status_code == 200 for response in responses)
    assert not any(is_success(response) for response in responses)
    assert gateway.accepted() == []
    assert gateway.counts()["malformed"] == 12


def test_a_rate_limited_request_gets_429_with_retry_after(start_gateway: StartGateway) -> None:
    # Given a sandbox that rate-limits every request
    gateway = start_gateway(FaultProfile(rate_limit_rate=1.0, retry_after_seconds=2))

    # When a message is sent
    response = send(gateway)

    # Then it is told to come back later
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2"
    assert gateway.accepted() == []


def test_latency_delays_the_answer(start_gateway: StartGateway) -> None:
    # Given a sandbox with 0.15 s of latency
    gateway = start_gateway(FaultProfile(latency_seconds=0.15))

    # When a message is sent
    started = time.monotonic()
    response = send(gateway)

    # Then the answer is OK but takes at least that long
    assert response.json() == OK
    assert time.monotonic() - started >= 0.15


def test_a_slow_answer_exceeds_the_client_timeout_yet_is_accepted(
    start_gateway: StartGateway,
) -> None:
    # Given a sandbox that answers every request after 0.4 s
    gateway = start_gateway(FaultProfile(slow_rate=1.0, slow_seconds=0.4))
    sent_at = time.time()

    # When a client with a 0.2 s read timeout sends a message
    with pytest.raises(requests.ReadTimeout):
        send(gateway, msg_id=9, timeout=0.2)

    # Then the gateway still accepts it, when it answers
    [record] = gateway.wait_for_accepted(1, timeout=2.0)
    assert record.msg_id == 9
    assert record.accepted_at >= sent_at + 0.4
    assert gateway.counts()["slow"] == 1


def test_an_outage_answers_503_for_its_duration_then_recovers() -> None:
    # Given a sandbox started with a 0.3 s outage on a hand-moved clock
    clock = FakeMonotonic()
    gateway = SandboxGateway(TOKEN, FaultProfile(outage_seconds=0.3), clock=clock)
    gateway.start()
    try:
        # When messages are sent during the outage and after it
        during = send(gateway, msg_id=1)
        clock.advance(0.29)
        still = send(gateway, msg_id=2)
        clock.advance(0.02)
        after = send(gateway, msg_id=3)
    finally:
        gateway.stop()

    # Then the outage answers 503 and the gateway recovers when it ends
    assert (during.status_code, still.status_code) == (503, 503)
    assert after.json() == OK
    assert [record.msg_id for record in gateway.accepted()] == [3]
    assert gateway.counts()["outage"] == 2


def test_a_refusing_outage_closes_connections_then_recovers() -> None:
    # Given a running sandbox on a hand-moved clock
    clock = FakeMonotonic()
    gateway = SandboxGateway(TOKEN, clock=clock)
    gateway.start()
    try:
        # When a refusing outage starts and a message is sent during it and after it
        gateway.start_outage(0.3, mode="refuse")
        with pytest.raises(requests.ConnectionError):
            send(gateway, msg_id=1)
        clock.advance(0.3)
        after = send(gateway, msg_id=2)
    finally:
        gateway.stop()

    # Then the caller sees a dropped connection, then an OK
    assert after.json() == OK
    assert [record.msg_id for record in gateway.accepted()] == [2]


def test_a_seed_replays_the_same_sequence_of_outcomes(start_gateway: StartGateway) -> None:
    # Given two sandboxes with the same mixed faults and seed
    profile = FaultProfile(error_rate=0.3, malformed_rate=0.2, rate_limit_rate=0.2, seed=1234)
    first, second = start_gateway(profile), start_gateway(profile)

    # When the same twenty messages are sent to each
    def story(gateway: SandboxGateway) -> list[tuple[int, bytes]]:
        return [(r.status_code, r.content) for r in (send(gateway, i) for i in range(20))]

    # Then both tell the same, varied, story
    told = story(first)
    assert told == story(second)
    assert len({status for status, _ in told}) >= 3


def test_a_profile_changes_at_runtime(gateway: SandboxGateway) -> None:
    # Given a healthy sandbox that accepted one message
    assert send(gateway, msg_id=1).json() == OK

    # When every request is made to fail, and later healed
    gateway.set_profile(FaultProfile(error_rate=1.0))
    failing = send(gateway, msg_id=2)
    gateway.set_profile(FaultProfile())
    healed = send(gateway, msg_id=3)

    # Then the faults follow the profile in force
    assert failing.status_code >= 500
    assert healed.json() == OK
    assert [record.msg_id for record in gateway.accepted()] == [1, 3]


# ---------------------------------------------------------------- the ledger


def test_an_id_accepted_twice_is_reported_as_a_duplicate(gateway: SandboxGateway) -> None:
    # Given message 5 sent twice and message 6 once
    for msg_id in (5, 6, 5):
        send(gateway, msg_id=msg_id)

    # Then the ledger keeps every acceptance and names the duplicate
    assert [record.msg_id for record in gateway.accepted()] == [5, 6, 5]
    assert gateway.accepted_ids() == {5: 2, 6: 1}
    assert gateway.duplicates() == [5]


def test_every_request_is_kept_with_its_receive_time_and_outcome(
    gateway: SandboxGateway,
) -> None:
    # Given one accepted and one unauthorized request
    send(gateway, msg_id=1)
    send(gateway, msg_id=2, token="wrong-token-0123456789")

    # Then both requests are listed in order with their outcome
    assert [(r.msg_id, r.outcome) for r in gateway.requests()] == [(1, "ok"), (2, "401")]
    first, second = gateway.requests()
    assert first.received_at <= second.received_at


def test_the_http_ledger_returns_the_same_data(gateway: SandboxGateway) -> None:
    # Given two accepted sends of one id and a refused one
    send(gateway, msg_id=8)
    send(gateway, msg_id=8)
    send(gateway, msg_id=9, token="wrong-token-0123456789")

    # When an out-of-process test reads the ledger over HTTP (no token)
    ledger = requests.get(f"{gateway.url}/_sandbox/ledger", timeout=2).json()

    # Then it matches the in-process view
    assert ledger["accepted"] == [dataclasses.asdict(r) for r in gateway.accepted()]
    assert ledger["duplicates"] == gateway.duplicates() == [8]
    assert {k: v for k, v in ledger["counts"].items() if v} == dict(gateway.counts())
    assert ledger["counts"]["5xx"] == 0
    assert ledger["requests"] == [dataclasses.asdict(r) for r in gateway.requests()]


def test_faults_and_reset_work_over_http(gateway: SandboxGateway) -> None:
    # Given a sandbox with one accepted send
    send(gateway, msg_id=1)

    # When the ledger is reset and a fault profile is posted over HTTP
    reset = requests.post(f"{gateway.url}/_sandbox/reset", timeout=2)
    posted = requests.post(
        f"{gateway.url}/_sandbox/profile",
        json={"reject_phone_suffixes": ["67"], "seed": 1},
        timeout=2,
    )
    bad = requests.post(f"{gateway.url}/_sandbox/profile", json={"error_rate": 2}, timeout=2)

    # Then the ledger is empty, the fault applies and a bad profile is refused with a reason
    assert (reset.status_code, posted.status_code) == (200, 200)
    assert gateway.accepted() == []
    assert send(gateway, msg_id=2).status_code == 400
    assert bad.status_code == 400
    assert "error_rate" in bad.json()["message"]
    assert gateway.profile.reject_phone_suffixes == ("67",)


# ---------------------------------------------------------------- lifecycle


def test_stop_is_quick_with_a_slow_request_in_flight() -> None:
    # Given a sandbox in the middle of a 30 s slow answer
    gateway = SandboxGateway(TOKEN, FaultProfile(slow_rate=1.0, slow_seconds=30))
    gateway.start()
    outcome: list[BaseException | requests.Response] = []

    def call() -> None:
        try:
            outcome.append(send(gateway, msg_id=1, timeout=5))
        except requests.RequestException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    deadline = time.monotonic() + 2
    while not gateway.requests() and time.monotonic() < deadline:
        time.sleep(0.01)

    # When it is stopped
    started = time.monotonic()
    gateway.stop()
    elapsed = time.monotonic() - started

    # Then it stops within a second, the caller is cut off and nothing was accepted
    assert elapsed < 1.0
    caller.join(2)
    assert isinstance(outcome[0], requests.ConnectionError)
    assert gateway.accepted() == []
    assert not gateway.is_alive()


# ---------------------------------------------------------------- configuration


def test_the_profile_is_read_from_the_environment() -> None:
    # Given the local stack's SANDBOX_* variables
    environ = {
        "SANDBOX_LATENCY_MS": "20",
        "SANDBOX_ERROR_RATE": "0.1",
        "SANDBOX_SLOW_RATE": "0.05",
        "SANDBOX_SLOW_MS": "12000",
        "SANDBOX_MALFORMED_RATE": "0.05",
        "SANDBOX_RATE_LIMIT_RATE": "",
        "SANDBOX_REJECT_SUFFIXES": "13, 666",
        "SANDBOX_OUTAGE_SECONDS": "2.5",
        "SANDBOX_SEED": "7",
    }

    # When a profile is read from them, Then each lands in its field (empty means unset)
    assert FaultProfile.from_env(environ) == FaultProfile(
        latency_seconds=0.02,
        error_rate=0.1,
        slow_rate=0.05,
        slow_seconds=12.0,
        malformed_rate=0.05,
        reject_phone_suffixes=("13", "666"),
        outage_seconds=2.5,
        seed=7,
    )
    assert FaultProfile.from_env({}) == FaultProfile()


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"SANDBOX_ERROR_RATE": "1.5"}, "SANDBOX_ERROR_RATE"),
        ({"SANDBOX_SLOW_RATE": "-0.1"}, "SANDBOX_SLOW_RATE"),
        ({"SANDBOX_MALFORMED_RATE": "lots"}, "SANDBOX_MALFORMED_RATE"),
        ({"SANDBOX_RATE_LIMIT_RATE": "nan"}, "SANDBOX_RATE_LIMIT_RATE"),
        ({"SANDBOX_LATENCY_MS": "-5"}, "SANDBOX_LATENCY_MS"),
        ({"SANDBOX_SLOW_MS": "soon"}, "SANDBOX_SLOW_MS"),
        ({"SANDBOX_OUTAGE_SECONDS": "inf"}, "SANDBOX_OUTAGE_SECONDS"),
        ({"SANDBOX_SEED": "1.5"}, "SANDBOX_SEED"),
        ({"SANDBOX_REJECT_SUFFIXES": "13,x9"}, "SANDBOX_REJECT_SUFFIXES"),
        ({"SANDBOX_OUTAGE_MODE": "sometimes"}, "SANDBOX_OUTAGE_MODE"),
        ({"SANDBOX_ERROR_RATE": "0.6", "SANDBOX_SLOW_RATE": "0.5"}, "SANDBOX_ERROR_RATE"),
    ],
    ids=[
        "rate-above-one",
        "rate-negative",
        "rate-not-a-number",
        "rate-nan",
        "latency-negative",
        "slow-not-a-number",
        "outage-infinite",
        "seed-not-whole",
        "suffix-not-digits",
        "unknown-outage-mode",
        "rates-add-up-beyond-one",
    ],
)
def test_a_bad_environment_value_is_refused_naming_the_variable(
    environ: dict[str, str], named: str
) -> None:
    # Given a bad SANDBOX_* value, When a profile is read, Then the error names the variable
    with pytest.raises(ValueError, match=named):
        FaultProfile.from_env(environ)
