"""The client directory in DynamoDB: a client item per client and a claim item per phone.

A phone number is unique because its claim (the phones table) is written with the client, in one
transaction, on the condition that the claim does not exist. A client item carries a version, so
a write of a client read earlier fails instead of undoing a change made since. The audience
queries walk the clients table's three indexes (see `storage.models`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pynamodb.connection import Connection
from pynamodb.exceptions import DoesNotExist, PynamoDBException
from pynamodb.transactions import TransactWrite

from chalicelib.domain.audience import AudienceFilter, AudienceQuery
from chalicelib.domain.client import (
    Client,
    ClientChanged,
    ClientNotFound,
    PhoneTaken,
    Recipient,
    client_problem,
)
from chalicelib.domain.estimate import SegmentRead, estimate_audience, segment_budget
from chalicelib.domain.paging import PageOf
from chalicelib.domain.sms_parts import ClientValues
from chalicelib.storage.errors import (
    Retry,
    TryAgain,
    busy_if_transient,
    is_conditional_failure,
    looks_like_id,
)
from chalicelib.storage.models import (
    CLIENT_SHARDS,
    ClientRecord,
    Models,
    tag_key,
    tag_prefix,
    tag_sort_key,
)
from chalicelib.storage.pagination import (
    Position,
    Segment,
    decode_cursor,
    encode_cursor,
    fingerprint,
    index_query,
    paginate,
    read_page,
)

logger = logging.getLogger(__name__)

PREVIEW_PAGE = 500
BATCH_GET_KEYS = 100  # DynamoDB's limit for one BatchGetItem
# A batch read's unprocessed keys or throttles, asked for again a few times before giving up.
BATCH_READ_RETRY = Retry(attempts=5)


@dataclass(frozen=True)
class AudienceSummary:
    """How many clients an audience selects, how many of them opted out, and the first few ids.

    An approximate summary is an estimate whose 95 % interval is [count_low, count_high]; an
    exact one has both equal to `count`."""

    count: int
    opted_out: int
    sample_ids: list[str]
    approximate: bool
    count_low: int
    count_high: int
    # The operator code, tag and timezone of the clients read who have not opted out (how many
    # have each): what their messages' parts depend on. Every such client when exact.
    values: Counter[ClientValues] = field(default_factory=Counter)

    @classmethod
    def exact(
        cls,
        count: int,
        opted_out: int,
        sample_ids: list[str],
        values: Counter[ClientValues] | None = None,
    ) -> AudienceSummary:
        """A summary that counted every client."""
        return cls(count, opted_out, sample_ids, False, count, count, values or Counter())


class ClientRepository(Protocol):
    """The stored clients. Writes are conditional: `PhoneTaken` when another client has the
    phone, `ClientChanged` when the client changed since it was read; `ClientNotFound` for an
    unknown id; `StorageBusy` when storage throttles or a concurrent transaction got in the way."""

    def get(self, client_id: str) -> Client:
        """The client as stored now."""
        ...

    def find_many(
        self, client_ids: list[str], *, retry: Retry = BATCH_READ_RETRY
    ) -> tuple[dict[str, Client], dict[str, str]]:
        """The usable clients among `client_ids`, by id, and what is wrong with the others."""
        ...

    def owner_of(self, phone: str) -> str | None:
        """The id of the client with this phone number, if any."""
        ...

    def owners_of(self, phones: list[str]) -> dict[str, str]:
        """The id of the client with each of these phone numbers, for those that have one."""
        ...

    def get_many(self, client_ids: list[str]) -> tuple[dict[str, Client], set[str]]:
        """The clients with these ids (those that exist), and the ids whose record is unreadable."""
        ...

    def page(self, audience: AudienceFilter, *, limit: int, cursor: str | None) -> PageOf[Client]:
        """One page of the clients `audience` selects; `cursor` from the page before."""
        ...

    def recipients(
        self, audience: AudienceFilter, *, scope: str, cursor: str | None, limit: int
    ) -> PageOf[Recipient]:
        """One page of the fan-out of `audience` from `cursor`, a cursor this call handed out
        for the same `scope` (a mailing's own checkpoint; one from before cursors were signed is
        still read)."""
        ...

    def summarize(
        self, audience: AudienceFilter, sample_size: int, *, exact: bool = False
    ) -> AudienceSummary:
        """Count the clients `audience` selects (and those opted out); the first `sample_size`
        ids. An audience that fits in a bounded read is counted exactly; a larger one is
        estimated (`approximate`) unless `exact`, which reads every entry."""
        ...

    def add(self, client: Client) -> Client:
        """Store a new client and claim its phone; the client as stored."""
        ...

    def save(self, client: Client, *, previous: Client) -> Client:
        """Store a changed client read as `previous` (moving its phone claim if the phone
        changed); the client as stored."""
        ...

    def delete(self, client: Client) -> None:
        """Remove the client as read, and free its phone."""
        ...

    def opt_out(self, client: Client, at: datetime) -> Client:
        """Mark the client (as read) opted out at `at`, if its phone is still the same; the
        client as stored."""
        ...


def shard_of(client_id: str) -> int:
    """The by_shard index shard a client is in (stable: it derives from the id)."""
    return int(hashlib.sha256(client_id.encode()).hexdigest()[:8], 16) % CLIENT_SHARDS


def client_record(model: type[ClientRecord], client: Client) -> ClientRecord:
    """The item of a client, with the keys of its indexes."""
    record = model(
        client.id,
        phone=client.phone,
        operator_code=client.operator_code,
        tag=client.tag,
        timezone=client.timezone,
        created_at=client.created_at,
        updated_at=client.updated_at,
        opted_out=client.opted_out,
        shard=shard_of(client.id),
        tag_sort=tag_sort_key(client.tag, client.id),
        tag_key=tag_key(client.tag),
    )
    if client.version:  # a new client's item has none yet: its first write sets it
        record.version = client.version
    return record


def client_of(record: ClientRecord) -> Client:
    """The client a stored item holds."""
    return Client(
        id=record.client_id,
        phone=record.phone,
        operator_code=record.operator_code,
        tag=record.tag,
        timezone=record.timezone,
        created_at=record.created_at,
        updated_at=record.updated_at,
        opted_out=bool(record.opted_out),
        version=int(record.version or 0),
    )


class DynamoClientRepository:
    """`ClientRepository` over the clients and phones tables."""

    def __init__(self, models: Models, connection: Connection) -> None:
        self._models = models
        self._connection = connection

    # ---------------------------------------------------------------- reads

    def get(self, client_id: str) -> Client:
        return client_of(self._load(client_id))

    def find_many(
        self, client_ids: list[str], *, retry: Retry = BATCH_READ_RETRY
    ) -> tuple[dict[str, Client], dict[str, str]]:
        """A record that is corrupt or from an older schema is reported, never raised: one bad
        record must not stop the work on the good ones. A read that keeps failing transiently
        (after `retry`) is raised: it says nothing about the records."""
        wanted = [c for c in dict.fromkeys(client_ids) if looks_like_id(c)]
        found: dict[str, Client] = {}
        problems: dict[str, str] = {}
        with busy_if_transient():
            raws = self._read_raw(wanted, retry)
        for raw in raws:
            client_id = raw.get("client_id", {}).get("S", "")
            try:
                item = self._models.Client.from_raw_data(raw)
            except Exception as exc:  # a record that does not even deserialise
                problems[client_id] = f"client record is unreadable: {type(exc).__name__}"
                continue
            problem = client_problem(item.phone, item.operator_code, item.timezone)
            if problem:
                problems[client_id] = problem
            else:
                found[client_id] = client_of(item)
        for client_id in client_ids:
            if client_id not in found and client_id not in problems:
                problems[client_id] = "client record is missing (the client was deleted)"
        return found, problems

    def _read_raw(self, client_ids: list[str], retry: Retry) -> list[dict[str, Any]]:
        """The stored clients as DynamoDB returned them (BatchGetItem), each deserialised
        separately by the caller, so one bad record spoils only itself."""
        table = self._models.Client.Meta.table_name
        items: list[dict[str, Any]] = []
        for start in range(0, len(client_ids), BATCH_GET_KEYS):
            keys = [{"client_id": {"S": c}} for c in client_ids[start : start + BATCH_GET_KEYS]]

            def page() -> None:
                nonlocal keys
                answer = self._connection.dispatch(
                    "BatchGetItem",
                    {"RequestItems": {table: {"Keys": keys, "ConsistentRead": True}}},
                )
                items.extend(answer.get("Responses", {}).get(table, []))
                keys = answer.get("UnprocessedKeys", {}).get(table, {}).get("Keys") or []
                if keys:  # DynamoDB was too busy for some: those are asked for again
                    raise TryAgain(f"{len(keys)} clients not read yet")

            retry(page)
        return items

    def owner_of(self, phone: str) -> str | None:
        with busy_if_transient():
            try:
                return self._models.Phone.get(phone, consistent_read=True).client_id
            except DoesNotExist:
                return None

    def owners_of(self, phones: list[str]) -> dict[str, str]:
        claims = self._models.Phone.batch_get(phones, consistent_read=True)
        return {claim.phone: claim.client_id for claim in claims}

    def get_many(self, client_ids: list[str]) -> tuple[dict[str, Client], set[str]]:
        Client_ = self._models.Client
        unreadable: set[str] = set()
        try:
            records = {c.client_id: c for c in Client_.batch_get(client_ids, consistent_read=True)}
        except Exception:  # a record that does not deserialise: read them one by one
            records = {}
            for client_id in client_ids:
                try:
                    records[client_id] = Client_.get(client_id, consistent_read=True)
                except DoesNotExist:
                    continue
                except Exception:
                    unreadable.add(client_id)
        return {i: client_of(r) for i, r in records.items()}, unreadable

    def page(self, audience: AudienceFilter, *, limit: int, cursor: str | None) -> PageOf[Client]:
        segments = self.audience_segments(audience)
        scope = fingerprint("clients", audience.operator_codes, audience.tags)
        with busy_if_transient():
            items, next_cursor = paginate(segments, scope, cursor, limit, client_of)
        return PageOf(items, next_cursor)

    def recipients(
        self, audience: AudienceFilter, *, scope: str, cursor: str | None, limit: int
    ) -> PageOf[Recipient]:
        # A message needs the client's id and phone only; the rest is read by the sender.
        segments = self.audience_segments(audience, attributes=("client_id", "phone"))
        position = decode_cursor(cursor, scope, segments) if cursor else Position()
        page = read_page(segments, position, limit)
        recipients = [Recipient(item.client_id, item.phone) for item in page.items]
        return PageOf(recipients, encode_cursor(page.next, scope))

    def summarize(
        self, audience: AudienceFilter, sample_size: int, *, exact: bool = False
    ) -> AudienceSummary:
        if exact:
            return self._count_every_entry(audience, sample_size)
        return self._estimate(audience, sample_size)

    def _count_every_entry(self, audience: AudienceFilter, sample_size: int) -> AudienceSummary:
        """Reads the audience's index entries once (two attributes each), as the fan-out would."""
        segments = self.audience_segments(audience, attributes=_SUMMARY_ATTRIBUTES)
        count = opted_out = 0
        sample_ids: list[str] = []
        values: Counter[ClientValues] = Counter()
        position: Position | None = Position()
        with busy_if_transient():
            while position is not None:
                page = read_page(segments, position, PREVIEW_PAGE)
                for item in page.items:
                    count += 1
                    opted_out += bool(item.opted_out)
                    if not item.opted_out:
                        values[ClientValues(item.operator_code, item.tag, item.timezone)] += 1
                    if len(sample_ids) < sample_size:
                        sample_ids.append(item.client_id)
                position = page.next
        return AudienceSummary.exact(count, opted_out, sample_ids, values)

    def _estimate(self, audience: AudienceFilter, sample_size: int) -> AudienceSummary:
        """One Query per look-up of the audience, each reading its share of PREVIEW_ENTRIES
        (and one entry more) from the segment's start, or the sample's size if larger (at most
        50). An operator code without a tag whose segment does not fit adds one Query per shard,
        filtered on the code(s), of PREVIEW_ENTRIES entries in all: its index is ordered by tag
        first, so its own first entries say nothing of its size. See `domain.estimate`."""
        look_ups = audience.selection(CLIENT_SHARDS)
        budget = segment_budget(len(look_ups))
        whole: list[SegmentRead] = []
        too_many: list[str] = []  # operator codes whose by_operator segment did not fit
        known = 0  # clients of those codes already read
        sample_ids: list[str] = []
        values: Counter[ClientValues] = Counter()
        with busy_if_transient():
            for look_up in look_ups:
                # One more than the share: a segment of exactly its share is counted exactly.
                limit = max(budget, sample_size - len(sample_ids)) + 1
                read, ids, seen = self._read_segment(look_up, limit)
                sample_ids.extend(ids[: sample_size - len(sample_ids)])
                by_tag_first = look_up.operator_code is not None and look_up.tag is None
                if by_tag_first and read.last_id is not None:  # its order gives no estimate
                    too_many.append(str(look_up.operator_code))  # (nor a fair sample of tags)
                    known += read.matched
                    continue
                whole.append(read)
                values.update(seen)
            shares = [
                self._read_shard(shard, segment_budget(CLIENT_SHARDS) + 1, too_many, values)
                for shard in (range(CLIENT_SHARDS) if too_many else ())
            ]
        result = estimate_audience(whole, shares, filtered_at_least=known)
        return AudienceSummary(
            result.count,
            result.opted_out,
            sample_ids,
            approximate=result.approximate,
            count_low=result.low,
            count_high=result.high,
            values=values,
        )

    def _read_segment(
        self, look_up: AudienceQuery, limit: int
    ) -> tuple[SegmentRead, list[str], Counter[ClientValues]]:
        """The first `limit` entries of one look-up's segment: what they show, their ids, and
        the client values of those not opted out."""
        names = dict(_VALUE_NAMES)
        if look_up.operator_code is not None:
            names["#key"] = "operator_code"
            key_values = {":key": {"S": look_up.operator_code}}
            condition = "#key = :key"
            index = "by_operator"
            if look_up.tag is not None:
                names["#sort"] = "tag_sort"
                key_values[":prefix"] = {"S": tag_prefix(look_up.tag)}
                condition += " AND begins_with(#sort, :prefix)"
        elif look_up.tag is not None:
            names["#key"], index = "tag_key", "by_tag"
            key_values, condition = {":key": {"S": tag_key(look_up.tag)}}, "#key = :key"
        else:
            names["#key"], index = "shard", "by_shard"
            key_values, condition = {":key": {"N": str(look_up.shard)}}, "#key = :key"
        answer = self._query(index, condition, names, key_values, limit)
        items = answer.get("Items", [])
        ids = [item["client_id"]["S"] for item in items]
        read = SegmentRead(
            evaluated=int(answer.get("ScannedCount", len(items))),
            matched=len(items),
            opted_out=sum(_opted_out(item) for item in items),
            last_id=_last_id(answer),
        )
        return read, ids, _values_of(items)

    def _read_shard(
        self, shard: int, limit: int, operator_codes: list[str], values: Counter[ClientValues]
    ) -> SegmentRead:
        """The first `limit` entries of one shard, of which those with one of `operator_codes`
        are returned (DynamoDB bills and limits the entries it evaluates, not those returned);
        their client values are added to `values`."""
        names = {**_VALUE_NAMES, "#key": "shard"}
        key_values = {":key": {"N": str(shard)}}
        for n, code in enumerate(operator_codes):
            key_values[f":c{n}"] = {"S": code}
        codes = ", ".join(f":c{n}" for n in range(len(operator_codes)))
        answer = self._query(
            "by_shard",
            "#key = :key",
            names,
            key_values,
            limit,
            filter_expression=f"#op IN ({codes})",
        )
        items = answer.get("Items", [])
        values.update(_values_of(items))
        return SegmentRead(
            evaluated=int(answer["ScannedCount"]),
            matched=len(items),
            opted_out=sum(_opted_out(item) for item in items),
            last_id=_last_id(answer),
        )

    def _query(
        self,
        index: str,
        condition: str,
        names: dict[str, str],
        values: dict[str, dict[str, str]],
        limit: int,
        *,
        filter_expression: str | None = None,
    ) -> dict[str, Any]:
        """One Query request on a clients index, as DynamoDB answers it (with ScannedCount and
        LastEvaluatedKey, which PynamoDB's iterators keep to themselves)."""
        request: dict[str, Any] = {
            "TableName": self._models.Client.Meta.table_name,
            "IndexName": index,
            "KeyConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
            "ProjectionExpression": _PROJECTION,
            "Limit": limit,
        }
        if filter_expression is not None:
            request["FilterExpression"] = filter_expression
        answer: dict[str, Any] = self._connection.dispatch("Query", request)
        return answer

    def audience_segments(
        self, audience: AudienceFilter, *, attributes: Sequence[str] | None = None
    ) -> list[Segment]:
        """The Queries whose union is exactly the clients `audience` selects, each client once.

        With `attributes`, the clients carry only those attributes (and the index keys a
        cursor needs): the fan-out reads two of a client's eleven.
        """
        client = self._models.Client
        by_operator = ("operator_code", "tag_sort", "client_id")
        by_tag = ("tag_key", "client_id")
        by_shard = ("shard", "client_id")

        def query(method: Any, key: Any, keys: tuple[str, ...], condition: Any = None) -> Segment:
            wanted = None if attributes is None else sorted({*keys, *attributes})
            return Segment(index_query(method, key, condition, attributes=wanted), keys)

        segments = []
        for look_up in audience.selection(CLIENT_SHARDS):
            if look_up.operator_code is not None:
                condition = None
                if look_up.tag is not None:
                    condition = client.tag_sort.startswith(tag_prefix(look_up.tag))
                segments.append(
                    query(client.by_operator.query, look_up.operator_code, by_operator, condition)
                )
            elif look_up.tag is not None:
                segments.append(query(client.by_tag.query, tag_key(look_up.tag), by_tag))
            else:
                segments.append(query(client.by_shard.query, look_up.shard, by_shard))
        return segments

    # ---------------------------------------------------------------- writes

    def add(self, client: Client) -> Client:
        Client_, Phone = self._models.Client, self._models.Phone
        item = client_record(Client_, client)
        claim = Phone(client.phone, client_id=client.id)
        with busy_if_transient():
            try:
                with TransactWrite(connection=self._connection) as tx:
                    tx.save(item, condition=Client_.client_id.does_not_exist())
                    tx.save(claim, condition=Phone.phone.does_not_exist())
            except PynamoDBException as exc:
                if is_conditional_failure(exc):
                    raise PhoneTaken(client.phone) from None
                raise
        return client_of(item)

    def save(self, client: Client, *, previous: Client) -> Client:
        Phone = self._models.Phone
        item = client_record(self._models.Client, client)
        with busy_if_transient():
            try:
                if client.phone == previous.phone:
                    item.save()
                else:
                    with TransactWrite(connection=self._connection) as tx:
                        tx.save(item)
                        tx.delete(Phone(previous.phone), condition=Phone.client_id == client.id)
                        tx.save(
                            Phone(client.phone, client_id=client.id),
                            condition=Phone.phone.does_not_exist(),
                        )
            except PynamoDBException as exc:
                if not is_conditional_failure(exc):
                    raise
                if client.phone != previous.phone and self.owner_of(client.phone) not in (
                    None,
                    client.id,
                ):
                    raise PhoneTaken(client.phone) from None
                raise ClientChanged(
                    f"client {client.id} was changed or deleted by another request; "
                    "read it again and retry"
                ) from None
        return client_of(item)

    def delete(self, client: Client) -> None:
        Phone = self._models.Phone
        item = client_record(self._models.Client, client)
        claim = Phone(client.phone, client_id=client.id)
        with busy_if_transient():
            try:
                with TransactWrite(connection=self._connection) as tx:
                    tx.delete(item)
                    tx.delete(claim, condition=Phone.client_id == client.id)
            except PynamoDBException as exc:
                if is_conditional_failure(exc):
                    raise ClientChanged(
                        f"client {client.id} was changed or deleted by another request; retry"
                    ) from None
                raise

    def opt_out(self, client: Client, at: datetime) -> Client:
        Client_ = self._models.Client
        item = client_record(Client_, client)
        with busy_if_transient():
            try:
                item.update(
                    actions=[Client_.opted_out.set(True), Client_.updated_at.set(at)],
                    condition=Client_.phone == client.phone,
                )
            except PynamoDBException as exc:
                if is_conditional_failure(exc):
                    raise ClientChanged(
                        f"client {client.id} was changed by another request; retry"
                    ) from None
                raise
        return client_of(item)

    def _load(self, client_id: str) -> ClientRecord:
        if not looks_like_id(client_id):
            raise ClientNotFound(client_id)
        with busy_if_transient():
            try:
                return self._models.Client.get(client_id, consistent_read=True)
            except DoesNotExist:
                raise ClientNotFound(client_id) from None


# What a summary reads of each index entry: the count needs the id and opt-out, the parts of a
# text the values its placeholders and price depend on (small attributes: no more reads).
_VALUE_NAMES = {
    "#id": "client_id",
    "#out": "opted_out",
    "#op": "operator_code",
    "#tag": "tag",
    "#tz": "timezone",
}
_PROJECTION = ", ".join(_VALUE_NAMES)
_SUMMARY_ATTRIBUTES = tuple(_VALUE_NAMES.values())


def _values_of(items: list[dict[str, Any]]) -> Counter[ClientValues]:
    """The client values of the entries that are not opted out."""
    return Counter(
        ClientValues(
            item.get("operator_code", {}).get("S", ""),
            item.get("tag", {}).get("S", ""),
            item.get("timezone", {}).get("S", "UTC"),
        )
        for item in items
        if not _opted_out(item)
    )


def _opted_out(item: dict[str, Any]) -> bool:
    return item.get("opted_out", {}).get("BOOL") is True


def _last_id(answer: dict[str, Any]) -> str | None:
    """The client id where a Query stopped before its segment's end; None if it reached it.
    (A segment of exactly the Limit may still get a last key: it is then estimated, which is
    why reads ask for one entry more than their share.)"""
    last_key = answer.get("LastEvaluatedKey")
    return str(last_key["client_id"]["S"]) if last_key else None


def _conforms(store: DynamoClientRepository) -> ClientRepository:
    return store  # mypy checks here that the DynamoDB store keeps the whole contract
