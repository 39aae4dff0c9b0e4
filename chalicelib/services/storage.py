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

import uuid
from typing import Any

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
    code = error_code(exc)
    if code in TRANSIENT_CODES:
        return True
    return code == _CANCELLED and not is_conditional_failure(exc)


def looks_like_id(value: str) -> bool:
    """Server ids are UUIDs; anything else cannot name a record (and never reaches DynamoDB)."""
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False
