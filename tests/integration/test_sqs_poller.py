"""The local SQS poller delivers batches to a handler as Lambda's SQS event source would.

moto runs in server mode (as in the local stack); every test gets its own queue with a
1-second visibility timeout and a dead-letter queue after two receives.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.exceptions import EndpointConnectionError

from devstack.poller import SqsPoller

REGION = "us-east-1"
ACCOUNT = "123456789012"
VISIBILITY_TIMEOUT = 1
MAX_RECEIVE_COUNT = 2
Respond = Callable[[dict[str, Any], int], Any]


@pytest.fixture(scope="module")
def sqs_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def emulator_client(service: str, endpoint: str) -> Any:
    """A boto3 client of `service` on the emulator server at `endpoint`."""
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )


@pytest.fixture(scope="module")
def sqs(sqs_endpoint: str) -> Any:
    return emulator_client("sqs", sqs_endpoint)


@dataclass(frozen=True)
class Queues:
    name: str
    url: str
    dlq_url: str


@pytest.fixture
def queues(sqs: Any) -> Queues:
    name = f"delivery-{uuid.uuid4().hex[:12]}"
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(MAX_RECEIVE_COUNT)}
    url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "VisibilityTimeout": str(VISIBILITY_TIMEOUT),
            "RedrivePolicy": json.dumps(redrive),
        },
    )["QueueUrl"]
    return Queues(name=name, url=url, dlq_url=dlq_url)


class Recorder:
    """A handler that remembers every event and answers with `respond(event, call_number)`."""

    def __init__(self, respond: Respond | None = None) -> None:
        self.respond = respond or (lambda _event, _call: None)
        self.events: list[dict[str, Any]] = []
        self.contexts: list[Any] = []
        self.delivered_at: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        with self._lock:
            self.events.append(copy.deepcopy(event))
            self.contexts.append(context)
            self.delivered_at.append(time.time())
            call = len(self.events)
        return self.respond(event, call)

    @property
    def records(self) -> list[dict[str, Any]]:
        return [record for event in self.events for record in event["Records"]]

    def deliveries(self) -> Counter[str]:
        """How many times each body was handed to the handler."""
        return Counter(record["body"] for record in self.records)


@pytest.fixture
def start_poller(sqs: Any, queues: Queues) -> Iterator[Callable[..., SqsPoller]]:
    started: list[SqsPoller] = []

    def start(handler: Any, **options: Any) -> SqsPoller:
        # Short polls keep stop() (and so each test) quick; long polls have their own tests.
        options.setdefault("wait_seconds", 0)
        poller = SqsPoller("delivery-worker", sqs, queues.url, handler, **options)
        poller.start()
        started.append(poller)
        return poller

    yield start
    for poller in started:
        poller.stop()


def send(sqs: Any, queues: Queues, *bodies: str, **options: Any) -> None:
    for first in range(0, len(bodies), 10):
        chunk = bodies[first : first + 10]
        entries = [{"Id": str(n), "MessageBody": body, **options} for n, body in enumerate(chunk)]
        response = sqs.send_message_batch(QueueUrl=queues.url, Entries=entries)
        assert not response.get("Failed")


def dead_letters(sqs: Any, queues: Queues) -> list[str]:
    response = sqs.receive_message(QueueUrl=queues.dlq_url, MaxNumberOfMessages=10)
    return [message["Body"] for message in response.get("Messages", [])]


def queue_depth(sqs: Any, queues: Queues) -> int:
    attributes = sqs.get_queue_attributes(QueueUrl=queues.url, AttributeNames=["All"])["Attributes"]
    return sum(
        int(attributes[name])
        for name in (
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        )
    )


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def fail_bodies(*bodies: str) -> Respond:
    """Report the records with these bodies as failed, every time."""

    def respond(event: dict[str, Any], _call: int) -> dict[str, Any]:
        return {
            "batchItemFailures": [
                {"itemIdentifier": record["messageId"]}
                for record in event["Records"]
                if record["body"] in bodies
            ]
        }

    return respond


def test_handler_receives_a_lambda_shaped_sqs_event_and_context(
    sqs: Any, queues: Queues, start_poller: Callable[..., SqsPoller]
) -> None:
    from aws_lambda_powertools.utilities.parser.models import SqsModel

    # Given a running poller
    handler = Recorder()
    start_poller(handler, function_timeout=5)

    # When a message with string, number and binary attributes arrives
    body = json.dumps({"mailing_id": "m-1", "client_id": "c-1"})
    sqs.send_message(
        QueueUrl=queues.url,
        MessageBody=body,
        MessageAttributes={
            "kind": {"DataType": "String", "StringValue": "sms"},
            "attempt": {"DataType": "Number", "StringValue": "3"},
            "blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
        },
    )
    eventually(lambda: len(handler.events) == 1)

    # Then the handler gets the record exactly as Lambda shapes it
    event = handler.events[0]
    SqsModel.model_validate(event)
    (record,) = event["Records"]
    assert set(record) == {
        "messageId",
        "receiptHandle",
        "body",
        "attributes",
        "messageAttributes",
        "md5OfBody",
        "md5OfMessageAttributes",
        "eventSource",
        "eventSourceARN",
        "awsRegion",
    }
    assert record["body"] == body
    assert record["md5OfBody"] == hashlib.md5(body.encode()).hexdigest()
    assert record["eventSource"] == "aws:sqs"
    assert record["eventSourceARN"] == f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queues.name}"
    assert record["awsRegion"] == REGION
    attributes = record["attributes"]
    assert {
        "ApproximateReceiveCount",
        "SentTimestamp",
        "SenderId",
        "ApproximateFirstReceiveTimestamp",
    } <= set(attributes)
    assert all(isinstance(value, str) for value in attributes.values())
    assert attributes["ApproximateReceiveCount"] == "1"
    assert record["messageAttributes"] == {
        "kind": {
            "stringValue": "sms",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "String",
        },
        "attempt": {
            "stringValue": "3",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "Number",
        },
        "blob": {
            "binaryValue": "AAE=",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "Binary",
        },
    }
    # And a context with what Lambda's runtime (and Powertools) read from it
    context = handler.contexts[0]
    assert context.function_name == "delivery-worker"
    assert context.memory_limit_in_mb == "128"
    assert (
        context.invoked_function_arn
        == f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:delivery-worker"
    )
    assert uuid.UUID(context.aws_request_id)
    assert context.log_group_name == "/aws/lambda/delivery-worker"
    assert "[$LATEST]" in context.log_stream_name
    assert 0 < context.get_remaining_time_in_millis() <= 5000


def test_a_reported_failure_is_retried_then_dead_lettered_and_its_siblings_deleted(
    sqs: Any, queues: Queues, start_poller: Callable[..., SqsPoller]
) -> None:
    # Given a batch of ten waiting messages and a handler that fails one of them
    bodies = [f"sms-{n}" for n in range(10)]
    send(sqs, queues, *bodies)
    handler = Recorder(fail_bodies("sms-3"))

    # When the poller long-polls the queue (its default) until nothing is left
    poller = start_poller(handler, wait_seconds=1)
    assert poller.wait_idle(timeout=8)

    # Then the nine successes were delivered once and deleted
    deliveries = handler.deliveries()
    assert len(handler.events[0]["Records"]) == 10
    assert all(deliveries[body] == 1 for body in bodies if body != "sms-3")
    # And the failed one came back until maxReceiveCount, then went to the DLQ
    assert deliveries["sms-3"] == MAX_RECEIVE_COUNT
    receive_counts = [
        record["attributes"]["ApproximateReceiveCount"]
        for record in handler.records
        if record["body"] == "sms-3"
    ]
    assert receive_counts == ["1", "2"]
    assert dead_letters(sqs, queues) == ["sms-3"]
    assert poller.stats() == {
        "invocations": 2,
        "records_received": 11,
        "records_deleted": 9,
        "records_failed": 2,
        "handler_errors": 0,
        "timeouts": 0,
        "poll_errors": 0,
    }


def test_a_handler_that_raises_gets_the_whole_batch_again(
    sqs: Any, queues: Queues, start_poller: Callable[..., SqsPoller]
) -> None:
    # Given a handler that raises on its first invocation only
    def respond(_event: dict[str, Any], call: int) -> None:
        if call == 1:
            raise RuntimeError("gateway down")

    handler = Recorder(respond)
    send(sqs, queues, "a", "b", "c")

    # When the poller runs
    poller = start_poller(handler)
    assert poller.wait_idle(timeout=6)

    # Then every record of the batch was delivered a second time, with a higher receive count
    assert handler.deliveries() == {"a": 2, "b": 2, "c": 2}
    assert {r["attributes"]["ApproximateReceiveCount"] for r in handler.events[1]["Records"]} == {
        "2"
    }
    assert dead_letters(sqs, queues) == []
    stats = poller.stats()
    assert stats["handler_errors"] == 1
    assert stats["records_deleted"] == 3


def test_a_failure_id_outside_the_batch_fails_the_whole_batch(
    sqs: Any, queues: Queues, start_poller: Callable[..., SqsPoller]
) -> None:
    # Given a handler whose first answer names a message that is not in the batch
    def respond(_event: dict[str, Any], call: int) -> Any:
        if call == 1:
            return {"batchItemFailures": [{"itemIdentifier": "not-in-this-batch"}]}
        return {"batchItemFailures": []}

    handler = Recorder(respond)
    send(sqs, queues, "a", "b")

    # When the poller runs
    poller = start_poller(handler)
    assert poller.wait_idle(timeout=6)

    # Then nothing was deleted the first time: both records came back (Lambda's rule)
    assert handler.deliveries() == {"a": 2, "b": 2}
    assert poller.stats()["records_deleted"] == 2


def test_without_report_batch_item_failures_a_reported_failure_is_lost(
    sqs: Any, queues: Queues, start_poller: Callable[..., SqsPoller]
) -> None:
    # Given a mapping without ReportBatchItemFailures (what `chalice deploy` creates)
    handler = Recorder(fail_bodies("lost"))
    send(sqs, queues, "lost", "kept")

    # When the handler reports one record as failed
    poller = start_poller(handler, report_batch_item_failures=False)
    assert poller.wait_idle(timeout=4)

    # Then the whole batch was deleted: the failure is never retried nor dead-lettered
    assert handler.deliveries() == {"lost": 1, "kept": 1}
    assert queue_depth(sqs, queues) == 0
    assert dead_letters(sqs, queues) == []
    assert poller.stats()["records_deleted"] == 2


def test_batch_size_limits_the_records_per_invocation(
    sqs: Any, queues: Queues, start_poller: Callable[..., SqsPoller]
) -> None:
    # Given five waiting messages
    send(sqs, queues, *[f"sms-{n}" for n in range(5)])
    handler = Recorder()

    # When the poller takes batches of two
    poller = start_poller(handler, batch_size=2)
    assert poller.wait_idle(timeout=4)

    # Then no invocation saw more than two records, and each message was handled once
    assert max(len(event["Records"]) for event in handler.events) <= 2
    assert len(handler.events) >= 3
    assert handler.deliveries() == {f"sms-{n}": 1 for n in range(5)}


def test_concurrent_pollers_run_handlers_in_parallel_and_deliver_each_message_once(
    sqs: Any, queues: Queues, start_poller: Callable[..., SqsPoller]
) -> None:
    # Given thirty waiting messages and a handler that takes a while
    bodies = [f"sms-{n}" for n in range(30)]
    send(sqs, queues, *bodies)
    running = 0
    most_running = 0
    lock = threading.Lock()

    def respond(_event: dict[str, Any], _call: int) -> None:
        nonlocal running, most_running
        with lock:
            running += 1
            most_running = max(most_running, running)
        time.sleep(0.2)
        with lock:
            running -= 1

    handler = Recorder(respond)

    # When three polling threads take batches of five
    poller = start_poller(handler, concurrency=3, batch_size=5)
    assert poller.is_alive()
    assert poller.wait_idle(timeout=5)

    # Then batches were handled side by side, and no message was handed out twice
    assert most_running >= 2
    assert handler.deliveries() == dict.fromkeys(bodies, 1)


def test_a_delayed_message_is_not_delivered_before_its_delay(
    sqs: Any, queues: Queues, start_poller: Callable[..., SqsPoller]
) -> None:
    # Given a running poller
    handler = Recorder()
    poller = start_poller(handler)

    # When a message is sent with DelaySeconds=1
    sent_at = time.time()
    sqs.send_message(QueueUrl=queues.url, MessageBody="later", DelaySeconds=1)

    # Then the queue is not idle while it waits, and it arrives only after the delay
    assert poller.wait_idle(timeout=0.3) is False
    assert poller.wait_idle(timeout=5)
    assert handler.deliveries() == {"later": 1}
    assert handler.delivered_at[0] - sent_at >= 0.95


def test_wait_idle_waits_for_the_queue_and_the_running_handler(sqs: Any, queues: Queues) -> None:
    # Given a message and a poller whose handler takes a while, not started yet
    handler = Recorder(lambda _event, _call: time.sleep(0.5))
    poller = SqsPoller("delivery-worker", sqs, queues.url, handler, wait_seconds=1)
    send(sqs, queues, "slow")

    # Then the queue is not idle while nobody polls it
    assert poller.wait_idle(timeout=0.3) is False

    # When the poller runs
    poller.start()
    try:
        eventually(lambda: len(handler.events) == 1)
        # Then it is not idle while the handler runs, and idle once it returned
        assert poller.wait_idle(timeout=0.1) is False
        assert poller.wait_idle(timeout=3)
        assert handler.deliveries() == {"slow": 1}
    finally:
        poller.stop()


def test_a_handler_running_past_the_function_timeout_gets_its_batch_again(
    sqs: Any, queues: Queues, start_poller: Callable[..., SqsPoller]
) -> None:
    # Given a handler that overruns a 0.3 s function timeout on its first invocation
    remaining: list[int] = []

    def respond(_event: dict[str, Any], call: int) -> None:
        if call == 1:
            time.sleep(0.5)
            remaining.append(handler.contexts[0].get_remaining_time_in_millis())

    handler = Recorder(respond)
    send(sqs, queues, "slow")

    # When the poller runs with that timeout
    poller = start_poller(handler, function_timeout=0.3)
    assert poller.wait_idle(timeout=6)

    # Then the context said time was up, and Lambda's timeout made the batch come back
    assert remaining == [0]
    assert handler.deliveries() == {"slow": 2}
    assert poller.stats()["handler_errors"] == 1


def test_stop_returns_within_a_long_poll_and_leaves_no_thread(sqs: Any, queues: Queues) -> None:
    # Given a poller with two threads long-polling an empty queue
    poller = SqsPoller(
        "delivery-worker", sqs, queues.url, Recorder(), wait_seconds=1, concurrency=2
    )
    poller.start()
    assert poller.is_alive()
    time.sleep(0.2)

    # When it is stopped
    started = time.monotonic()
    poller.stop()

    # Then it returns within the long poll (plus moto's slack) and nothing is left running
    assert time.monotonic() - started < 3
    assert not poller.is_alive()
    assert not [t for t in threading.enumerate() if t.name.startswith("delivery-worker-")]


def test_polling_errors_are_retried_without_killing_the_poller(sqs: Any, queues: Queues) -> None:
    # Given an SQS endpoint that is unreachable for the first two receives
    class FlakySqs:
        def __init__(self, client: Any) -> None:
            self._client = client
            self.failures_left = 2

        def __getattr__(self, name: str) -> Any:
            return getattr(self._client, name)

        def receive_message(self, **request: Any) -> Any:
            if self.failures_left:
                self.failures_left -= 1
                raise EndpointConnectionError(endpoint_url=queues.url)
            return self._client.receive_message(**request)

    handler = Recorder()
    poller = SqsPoller("delivery-worker", FlakySqs(sqs), queues.url, handler, wait_seconds=1)
    send(sqs, queues, "after-outage")

    # When the poller runs through the outage
    poller.start()
    try:
        assert poller.wait_idle(timeout=5)

        # Then it stayed alive, counted the errors and delivered the message
        assert poller.is_alive()
        assert poller.stats()["poll_errors"] == 2
        assert handler.deliveries() == {"after-outage": 1}
    finally:
        poller.stop()


def test_a_chalice_sqs_handler_with_powertools_partial_failures_runs_unchanged(
    sqs: Any, queues: Queues, start_poller: Callable[..., SqsPoller]
) -> None:
    from aws_lambda_powertools.utilities.batch import (
        BatchProcessor,
        EventType,
        process_partial_response,
    )
    from chalice import Chalice

    # Given a Chalice SQS handler as it would be deployed, reporting failures via Powertools
    app = Chalice(app_name="poller-test")
    processor = BatchProcessor(event_type=EventType.SQS)

    def deliver(record: Any) -> None:
        if record.body == "undeliverable":
            raise ValueError("gateway rejected the message")

    @app.on_sqs_message(queue=queues.name, batch_size=10)
    def on_messages(event: Any) -> Any:
        return process_partial_response(
            event=event.to_dict(),
            record_handler=deliver,
            processor=processor,
            context=event.context,
        )

    send(sqs, queues, "fine", "undeliverable")

    # When the poller invokes it (a long visibility timeout keeps the failure in flight)
    poller = start_poller(on_messages, visibility_timeout=30)
    eventually(lambda: poller.stats()["invocations"] >= 1)
    eventually(lambda: poller.stats()["records_deleted"] == 1, timeout=2)

    # Then the good record was deleted and only the failed one is left for a retry
    stats = poller.stats()
    assert stats["records_failed"] == 1
    assert stats["handler_errors"] == 0
    assert queue_depth(sqs, queues) == 1


# -- Lambda's timeout: an invocation past it is stopped, and writes nothing more -------------


@pytest.fixture(scope="module")
def dynamodb(sqs_endpoint: str) -> Any:
    return emulator_client("dynamodb", sqs_endpoint)


@pytest.fixture
def outcomes(dynamodb: Any) -> str:
    """A table the handlers write their outcomes to, one item per record body."""
    name = f"outcomes-{uuid.uuid4().hex[:12]}"
    dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "body", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "body", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return name


def written(dynamodb: Any, table: str) -> set[str]:
    return {item["body"]["S"] for item in dynamodb.scan(TableName=table)["Items"]}


def test_a_handler_past_its_timeout_writes_nothing_and_its_batch_comes_back(
    sqs: Any,
    queues: Queues,
    dynamodb: Any,
    outcomes: str,
    start_poller: Callable[..., SqsPoller],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a handler whose first invocation for "slow" outlives a 1 s timeout before it writes
    # its outcome (1 s, so that a busy machine does not stop the later invocations too), and a
    # second message behind it
    late_write: list[BaseException] = []
    zombie_done = threading.Event()

    def respond(event: dict[str, Any], call: int) -> None:
        for record in event["Records"]:
            if record["body"] == "slow" and call == 1:
                time.sleep(1.5)
                try:
                    dynamodb.put_item(TableName=outcomes, Item={"body": {"S": "late"}})
                except BaseException as exc:
                    late_write.append(exc)
                    raise
                finally:
                    zombie_done.set()
            dynamodb.put_item(TableName=outcomes, Item={"body": {"S": record["body"]}})

    handler = Recorder(respond)
    send(sqs, queues, "slow")
    send(sqs, queues, "fast")

    # When one poller runs it, a record at a time
    poller = start_poller(handler, function_timeout=1.0, batch_size=1)
    assert poller.wait_idle(timeout=12)
    assert zombie_done.wait(4)

    # Then the write after the deadline was refused and wrote nothing...
    assert [type(exc).__name__ for exc in late_write] == ["InvocationAbandoned"]
    assert written(dynamodb, outcomes) == {"slow", "fast"}
    # ...the batch came back after the visibility timeout and the poller kept serving
    assert handler.deliveries() == {"slow": 2, "fast": 1}
    assert poller.stats()["timeouts"] == 1
    # ...and the log says so in one line, with no traceback
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage().split(";")[0] for r in errors] == [
        "delivery-worker: 1 records from " + queues.name + ": timed out after 1 s"
    ]
    assert "Lambda would have stopped it" in errors[0].getMessage()
    assert errors[0].exc_info is None


def test_a_handler_that_finishes_in_time_writes_and_its_records_are_deleted(
    sqs: Any,
    queues: Queues,
    dynamodb: Any,
    outcomes: str,
    start_poller: Callable[..., SqsPoller],
) -> None:
    # Given a handler that writes its outcome well within its timeout
    def respond(event: dict[str, Any], _call: int) -> None:
        time.sleep(0.1)
        for record in event["Records"]:
            dynamodb.put_item(TableName=outcomes, Item={"body": {"S": record["body"]}})

    handler = Recorder(respond)
    send(sqs, queues, "a", "b")

    # When the poller runs it
    poller = start_poller(handler, function_timeout=2)
    assert poller.wait_idle(timeout=5)

    # Then every outcome is written and each record was delivered once
    assert written(dynamodb, outcomes) == {"a", "b"}
    assert handler.deliveries() == {"a": 1, "b": 1}
    assert poller.stats()["timeouts"] == 0


def test_the_remaining_time_counts_down_during_an_invocation(
    sqs: Any, queues: Queues, start_poller: Callable[..., SqsPoller]
) -> None:
    # Given a handler that reads its remaining time twice, 0.3 s apart
    readings: list[int] = []

    def respond(_event: dict[str, Any], _call: int) -> None:
        context = handler.contexts[-1]
        readings.append(context.get_remaining_time_in_millis())
        time.sleep(0.3)
        readings.append(context.get_remaining_time_in_millis())

    handler = Recorder(respond)
    send(sqs, queues, "x")

    # When it runs with a 2 s timeout
    poller = start_poller(handler, function_timeout=2)
    assert poller.wait_idle(timeout=5)

    # Then it had at most 2 s, and 0.3 s later about 0.3 s less
    first, second = readings
    assert first <= 2000
    assert 250 <= first - second <= 600


def test_a_schedule_tick_past_its_timeout_is_stopped_and_writes_nothing(
    dynamodb: Any, outcomes: str, caplog: pytest.LogCaptureFixture
) -> None:
    from devstack.stack import ScheduleTrigger

    # Given a scheduled function that writes after its 0.3 s timeout
    done = threading.Event()

    def tick(_event: dict[str, Any], _context: Any) -> None:
        try:
            time.sleep(0.6)
            dynamodb.put_item(TableName=outcomes, Item={"body": {"S": "tick"}})
        finally:
            done.set()

    trigger = ScheduleTrigger(
        tick,
        "scheduler_tick",
        60,
        rule_name="tick",
        region=REGION,
        account=ACCOUNT,
        function_timeout=0.3,
    )

    # When the schedule invokes it
    started = time.monotonic()
    trigger.invoke()

    # Then the schedule moved on at the timeout, the late write was refused, one line logged
    assert time.monotonic() - started < 0.55
    assert done.wait(2)
    assert written(dynamodb, outcomes) == set()
    assert trigger.timeouts == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "scheduler_tick: the scheduled invocation timed out after 0.3 s; "
        "Lambda would have stopped it"
    ]
