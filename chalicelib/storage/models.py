"""PynamoDB items and indexes: the storage shape only.

The record classes are declared here, once, so they can be used as types. `build_models` binds them
to one stage: a subclass per table with the stage's table name and region, made when the settings
are known, so an emulator can start first.

Tables (one per kind of record; see docs/architecture.md, "Storage"):
- clients:   one item per client. Three sparse-free GSIs make every audience filter a Query:
             by_operator (operator_code + tag), by_tag (tag), by_shard (all clients, in shards).
- phones:    one item per phone number, owned by a client; makes phone numbers unique.
- mailings:  one item per mailing, with its per-status message counters, one `#totals`
             item (TOTALS_KEY: the statistics over every settled mailing), and a mailing's
             timeline in a few `#timeline#<id>#NN` items (timeline_part_key: how its counters
             moved, by time; in no index). GSIs: due (sparse,
             only mailings whose audience still has to be enqueued, by start time),
             by_created (all mailings, newest first) and by_end (all mailings, by end).
- messages:  one item per (mailing, client); GSI by_status (sparse, keys only) lists a
             mailing's messages by final status, in message id order; pending messages are
             not in it (creating one costs no index write, sending it one put, not a move).
             A TTL removes them long after the mailing's end.
- sequences: named counters that hand out blocks of int64 message ids.
- imports:   CSV imports of clients, several items per import (see `ClientImportRecord`;
             storage/imports.py maps each kind to its domain type). GSI
             by_created (sparse, keys only: the import's "job" item) lists them newest first.
- idempotency: one item per (caller, Idempotency-Key) of a create: in progress, then the
             response to replay; a TTL removes it IDEMPOTENCY_TTL_HOURS after the first request.
- audit:     one item per write through the API (who, what, which target, when), under its
             target's id, newest last; GSIs by_actor and by_time list them newest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar, cast

from pynamodb.attributes import (
    BooleanAttribute,
    ListAttribute,
    MapAttribute,
    NumberAttribute,
    NumberSetAttribute,
    TTLAttribute,
    UnicodeAttribute,
    UTCDateTimeAttribute,
    VersionAttribute,
)
from pynamodb.connection import Connection
from pynamodb.indexes import AllProjection, GlobalSecondaryIndex, KeysOnlyProjection
from pynamodb.models import Model

from chalicelib.settings import Settings

# Tags cannot contain control characters, so this one separates tag and client id in a sort key.
TAG_SEPARATOR = "\x1f"
# All clients are spread over this many shards of the by_shard index; the full audience is
# walked shard by shard (and, at scale, in parallel). Changing it needs a backfill.
CLIENT_SHARDS = 16
MAILING_LISTING_KEY = "mailing"
DUE_KEY = "due"
# An item of the mailings table that is not a mailing: the all-time totals (see
# storage/mailings.py, "Statistics"). Not a UUID, so no caller can name it (nor a timeline part).
TOTALS_KEY = "#totals"


def timeline_part_key(mailing_id: str, part: int) -> str:
    """The key of one part of a mailing's timeline (storage/timeline.py), in the mailings table."""
    return f"#timeline#{mailing_id}#{part:02d}"


MESSAGE_ID_SEQUENCE = "message_id"
# The parts of a client import (the sort key of the imports table).
IMPORT_JOB = "job"
IMPORT_LISTING_KEY = "import"
AUDIT_LISTING_KEY = "audit"


def import_chunk_part(chunk: int) -> str:
    return f"chunk#{chunk:05d}"


def import_invalid_part(page: int) -> str:
    return f"invalid#{page:03d}"


def tag_sort_key(tag: str, client_id: str) -> str:
    return f"{tag}{TAG_SEPARATOR}{client_id}"


def tag_prefix(tag: str) -> str:
    return f"{tag}{TAG_SEPARATOR}"


def tag_key(tag: str) -> str:
    # GSI key attributes cannot be empty strings, and an empty tag is a valid tag.
    return f"#{tag}"


# Statuses the by_status index holds: the rare ones, which an operator lists to act on them (retry
# the failed, look into the expired) and which a partition read would have to dig out of many.
# `pending` and `sent` are most of a mailing's messages, so a filtered Query of the mailing's
# partition lists them with little waste, in client id order; kept out, a message costs no index
# write when created and none when it is sent (one put only when it ends in a rare status).
INDEXED_STATUSES = frozenset({"failed", "expired", "cancelled", "skipped"})


def status_key(mailing_id: str, status: str) -> str | None:
    """The message's by_status key; None for a status the index does not hold."""
    return f"{mailing_id}#{status}" if status in INDEXED_STATUSES else None


class RowError(MapAttribute[str, Any]):
    """One problem with one row of an imported file (row 1 is the first after the header)."""

    row = NumberAttribute()
    field = UnicodeAttribute(null=True)
    message = UnicodeAttribute()


class ClientByOperator(GlobalSecondaryIndex["ClientRecord"]):
    class Meta:
        index_name = "by_operator"
        projection = AllProjection()

    operator_code = UnicodeAttribute(hash_key=True)
    tag_sort = UnicodeAttribute(range_key=True)


class ClientByTag(GlobalSecondaryIndex["ClientRecord"]):
    class Meta:
        index_name = "by_tag"
        projection = AllProjection()

    tag_key = UnicodeAttribute(hash_key=True)
    client_id = UnicodeAttribute(range_key=True)


class ClientByShard(GlobalSecondaryIndex["ClientRecord"]):
    class Meta:
        index_name = "by_shard"
        projection = AllProjection()

    shard = NumberAttribute(hash_key=True)
    client_id = UnicodeAttribute(range_key=True)


class ClientRecord(Model):
    class Meta:
        # The stage's table name and region are set by `bind`.
        table_name = "clients"
        billing_mode = "PAY_PER_REQUEST"

    client_id = UnicodeAttribute(hash_key=True)
    phone = UnicodeAttribute()
    operator_code = UnicodeAttribute()
    tag = UnicodeAttribute()
    timezone = UnicodeAttribute()
    created_at = UTCDateTimeAttribute()
    updated_at = UTCDateTimeAttribute()
    shard = NumberAttribute()
    tag_sort = UnicodeAttribute()
    tag_key = UnicodeAttribute()
    # An opted-out client is never sent to: its messages become `skipped`.
    opted_out = BooleanAttribute(default=False, null=True)
    version = VersionAttribute()

    by_operator = ClientByOperator()
    by_tag = ClientByTag()
    by_shard = ClientByShard()


class PhoneRecord(Model):
    class Meta:
        # The stage's table name and region are set by `bind`.
        table_name = "phones"
        billing_mode = "PAY_PER_REQUEST"

    phone = UnicodeAttribute(hash_key=True)
    client_id = UnicodeAttribute()


class MailingDue(GlobalSecondaryIndex["MailingRecord"]):
    class Meta:
        index_name = "due"
        # Keys only, like by_created: counter updates on every send then cost no index write.
        projection = KeysOnlyProjection()

    due_key = UnicodeAttribute(hash_key=True)
    start_at = UTCDateTimeAttribute(range_key=True)


class MailingByCreated(GlobalSecondaryIndex["MailingRecord"]):
    class Meta:
        index_name = "by_created"
        projection = KeysOnlyProjection()

    listing_key = UnicodeAttribute(hash_key=True)
    created_at = UTCDateTimeAttribute(range_key=True)


class MailingByEnd(GlobalSecondaryIndex["MailingRecord"]):
    class Meta:
        index_name = "by_end"
        # Keys only: the daily report reads the mailings whose end is within its window or later.
        projection = KeysOnlyProjection()

    listing_key = UnicodeAttribute(hash_key=True)
    end_at = UTCDateTimeAttribute(range_key=True)


class MailingRecord(Model):
    class Meta:
        # The stage's table name and region are set by `bind`.
        table_name = "mailings"
        billing_mode = "PAY_PER_REQUEST"

    mailing_id = UnicodeAttribute(hash_key=True)
    text = UnicodeAttribute()
    start_at = UTCDateTimeAttribute()
    end_at = UTCDateTimeAttribute()
    operator_codes = ListAttribute(of=UnicodeAttribute, default=list)
    tags = ListAttribute(of=UnicodeAttribute, default=list)
    window_start = NumberAttribute(null=True)  # minutes after local midnight
    window_end = NumberAttribute(null=True)
    status = UnicodeAttribute()
    created_at = UTCDateTimeAttribute()
    updated_at = UTCDateTimeAttribute()
    listing_key = UnicodeAttribute(default=MAILING_LISTING_KEY)
    # Present only while the audience still has to be enqueued: keeps the due index small.
    due_key = UnicodeAttribute(null=True)
    # Where fan-out stopped last (an opaque audience cursor); None before it starts.
    fanout_cursor = UnicodeAttribute(null=True)
    fanout_done = BooleanAttribute(default=False)
    # One scheduler worker at a time advances a mailing: it holds this lease.
    lease_owner = UnicodeAttribute(null=True)
    lease_until = UTCDateTimeAttribute(null=True)
    # The reconciler (services/reconciler.py): the counters as last seen, since when they
    # have not moved, and where a pass over the pending messages stands (a message id).
    quiet_mark = UnicodeAttribute(null=True)
    quiet_since = UTCDateTimeAttribute(null=True)
    reconcile_after = NumberAttribute(null=True)
    # The width in seconds of its timeline's buckets (domain/timeline.py); absent on mailings
    # stored before timelines were kept.
    timeline_step = NumberAttribute(null=True)
    # The most SMS parts a message may take, and the text's parts and cost over the audience
    # (a small JSON object, see storage/mailings.py `_parts_of`); absent on older mailings.
    max_parts = NumberAttribute(null=True)
    parts_estimate = UnicodeAttribute(null=True)
    count_pending = NumberAttribute(default=0)
    count_sent = NumberAttribute(default=0)
    count_failed = NumberAttribute(default=0)
    count_expired = NumberAttribute(default=0)
    count_cancelled = NumberAttribute(default=0)
    count_skipped = NumberAttribute(default=0)
    # Messages with a delivery receipt, by outcome (storage/receipts.py); absent until one comes.
    count_delivered = NumberAttribute(null=True)
    count_undelivered = NumberAttribute(null=True)
    # Only on the TOTALS_KEY item: inbound SMS by what they did (storage/inbound.py).
    inbound_replies = NumberAttribute(null=True)
    inbound_opt_outs = NumberAttribute(null=True)
    inbound_unknown = NumberAttribute(null=True)
    # The skipped messages by reason (absent until one is skipped for it): `skipped_opted_out`,
    # `skipped_frequency_cap`, `skipped_holdout`, ADDed with `count_skipped`.
    skipped_opted_out = NumberAttribute(null=True)
    skipped_frequency_cap = NumberAttribute(null=True)
    skipped_holdout = NumberAttribute(null=True)
    # A service message: the frequency cap neither stops it nor counts it.
    frequency_cap_exempt = BooleanAttribute(null=True)
    # A/B texts as JSON (`[{"text", "weight"}]`, absent for a single text), the holdout share,
    # and the sent messages of each variant (ADDed with `count_sent`).
    variants = UnicodeAttribute(null=True)
    holdout_percent = NumberAttribute(null=True)
    variant_sent_0 = NumberAttribute(null=True)
    variant_sent_1 = NumberAttribute(null=True)
    variant_sent_2 = NumberAttribute(null=True)
    variant_sent_3 = NumberAttribute(null=True)
    variant_sent_4 = NumberAttribute(null=True)
    # What the mailing added to the totals item when it last settled, and how many times it
    # settled (the condition of the next settling write). Absent until it first settles.
    settled_times = NumberAttribute(null=True)
    settled_status = UnicodeAttribute(null=True)
    settled_pending = NumberAttribute(null=True)
    settled_sent = NumberAttribute(null=True)
    settled_failed = NumberAttribute(null=True)
    settled_expired = NumberAttribute(null=True)
    settled_cancelled = NumberAttribute(null=True)
    settled_skipped = NumberAttribute(null=True)
    # Only on the TOTALS_KEY item (with the count_* above): mailings by settled status.
    mailings_scheduled = NumberAttribute(null=True)
    mailings_running = NumberAttribute(null=True)
    mailings_paused = NumberAttribute(null=True)
    mailings_finished = NumberAttribute(null=True)
    mailings_cancelled = NumberAttribute(null=True)

    due = MailingDue()
    by_created = MailingByCreated()
    by_end = MailingByEnd()


class MessageByStatus(GlobalSecondaryIndex["MessageRecord"]):
    class Meta:
        index_name = "by_status"
        # Keys only: updates that keep the status (claims, attempts) cost no index write.
        projection = KeysOnlyProjection()

    status_key = UnicodeAttribute(hash_key=True)
    message_id = NumberAttribute(range_key=True)


class MessageRecord(Model):
    class Meta:
        # The stage's table name and region are set by `bind`.
        table_name = "messages"
        billing_mode = "PAY_PER_REQUEST"

    mailing_id = UnicodeAttribute(hash_key=True)
    client_id = UnicodeAttribute(range_key=True)
    message_id = NumberAttribute()
    phone = UnicodeAttribute()
    status = UnicodeAttribute()
    status_key = UnicodeAttribute(null=True)  # only in INDEXED_STATUSES
    created_at = UTCDateTimeAttribute()
    updated_at = UTCDateTimeAttribute()
    sent_at = UTCDateTimeAttribute(null=True)
    attempts = NumberAttribute(default=0)
    last_error = UnicodeAttribute(null=True)
    # Why a skipped message was never sent (domain SkipReason); absent on other statuses.
    skip_reason = UnicodeAttribute(null=True)
    # The A/B variant a sent message carried (its index in the mailing's variants).
    variant = NumberAttribute(null=True)
    # A sender holds the message while it calls the gateway; no other sender may until then.
    claim_id = UnicodeAttribute(null=True)
    claim_until = UTCDateTimeAttribute(null=True)
    # DynamoDB deletes the record this long after the mailing's end (orphans included).
    expires_at = TTLAttribute(null=True)
    # The gateway's first delivery receipt (storage/receipts.py); absent until one comes.
    delivery_status = UnicodeAttribute(null=True)
    delivery_at = UTCDateTimeAttribute(null=True)
    delivery_received_at = UTCDateTimeAttribute(null=True)
    delivery_error = UnicodeAttribute(null=True)

    by_status = MessageByStatus()


# Partitions of the messages table that hold no message (their keys are not mailing ids, which
# are UUIDs): a page of message ids (`#ids#<bucket>`, storage/receipts.py) and a client's
# replies (`#inbound#<client_id>`, storage/inbound.py). Neither carries a status key, so the
# by_status index never sees them, and each has its own TTL.
MESSAGE_IDS_PREFIX = "#ids#"
INBOUND_PREFIX = "#inbound#"


def message_ids_key(bucket: int) -> str:
    return f"{MESSAGE_IDS_PREFIX}{bucket}"


def message_id_sort(message_id: int) -> str:
    # Zero-padded: the sort key is a string, and ids must sort as numbers.
    return f"{message_id:020d}"


def inbound_key(client_id: str) -> str:
    return f"{INBOUND_PREFIX}{client_id}"


class MessageIdPageRecord(Model):
    """Which clients one fan-out page's message ids went to, in id order: `first_id + n` is
    the message of `clients[n]`. Written (only with DELIVERY_RECEIPTS) in the lookup bucket of
    each id it holds, so a receipt finds its message with one Query and one read."""

    class Meta:
        # The messages table (set by `bind`); see MESSAGE_IDS_PREFIX.
        table_name = "messages"
        billing_mode = "PAY_PER_REQUEST"

    bucket = UnicodeAttribute(hash_key=True, attr_name="mailing_id")
    first_id_key = UnicodeAttribute(range_key=True, attr_name="client_id")
    first_id = NumberAttribute()
    page_mailing_id = UnicodeAttribute()
    page_clients = ListAttribute(of=UnicodeAttribute)
    expires_at = TTLAttribute(null=True)


class InboundReplyRecord(Model):
    """A client's reply that was not an opt-out keyword, under `#inbound#<client_id>`;
    its id (the time it came, then a random suffix) orders them."""

    class Meta:
        # The messages table (set by `bind`); see INBOUND_PREFIX.
        table_name = "messages"
        billing_mode = "PAY_PER_REQUEST"

    # The table's key names (the cursors of storage/pagination.py name keys by attribute):
    # `mailing_id` holds `#inbound#<client_id>`, `client_id` the reply's id.
    mailing_id = UnicodeAttribute(hash_key=True)
    client_id = UnicodeAttribute(range_key=True)
    phone = UnicodeAttribute()
    text = UnicodeAttribute()
    received_at = UTCDateTimeAttribute()
    expires_at = TTLAttribute(null=True)


class SequenceRecord(Model):
    class Meta:
        # The stage's table name and region are set by `bind`.
        table_name = "sequences"
        billing_mode = "PAY_PER_REQUEST"

    name = UnicodeAttribute(hash_key=True)
    value = NumberAttribute(default=0)


class ImportByCreated(GlobalSecondaryIndex["ClientImportRecord"]):
    class Meta:
        index_name = "by_created"
        projection = KeysOnlyProjection()

    listing_key = UnicodeAttribute(hash_key=True)
    created_at = UTCDateTimeAttribute(range_key=True)


class ClientImportRecord(Model):
    """One item of a CSV import of clients; `part` says which:

    - "job": the status, the file's counts and the totals of the chunks settled so far
      (`settled_chunks` makes each chunk's totals count once);
    - "invalid#NNN": a page of the file's invalid rows, written with the job;
    - "chunk#NNNNN": one chunk's progress (`done_parts`, each part's writes and totals in one
      transaction), its totals and its write-time errors, `finished` once all are in.
    """

    class Meta:
        # The stage's table name and region are set by `bind`.
        table_name = "imports"
        billing_mode = "PAY_PER_REQUEST"

    import_id = UnicodeAttribute(hash_key=True)
    part = UnicodeAttribute(range_key=True)
    status = UnicodeAttribute(null=True)
    created_at = UTCDateTimeAttribute(null=True)
    updated_at = UTCDateTimeAttribute(null=True)
    listing_key = UnicodeAttribute(null=True)
    rows = NumberAttribute(null=True)
    valid = NumberAttribute(null=True)
    invalid = NumberAttribute(null=True)
    chunks = NumberAttribute(null=True)
    settled_chunks = NumberSetAttribute(null=True)
    abandoned_chunks = NumberAttribute(null=True)
    done_parts = NumberSetAttribute(null=True)
    finished = BooleanAttribute(null=True)
    created = NumberAttribute(null=True)
    updated = NumberAttribute(null=True)
    unchanged = NumberAttribute(null=True)
    failed = NumberAttribute(null=True)
    errors = ListAttribute(of=RowError, null=True)
    errors_omitted = NumberAttribute(null=True)
    expires_at = TTLAttribute(null=True)

    by_created = ImportByCreated()


class IdempotencyRecord(Model):
    """A create sent with an Idempotency-Key: claimed while it runs, then its response."""

    class Meta:
        # The stage's table name and region are set by `bind`.
        table_name = "idempotency"
        billing_mode = "PAY_PER_REQUEST"

    # The caller's principal id and the key, so one caller's keys never meet another's.
    scope = UnicodeAttribute(hash_key=True)
    fingerprint = UnicodeAttribute()
    # Which run holds the claim: only it may save the response or give the key back.
    attempt = UnicodeAttribute()
    # Until then another request with the key waits (409); after it, a crashed run's claim
    # may be taken over.
    claimed_until = UTCDateTimeAttribute()
    response_status = NumberAttribute(null=True)
    response_body = UnicodeAttribute(null=True)
    response_content_type = UnicodeAttribute(null=True)
    expires_at = TTLAttribute()


class AuditByActor(GlobalSecondaryIndex["AuditEntryRecord"]):
    class Meta:
        index_name = "by_actor"
        projection = AllProjection()

    actor = UnicodeAttribute(hash_key=True)
    entry_key = UnicodeAttribute(range_key=True)


class AuditByTime(GlobalSecondaryIndex["AuditEntryRecord"]):
    class Meta:
        index_name = "by_time"
        projection = AllProjection()

    listing_key = UnicodeAttribute(hash_key=True)
    entry_key = UnicodeAttribute(range_key=True)


class AuditEntryRecord(Model):
    """One write through the API; `entry_key` (the time, then a random suffix) orders them."""

    class Meta:
        # The stage's table name and region are set by `bind`.
        table_name = "audit"
        billing_mode = "PAY_PER_REQUEST"

    target_id = UnicodeAttribute(hash_key=True)
    entry_key = UnicodeAttribute(range_key=True)
    at = UTCDateTimeAttribute()
    actor = UnicodeAttribute()
    role = UnicodeAttribute(null=True)
    auth_mode = UnicodeAttribute(null=True)
    action = UnicodeAttribute()
    target_type = UnicodeAttribute()
    request_id = UnicodeAttribute(null=True)
    http_status = NumberAttribute()
    # The names of the fields the request set, never their values; the status it left.
    fields = ListAttribute(of=UnicodeAttribute, default=list)
    status = UnicodeAttribute(null=True)
    listing_key = UnicodeAttribute(default=AUDIT_LISTING_KEY)
    expires_at = TTLAttribute(null=True)

    by_actor = AuditByActor()
    by_time = AuditByTime()


@dataclass(frozen=True)
class Models:
    """The record classes bound to one stage's tables."""

    Client: type[ClientRecord]
    Phone: type[PhoneRecord]
    Mailing: type[MailingRecord]
    Message: type[MessageRecord]
    Sequence: type[SequenceRecord]
    ClientImport: type[ClientImportRecord]
    IdempotencyRecord: type[IdempotencyRecord]
    AuditEntry: type[AuditEntryRecord]
    # On the messages table (not tables of their own, so not in `all`).
    MessageIdPage: type[MessageIdPageRecord]
    InboundReply: type[InboundReplyRecord]

    def all(self) -> tuple[type[Model], ...]:
        return (
            self.Client,
            self.Phone,
            self.Mailing,
            self.Message,
            self.Sequence,
            self.ClientImport,
            self.IdempotencyRecord,
            self.AuditEntry,
        )


R = TypeVar("R", bound=Model)


def _bound(record: type[R], table_name: str, region: str) -> type[R]:
    """A subclass of `record` on one stage's table (PynamoDB copies the indexes per subclass)."""
    meta = type("Meta", (cast(type, record.Meta),), {"table_name": table_name, "region": region})
    return type(record.__name__, (record,), {"Meta": meta, "__module__": __name__})


@cache
def build_models(settings: Settings) -> Models:
    """Record classes bound to the tables named by `settings` (cached per settings)."""
    _share_botocore_data()

    def bound(record: type[R]) -> type[R]:
        return _bound(record, settings.table_name(record.Meta.table_name), settings.aws_region)

    return Models(
        Client=bound(ClientRecord),
        Phone=bound(PhoneRecord),
        Mailing=bound(MailingRecord),
        Message=bound(MessageRecord),
        Sequence=bound(SequenceRecord),
        ClientImport=bound(ClientImportRecord),
        IdempotencyRecord=bound(IdempotencyRecord),
        AuditEntry=bound(AuditEntryRecord),
        MessageIdPage=bound(MessageIdPageRecord),
        InboundReply=bound(InboundReplyRecord),
    )


def create_tables(models: Models) -> list[str]:
    """Create the tables that do not exist yet; returns the names it created."""
    created = []
    for model in models.all():
        if not model.exists():
            model.create_table(wait=True)
            created.append(model.Meta.table_name)
    return created


@cache
def _share_botocore_data() -> None:
    """Make PynamoDB's per-connection botocore sessions share one data loader.

    PynamoDB opens a botocore session per model class, and each would parse the DynamoDB
    service description again (~0.2 s apiece): a second of every cold start for five tables.
    """
    import botocore.loaders
    import botocore.session
    import pynamodb.connection.base as pynamodb_base

    loader = botocore.loaders.create_loader()

    def get_session() -> botocore.session.Session:
        session = botocore.session.get_session()
        session.register_component("data_loader", loader)
        return session

    pynamodb_base.get_session = get_session  # type: ignore[attr-defined]


def connection_for(settings: Settings) -> Connection:
    """A low-level PynamoDB connection (transactions, batch reads) in the stage's region."""
    return Connection(region=settings.aws_region)
