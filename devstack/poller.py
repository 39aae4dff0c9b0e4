"""An SQS poller for the local stack: Lambda's SQS event source mapping, in a thread.

It receives batches, hands them to a Lambda-style `handler(event, context)` in exactly the
shape Lambda would, and deletes records by Lambda's rules, so the handler that runs in AWS
runs unchanged here. Redelivery and the dead-letter queue are left to the queue itself
(its visibility timeout and redrive policy), as they are in AWS. A handler that runs past its
function's timeout is stopped as Lambda stops it (see `invoke`): its batch is not deleted, and
nothing it does afterwards takes effect.
"""

from __future__ import annotations

import base64
import contextvars
import decimal
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from devstack import faults, invocation

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], Any], Any]

# Lambda's own defaults where the poller has no better source.
DEFAULT_FUNCTION_TIMEOUT_SECONDS = 30.0
DEFAULT_MEMORY_MB = 128
_MAX_BATCH_SIZE = 10  # one ReceiveMessage call returns at most 10 messages
_MAX_WAIT_SECONDS = 20
_MAX_VISIBILITY_TIMEOUT = 43200
_DELETE_CHUNK = 10
# A short poll that found nothing waits this long, so wait_seconds=0 does not spin.
_EMPTY_POLL_PAUSE_SECONDS = 0.1
_BACKOFF_FIRST_SECONDS = 0.2
_BACKOFF_MAX_SECONDS = 5.0
# stop() waits for a long poll plus a running handler, but not for a 15-minute one.
_STOP_HANDLER_GRACE_SECONDS = 10.0
# moto answers a long poll up to a second after WaitTimeSeconds (it waits in 1 s steps).
_LONG_POLL_SLACK_SECONDS = 1.0
_IDLE_CHECK_SECONDS = 0.1
_QUEUE_DEPTH_ATTRIBUTES = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)


class LambdaContext:
    """The context object Lambda's Python runtime passes to a handler, for one invocation."""

    def __init__(
        self,
        *,
        function_name: str,
        invoked_function_arn: str,
        log_stream_name: str,
        timeout_seconds: float,
        memory_limit_in_mb: int = DEFAULT_MEMORY_MB,
    ) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = invoked_function_arn
        # A string, as the runtime reads it from AWS_LAMBDA_FUNCTION_MEMORY_SIZE.
        self.memory_limit_in_mb = str(memory_limit_in_mb)
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = log_stream_name
        self.client_context = None
        self.identity = SimpleNamespace(cognito_identity_id=None, cognito_identity_pool_id=None)
        self.tenant_id = None
        self._deadline = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before Lambda would stop this invocation (never negative)."""
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    def log(self, msg: str) -> None:
        logger.info("%s", msg)

    def __repr__(self) -> str:
        return (
            f"LambdaContext(function_name={self.function_name!r}, "
            f"aws_request_id={self.aws_request_id!r})"
        )


@dataclass
class PollerStats:
    """What the poller has done since it was built."""

    invocations: int = 0
    records_received: int = 0
    records_deleted: int = 0
    records_failed: int = 0
    handler_errors: int = 0
    timeouts: int = 0
    poll_errors: int = 0


class InvocationTimedOut(Exception):
    """The handler ran past its function's timeout, and Lambda would have stopped it."""

    def __init__(self, function: str, timeout_seconds: float) -> None:
        super().__init__(f"timed out after {timeout_seconds:g} s")
        self.function = function
        self.timeout_seconds = timeout_seconds


def invoke(function: str, timeout_seconds: float, call: Callable[[], Any]) -> Any:
    """Run `call` as one invocation of `function`, stopped as Lambda stops it at its timeout.

    It runs in a thread of its own, so the caller can walk away at the deadline as Lambda
    does: then the invocation is abandoned (from its deadline on every AWS and gateway call it
    makes fails, see faults.py, so it writes nothing more) and InvocationTimedOut is raised,
    while the thread may still run to its next call. Otherwise what `call` returns is returned
    and what it raises is raised.
    """
    faults.install_call_hooks()
    started = threading.Event()
    finished = threading.Event()
    tagged: list[invocation.Invocation] = []
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        with invocation.running(function, timeout_seconds) as current:
            tagged.append(current)
            started.set()
            try:
                outcome.append((True, call()))
            except BaseException as exc:  # handed to the caller, or dropped once abandoned
                outcome.append((False, exc))
            finally:
                finished.set()

    # The caller's context (log fields bound to it, say) goes with the call, as before.
    context = contextvars.copy_context()
    thread = threading.Thread(
        target=context.run, args=(run,), name=f"{function}-invocation", daemon=True
    )
    thread.start()
    started.wait()
    current = tagged[0]
    if not finished.wait(current.remaining_seconds()):
        current.abandon()
        raise InvocationTimedOut(function, timeout_seconds)
    returned, value = outcome[0]
    if returned:
        return value
    if isinstance(value, invocation.InvocationAbandoned):
        # A call refused at the deadline ended it: the same timeout, seen from inside.
        raise InvocationTimedOut(function, timeout_seconds) from None
    raise value


class _WholeBatchFailed(Exception):
    """The handler's response makes Lambda treat the whole batch as failed."""


class SqsPoller:
    """A local stand-in for a Lambda SQS event source mapping (a local-stack component)."""

    def __init__(
        self,
        name: str,
        sqs_client: Any,
        queue_url: str,
        handler: Handler,
        *,
        batch_size: int = 10,
        visibility_timeout: int | None = None,
        wait_seconds: int = 1,
        concurrency: int = 1,
        report_batch_item_failures: bool = True,
        function_timeout: float | None = None,
        region: str = "us-east-1",
        account: str = "123456789012",
    ) -> None:
        if not 1 <= batch_size <= _MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be 1..{_MAX_BATCH_SIZE}, got {batch_size}")
        if not 0 <= wait_seconds <= _MAX_WAIT_SECONDS:
            raise ValueError(f"wait_seconds must be 0..{_MAX_WAIT_SECONDS}, got {wait_seconds}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if visibility_timeout is not None and not (
            0 <= visibility_timeout <= _MAX_VISIBILITY_TIMEOUT
        ):
            raise ValueError(
                f"visibility_timeout must be 0..{_MAX_VISIBILITY_TIMEOUT}, got {visibility_timeout}"
            )
        if function_timeout is not None and function_timeout <= 0:
            raise ValueError(f"function_timeout must be positive, got {function_timeout}")
        self.name = name
        self.queue_url = queue_url
        self.queue_name = queue_url.rstrip("/").rsplit("/", 1)[-1]
        self.queue_arn = f"arn:aws:sqs:{region}:{account}:{self.queue_name}"
        self.function_arn = f"arn:aws:lambda:{region}:{account}:function:{name}"
        self._sqs = sqs_client
        self._handler = handler
        self._batch_size = batch_size
        self._visibility_timeout = visibility_timeout
        self._wait_seconds = wait_seconds
        self._concurrency = concurrency
        self._report_batch_item_failures = report_batch_item_failures
        self._function_timeout = function_timeout
        self._region = region
        self._invocation_budget = function_timeout or DEFAULT_FUNCTION_TIMEOUT_SECONDS
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # moto's ReceiveMessage is not atomic: two concurrent calls can both take the same
        # message. Receiving one thread at a time avoids that; handlers still run in parallel.
        self._receive_lock = threading.Lock()
        self._stats = PollerStats()
        self._running_invocations = 0

    # -- component protocol -------------------------------------------------------------

    def start(self) -> None:
        """Start the polling threads; the queue must exist (its visibility timeout is read)."""
        if self._threads:
            raise RuntimeError(f"{self.name} is already started")
        if self._function_timeout is None:
            visibility = self._visibility_timeout
            if visibility is None:
                visibility = self._queue_visibility_timeout()
            # Lambda requires the function timeout to fit in the visibility timeout.
            self._invocation_budget = float(visibility or DEFAULT_FUNCTION_TIMEOUT_SECONDS)
        # A fresh event per run: a thread left behind by an earlier stop() stays stopped.
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._poll_forever,
                args=(self._stopping,),
                name=f"{self.name}-{n}",
                daemon=True,
            )
            for n in range(self._concurrency)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop polling and wait for a running long poll and handler, at most `timeout` s."""
        self._stopping.set()
        if timeout is None:
            timeout = (
                self._wait_seconds
                + _LONG_POLL_SLACK_SECONDS
                + min(self._invocation_budget, _STOP_HANDLER_GRACE_SECONDS)
            )
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [thread.name for thread in self._threads if thread.is_alive()]
        if stuck:
            # Daemon threads: they cannot keep the process alive, only finish late.
            logger.warning(
                "%s: %s still running after %.1f s; left behind",
                self.name,
                ", ".join(stuck),
                timeout,
            )
        self._threads = []

    def is_alive(self) -> bool:
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    # -- observability and tests --------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """The counters: invocations, records received/deleted/failed, handler/poll errors."""
        with self._lock:
            return asdict(self._stats)

    def wait_idle(self, timeout: float) -> bool:
        """True once the queue holds nothing visible, in flight or delayed and no handler runs."""
        deadline = time.monotonic() + timeout
        # Twice in a row: moto counts visible, in-flight and delayed messages at three moments,
        # so a message whose visibility timeout ends between two of them is in neither count.
        empty_before = False
        while True:
            empty = self._queue_is_empty() and self._idle()
            if empty and empty_before:
                return True
            empty_before = empty
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(_IDLE_CHECK_SECONDS, remaining))

    def _idle(self) -> bool:
        with self._lock:
            return self._running_invocations == 0

    def _queue_is_empty(self) -> bool:
        try:
            attributes = self._sqs.get_queue_attributes(
                QueueUrl=self.queue_url, AttributeNames=list(_QUEUE_DEPTH_ATTRIBUTES)
            )["Attributes"]
        except Exception:
            logger.debug("%s: cannot read the depth of %s", self.name, self.queue_name)
            return False
        return all(int(attributes.get(name, "0")) == 0 for name in _QUEUE_DEPTH_ATTRIBUTES)

    def _queue_visibility_timeout(self) -> int:
        attributes = self._sqs.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["VisibilityTimeout"]
        )["Attributes"]
        return int(attributes["VisibilityTimeout"])

    # -- the polling loop ---------------------------------------------------------------

    def _poll_forever(self, stopping: threading.Event) -> None:
        # One polling thread stands for one Lambda execution environment: one log stream.
        log_stream_name = f"{datetime.now(UTC):%Y/%m/%d}/[$LATEST]{uuid.uuid4().hex}"
        backoff = _BACKOFF_FIRST_SECONDS
        while not stopping.is_set():
            try:
                messages = self._receive(stopping)
            except Exception as exc:
                if stopping.is_set():
                    break
                with self._lock:
                    self._stats.poll_errors += 1
                logger.warning(
                    "%s: receiving from %s failed (%s); retrying in %.1f s",
                    self.name,
                    self.queue_name,
                    exc,
                    backoff,
                )
                stopping.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_SECONDS)
                continue
            backoff = _BACKOFF_FIRST_SECONDS
            if messages:
                # Received is in flight: hand it over even when stopping, or it would sit
                # invisible for a whole visibility timeout with nobody working on it.
                try:
                    self._invoke(messages, log_stream_name)
                except Exception:
                    # A bug here must not end polling; the batch simply comes back.
                    logger.exception("%s: invoking the handler failed unexpectedly", self.name)
            elif self._wait_seconds == 0:
                stopping.wait(_EMPTY_POLL_PAUSE_SECONDS)

    def _receive(self, stopping: threading.Event) -> list[dict[str, Any]]:
        request: dict[str, Any] = {
            "QueueUrl": self.queue_url,
            "MaxNumberOfMessages": self._batch_size,
            "WaitTimeSeconds": self._wait_seconds,
            "AttributeNames": ["All"],
            "MessageAttributeNames": ["All"],
        }
        if self._visibility_timeout is not None:
            request["VisibilityTimeout"] = self._visibility_timeout
        with self._receive_lock:
            # Another thread's long poll may have outlasted stop(): receive nothing new.
            if stopping.is_set():
                return []
            return list(self._sqs.receive_message(**request).get("Messages", []))

    def _invoke(self, messages: Sequence[dict[str, Any]], log_stream_name: str) -> None:
        records = [self._record(message) for message in messages]
        ids = [record["messageId"] for record in records]
        context = LambdaContext(
            function_name=self.name,
            invoked_function_arn=self.function_arn,
            log_stream_name=log_stream_name,
            timeout_seconds=self._invocation_budget,
        )
        with self._lock:
            self._running_invocations += 1
            self._stats.invocations += 1
            self._stats.records_received += len(records)
        try:
            retry = self._run_handler({"Records": records}, context, ids)
            kept = set(ids) if retry is None else retry
            to_delete = [record for record in records if record["messageId"] not in kept]
            deleted = self._delete(to_delete)
            with self._lock:
                self._stats.records_failed += len(kept)
                self._stats.records_deleted += deleted
        finally:
            with self._lock:
                self._running_invocations -= 1

    def _run_handler(
        self, event: dict[str, Any], context: LambdaContext, ids: list[str]
    ) -> set[str] | None:
        """The message ids to leave for redelivery; None when the whole batch failed."""
        try:
            response = invoke(
                self.name, self._invocation_budget, lambda: self._handler(event, context)
            )
            # The runtime serialises the response; one that cannot be is an invocation error.
            _marshal(response)
        except InvocationTimedOut as exc:
            with self._lock:
                self._stats.handler_errors += 1
                self._stats.timeouts += 1
            # One line, no traceback: the handler did nothing wrong but run long.
            logger.error(
                "%s: %d records from %s: %s; Lambda would have stopped it; the batch will be "
                "retried after the visibility timeout: %s",
                self.name,
                len(ids),
                self.queue_name,
                exc,
                ", ".join(ids),
                extra={"queue": self.queue_name, "sqs_message_ids": ids},
            )
            return None
        except Exception:
            self._count_handler_error()
            logger.exception(
                "%s: handler failed on %d records from %s; the batch will be retried: %s",
                self.name,
                len(ids),
                self.queue_name,
                ", ".join(ids),
                extra={"queue": self.queue_name, "sqs_message_ids": ids},
            )
            return None
        if not self._report_batch_item_failures:
            return set()
        try:
            return _reported_failures(response, set(ids))
        except _WholeBatchFailed as exc:
            logger.error(
                "%s: %s; all %d records from %s will be retried: %s",
                self.name,
                exc,
                len(ids),
                self.queue_name,
                ", ".join(ids),
                extra={"queue": self.queue_name, "sqs_message_ids": ids},
            )
            return None

    def _count_handler_error(self) -> None:
        with self._lock:
            self._stats.handler_errors += 1

    def _delete(self, records: Sequence[dict[str, Any]]) -> int:
        deleted = 0
        for start in range(0, len(records), _DELETE_CHUNK):
            chunk = records[start : start + _DELETE_CHUNK]
            entries = [
                {"Id": str(n), "ReceiptHandle": record["receiptHandle"]}
                for n, record in enumerate(chunk)
            ]
            try:
                response = self._sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
            except Exception as exc:
                # Not deleted means delivered again: at-least-once, as in AWS.
                logger.warning(
                    "%s: deleting %d records from %s failed (%s); they will be redelivered",
                    self.name,
                    len(chunk),
                    self.queue_name,
                    exc,
                )
                continue
            deleted += len(response.get("Successful", []))
            for failure in response.get("Failed", []):
                record = chunk[int(failure["Id"])]
                logger.warning(
                    "%s: could not delete %s from %s: %s",
                    self.name,
                    record["messageId"],
                    self.queue_name,
                    failure.get("Message") or failure.get("Code"),
                )
        return deleted

    def _record(self, message: dict[str, Any]) -> dict[str, Any]:
        """One SQS message as a record of Lambda's SQS event."""
        record: dict[str, Any] = {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": {
                name: str(value) for name, value in message.get("Attributes", {}).items()
            },
            "messageAttributes": {
                name: _lambda_message_attribute(value)
                for name, value in message.get("MessageAttributes", {}).items()
            },
            "md5OfBody": message["MD5OfBody"],
        }
        if message.get("MD5OfMessageAttributes"):
            record["md5OfMessageAttributes"] = message["MD5OfMessageAttributes"]
        record["eventSource"] = "aws:sqs"
        record["eventSourceARN"] = self.queue_arn
        record["awsRegion"] = self._region
        return record


def _marshal(response: Any) -> None:
    """Raise where Lambda's Python runtime fails with Runtime.MarshalError."""
    if isinstance(response, bytes):  # sent as is
        return

    def default(value: Any) -> Any:
        if isinstance(value, decimal.Decimal):  # the runtime encodes these as numbers
            return str(value)
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    json.dumps(response, default=default)


def _lambda_message_attribute(value: dict[str, Any]) -> dict[str, Any]:
    """boto3's MessageAttributeValue in Lambda's camelCase shape, binaries base64-encoded."""
    attribute: dict[str, Any] = {}
    if "StringValue" in value:
        attribute["stringValue"] = value["StringValue"]
    if "BinaryValue" in value:
        attribute["binaryValue"] = _base64(value["BinaryValue"])
    attribute["stringListValues"] = list(value.get("StringListValues", []))
    attribute["binaryListValues"] = [_base64(v) for v in value.get("BinaryListValues", [])]
    attribute["dataType"] = value["DataType"]
    return attribute


def _base64(value: bytes | str) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return base64.b64encode(raw).decode("ascii")


def _reported_failures(response: Any, batch_ids: set[str]) -> set[str]:
    """The ids a handler reported in batchItemFailures, by Lambda's rules.

    No response, an empty one or an empty/null list means every record succeeded; a
    malformed entry or an id not in the batch makes the whole batch fail.
    """
    if not isinstance(response, dict):
        return set()
    failures = response.get("batchItemFailures")
    if failures is None:
        return set()
    if not isinstance(failures, list):
        raise _WholeBatchFailed("batchItemFailures is not a list")
    failed: set[str] = set()
    for item in failures:
        identifier = item.get("itemIdentifier") if isinstance(item, dict) else None
        if not identifier or not isinstance(identifier, str):
            raise _WholeBatchFailed(f"invalid batch item failure {item!r}")
        if identifier not in batch_ids:
            raise _WholeBatchFailed(f"batch item failure {identifier!r} is not in the batch")
        failed.add(identifier)
    return failed
