"""Small helpers shared by the services' data access.

DynamoDB errors mean different things, and the services must tell them apart:
- a failed condition is an answer: someone else already did it (or the record is not there);
- a transaction conflict, a throttle or a 500 means "try again": nothing was written;
- anything else (an access denial, a validation error) is a bug to surface.

A cancelled transaction carries one reason per item. Only when every reason given is
`ConditionalCheckFailed` did the conditions fail; a `TransactionConflict`, `ThrottlingError` or
any other reason beside them means the transaction was not evaluated to the end, so no answer
can be read from it.
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from chalicelib.errors import StorageBusy

logger = logging.getLogger(__name__)
T = TypeVar("T")

CONDITION_FAILED = "ConditionalCheckFailed"
_CONDITION_FAILED_CODE = "ConditionalCheckFailedException"
_CANCELLED = "TransactionCanceledException"
# Error codes that mean "nothing was written; the same request may succeed if sent again".
TRANSIENT_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalServerError",
        "ServiceUnavailable",
        "TransactionConflictException",
        "TransactionInProgressException",
    }
)


class TryAgain(Exception):
    """Part of a request was not done (a batch read's unprocessed keys): ask again for the rest."""


def cancellation_reasons(exc: Exception) -> list[str]:
    """The codes of a cancelled transaction's reasons, the items that gave none left out."""
    reasons = getattr(exc, "cancellation_reasons", None) or []
    codes = [getattr(reason, "code", None) for reason in reasons if reason is not None]
    return [code for code in codes if code and code != "None"]


def error_code(exc: Exception) -> str | None:
    """The DynamoDB error code behind a PynamoDB (or botocore) exception, if any."""
    code = getattr(exc, "cause_response_code", None)
    if code is None:
        response: Any = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
    return code if isinstance(code, str) else None


def is_conditional_failure(exc: Exception) -> bool:
    """True when a write failed on its condition: the answer is "already done" or "not there".

    A cancelled transaction counts only when its reasons are all failed conditions; one
    cancelled for a conflict or a throttle is transient (see `is_transient`), never an answer.
    """
    code = error_code(exc)
    if code == _CONDITION_FAILED_CODE:
        return True
    if code != _CANCELLED:
        return False
    reasons = cancellation_reasons(exc)
    return bool(reasons) and all(reason == CONDITION_FAILED for reason in reasons)


def is_transient(exc: Exception) -> bool:
    """True when nothing was written and the same request may succeed if sent again."""
    if isinstance(exc, (TryAgain, StorageBusy)):
        return True
    code = error_code(exc)
    if code in TRANSIENT_CODES:
        return True
    return code == _CANCELLED and not is_conditional_failure(exc)


@dataclass(frozen=True)
class Retry:
    """Runs a storage request again, after a jittered exponential backoff, while it fails
    transiently and `remaining()` (seconds) leaves room for the pause plus `reserve`; at most
    `attempts` times when given. Anything else, or the last transient failure, is raised.

    botocore retries throttles itself but never a cancelled transaction; this is for what still
    reaches the service after botocore's own attempts. Each pause goes through `sleep`, so a
    test's virtual clock can take it without sleeping; `what` and the ids in `log` name the
    request in the warning logged before it.
    """

    remaining: Callable[[], float] = lambda: math.inf
    attempts: int | None = None
    reserve: float = 0.0
    first_pause: float = 0.05
    max_pause: float = 1.0
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    what: str = "storage request"
    log: Mapping[str, object] = field(default_factory=dict)

    def __call__(self, request: Callable[[], T]) -> T:
        ceiling = self.first_pause
        attempt = 1
        while True:
            try:
                return request()
            except Exception as exc:
                pause = self.rng.uniform(ceiling / 2, ceiling)
                if (
                    not is_transient(exc)
                    or attempt == self.attempts
                    or self.remaining() - pause <= self.reserve
                ):
                    raise
                # Not `attempt`: the sender's lines use that for the gateway call's attempt.
                logger.warning(
                    "%s: %s, trying again in %.2f s",
                    self.what,
                    error_code(exc) or type(exc).__name__,
                    pause,
                    extra={**self.log, "storage_attempt": attempt},
                )
            self.sleep(pause)
            ceiling = min(ceiling * 2, self.max_pause)
            attempt += 1


# No retry: the request's own outcome, whatever it is.
ONCE = Retry(attempts=1)
# Writes that may wait a little (the scheduler's, retry-failed's): six tries in all, since a
# fault that outlasts them is not a passing one, pausing at most 0.1, 0.2, 0.4, 0.8 and 1.6 s.
PATIENT = Retry(attempts=6, first_pause=0.1, max_pause=2.0)


def looks_like_id(value: str) -> bool:
    """Server ids are UUIDs; anything else cannot name a record (and never reaches DynamoDB)."""
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


@contextmanager
def busy_if_transient() -> Iterator[None]:
    """A throttle or a conflict with another transaction, left after the retries, becomes the
    domain's `StorageBusy` (nothing was written; the caller may send the request again)."""
    try:
        yield
    except StorageBusy:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise StorageBusy() from exc
        raise
