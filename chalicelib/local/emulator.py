"""Make the embedded emulator keep DynamoDB's atomicity under concurrent requests.

Real DynamoDB applies each write, `ADD` and transaction atomically. moto does not lock: two
concurrent transactions that `ADD` to the same counter can both read the old value, and one
increment is lost. The local stack and the tests send requests from many threads (senders,
pollers, the API), so without this the counters would drift on the emulator, never on AWS.
Serialising DynamoDB requests inside moto restores the guarantee; SQS requests (long polls
included) are not affected.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

_LOCK = threading.RLock()
_PATCHED = False


def make_dynamodb_atomic() -> None:
    """Serialise moto's DynamoDB request handling (idempotent; in-process moto only)."""
    global _PATCHED
    if _PATCHED:
        return
    from moto.dynamodb.responses import DynamoHandler

    original = DynamoHandler.call_action

    @functools.wraps(original)
    def call_action(self: Any) -> Any:
        with _LOCK:
            return original(self)

    DynamoHandler.call_action = call_action  # type: ignore[method-assign]
    _PATCHED = True
