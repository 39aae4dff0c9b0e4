"""Chaos: two mailings through the local stack while AWS and the gateway both misbehave.

One stack serves the module, and it fails the way AWS and a flaky gateway fail:
- AWS (`AWS_FAULTS`): 15% of DynamoDB transactions are cancelled for a `TransactionConflict`,
  3% of DynamoDB requests are throttled and 1% answer 500, 2% of SQS requests answer 500 and 1%
  time out; botocore retries what it retries on AWS, and the rest reaches the code;
- IAM: every function's AWS calls are checked against its own role's statements, as deployed;
- Lambda: the sender has 8 s and the fan-out 15 s before they are stopped, as Lambda stops them
  (`LAMBDA_TIMEOUTS`), so a batch that runs long is cut off mid-way;
- the gateway answers 10% of sends with a 5xx, 5% slowly (within the read timeout), 2% with a
  200 that is not a success, and rejects some phone suffixes with 400.

Mailing A goes to every client with no send window; its end leaves time to deliver everything.
Mailing B goes to a fifth of them with a send window that is open now for some time zones, opens
during the run for Moscow and closes during it for UTC.

The scenario runs once (the `chaos` fixture); each test checks one invariant on its record and
prints its figures. The sandbox's ledger (every request and every accepted send, wall-clock
times) is read over HTTP; the message records through `GET /mailings/{id}/stats`; the AWS faults
from the stack's own count, printed when it stops.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as time_of_day
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests

from tests.support.local_stack import REPO_ROOT, Stack, aws_faults_injected, running_stack

pytestmark = pytest.mark.e2e

CLIENTS = 600
TIMEZONES = ("UTC", "Europe/Moscow", "Asia/Vladivostok", "America/New_York")
OPERATOR_CODES = ("900", "916", "926", "999")
# Phones ending in these get 400 from the gateway: 2% of the clients (n % 100 is 13 or 77).
REJECTED_SUFFIXES = ("13", "77")
# Mailing B's audience: a fifth of the clients, spread over every time zone.
B_TAG = "evening"
STATUSES = ("pending", "sent", "failed", "expired", "cancelled")

MAILING_SECONDS = 150
MAX_ATTEMPTS = 10
# A's end leaves time for everything: at least this share of what can be delivered must be.
DELIVERED_SHARE = 0.95
# Slow answers come within the read timeout, so the gateway's ledger and our records can be
# compared exactly: an answer we gave up on would leave a send we cannot know about.
READ_TIMEOUT_SECONDS = 2.0
CONNECT_TIMEOUT_SECONDS = 3.05
SLOW_SECONDS = 0.8
SEND_TIMEOUT_SECONDS = 8
CONFLICT_RATE = 0.15
AWS_FAULTS = f"conflict={CONFLICT_RATE},throttle=0.03,ddb500=0.01,sqs500=0.02,sqstimeout=0.01"
SEED = 20261206
STACK_ENV = {
    "SCHEDULER_INTERVAL_SECONDS": "1",
    "RETRY_BASE_SECONDS": "2",
    "RETRY_MAX_SECONDS": "10",
    "MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    "GATEWAY_READ_TIMEOUT": str(READ_TIMEOUT_SECONDS),
    "GATEWAY_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT_SECONDS),
    # A claim outlives the invocation that took it; a batch cut off by its timeout comes back
    # once the claims it held have lapsed.
    "CLAIM_SECONDS": str(SEND_TIMEOUT_SECONDS + 2),
    "SEND_VISIBILITY_TIMEOUT_SECONDS": str(SEND_TIMEOUT_SECONDS + 4),
    "LAMBDA_TIMEOUTS": f"send_messages={SEND_TIMEOUT_SECONDS},advance_mailing=15",
    "AWS_FAULTS": f"{AWS_FAULTS},seed={SEED}",
    "SANDBOX_ERROR_RATE": "0.1",
    "SANDBOX_SLOW_RATE": "0.05",
    "SANDBOX_SLOW_MS": str(int(SLOW_SECONDS * 1000)),
    "SANDBOX_MALFORMED_RATE": "0.02",
    "SANDBOX_REJECT_SUFFIXES": ",".join(REJECTED_SUFFIXES),
    "SANDBOX_SEED": str(SEED),
}

CREATE_THREADS = 8
SAMPLE_SECONDS = 0.5
READ_P99_BOUND_SECONDS = 2.0
# After the end the scheduler (a tick a second) expires what is left and finishes the mailings;
# allow it a minute (one transaction per message left, on the emulator, under faults).
FINISH_GRACE_SECONDS = 90
# A write the API answers 503 (storage busy) is sent again after its Retry-After, as a client
# of the API is told to; this many times at most.
WRITE_TRIES = 8
LIST_PAGE = 500


# ---------------------------------------------------------------- the record of one run


@dataclass
class Mailing:
    """One mailing as created, its audience, and what it ended as."""

    name: str
    id: str
    end_at: datetime
    audience: list[dict[str, Any]]
    window: tuple[time_of_day, time_of_day] | None = None
    status: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    listed: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [message for status in STATUSES for message in self.listed[status]]


@dataclass
class ChaosRun:
    clients: dict[str, dict[str, Any]]
    mailings: list[Mailing]
    ledger: dict[str, Any]
    overall: dict[str, Any]
    read_latencies: dict[str, list[float]]
    read_failures: list[str]
    timings: dict[str, float]
    finished_in_time: bool
    stack_output: str
    aws_faults: dict[str, int]
    write_retries: int

    def mailing(self, name: str) -> Mailing:
        return next(m for m in self.mailings if m.name == name)

    def accepted_by_id(self) -> dict[int, list[dict[str, Any]]]:
        by_id: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for send in self.ledger["accepted"]:
            by_id[send["msg_id"]].append(send)
        return by_id

    def requests_by_id(self) -> dict[int, list[dict[str, Any]]]:
        by_id: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for request in self.ledger["requests"]:
            by_id[request["msg_id"]].append(request)
        return by_id


# ---------------------------------------------------------------- helpers


def client_body(n: int) -> dict[str, Any]:
    code = OPERATOR_CODES[n % len(OPERATOR_CODES)]
    return {
        "phone": f"7{code}{n:07d}",
        "tag": B_TAG if n % 5 == 0 else "regular",
        "timezone": TIMEZONES[n % len(TIMEZONES)],
    }


class Writer:
    """POSTs as a well-behaved API client does: a 503 is sent again after its Retry-After."""

    def __init__(self) -> None:
        self.retries = 0
        self._lock = threading.Lock()

    def post(self, http: requests.Session, url: str, body: dict[str, Any]) -> dict[str, Any]:
        for _ in range(WRITE_TRIES):
            response = http.post(url, json=body, timeout=10)
            if response.status_code != 503:
                break
            # The storage was busy (a conflict or a throttle): the service said when to retry.
            assert response.json()["error"] == "unavailable", response.text
            with self._lock:
                self.retries += 1
            time.sleep(float(response.headers["Retry-After"]))
        assert response.status_code == 201, response.text
        return response.json()


def create_clients(stack: Stack, count: int, writer: Writer) -> list[dict[str, Any]]:
    """`count` clients created over HTTP by a few threads, as the API returned them."""
    local = threading.local()
    sessions: list[requests.Session] = []

    def create(n: int) -> dict[str, Any]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.session.headers.update(stack.auth)
            sessions.append(local.session)
        return writer.post(local.session, f"{stack.url}/clients", client_body(n))

    try:
        with ThreadPoolExecutor(CREATE_THREADS) as pool:
            return list(pool.map(create, range(count)))
    finally:
        for session in sessions:
            session.close()


def next_minute(moment: datetime) -> datetime:
    """The first whole minute strictly after `moment`."""
    return moment.replace(second=0, microsecond=0) + timedelta(minutes=1)


def in_window(window: tuple[time_of_day, time_of_day], local: time_of_day) -> bool:
    """The documented rule (docs/api.md): [start, end), an end before the start wraps."""
    start, end = window
    if start < end:
        return start <= local < end
    return local >= start or local < end


def local_time(timestamp: float, zone: str) -> time_of_day:
    return datetime.fromtimestamp(timestamp, ZoneInfo(zone)).time()


def window_for_b(now: datetime) -> tuple[tuple[time_of_day, time_of_day], datetime, datetime]:
    """A window open now for UTC, New York and Vladivostok, closed for Moscow.

    It opens for Moscow 50-110 s from now and closes for UTC 80-140 s from
    now (before B's end); for New York and Vladivostok it stays open throughout.
    """
    opens = next_minute(now + timedelta(seconds=50))
    closes = next_minute(now + timedelta(seconds=80))
    start = opens.astimezone(ZoneInfo("Europe/Moscow")).time().replace(second=0)
    end = closes.astimezone(UTC).time().replace(second=0)
    return (start, end), opens, closes


def create_mailing(
    http: requests.Session,
    writer: Writer,
    stack: Stack,
    start_at: datetime,
    audience_filter: dict[str, list[str]],
    window: tuple[time_of_day, time_of_day] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "text": "Chaos sale: everything must go",
        "start_at": start_at.isoformat(),
        "end_at": (start_at + timedelta(seconds=MAILING_SECONDS)).isoformat(),
        "filter": audience_filter,
    }
    if window is not None:
        body["send_window"] = {
            "start": window[0].strftime("%H:%M"),
            "end": window[1].strftime("%H:%M"),
        }
    return writer.post(http, f"{stack.url}/mailings", body)


def get_json(http: requests.Session, url: str, **params: Any) -> dict[str, Any]:
    response = http.get(url, params=params, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def messages_with_status(
    http: requests.Session, stack: Stack, mailing_id: str, status: str
) -> list[dict[str, Any]]:
    """Every message of the mailing listed under `status`, in pages of LIST_PAGE."""
    messages: list[dict[str, Any]] = []
    params: dict[str, Any] = {"status": status, "limit": LIST_PAGE}
    while True:
        page = get_json(http, f"{stack.url}/mailings/{mailing_id}/stats", **params)
        messages += page["messages"]
        if not page["next_cursor"]:
            return messages
        params["cursor"] = page["next_cursor"]


class ReadSampler:
    """Reads the statistics every SAMPLE_SECONDS from a thread, timing each read."""

    def __init__(self, stack: Stack, paths: dict[str, str]) -> None:
        self._stack = stack
        self._paths = paths
        self.latencies: dict[str, list[float]] = {name: [] for name in paths}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="read-sampler", daemon=True)

    def __enter__(self) -> ReadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with requests.Session() as session:
            session.headers.update(self._stack.auth)
            while not self._stop.is_set():
                for name, path in self._paths.items():
                    started = time.monotonic()
                    try:
                        response = session.get(f"{self._stack.url}{path}", timeout=10)
                        if response.status_code != 200:
                            self.failures.append(f"{name}: HTTP {response.status_code}")
                    except requests.RequestException as exc:
                        self.failures.append(f"{name}: {type(exc).__name__}")
                    self.latencies[name].append(time.monotonic() - started)
                self._stop.wait(SAMPLE_SECONDS)


def wait_until_finished(
    http: requests.Session, stack: Stack, mailings: list[Mailing], deadline: float
) -> bool:
    """True once every mailing is finished; False when `deadline` (wall clock) comes first."""
    while True:
        pages = [get_json(http, f"{stack.url}/mailings/{m.id}/stats", limit=1) for m in mailings]
        if all(page["status"] == "finished" for page in pages):
            return True
        if time.time() > deadline:
            return False
        time.sleep(1)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# ---------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def chaos() -> ChaosRun:
    """Given 600 clients in four zones, when mailings A and B run through the faults."""
    writer = Writer()
    with running_stack(**STACK_ENV) as stack:
        assert stack.sandbox_url, f"no SANDBOX line:\n{stack.running.output}"
        timings: dict[str, float] = {"stack start": stack.startup_seconds}
        began = time.monotonic()
        created = create_clients(stack, CLIENTS, writer)
        timings[f"create {CLIENTS} clients"] = time.monotonic() - began
        clients = {client["id"]: client for client in created}
        with requests.Session() as http:
            http.headers.update(stack.auth)
            mailings, sampler, finished = run_mailings(http, writer, stack, created, timings)
            began = time.monotonic()
            for mailing in mailings:
                page = get_json(http, f"{stack.url}/mailings/{mailing.id}/stats", limit=1)
                mailing.status, mailing.counts = page["status"], page["stats"]
                mailing.listed = {
                    status: messages_with_status(http, stack, mailing.id, status)
                    for status in STATUSES
                }
            overall = get_json(http, f"{stack.url}/stats", limit=LIST_PAGE)
            ledger = get_json(http, f"{stack.sandbox_url}/_sandbox/ledger")
            timings["read records and ledger"] = time.monotonic() - began
    # The stack has stopped: it printed the AWS faults it injected. Its log is kept for a look
    # after a failure (build/ is not tracked).
    log = REPO_ROOT / "build" / "chaos-stack.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text(stack.running.output)
    return ChaosRun(
        clients,
        mailings,
        ledger,
        overall,
        sampler.latencies,
        sampler.failures,
        timings,
        finished,
        stack.running.output,
        aws_faults_injected(stack),
        writer.retries,
    )


def run_mailings(
    http: requests.Session,
    writer: Writer,
    stack: Stack,
    created: list[dict[str, Any]],
    timings: dict[str, float],
) -> tuple[list[Mailing], ReadSampler, bool]:
    """Create A and B now and wait, reading the statistics meanwhile, until both finish."""
    now = datetime.now(UTC)
    window, opens, closes = window_for_b(now)
    # B first: its jobs queue ahead of A's, so it is not only served after A.
    b = create_mailing(http, writer, stack, now, {"tags": [B_TAG]}, window)
    a = create_mailing(http, writer, stack, now, {}, None)
    mailings = [
        Mailing("A", a["id"], parse_time(a["end_at"]), created),
        Mailing(
            "B",
            b["id"],
            parse_time(b["end_at"]),
            [c for c in created if c["tag"] == B_TAG],
            window,
        ),
    ]
    inside_now = {zone: in_window(window, local_time(now.timestamp(), zone)) for zone in TIMEZONES}
    assert inside_now == {
        "UTC": True,
        "Europe/Moscow": False,
        "Asia/Vladivostok": True,
        "America/New_York": True,
    }
    print(
        f"\nchaos: mailings created at {now:%H:%M:%S} UTC, end {mailings[0].end_at:%H:%M:%S}; "
        f"B window {window[0]:%H:%M}-{window[1]:%H:%M} local: opens for Moscow at "
        f"{opens:%H:%M:%S}, closes for UTC at {closes:%H:%M:%S}"
    )
    paths = {
        "GET /mailings/A/stats": f"/mailings/{a['id']}/stats?limit=50",
        "GET /mailings/B/stats": f"/mailings/{b['id']}/stats?limit=50",
        "GET /stats": "/stats",
    }
    began = time.monotonic()
    last_end = max(m.end_at for m in mailings).timestamp()
    with ReadSampler(stack, paths) as sampler:
        finished = wait_until_finished(http, stack, mailings, last_end + FINISH_GRACE_SECONDS)
    timings["mailings, created to finished"] = time.monotonic() - began
    timings["finished after the end"] = time.time() - last_end
    return mailings, sampler, finished


def report(invariants: Callable[[str], None], *lines: str) -> None:
    invariants("\n".join(lines))


def pending_evidence(chaos: ChaosRun, mailing: Mailing) -> list[str]:
    """What a stuck mailing looks like: its pending messages, their gateway calls, stack errors."""
    requests_by_id = chaos.requests_by_id()
    lines = [f"{mailing.name} ({mailing.id}): {mailing.status}, counters {mailing.counts}"]
    for message in mailing.listed["pending"][:10]:
        zone = chaos.clients[message["client_id"]]["timezone"]
        calls = [(r["outcome"], round(r["received_at"], 2)) for r in requests_by_id[message["id"]]]
        lines.append(f"  pending {message} {zone} gateway calls {calls}")
    errors = [
        line
        for line in chaos.stack_output.splitlines()
        if any(word in line for word in ("ERROR", "Traceback", "WARNING"))
        and "connectionpool" not in line
    ]
    lines += [f"  stack: {line}" for line in errors[:20]]
    return lines


# ---------------------------------------------------------------- invariants


def test_aws_and_the_gateway_failed_as_configured(
    chaos: ChaosRun, invariants: Callable[[str], None]
) -> None:
    """Given the chaos run, when its faults are counted, then every kind of gateway fault was
    served and AWS cancelled, throttled and failed requests as configured."""
    counts = chaos.ledger["counts"]
    faults = chaos.aws_faults
    conflict_share = faults.get("conflict", 0) / max(1, faults.get("transactions", 0))
    timeouts = sum(
        "Lambda would have stopped it" in line for line in chaos.stack_output.splitlines()
    )
    denied = [line for line in chaos.stack_output.splitlines() if "is not authorized" in line]
    deadline_requeues = chaos.stack_output.count("too little time left for a gateway call")
    report(
        invariants,
        "timings: "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in chaos.timings.items()),
        "gateway requests by outcome: "
        + ", ".join(f"{outcome} {n}" for outcome, n in counts.items() if n),
        f"AWS faults injected: {faults}; {conflict_share:.0%} of transactions cancelled "
        "for a conflict",
        f"API writes answered 503 and sent again: {chaos.write_retries}",
        f"invocations stopped at their timeout: {timeouts}; jobs sent back by the sender for "
        f"too little time before its deadline: {deadline_requeues}; IAM denials: {len(denied)}",
    )
    # Every kind of gateway fault was served
    for outcome in ("5xx", "slow", "malformed", "400", "ok"):
        assert counts[outcome] > 0, outcome
    # And AWS cancelled at least a tenth of the transactions for a conflict, and throttled and
    # failed requests besides
    assert conflict_share >= 0.10
    for kind in ("throttle", "ddb500", "sqs500"):
        assert faults.get(kind, 0) > 0, kind
    # And the sender's deadline was short enough to matter: it sent jobs back rather than start
    # calls it had no time to finish and record
    assert deadline_requeues > 0
    # And no function was ever denied an action it needs (IAM is enforced in the stack)
    assert denied == []


def test_nearly_every_deliverable_message_of_a_was_delivered(
    chaos: ChaosRun, invariants: Callable[[str], None]
) -> None:
    """Given mailing A of the chaos run, when its deliverable messages are counted, then at least
    DELIVERED_SHARE of them were sent."""
    a = chaos.mailing("A")
    deliverable = [m for m in a.messages if not m["phone"].endswith(REJECTED_SUFFIXES)]
    sent = [m for m in deliverable if m["status"] == "sent"]
    share = len(sent) / len(deliverable)
    report(
        invariants,
        f"A: {a.counts}; delivered {len(sent)} of {len(deliverable)} deliverable ({share:.1%}, "
        f"at least {DELIVERED_SHARE:.0%} required: its end left time)",
    )
    assert share >= DELIVERED_SHARE


def test_every_message_is_in_exactly_one_final_state(
    chaos: ChaosRun, invariants: Callable[[str], None]
) -> None:
    """Given the chaos run's mailings past their end, when their messages are listed, then each is
    finished, each matching client has one message in exactly one final status, and no id is
    shared."""
    # Once their end has passed, the scheduler finishes both mailings within the grace
    for mailing in chaos.mailings:
        if mailing.status != "finished" or mailing.listed["pending"]:
            report(invariants, *pending_evidence(chaos, mailing))
    assert chaos.finished_in_time
    lines = []
    all_ids: list[int] = []
    for mailing in chaos.mailings:
        lines.append(
            f"{mailing.name}: {mailing.status}, {len(mailing.audience)} matching clients, "
            + ", ".join(f"{s} {len(mailing.listed[s])}" for s in STATUSES)
        )
        # Each matching client has one message, listed under exactly one status
        listed_clients = Counter(m["client_id"] for m in mailing.messages)
        assert max(listed_clients.values()) == 1, listed_clients.most_common(3)
        assert set(listed_clients) == {c["id"] for c in mailing.audience}
        # And once the mailing is finished, none is pending
        assert mailing.status == "finished"
        assert mailing.listed["pending"] == []
        for status, messages in mailing.listed.items():
            assert all(m["status"] == status for m in messages)
        all_ids += [m["id"] for m in mailing.messages]
    report(invariants, *lines, f"message ids: {len(all_ids)}, distinct {len(set(all_ids))}")
    # And message ids are never shared
    assert len(all_ids) == len(set(all_ids))


def test_counters_equal_the_message_records(
    chaos: ChaosRun, invariants: Callable[[str], None]
) -> None:
    """Given the chaos run, when each mailing's counters and GET /stats are compared with the
    listed messages, then they are equal."""
    lines = []
    for mailing in chaos.mailings:
        listed = {status: len(mailing.listed[status]) for status in STATUSES}
        lines.append(f"{mailing.name}: counters {mailing.counts}, listed {listed}")
        assert {status: mailing.counts[status] for status in STATUSES} == listed
        assert mailing.counts["total"] == sum(listed.values()) == len(mailing.audience)
    overall = chaos.overall["messages"]
    lines.append(f"GET /stats: {chaos.overall['mailings']} mailings, messages {overall}")
    report(invariants, *lines)
    assert chaos.overall["mailings"] == len(chaos.mailings)
    for status in (*STATUSES, "total"):
        assert overall[status] == sum(m.counts[status] for m in chaos.mailings), status


def test_gateway_accepted_each_message_at_most_once_and_sent_equals_accepted(
    chaos: ChaosRun, invariants: Callable[[str], None]
) -> None:
    """Given the gateway's ledger after the chaos run, when it is compared with the messages, then
    no message was accepted twice, sent equals accepted, and no message had more calls than
    attempts."""
    accepted = chaos.accepted_by_id()
    requests_by_id = chaos.requests_by_id()
    messages = {m["id"]: m for mailing in chaos.mailings for m in mailing.messages}
    duplicates = sorted(msg_id for msg_id, sends in accepted.items() if len(sends) > 1)
    recorded_sent = {msg_id for msg_id, m in messages.items() if m["status"] == "sent"}
    accepted_unsent = sorted(set(accepted) - recorded_sent)
    sent_unaccepted = sorted(recorded_sent - set(accepted))
    most_calls = max(len(calls) for calls in requests_by_id.values())
    uncounted = [
        (m, requests_by_id[msg_id])
        for msg_id, m in messages.items()
        if len(requests_by_id.get(msg_id, [])) > m["attempts"]
    ]
    lines = [
        f"accepted sends {len(chaos.ledger['accepted'])}, distinct ids {len(accepted)}, "
        f"ids accepted more than once {len(duplicates)}",
        f"recorded sent {len(recorded_sent)}; accepted but not recorded sent "
        f"{len(accepted_unsent)}; recorded sent but never accepted {len(sent_unaccepted)}",
        f"most gateway calls for one message: {most_calls} (MAX_ATTEMPTS {MAX_ATTEMPTS}); "
        f"messages with more calls than claimed attempts: {len(uncounted)}",
    ]
    for msg_id in (duplicates + accepted_unsent)[:10]:
        lines.append(
            f"  {msg_id}: accepted {len(accepted[msg_id])}x, status {messages[msg_id]['status']}, "
            f"requests {[r['outcome'] for r in requests_by_id[msg_id]]}"
        )
    report(invariants, *lines)

    # The gateway only ever saw our messages' ids
    assert set(accepted) <= set(messages)
    assert set(requests_by_id) <= set(messages)
    # And it accepted each message at most once, through every conflict, throttle and timeout
    assert duplicates == []
    # And `sent` is exactly what it accepted
    assert accepted_unsent == []
    assert sent_unaccepted == []
    # And no message was called without a claim, nor more than MAX_ATTEMPTS times
    assert uncounted == []
    assert most_calls <= MAX_ATTEMPTS
    # And a rejected subscriber was never accepted
    rejected = [m for m in messages.values() if m["phone"].endswith(REJECTED_SUFFIXES)]
    assert rejected
    assert not [m for m in rejected if m["id"] in accepted]


def test_nothing_reached_the_gateway_after_the_end(
    chaos: ChaosRun, invariants: Callable[[str], None]
) -> None:
    """Given the chaos run, when the gateway's requests are compared with each mailing's end, then
    none came after it."""
    accepted = chaos.accepted_by_id()
    requests_by_id = chaos.requests_by_id()
    lines = []
    for mailing in chaos.mailings:
        end = mailing.end_at.timestamp()
        ids = [m["id"] for m in mailing.messages]
        sends = [send for msg_id in ids for send in accepted.get(msg_id, [])]
        calls = [r for msg_id in ids for r in requests_by_id.get(msg_id, [])]
        late_sends = [s for s in sends if s["accepted_at"] > end]
        late_calls = [r for r in calls if r["received_at"] > end]
        last_send = max((s["accepted_at"] for s in sends), default=math.nan)
        last_call = max((r["received_at"] for r in calls), default=math.nan)
        lines.append(
            f"{mailing.name}: sends after the end {len(late_sends)}, requests after the end "
            f"{len(late_calls)}; last send {end - last_send:.2f} s and last request "
            f"{end - last_call:.2f} s before the end"
        )
        assert late_sends == []
        assert late_calls == []
    report(invariants, *lines)


def test_no_send_of_b_reached_the_gateway_outside_the_clients_window(
    chaos: ChaosRun, invariants: Callable[[str], None]
) -> None:
    """Given mailing B's send window, when the gateway's requests for B are read in each client's
    local time, then none fell outside the window."""
    b = chaos.mailing("B")
    assert b.window is not None
    accepted = chaos.accepted_by_id()
    requests_by_id = chaos.requests_by_id()
    outside_sends: list[dict[str, Any]] = []
    outside_calls: list[dict[str, Any]] = []
    by_zone: dict[str, Counter[str]] = {zone: Counter() for zone in TIMEZONES}
    local_sends: dict[str, list[time_of_day]] = {zone: [] for zone in TIMEZONES}
    for message in b.messages:
        zone = chaos.clients[message["client_id"]]["timezone"]
        by_zone[zone][message["status"]] += 1
        for send in accepted.get(message["id"], []):
            by_zone[zone]["accepted"] += 1
            local_sends[zone].append(local_time(send["accepted_at"], zone))
            if not in_window(b.window, local_time(send["accepted_at"], zone)):
                outside_sends.append({**send, "timezone": zone})
        for call in requests_by_id.get(message["id"], []):
            if not in_window(b.window, local_time(call["received_at"], zone)):
                outside_calls.append({**call, "timezone": zone})
    report(
        invariants,
        f"B window {b.window[0]:%H:%M}-{b.window[1]:%H:%M} local; "
        f"sends outside it {len(outside_sends)}, requests outside it {len(outside_calls)}",
        *(
            f"  {zone}: {dict(counts)}, accepted between "
            f"{min(local_sends[zone], default=None)} and {max(local_sends[zone], default=None)}"
            for zone, counts in by_zone.items()
        ),
    )
    # Some of B was sent, so the check below is not empty
    assert sum(counts["accepted"] for counts in by_zone.values()) > 0
    # And nothing reached the gateway outside the client's local window
    assert outside_sends == []
    assert outside_calls == []


def test_the_api_stayed_responsive_while_it_ran(
    chaos: ChaosRun, invariants: Callable[[str], None]
) -> None:
    """Given reads sampled while the chaos run ran, when their latencies are measured, then none
    failed and the p99 stayed under its bound."""
    every = [latency for values in chaos.read_latencies.values() for latency in values]
    lines = [
        f"{name}: {len(values)} reads, p50 {statistics.median(values) * 1000:.0f} ms, "
        f"p99 {percentile(values, 0.99) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"
        for name, values in chaos.read_latencies.items()
    ]
    lines.append(
        f"all reads: {len(every)}, p50 {statistics.median(every) * 1000:.0f} ms, "
        f"p99 {percentile(every, 0.99) * 1000:.0f} ms, failures {len(chaos.read_failures)}"
    )
    report(invariants, *lines)
    assert chaos.read_failures == []
    assert percentile(every, 0.99) < READ_P99_BOUND_SECONDS
