"""What the SMS gateway answered to one call, classified once (by the gateway client).

`AnswerKind` is the one reading of the HTTP status, the body and the transport error; everything
else (the message's fate, the shared rate, the error metrics) decides from the kind, never from
the status code again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    """What an answer means for the message."""

    SENT = "sent"
    REJECTED = "rejected"  # the gateway refused this message for good: do not retry
    UNAUTHORIZED = "unauthorized"  # our credentials are wrong: a configuration problem
    RETRY = "retry"  # transient or unknown: try again later


class AnswerKind(StrEnum):
    """What the gateway answered, as precisely as the sender and the metrics need it."""

    SENT = "sent"  # HTTP 200 with the success code
    REJECTED = "rejected"  # a 4xx that refuses this message for good
    UNAUTHORIZED = "unauthorized"  # HTTP 401 / 403
    TOO_MANY_REQUESTS = "too_many_requests"  # HTTP 429: slow down
    UNAVAILABLE = "unavailable"  # HTTP 503: slow down when it says for how long
    SERVER_ERROR = "server_error"  # another 5xx
    REQUEST_TIMEOUT = "request_timeout"  # HTTP 408: the gateway gave up waiting for the request
    BAD_ANSWER = "bad_answer"  # HTTP 200 without the success code, or an unexpected status
    TIMEOUT = "timeout"  # no answer in time
    NETWORK = "network"  # no answer at all: connection refused or dropped

    @property
    def outcome(self) -> Outcome:
        """What this kind of answer means for the message."""
        return _OUTCOMES.get(self, Outcome.RETRY)

    @property
    def error_class(self) -> str | None:
        """The metrics' class of a failed call (None for a success)."""
        return _ERROR_CLASSES[self]


_OUTCOMES = {
    AnswerKind.SENT: Outcome.SENT,
    AnswerKind.REJECTED: Outcome.REJECTED,
    AnswerKind.UNAUTHORIZED: Outcome.UNAUTHORIZED,
}

_ERROR_CLASSES: dict[AnswerKind, str | None] = {
    AnswerKind.SENT: None,
    AnswerKind.REJECTED: "http_4xx",
    AnswerKind.UNAUTHORIZED: "unauthorized",
    AnswerKind.TOO_MANY_REQUESTS: "http_429",
    AnswerKind.UNAVAILABLE: "http_5xx",
    AnswerKind.SERVER_ERROR: "http_5xx",
    AnswerKind.REQUEST_TIMEOUT: "http_4xx",
    AnswerKind.BAD_ANSWER: "bad_answer",
    AnswerKind.TIMEOUT: "timeout",
    AnswerKind.NETWORK: "network",
}


@dataclass(frozen=True)
class GatewayResult:
    """One call's answer: its kind, a short detail for the message's error, and its timing."""

    kind: AnswerKind
    detail: str
    status_code: int | None  # for logs only: decisions read `kind`
    latency_seconds: float
    retry_after: str | None = None  # the answer's Retry-After header, as sent

    @property
    def outcome(self) -> Outcome:
        return self.kind.outcome
