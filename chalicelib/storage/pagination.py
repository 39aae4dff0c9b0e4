"""Opaque cursors and a pager that walks several DynamoDB queries ("segments") in order.

A listing such as "clients with operator 900 or 901 and tag vip" is a handful of Queries, one per
(operator, tag) pair. The pager walks them one after another; its cursor says which segment it is
in and where DynamoDB stopped inside it, so a page, a fan-out checkpoint or an HTTP cursor can
resume exactly where the previous one ended.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pynamodb.exceptions import PynamoDBException

from chalicelib.errors import MalformedRequest
from chalicelib.storage.errors import error_code

RawKey = dict[str, dict[str, str]]
QueryFn = Callable[[RawKey | None, int], Iterable[Any]]


@dataclass(frozen=True)
class Segment:
    """One DynamoDB Query: `query(last_key, limit)` yields items; `key_names` form its keys."""

    query: QueryFn
    key_names: tuple[str, ...]

    def key_of(self, item: Any) -> RawKey:
        # Attribute by attribute: items from a keys-only index are partial and cannot serialize.
        attributes = item.get_attributes()
        key = {}
        for name in self.key_names:
            attribute = attributes[name]
            key[attribute.attr_name] = {
                attribute.attr_type: attribute.serialize(getattr(item, name))
            }
        return key


@dataclass(frozen=True)
class Position:
    segment: int = 0
    last_key: RawKey | None = None


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next: Position | None


def fingerprint(*parts: object) -> str:
    """A short stable digest of what a listing is about, so a cursor cannot be reused elsewhere."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# Cursors callers may send back; longer ones are refused before decoding.
CURSOR_MAX_LENGTH = 4096
# Version 2 carries a digest of its position, so an edited cursor is refused here instead of
# reaching DynamoDB. Version 1 (no digest) is still read where the service stored it itself
# (a mailing's fan-out checkpoint written before version 2).
_CURSOR_VERSION = 2


def invalid_cursor() -> MalformedRequest:
    """The one answer to a cursor this listing did not hand out."""
    return MalformedRequest(
        "cursor is not valid; start again without it",
        [
            {
                "field": "query.cursor",
                "message": "not a next_cursor of this listing with these filters",
                "type": "cursor",
            }
        ],
    )


def _digest(scope: str, segment: object, last_key: object) -> str:
    return fingerprint("cursor", scope, segment, last_key)


def encode_cursor(position: Position | None, scope: str) -> str | None:
    if position is None:
        return None
    payload = {
        "v": _CURSOR_VERSION,
        "f": scope,
        "s": position.segment,
        "k": position.last_key,
        "h": _digest(scope, position.segment, position.last_key),
    }
    raw = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(
    cursor: str | None, scope: str, segments: Sequence[Segment], *, unsigned_ok: bool = True
) -> Position:
    """Parse a cursor made by `encode_cursor` for the same listing; anything else is a 400.
    With `unsigned_ok=False` (cursors from callers), a version 1 cursor is refused too."""
    if cursor is None:
        return Position()
    if len(cursor) > CURSOR_MAX_LENGTH:
        raise invalid_cursor()
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        payload = json.loads(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise invalid_cursor() from None
    if not isinstance(payload, dict) or payload.get("f") != scope:
        raise invalid_cursor()
    segment, last_key = payload.get("s"), payload.get("k")
    version = payload.get("v")
    if version == _CURSOR_VERSION:
        if payload.get("h") != _digest(scope, segment, last_key):
            raise invalid_cursor()
    elif not (version == 1 and unsigned_ok):
        raise invalid_cursor()
    if not isinstance(segment, int) or isinstance(segment, bool):
        raise invalid_cursor()
    if not 0 <= segment < max(len(segments), 1):
        raise invalid_cursor()
    if last_key is not None and not _valid_key(last_key, segments[segment].key_names):
        raise invalid_cursor()
    return Position(segment, last_key)


def _valid_key(key: object, names: tuple[str, ...]) -> bool:
    if not isinstance(key, dict) or set(key) != set(names):
        return False
    for value in key.values():
        if not isinstance(value, dict) or len(value) != 1:
            return False
        kind, scalar = next(iter(value.items()))
        if kind not in ("S", "N") or not isinstance(scalar, str) or not scalar:
            return False
        if len(scalar) > 1024:
            return False
        if kind == "N":
            try:
                int(scalar)
            except ValueError:
                return False
    return True


def read_page(segments: Sequence[Segment], start: Position, limit: int) -> Page:
    """Up to `limit` items from `start` on, and where the next page begins (None at the end)."""
    items: list[Any] = []
    index, last_key = start.segment, start.last_key
    while index < len(segments):
        segment = segments[index]
        wanted = limit - len(items)
        # One more than needed tells whether this segment has anything left.
        batch = list(segment.query(last_key, wanted + 1))
        if len(batch) > wanted:
            taken = batch[:wanted]
            items.extend(taken)
            return Page(items, Position(index, segment.key_of(taken[-1])))
        items.extend(batch)
        index, last_key = index + 1, None
        if len(items) == limit:
            return Page(items, Position(index) if index < len(segments) else None)
    return Page(items, None)


def paginate(
    segments: Sequence[Segment],
    scope: str,
    cursor: str | None,
    limit: int,
    convert: Callable[[Any], Any],
) -> tuple[list[Any], str | None]:
    """One page of a listing from an HTTP cursor: converted items and the next cursor."""
    start = decode_cursor(cursor, scope, segments, unsigned_ok=False)
    try:
        page = read_page(segments, start, limit)
    except PynamoDBException as exc:
        # DynamoDB refuses a start key it finds outside the query ("the provided starting key
        # is invalid"): a forged cursor that passed every check above, never a server fault.
        if start.last_key is not None and error_code(exc) == "ValidationException":
            raise invalid_cursor() from None
        raise
    return [convert(item) for item in page.items], encode_cursor(page.next, scope)


def index_query(
    method: Callable[..., Iterable[Any]],
    hash_key: Any,
    range_condition: Any = None,
    *,
    forward: bool = True,
    attributes: Sequence[str] | None = None,
) -> QueryFn:
    """A segment query over a PynamoDB `Model.query` or `Index.query` for one hash key;
    with `attributes`, items carry only those (which must include the segment's key names)."""
    attributes_to_get = list(attributes) if attributes is not None else None

    def query(last_key: RawKey | None, limit: int) -> Iterable[Any]:
        return method(
            hash_key,
            range_key_condition=range_condition,
            scan_index_forward=forward,
            limit=limit,
            page_size=limit,
            last_evaluated_key=last_key,
            attributes_to_get=attributes_to_get,
        )

    return query
