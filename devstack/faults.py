"""What the local stack does to the service's outgoing calls, so they fail as they would in AWS.

1. AWS faults (`AWS_FAULTS`). The emulator never throttles, never cancels a transaction for a
   conflict and never fails: here a share of the service's own AWS requests is answered with
   the error AWS returns under contention and failure, before the request reaches the emulator
   (a faulted request changes nothing, as in AWS). The answer is made per HTTP attempt, below
   botocore's retry handler, so the SDK retries it as it would retry AWS's, and what reaches the
   code is what would reach it in AWS. Only calls made inside an invocation (see invocation.py)
   are faulted: never the stack's own set-up, the pollers' receives and deletes, or a test's
   reads.
2. Lambda's timeout. An invocation Lambda has stopped makes no further call: once its deadline
   has passed (or the poller has abandoned it), every AWS request and every HTTP request through
   `requests` (the SMS gateway) from it raises InvocationAbandoned, so nothing it would still do
   takes effect.

Both hook the one place every attempt passes: `botocore.endpoint.Endpoint._do_get_response`
(which also runs moto's in-process `mock_aws` stub, through its `before-send` event, so both the
in-process mock and the stack's emulator server are covered) and `requests.Session.send`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import random
import threading
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from devstack import invocation

logger = logging.getLogger(__name__)

SETTING = "AWS_FAULTS"

_DYNAMODB = "dynamodb"
_SQS = "sqs"
# Not a fault: how many DynamoDB transactions were attempted while faults were on.
TRANSACTIONS = "transactions"
_SECRETS = "secrets-manager"
_DYNAMODB_ERROR_PREFIX = "com.amazonaws.dynamodb.v20120810#"


@dataclass(frozen=True)
class AwsFaults:
    """How often the service's AWS requests fail; each rate is a share of request attempts."""

    # DynamoDB TransactWriteItems cancelled with a TransactionConflict reason.
    conflict: float = 0.0
    # DynamoDB requests answered ThrottlingException or ProvisionedThroughputExceededException.
    throttle: float = 0.0
    # DynamoDB requests answered InternalServerError (500).
    ddb500: float = 0.0
    # SQS requests answered InternalError (500).
    sqs500: float = 0.0
    # SQS requests that time out waiting for the answer (the request was never sent).
    sqstimeout: float = 0.0
    # Secrets Manager requests answered ThrottlingException.
    secrets: float = 0.0
    # Seed of the draws: the same seed and the same calls give the same faults.
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in _RATES:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1):
                raise ValueError(f"{SETTING}: {name} must be a rate between 0 and 1, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> AwsFaults:
        """Read `name=value,...` (empty: no faults); a bad entry raises ValueError naming it."""
        values: dict[str, Any] = {}
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            name, sep, raw = (piece.strip() for piece in entry.partition("="))
            if not sep:
                raise ValueError(f"{SETTING}: {entry!r} is not name=value")
            if name not in _FIELDS:
                raise ValueError(f"{SETTING}: unknown fault {name!r}; known: {', '.join(_FIELDS)}")
            if name in values:
                raise ValueError(f"{SETTING}: {name} is given twice")
            values[name] = _seed(raw) if name == "seed" else _rate(name, raw)
        return cls(**values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AwsFaults:
        return cls.parse(environ.get("AWS_FAULTS") or "")

    @property
    def active(self) -> bool:
        return any(getattr(self, name) > 0 for name in _RATES)

    def summary(self) -> str:
        """The faults that are on, as `AWS_FAULTS` would set them, or "none"."""
        on = [f"{name}={getattr(self, name):g}" for name in _RATES if getattr(self, name) > 0]
        if on and self.seed is not None:
            on.append(f"seed={self.seed}")
        return ",".join(on) or "none"


_FIELDS = tuple(f.name for f in dataclasses.fields(AwsFaults))
_RATES = tuple(name for name in _FIELDS if name != "seed")


def _rate(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SETTING}: {name} must be a rate between 0 and 1, got {raw!r}") from None
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"{SETTING}: {name} must be a rate between 0 and 1, got {raw!r}")
    return value


def _seed(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{SETTING}: seed must be a whole number, got {raw!r}") from None


# -- the faults ------------------------------------------------------------------------------


class _RawBody:
    """The `raw` of a botocore AWSResponse: a body already read."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Any:
        yield self._body


@dataclass(frozen=True)
class _ErrorAnswer:
    """An error answer as the service's JSON protocol writes it."""

    status: int
    code: str
    message: str
    type_prefix: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    query_error: str | None = None  # SQS (query-compatible) reads its error code from a header

    def response(self, url: str) -> Any:
        from botocore.awsrequest import AWSResponse

        body = {"__type": f"{self.type_prefix}{self.code}", "message": self.message, **self.extra}
        headers = {
            "Content-Type": "application/x-amz-json-1.0",
            "x-amzn-RequestId": str(uuid.uuid4()),
        }
        if self.query_error:
            headers["x-amzn-query-error"] = self.query_error
        return AWSResponse(url, self.status, headers, _RawBody(json.dumps(body).encode()))


class _Injector:
    """Draws, per request attempt, whether it fails and how; counts what it injected."""

    def __init__(self, faults: AwsFaults) -> None:
        self.faults = faults
        self._random = random.Random(faults.seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def draw(self, service: str, operation: str, request: Any) -> _ErrorAnswer | str | None:
        """The error to answer with, "timeout" for a read timeout, or None to let it through."""
        faults = self.faults
        with self.lock:
            if service == _DYNAMODB and operation == "TransactWriteItems":
                # The base of the conflict rate: every transaction attempt, faulted or not.
                self.counts[TRANSACTIONS] += 1
            if service == _DYNAMODB:
                if self._hit(faults.ddb500):
                    return self._count("ddb500", _dynamodb_500())
                if self._hit(faults.throttle):
                    code = self._random.choice(
                        ("ThrottlingException", "ProvisionedThroughputExceededException")
                    )
                    return self._count("throttle", _dynamodb_throttle(code))
                if operation == "TransactWriteItems" and self._hit(faults.conflict):
                    items = _transaction_size(request)
                    return self._count("conflict", _conflict(items, self._random))
            elif service == _SQS:
                if self._hit(faults.sqs500):
                    return self._count("sqs500", _sqs_500())
                if self._hit(faults.sqstimeout):
                    return self._count("sqstimeout", "timeout")
            elif service == _SECRETS and self._hit(faults.secrets):
                return self._count("secrets", _secrets_throttle())
        return None

    def _hit(self, rate: float) -> bool:
        # No draw for a fault that is off: turning one on keeps the others' sequence.
        return rate > 0 and self._random.random() < rate

    def _count(self, kind: str, answer: Any) -> Any:
        self.counts[kind] += 1
        return answer


def _dynamodb_500() -> _ErrorAnswer:
    return _ErrorAnswer(500, "InternalServerError", "Internal server error", _DYNAMODB_ERROR_PREFIX)


def _dynamodb_throttle(code: str) -> _ErrorAnswer:
    message = (
        "The level of configured provisioned throughput for the table was exceeded."
        if code == "ProvisionedThroughputExceededException"
        else "Throughput exceeds the current capacity of your table or index."
    )
    return _ErrorAnswer(400, code, message, _DYNAMODB_ERROR_PREFIX)


def _conflict(items: int, rng: random.Random) -> _ErrorAnswer:
    """A cancellation as DynamoDB writes it: a reason per item, a conflict on at least one."""
    conflicting = rng.randrange(items)
    reasons = [
        {"Code": "TransactionConflict", "Message": "Transaction is ongoing for the item"}
        if n == conflicting
        else {"Code": "None"}
        for n in range(items)
    ]
    codes = ", ".join(reason["Code"] for reason in reasons)
    return _ErrorAnswer(
        400,
        "TransactionCanceledException",
        f"Transaction cancelled, please refer cancellation reasons for specific reasons [{codes}]",
        _DYNAMODB_ERROR_PREFIX,
        extra={"CancellationReasons": reasons},
    )


def _transaction_size(request: Any) -> int:
    body = request.body
    try:
        text = body.decode() if isinstance(body, bytes) else str(body)
        return max(1, len(json.loads(text).get("TransactItems", [])))
    except (ValueError, AttributeError):
        return 1


def _sqs_500() -> _ErrorAnswer:
    return _ErrorAnswer(
        500,
        "InternalError",
        "We encountered an internal error. Please try again.",
        "com.amazonaws.sqs#",
        query_error="InternalError;Receiver",
    )


def _secrets_throttle() -> _ErrorAnswer:
    return _ErrorAnswer(400, "ThrottlingException", "Rate exceeded")


# -- the hooks -------------------------------------------------------------------------------

_injector: _Injector | None = None
_install_lock = threading.Lock()
_installed = False


def inject_aws_faults(faults: AwsFaults | None) -> None:
    """Answer the service's AWS requests with these faults from now on (None or none: stop).

    The counts start again from zero.
    """
    global _injector
    install_call_hooks()
    _injector = _Injector(faults) if faults is not None and faults.active else None


def injected_aws_faults() -> dict[str, int]:
    """How many faults of each kind were injected since `inject_aws_faults`, and how many
    transactions were attempted meanwhile (`transactions`)."""
    injector = _injector
    if injector is None:
        return {}
    with injector.lock:
        return {
            name: injector.counts[name] for name in (*_RATES, TRANSACTIONS) if injector.counts[name]
        }


def install_call_hooks() -> None:
    """Hook botocore and requests (idempotent): abandoned invocations' calls fail, faults apply."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _hook_botocore()
        _hook_requests()
        _installed = True


def _hook_botocore() -> None:
    from botocore.endpoint import Endpoint
    from botocore.exceptions import ReadTimeoutError

    original = Endpoint._do_get_response

    @functools.wraps(original)
    def do_get_response(self: Any, request: Any, operation_model: Any, context: Any) -> Any:
        current = invocation.current()
        if current is None:
            return original(self, request, operation_model, context)
        service = operation_model.service_model.service_id.hyphenize()
        if current.abandoned:
            raise invocation.InvocationAbandoned(
                f"{current.function} ran past its timeout: {service} "
                f"{operation_model.name} refused, as Lambda would have stopped it"
            )
        injector = _injector
        answer = None if injector is None else injector.draw(service, operation_model.name, request)
        if answer is None:
            return original(self, request, operation_model, context)
        if answer == "timeout":
            return None, ReadTimeoutError(endpoint_url=request.url)
        return _parsed(self, answer.response(request.url), operation_model)

    Endpoint._do_get_response = do_get_response  # type: ignore[method-assign]


def _parsed(endpoint: Any, http_response: Any, operation_model: Any) -> Any:
    """The (response, parsed) pair botocore makes of an answer, as `_do_get_response` does."""
    from botocore.endpoint import convert_to_response_dict

    response_dict = convert_to_response_dict(http_response, operation_model)
    parser = endpoint._response_parser_factory.create_parser(
        operation_model.service_model.resolved_protocol
    )
    parsed = parser.parse(response_dict, operation_model.output_shape)
    # Modeled fields of the error, such as a cancellation's CancellationReasons.
    endpoint._add_modeled_error_fields(response_dict, parsed, operation_model, parser)
    return (http_response, parsed), None


def _hook_requests() -> None:
    # Session.send, not HTTPAdapter.send: `responses` (under moto's mock_aws) replaces the latter.
    import requests

    original = requests.Session.send

    @functools.wraps(original)
    def send(self: Any, request: Any, **kwargs: Any) -> Any:
        current = invocation.current()
        if current is not None and current.abandoned:
            raise invocation.InvocationAbandoned(
                f"{current.function} ran past its timeout: {request.method} {request.url} "
                "refused, as Lambda would have stopped it"
            )
        return original(self, request, **kwargs)

    requests.Session.send = send  # type: ignore[method-assign]
