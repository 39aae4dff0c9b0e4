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
3. Index Query cost. moto answers a Query on an index by sorting the whole table, filtering it
   for the hash key and skipping to ExclusiveStartKey one item at a time: walking a 100,000-client
   audience a page at a time was quadratic. Here the items of each (table, index, hash key value)
   are kept sorted as moto sorts them, the start key is found by bisection, and moto's own loop
   takes it from there, so a page costs about its own size. The groups are dropped on any write
   to their table and rebuilt by the next Query.
4. Response cost. moto writes each attribute of each item it returns by trying every member of
   AttributeValue, under several aliases, through its generic serializer: a 100-item Query
   page took longer to serialize than to answer. A plain string or number attribute is
   written directly, as the generic serializer would write it.
5. Condition cost. moto parses a transaction's condition expression three times per item (to
   validate the request, to check it, and again to put the item): the 99 identical conditions
   of a fan-out page cost more than the puts. A parse is a pure function of the expression, its
   names and its values, so the last few hundred parses are remembered.
6. Memory. moto keeps every model object it ever creates in a class-level list, for its
   dashboard: each item a Query copies or projects, each item overwritten or deleted, each SQS
   message long deleted stayed in memory for the life of the process, and the garbage collector
   walked them all again and again. DynamoDB items and SQS messages are no longer listed (the
   dashboard no longer shows them); they live as long as a table or a queue holds them.
7. SQS send cost. moto computes every attribute of a queue, three of them by walking all its
   messages, to read one flag on each message sent: a send cost grew with the queue's depth
   (40 SendMessageBatch/s on an empty queue, 3/s behind 1,000 messages). While a message is sent
   those three counts, which sending never reads, are not computed.
8. Dispatch cost. moto's server finds the service of every request under one lock of its own,
   listing its modules on disk (an `isdir` per module) before parsing the signature: a few
   percent of the emulator's time, and one more lock every request, DynamoDB or SQS, queued
   behind. A signed DynamoDB or SQS request's service follows from its signature scope and
   target header alone, so the answer is remembered per (service, region, target prefix).
9. Update expression cost. moto parses an item's update expression twice (to validate the request
   and to apply it): within a transaction, about a sixth of each item's cost. The parse is a pure
   function of the expression's text and its tree is only read (the validator works on a deep
   copy), so the last few hundred are remembered, as the conditions are (5).
"""

from __future__ import annotations

import bisect
import copy
import functools
import json
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

_LOCK = threading.RLock()
_PATCHED: set[str] = set()


def patch_moto() -> None:
    """Every patch of this module (idempotent): what the local stack and the tests run on."""
    make_dynamodb_atomic()
    make_index_queries_fast()
    make_dynamodb_responses_fast()
    make_condition_parses_cached()
    make_records_untracked()
    make_sqs_sends_constant_time()
    make_dispatch_cached()
    make_update_parses_cached()


def make_dynamodb_atomic() -> None:
    """Patch in-process moto (idempotent): serialised DynamoDB requests, item-level rollback."""
    if "atomic" in _PATCHED:
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
    _PATCHED.add("atomic")


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


# ------------------------------------------------------------------------- index queries

# table -> {(index name, hash attribute, range attribute): _IndexGroups}; dropped on writes.
_INDEX_GROUPS: weakref.WeakKeyDictionary[Any, dict[tuple[str, str, str], _IndexGroups]] = (
    weakref.WeakKeyDictionary()
)


class _IndexGroups:
    """One index's items by hash key value; each group is sorted the first time it is asked for."""

    def __init__(self, table: Any, hash_attr: str, range_attr: str) -> None:
        self._table = table
        self._hash_attrs = [hash_attr, table.hash_key_attr]
        self._range_attrs = [range_attr, table.range_key_attr]
        self._sorted: set[Any] = set()
        self._groups: dict[Any, list[Any]] = {}
        # The items moto's query would consider: the hash key present, the range key present.
        for item in _table_items(table):
            value = item.attrs.get(hash_attr)
            if value is not None and item.attrs.get(range_attr):
                self._groups.setdefault(value, []).append(item)

    def group(self, value: Any) -> list[Any]:
        items = self._groups.get(value)
        if items is None:
            return []
        if value not in self._sorted:
            # moto sorts the whole table by its keys, then the matches by the index's sort order.
            items.sort(key=_table_order)
            self._table.sorted_items(self._hash_attrs, self._range_attrs, items)
            self._sorted.add(value)
        return items


def _table_items(table: Any) -> list[Any]:
    from moto.dynamodb.models.dynamo_type import Item

    if table.range_key_attr:
        found = [item for group in table.items.values() for item in group.values()]
    else:
        found = list(table.items.values())
    return [item for item in found if isinstance(item, Item)]


def _table_order(item: Any) -> Any:
    # The key of moto's Table.all_items.
    return (item.hash_key, item.range_key) if item.range_key else item.hash_key


def forget_indexes(table: Any) -> None:
    """Drop a table's index groups (after any write to it)."""
    _INDEX_GROUPS.pop(table, None)


def make_index_queries_fast() -> None:
    """Patch in-process moto (idempotent): an index Query costs about its page, not the table."""
    if "index_queries" in _PATCHED:
        return
    from moto.dynamodb.models import DynamoDBBackend
    from moto.dynamodb.models.table import Table

    query = Table.query

    @functools.wraps(query)
    def indexed_query(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return _indexed_query(self, query, *args, **kwargs)

    Table.query = indexed_query  # type: ignore[method-assign]

    # Every way moto changes an item goes through one of these; each forgets the table's groups.
    def forgetting(method: Callable[..., Any], table_of: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            with _LOCK:
                try:
                    return method(self, *args, **kwargs)
                finally:
                    for table in table_of(self, *args, **kwargs):
                        forget_indexes(table)

        return wrapper

    def this_table(table: Any, *_: Any, **__: Any) -> list[Any]:
        return [table]

    def named_table(backend: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = args[0] if args else kwargs.get("table_name", kwargs.get("name"))
        return [backend.tables[name]] if name in backend.tables else []

    def every_table(backend: Any, *_: Any, **__: Any) -> list[Any]:
        return list(backend.tables.values())

    Table.put_item = forgetting(Table.put_item, this_table)  # type: ignore[method-assign]
    Table.delete_item = forgetting(Table.delete_item, this_table)  # type: ignore[method-assign]
    # update_item changes the item in place, update_table the indexes, PartiQL any item.
    DynamoDBBackend.update_item = forgetting(DynamoDBBackend.update_item, named_table)  # type: ignore[method-assign]
    DynamoDBBackend.update_table = forgetting(DynamoDBBackend.update_table, named_table)  # type: ignore[method-assign]
    DynamoDBBackend.execute_statement = forgetting(  # type: ignore[method-assign]
        DynamoDBBackend.execute_statement, every_table
    )
    _PATCHED.add("index_queries")


def _indexed_query(
    table: Any,
    query: Callable[..., Any],
    hash_key: Any,
    range_comparison: str | None,
    range_objs: list[Any],
    limit: int | None,
    exclusive_start_key: dict[str, Any] | None,
    scan_index_forward: bool,
    projection_expressions: Any,
    index_name: str | None = None,
    consistent_read: bool = False,
    filter_expression: Any = None,
    hash_key_conditions: list[tuple[str, Any]] | None = None,
    range_key_conditions: list[tuple[str, str, list[Any]]] | None = None,
    **filter_kwargs: Any,
) -> Any:
    """moto's Table.query, over one sorted group and from a bisected start, where it can be;
    anything else (table queries, multi-attribute keys, legacy QueryFilter) is moto's own."""
    from moto.dynamodb.models.table import RESULT_SIZE_LIMIT

    def moto_query() -> Any:
        return query(
            table,
            hash_key,
            range_comparison,
            range_objs,
            limit,
            exclusive_start_key,
            scan_index_forward,
            projection_expressions,
            index_name=index_name,
            consistent_read=consistent_read,
            filter_expression=filter_expression,
            hash_key_conditions=hash_key_conditions,
            range_key_conditions=range_key_conditions,
            **filter_kwargs,
        )

    if not index_name or filter_kwargs:
        return moto_query()
    index = next((i for i in table.all_indexes() if i.name == index_name), None)
    if index is None or (consistent_read and index in table.global_indexes):
        return moto_query()  # moto's own validation error
    hash_keys = [k["AttributeName"] for k in index.schema if k["KeyType"] == "HASH"]
    range_keys = [k["AttributeName"] for k in index.schema if k["KeyType"] == "RANGE"]
    if len(hash_keys) != 1 or len(range_keys) != 1:
        return moto_query()
    hash_attr, range_attr = hash_keys[0], range_keys[0]
    if not hash_key_conditions or [c[0] for c in hash_key_conditions] != [hash_attr]:
        return moto_query()
    if range_key_conditions and [c[0] for c in range_key_conditions] != [range_attr]:
        return moto_query()

    indexes = _INDEX_GROUPS.setdefault(table, {})
    groups = indexes.get((index_name, hash_attr, range_attr))
    if groups is None:
        groups = indexes[(index_name, hash_attr, range_attr)] = _IndexGroups(
            table, hash_attr, range_attr
        )
    candidates = groups.group(hash_key_conditions[0][1])
    if scan_index_forward is False:
        candidates = candidates[::-1]

    hash_attrs = [hash_attr, table.hash_key_attr]
    range_attrs = [range_attr, table.range_key_attr]
    start = 0
    if exclusive_start_key is not None:

        def past_start(item: Any) -> bool:
            return not table._item_comes_before_dct(
                item, exclusive_start_key, hash_attrs, range_attrs, scan_index_forward
            )

        # moto skips every item that "comes before" the start key; over a group sorted by the
        # same keys those are a prefix, so the first one that does not is found by bisection.
        start = bisect.bisect_left(candidates, True, key=past_start)

    # From here on, moto's loop as it is, on the remaining candidates.
    results: list[Any] = []
    result_size = 0
    scanned_count = 0
    last_evaluated_key = None
    for position in range(start, len(candidates)):
        result = candidates[position]
        size = result.size()  # moto computes it twice; it is the same
        reached_length_limit = len(results) == limit
        reached_size_limit = (result_size + size) > RESULT_SIZE_LIMIT
        if reached_length_limit or reached_size_limit:
            last_evaluated_key = table._get_last_evaluated_key(results[-1], index_name)
            break
        if not range_comparison:
            results.append(result)
            result_size += size
            scanned_count += 1
        else:
            value = result.attrs.get(range_attr)
            if value and value.compare(range_comparison, range_objs):
                results.append(result)
                result_size += size
                scanned_count += 1

    if not projection_expressions:
        results = copy.deepcopy(results)
    results = [index.project(r) for r in results]
    if filter_expression is not None:
        results = [item for item in results if filter_expression.expr(item)]
    if projection_expressions:
        # Projected items are built from copies of the values: a deep copy of each whole item
        # first (moto's way) only to drop most of it costs more than the rest of the page.
        results = [_project(r, projection_expressions) for r in results]
    return results, scanned_count, last_evaluated_key


def _project(item: Any, projection_expressions: list[list[str]]) -> Any:
    """moto's Item.project, converting only the projected attributes where they are all
    top-level names, not list elements (moto converts the whole item once per name)."""
    from moto.dynamodb.models.dynamo_type import (
        DynamoType,
        Item,
        LimitedSizeDict,
        deserializer,
        serializer,
    )

    if any(len(path) != 1 or "[" in path[0] for path in projection_expressions):
        projected = item.project(projection_expressions)
    else:
        attrs = LimitedSizeDict()
        for (name,) in projection_expressions:
            value = item.attrs.get(name)
            if value is None:
                continue
            if value.type == "S":
                # What the round trip below makes of a string: the same string.
                picked = {"S": value.value}
            else:
                # As Item.to_regular_json, then Item.project, do it, one attribute at a time.
                picked = serializer.serialize(deserializer.deserialize(value.to_regular_json()))
            # Part of an item that passed moto's size check passes it too: no check per key.
            dict.__setitem__(attrs, name, DynamoType(picked))
        projected = Item.__new__(Item)
        projected.attrs = attrs
    # Keys are strings, numbers or binary: a new DynamoType is a full copy.
    projected.hash_key = DynamoType(item.hash_key)
    projected.range_key = None if item.range_key is None else DynamoType(item.range_key)
    return projected


# ------------------------------------------------------------------------- responses

_SCALARS = ("S", "N")


def make_dynamodb_responses_fast() -> None:
    """Patch in-process moto (idempotent): string and number attributes serialize directly."""
    if "responses" in _PATCHED:
        return
    from moto.core.serialize import JSONSerializer

    structure = JSONSerializer._serialize_type_structure

    @functools.wraps(structure)
    def serialize_structure(self: Any, serialized: Any, value: Any, shape: Any, key: str) -> None:
        # By then DynamoResult has turned each attribute into a one-key dict such as {"S": "x"}.
        if key and shape.name == "AttributeValue" and type(value) is dict and len(value) == 1:
            ((kind, scalar),) = value.items()
            if kind in _SCALARS and type(scalar) is str:
                self._default_serialize(serialized, {kind: scalar}, shape, key)
                return
        structure(self, serialized, value, shape, key)

    JSONSerializer._serialize_type_structure = serialize_structure  # type: ignore[method-assign]
    _PATCHED.add("responses")


# ------------------------------------------------------------------------- conditions

_PARSES_KEPT = 512


def make_condition_parses_cached() -> None:
    """Patch in-process moto (idempotent): a condition expression is parsed once, not per item."""
    if "conditions" in _PATCHED:
        return
    from moto.dynamodb.comparisons import ConditionExpressionParser

    parse = ConditionExpressionParser.parse
    parsed: OrderedDict[str, tuple[Any, list[str], list[str]]] = OrderedDict()

    @functools.wraps(parse)
    def remembered(self: Any) -> Any:
        key = json.dumps(
            [
                self.condition_expression,
                self.expression_attribute_names,
                self.expression_attribute_values,
            ],
            sort_keys=True,
            default=repr,
        )
        with _LOCK:
            hit = parsed.get(key)
            if hit is not None:
                parsed.move_to_end(key)
        if hit is None:
            # A failed parse raises here, every time, exactly as before.
            op = parse(self)
            with _LOCK:
                found = (list(self.expr_attr_names_found), list(self.expr_attr_values_found))
                parsed[key] = (op, *found)
                if len(parsed) > _PARSES_KEPT:
                    parsed.popitem(last=False)
            return op
        # The tree holds the expression only; evaluating it against an item changes nothing.
        op, names, values = hit
        self.expr_attr_names_found.extend(names)
        self.expr_attr_values_found.extend(values)
        return op

    ConditionExpressionParser.parse = remembered  # type: ignore[method-assign]
    _PATCHED.add("conditions")


# ------------------------------------------------------------------------- memory


def make_records_untracked() -> None:
    """Patch in-process moto (idempotent): DynamoDB items and SQS messages are not kept forever."""
    if "untracked" in _PATCHED:
        return
    from moto.dynamodb.models.dynamo_type import Item
    from moto.sqs.models import Message

    def untracked(cls: type, *_: Any, **__: Any) -> Any:
        # BaseModel.__new__ without the append to `cls.instances_tracked`.
        return object.__new__(cls)

    for model in (Item, Message):
        model.__new__ = untracked  # type: ignore[method-assign, assignment]
    _PATCHED.add("untracked")


# ------------------------------------------------------------------------- SQS sends

_SENDING = threading.local()
_COUNT_ATTRIBUTES = (
    "approximate_number_of_messages",
    "approximate_number_of_messages_delayed",
    "approximate_number_of_messages_not_visible",
)


def make_sqs_sends_constant_time() -> None:
    """Patch in-process moto (idempotent): sending a message does not walk the queue."""
    if "sqs_sends" in _PATCHED:
        return
    from moto.sqs.models import Queue, SQSBackend

    for name in _COUNT_ATTRIBUTES:
        count = getattr(Queue, name).fget

        def counted(queue: Any, _count: Callable[[Any], int] = count) -> int:
            # Only while this thread sends, where moto reads one other attribute of the result.
            return 0 if getattr(_SENDING, "active", False) else _count(queue)

        setattr(Queue, name, property(counted))

    def sending(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            outer = getattr(_SENDING, "active", False)
            _SENDING.active = True
            try:
                return method(self, *args, **kwargs)
            finally:
                _SENDING.active = outer

        return wrapper

    SQSBackend.send_message = sending(SQSBackend.send_message)  # type: ignore[method-assign]
    SQSBackend.send_message_batch = sending(SQSBackend.send_message_batch)  # type: ignore[method-assign]
    _PATCHED.add("sqs_sends")


def make_update_parses_cached() -> None:
    """Patch in-process moto (idempotent): an update expression is parsed once, not per item."""
    if "updates" in _PATCHED:
        return
    from moto.dynamodb.parsing.expressions import UpdateExpressionParser

    make = UpdateExpressionParser.make
    parsed: OrderedDict[str, Any] = OrderedDict()

    def remembered(cls: Any, expression: str) -> Any:
        with _LOCK:
            tree = parsed.get(expression)
            if tree is not None:
                parsed.move_to_end(expression)
                return tree
        tree = make(expression)  # a bad expression raises here, every time, as before
        with _LOCK:
            parsed[expression] = tree
            if len(parsed) > _PARSES_KEPT:
                parsed.popitem(last=False)
        return tree

    remembered.__wrapped__ = make  # type: ignore[attr-defined]
    UpdateExpressionParser.make = classmethod(remembered)  # type: ignore[method-assign,assignment]
    _PATCHED.add("updates")


_CACHED_SERVICES = frozenset({"dynamodb", "sqs"})


def dispatch_key(request: dict[str, Any]) -> tuple[str, str, str] | None:
    """What decides which moto app answers a signed DynamoDB or SQS request; None otherwise.

    moto infers it from the SigV4 credential scope (service and region) and, for DynamoDB, the
    target's API version (DynamoDB Streams and the 2011 API are other apps).
    """
    # `request` is the WSGI environ of one HTTP request, not the process's settings.
    path = request.get("PATH_INFO", "")
    auth = request.get("HTTP_AUTHORIZATION") or ""
    if not isinstance(path, str) or path.startswith(("/moto-api", "/latest/")):
        return None
    try:
        _, _, region, service, _ = auth.split(",")[0].split()[1].split("/")
    except (IndexError, ValueError):
        return None
    if service.lower() not in _CACHED_SERVICES:
        return None
    target = (request.get("HTTP_X_AMZ_TARGET") or "").split(".", 1)[0]
    return service.lower(), region, target


def make_dispatch_cached() -> None:
    """Patch moto's server (idempotent): DynamoDB and SQS requests find their app without a lock."""
    if "dispatch" in _PATCHED:
        return
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication

    get_application = DomainDispatcherApplication.get_application

    @functools.wraps(get_application)
    def cached(self: Any, environ: dict[str, Any]) -> Any:
        key = dispatch_key(environ)
        if key is None:
            return get_application(self, environ)
        apps = self.__dict__.setdefault("_apps_by_dispatch_key", {})
        app = apps.get(key)
        if app is None:
            app = apps[key] = get_application(self, environ)
        return app

    DomainDispatcherApplication.get_application = cached  # type: ignore[method-assign]
    _PATCHED.add("dispatch")


def serve(host: str, port: int) -> None:
    """Run the patched emulator in this process until it is terminated."""
    import logging
    import signal

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    patch_moto()
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
