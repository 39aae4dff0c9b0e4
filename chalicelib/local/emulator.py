"""Make the embedded emulator behave like DynamoDB where the service depends on it.

1. Atomicity under concurrency. Real DynamoDB applies each write, `ADD` and transaction
   atomically. moto does not lock: two concurrent transactions that `ADD` to the same counter can
   both read the old value, and one increment is lost. The local stack and the tests send
   requests from many threads (senders, pollers, the API), so the counters would drift on the
   emulator, never on AWS. Serialising DynamoDB requests inside moto restores the guarantee;
   SQS requests (long polls included) are not affected.
2. Transaction cost. moto backs up every table a transaction touches with a deep copy, so each
   transaction costs time proportional to the table size (a 10,000-message mailing slowed to a
   few messages a second). Here a transaction backs up only the items it touches and restores
   them if it is cancelled, which is the same all-or-nothing outcome.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
from typing import Any

_LOCK = threading.RLock()
_PATCHED = False


def make_dynamodb_atomic() -> None:
    """Patch in-process moto (idempotent): serialised DynamoDB requests, item-level rollback."""
    global _PATCHED
    if _PATCHED:
        return
    from moto.dynamodb.models import DynamoDBBackend
    from moto.dynamodb.models.table import Table
    from moto.dynamodb.responses import DynamoHandler

    call_action = DynamoHandler.call_action

    @functools.wraps(call_action)
    def serialised(self: Any) -> Any:
        with _LOCK:
            return call_action(self)

    transact = DynamoDBBackend.transact_write_items

    @functools.wraps(transact)
    def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> None:
        with _LOCK:
            backup = _backup_items(self, transact_items)
            # moto's own table-wide backup becomes a no-op reference while this call runs.
            Table.__deepcopy__ = lambda table, memo: table  # type: ignore[attr-defined]
            try:
                return transact(self, transact_items)
            except Exception:
                _restore_items(self, backup)
                raise
            finally:
                del Table.__deepcopy__  # type: ignore[attr-defined]

    DynamoHandler.call_action = serialised  # type: ignore[method-assign]
    DynamoDBBackend.transact_write_items = transact_write_items  # type: ignore[method-assign]
    _PATCHED = True


def _backup_items(backend: Any, transact_items: list[dict[str, Any]]) -> list[tuple]:
    backup = []
    for entry in transact_items:
        _, operation = next(iter(entry.items()))
        name = operation.get("TableName")
        if name not in backend.tables:
            continue
        table = backend.tables[name]
        if "Item" in operation:
            attributes = operation["Item"]
            key = {table.hash_key_attr: attributes.get(table.hash_key_attr)}
            if table.range_key_attr is not None:
                key[table.range_key_attr] = attributes.get(table.range_key_attr)
        else:
            key = operation.get("Key")
        if not key or any(value is None for value in key.values()):
            continue
        try:
            current = backend.get_item(name, key)
        except Exception:  # noqa: S112 - an invalid key: moto's own call reports it
            continue
        saved = copy.deepcopy(current.to_json()["Attributes"]) if current else None
        backup.append((name, key, saved))
    return backup


def _restore_items(backend: Any, backup: list[tuple]) -> None:
    for name, key, saved in reversed(backup):
        if backend.get_item(name, key) is not None:
            backend.delete_item(name, key)
        if saved is not None:
            backend.put_item(name, saved)


def serve(host: str, port: int) -> None:
    """Run the patched emulator in this process until it is terminated."""
    import logging
    import signal

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    make_dynamodb_atomic()
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    print(f"EMULATOR http://{host}:{server._server.server_port}", flush=True)
    parent = os.getppid()
    # Ends with its parent too, even one killed without a chance to stop it.
    while not stopped.wait(1.0) and os.getppid() == parent:
        pass
    server.stop()


if __name__ == "__main__":
    import sys

    serve(
        sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1",
        int(sys.argv[2]) if len(sys.argv) > 2 else 0,
    )
