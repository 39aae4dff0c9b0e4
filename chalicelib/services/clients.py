"""The client directory: create, edit, delete and find clients; phone numbers stay unique."""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pynamodb.connection import Connection
from pynamodb.exceptions import DoesNotExist, PutError, TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from chalicelib.domain import AudienceFilter, Client, Clock, PageOf, default_operator_code
from chalicelib.errors import Conflict, NotFound
from chalicelib.pagination import (
    Position,
    Segment,
    fingerprint,
    index_query,
    paginate,
    read_page,
)
from chalicelib.storage.errors import Retry, TryAgain, is_conditional_failure, looks_like_id
from chalicelib.storage.models import (
    CLIENT_SHARDS,
    Models,
    tag_key,
    tag_prefix,
    tag_sort_key,
)

logger = logging.getLogger(__name__)

PREVIEW_PAGE = 500
BATCH_GET_KEYS = 100  # DynamoDB's limit for one BatchGetItem
# A batch read's unprocessed keys or throttles, asked for again a few times before giving up.
BATCH_READ_RETRY = Retry(attempts=5)


@dataclass(frozen=True)
class ClientFields:
    """What a caller sets on a client; `operator_code=None` means "derive from the phone"."""

    phone: str
    operator_code: str | None
    tag: str
    timezone: str
    opted_out: bool = False


def _shard_of(client_id: str) -> int:
    return int(hashlib.sha256(client_id.encode()).hexdigest()[:8], 16) % CLIENT_SHARDS


# ASCII only, as the API checks them: a record written before that check may hold other digits.
_PHONE = re.compile(r"^7[0-9]{10}$", re.ASCII)
_OPERATOR_CODE = re.compile(r"^[0-9]{3}$", re.ASCII)


def client_record_problem(item: Any) -> str | None:
    """What makes a stored client unusable for sending (corrupt or older schema), if anything."""
    problems = []
    if not isinstance(item.phone, str) or not _PHONE.fullmatch(item.phone):
        problems.append("phone is not 7XXXXXXXXXX")
    if not isinstance(item.operator_code, str) or not _OPERATOR_CODE.fullmatch(item.operator_code):
        problems.append("operator code is not 3 digits")
    try:
        ZoneInfo(item.timezone)
    except (ValueError, TypeError, ZoneInfoNotFoundError):
        problems.append("timezone is missing or unknown")
    if not problems:
        return None
    return "client record is corrupt: " + ", ".join(problems)


class ClientDirectory:
    """Clients and the audience queries over them."""

    def __init__(self, models: Models, connection: Connection, clock: Clock) -> None:
        self._models = models
        self._connection = connection
        self._clock = clock

    # ---------------------------------------------------------------- reads

    def get(self, client_id: str) -> Client:
        """The client, or NotFound."""
        return self._to_domain(self._load(client_id))

    def find_many(
        self, client_ids: list[str], *, retry: Retry = BATCH_READ_RETRY
    ) -> tuple[dict[str, Client], dict[str, str]]:
        """The usable clients among `client_ids`, by id, and what is wrong with the others.

        A record that is corrupt or from an older schema is reported, never raised: one bad
        record must not stop the work on the good ones. A read that keeps failing transiently
        (after `retry`) is raised: it says nothing about the records.
        """
        wanted = [c for c in dict.fromkeys(client_ids) if looks_like_id(c)]
        found: dict[str, Client] = {}
        problems: dict[str, str] = {}
        for raw in self._read_raw(wanted, retry):
            client_id = raw.get("client_id", {}).get("S", "")
            try:
                item = self._models.Client.from_raw_data(raw)
            except Exception as exc:  # a record that does not even deserialise
                problems[client_id] = f"client record is unreadable: {type(exc).__name__}"
                continue
            problem = client_record_problem(item)
            if problem:
                problems[client_id] = problem
            else:
                found[client_id] = self._to_domain(item)
        for client_id in client_ids:
            if client_id not in found and client_id not in problems:
                problems[client_id] = "client record is missing (the client was deleted)"
        return found, problems

    def _read_raw(self, client_ids: list[str], retry: Retry) -> list[dict]:
        """The stored clients as DynamoDB returned them (BatchGetItem), each deserialised
        separately by the caller, so one bad record spoils only itself."""
        table = self._models.Client.Meta.table_name
        items: list[dict] = []
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

    def list(
        self,
        *,
        limit: int,
        cursor: str | None,
        operator_code: str | None = None,
        tag: str | None = None,
        phone: str | None = None,
    ) -> PageOf:
        """One page of clients, optionally only those with this operator code and/or tag; with
        a phone number, the one client that has it (if it matches the others), in one page."""
        audience = AudienceFilter(
            operator_codes=(operator_code,) if operator_code is not None else (),
            tags=(tag,) if tag is not None else (),
        )
        if phone is not None:
            return self._with_phone(phone, audience)
        segments = self.audience_segments(audience)
        scope = fingerprint("clients", audience.operator_codes, audience.tags)
        return PageOf(*paginate(segments, scope, cursor, limit, self._to_domain))

    def preview(self, audience: AudienceFilter, sample_size: int) -> tuple[int, int, list[Client]]:
        """How many clients `audience` selects, how many of those opted out, and the first
        `sample_size` of them, without creating anything. Reads the audience's index entries
        once (two attributes each), as the fan-out would."""
        segments = self.audience_segments(audience, attributes=("client_id", "opted_out"))
        count = opted_out = 0
        sample_ids: list[str] = []
        position: Position | None = Position()
        while position is not None:
            page = read_page(segments, position, PREVIEW_PAGE)
            for item in page.items:
                count += 1
                opted_out += bool(item.opted_out)
                if len(sample_ids) < sample_size:
                    sample_ids.append(item.client_id)
            position = page.next
        found, _ = self.find_many(sample_ids)
        return count, opted_out, [found[i] for i in sample_ids if i in found]

    def opt_out(self, phone: str) -> Client:
        """Mark the client with this phone as opted out (a STOP reply); idempotent."""
        client_id = self._phone_owner(phone)
        if client_id is None:
            raise NotFound(f"no client has the phone number {phone}")
        item = self._load(client_id)
        if item.opted_out:
            return self._to_domain(item)
        Client = self._models.Client
        try:
            item.update(
                actions=[Client.opted_out.set(True), Client.updated_at.set(self._clock())],
                condition=Client.phone == phone,
            )
        except UpdateError as exc:
            if is_conditional_failure(exc):
                raise Conflict(
                    f"client {client_id} was changed by another request; retry"
                ) from None
            raise
        logger.info("client opted out", extra={"client_id": client_id})
        return self._to_domain(item)

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

        if audience.operator_codes and audience.tags:
            return [
                query(
                    client.by_operator.query,
                    code,
                    by_operator,
                    client.tag_sort.startswith(tag_prefix(tag)),
                )
                for code in sorted(audience.operator_codes)
                for tag in sorted(audience.tags)
            ]
        if audience.operator_codes:
            return [
                query(client.by_operator.query, code, by_operator)
                for code in sorted(audience.operator_codes)
            ]
        if audience.tags:
            return [
                query(client.by_tag.query, tag_key(tag), by_tag) for tag in sorted(audience.tags)
            ]
        return [query(client.by_shard.query, shard, by_shard) for shard in range(CLIENT_SHARDS)]

    # ---------------------------------------------------------------- writes

    def create(self, fields: ClientFields) -> Client:
        """Add a client; a phone number that another client has is a Conflict."""
        now = self._clock()
        client_id = str(uuid.uuid4())
        item = self._models.Client(client_id, created_at=now)
        self._apply(item, fields, now)
        claim = self._models.Phone(fields.phone, client_id=client_id)
        try:
            with TransactWrite(connection=self._connection) as tx:
                tx.save(item, condition=self._models.Client.client_id.does_not_exist())
                tx.save(claim, condition=self._models.Phone.phone.does_not_exist())
        except TransactWriteError as exc:
            if is_conditional_failure(exc):
                raise self._phone_taken(fields.phone) from None
            raise
        logger.info("client created", extra={"client_id": client_id})
        return self._to_domain(item)

    def replace(self, client_id: str, fields: ClientFields) -> Client:
        """Overwrite every field of a client (PUT)."""
        item = self._load(client_id)
        client = self._save(item, fields)
        logger.info("client replaced", extra={"client_id": client_id})
        return client

    def update(self, client_id: str, changes: dict[str, Any]) -> Client:
        """Change only the given fields (PATCH); the operator code is kept unless given."""
        item = self._load(client_id)
        client = self._save(item, replace(self.fields_of(item), **changes))
        logger.info(
            "client updated: %s", ", ".join(sorted(changes)), extra={"client_id": client_id}
        )
        return client

    def delete(self, client_id: str) -> None:
        """Remove a client and free its phone number."""
        item = self._load(client_id)
        claim = self._models.Phone(item.phone, client_id=client_id)
        try:
            with TransactWrite(connection=self._connection) as tx:
                tx.delete(item)
                tx.delete(claim, condition=self._models.Phone.client_id == client_id)
        except TransactWriteError as exc:
            if is_conditional_failure(exc):
                raise Conflict(
                    f"client {client_id} was changed or deleted by another request; retry"
                ) from None
            raise
        logger.info("client deleted", extra={"client_id": client_id})

    # ---------------------------------------------------------------- helpers

    def _save(self, item: Any, fields: ClientFields) -> Client:
        old_phone = item.phone
        now = self._clock()
        self._apply(item, fields, now)
        try:
            if fields.phone == old_phone:
                item.save()
            else:
                Phone = self._models.Phone
                with TransactWrite(connection=self._connection) as tx:
                    tx.save(item)
                    tx.delete(Phone(old_phone), condition=Phone.client_id == item.client_id)
                    tx.save(
                        Phone(fields.phone, client_id=item.client_id),
                        condition=Phone.phone.does_not_exist(),
                    )
        except (PutError, TransactWriteError) as exc:
            if not is_conditional_failure(exc):
                raise
            if fields.phone != old_phone and self._phone_owner(fields.phone) not in (
                None,
                item.client_id,
            ):
                raise self._phone_taken(fields.phone) from None
            raise Conflict(
                f"client {item.client_id} was changed or deleted by another request; "
                "read it again and retry"
            ) from None
        return self._to_domain(item)

    def _apply(self, item: Any, fields: ClientFields, now: datetime) -> None:
        item.phone = fields.phone
        item.operator_code = fields.operator_code or default_operator_code(fields.phone)
        item.tag = fields.tag
        item.timezone = fields.timezone
        item.opted_out = fields.opted_out
        item.updated_at = now
        item.shard = _shard_of(item.client_id)
        item.tag_sort = tag_sort_key(fields.tag, item.client_id)
        item.tag_key = tag_key(fields.tag)

    def apply_fields(self, item: Any, fields: ClientFields, now: datetime) -> None:
        """Set a client item's fields and what derives from them (index keys, shard) in memory,
        for a writer that batches its own writes (the CSV import)."""
        self._apply(item, fields, now)

    @staticmethod
    def fields_of(item: Any) -> ClientFields:
        """A stored client's fields as they are: what a PATCH starts from."""
        return ClientFields(
            phone=item.phone,
            operator_code=item.operator_code,
            tag=item.tag,
            timezone=item.timezone,
            opted_out=bool(item.opted_out),
        )

    def _load(self, client_id: str) -> Any:
        if not looks_like_id(client_id):
            raise NotFound(f"client {client_id} not found")
        try:
            return self._models.Client.get(client_id, consistent_read=True)
        except DoesNotExist:
            raise NotFound(f"client {client_id} not found") from None

    def _with_phone(self, phone: str, audience: AudienceFilter) -> PageOf:
        # Phones are unique: their claim names the one client, with no index to page through.
        owner = self._phone_owner(phone)
        try:
            client = self.get(owner) if owner is not None else None
        except NotFound:  # deleted between the two reads
            client = None
        if client is None or not audience.matches(client.operator_code, client.tag):
            return PageOf([], None)
        return PageOf([client], None)

    def _phone_owner(self, phone: str) -> str | None:
        try:
            return self._models.Phone.get(phone, consistent_read=True).client_id
        except DoesNotExist:
            return None

    @staticmethod
    def _phone_taken(phone: str) -> Conflict:
        return Conflict(
            f"another client already has phone {phone}",
            [{"field": "body.phone", "message": "already in use", "type": "unique"}],
        )

    @staticmethod
    def _to_domain(item: Any) -> Client:
        return Client(
            id=item.client_id,
            phone=item.phone,
            operator_code=item.operator_code,
            tag=item.tag,
            timezone=item.timezone,
            created_at=item.created_at,
            updated_at=item.updated_at,
            opted_out=bool(item.opted_out),
        )
