"""A mailing's timeline as stored: how its counters moved, by bucket of time
(chalicelib/domain/timeline.py), in a few items of the mailings table.

Each part item (`timeline_part_key`: the mailing id and the part number) holds
`BUCKETS_PER_PART` buckets as one number attribute per status and bucket that moved (`se07`: the
messages that became sent in the part's bucket 7; negative when they left the status) and the
time of its last change. Every write that moves a mailing's counters ADDs the same amounts to
the bucket of its time in the same transaction, so the timeline always sums to the counters and
costs no request of its own (one more item in it: two write units, as the counters' own). A
message failed without its mailing (`fail_orphan`) moves no counter, so no bucket either. The
parts are written by update actions that set no index key, so no index (and no listing of
mailings) ever sees them; a mailing's delete removes them with it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from pynamodb.connection import Connection
from pynamodb.expressions.operand import Path
from pynamodb.expressions.update import Action

from chalicelib.domain.mailing import MessageCounts, MessageStatus
from chalicelib.domain.timeline import (
    BUCKETS,
    BUCKETS_PER_PART,
    TimelineGrid,
    part_of,
    parts_until,
)
from chalicelib.storage.models import MailingRecord, timeline_part_key

# A status's two letters in a bucket's attribute name (short: a part stays under 1 KB).
_LETTERS = {
    MessageStatus.PENDING: "pe",
    MessageStatus.SENT: "se",
    MessageStatus.FAILED: "fa",
    MessageStatus.EXPIRED: "ex",
    MessageStatus.CANCELLED: "ca",
    MessageStatus.SKIPPED: "sk",
}
_STATUSES = {letters: status for status, letters in _LETTERS.items()}
# How often keys DynamoDB left unprocessed are asked for again before giving up.
_UNPROCESSED_TRIES = 5


@dataclass(frozen=True)
class Activity:
    """A mailing's timeline as read: how its counters moved in each bucket that has a part,
    and when the last of them changed (None: nothing moved yet)."""

    buckets: Mapping[int, MessageCounts]
    last_change: datetime | None


def part_updates(
    M: type[MailingRecord],
    mailing_id: str,
    grid: TimelineGrid | None,
    moves: Iterable[tuple[datetime, MessageStatus, int]],
) -> list[tuple[MailingRecord, list[Action]]]:
    """The update of each part that `moves` (when, which counter, by how much) touch, for a
    transaction that moves the counters by the same amounts; none without a grid (a mailing
    stored before timelines were kept)."""
    if grid is None:
        return []
    added: dict[int, dict[tuple[MessageStatus, int], int]] = defaultdict(dict)
    latest: dict[int, datetime] = {}
    for at, status, n in moves:
        if not n:
            continue
        bucket = grid.bucket(at)
        part = part_of(bucket)
        key = (status, bucket % BUCKETS_PER_PART)
        added[part][key] = added[part].get(key, 0) + n
        latest[part] = max(latest.get(part, at), at)
    updates = []
    for part, amounts in sorted(added.items()):
        actions: list[Action] = [
            Path(f"{_LETTERS[status]}{slot:02d}").add(n)
            for (status, slot), n in sorted(amounts.items())
            if n
        ]
        actions.append(M.updated_at.set(latest[part]))
        updates.append((M(timeline_part_key(mailing_id, part)), actions))
    return updates


def part_keys(mailing_id: str) -> list[str]:
    """The keys of every part a mailing's timeline can have."""
    return [timeline_part_key(mailing_id, part) for part in range(part_of(BUCKETS - 1) + 1)]


def read(
    connection: Connection, table: str, mailing_id: str, grid: TimelineGrid, now: datetime
) -> Activity:
    """The mailing's buckets up to `now`: one BatchGetItem of at most `BUCKETS / BUCKETS_PER_PART`
    keys (consistent, so it agrees with a counter update that just returned)."""
    keys = [
        {"mailing_id": {"S": timeline_part_key(mailing_id, part)}}
        for part in parts_until(grid, now)
    ]
    items: list[dict[str, dict[str, str]]] = []
    for _ in range(_UNPROCESSED_TRIES):
        request = {"RequestItems": {table: {"Keys": keys, "ConsistentRead": True}}}
        response = connection.dispatch("BatchGetItem", request)
        items += response.get("Responses", {}).get(table, [])
        keys = response.get("UnprocessedKeys", {}).get(table, {}).get("Keys", [])
        if not keys:
            break
    else:
        raise RuntimeError(f"the timeline of mailing {mailing_id} could not be read whole")
    return _activity(items)


def _activity(items: list[dict[str, dict[str, str]]]) -> Activity:
    buckets: dict[int, dict[str, int]] = defaultdict(dict)
    last_change: datetime | None = None
    for item in items:
        part = int(item["mailing_id"]["S"].rsplit("#", 1)[1])
        for name, value in item.items():
            status = _STATUSES.get(name[:2])
            if status is None or "N" not in value or not name[2:].isdigit():
                continue
            bucket = part * BUCKETS_PER_PART + int(name[2:])
            buckets[bucket][status.value] = int(value["N"])
        changed = item.get("updated_at", {}).get("S")
        if changed is not None:
            at = datetime.strptime(changed, "%Y-%m-%dT%H:%M:%S.%f%z").astimezone(UTC)
            last_change = at if last_change is None else max(last_change, at)
    return Activity({b: MessageCounts(**moved) for b, moved in buckets.items()}, last_change)
