"""Mailings' timelines in memory, as storage/timeline.py keeps them in the mailings table: per
part of the buckets, how the counters moved in each bucket and the time of the part's last
write. The in-memory mailing and message repositories share one (as both write the table)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime

from chalicelib.domain.mailing import MessageCounts, MessageStatus
from chalicelib.domain.timeline import TimelineGrid, part_of, parts_until
from chalicelib.storage.timeline import Activity


class MemoryTimelines:
    """Every mailing's timeline parts: (mailing id, part) -> buckets and last write."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, int], dict[int, MessageCounts]] = {}
        self._changed: dict[tuple[str, int], datetime] = {}
        self._lock = threading.Lock()

    def add(
        self,
        mailing_id: str,
        grid: TimelineGrid | None,
        moves: Iterable[tuple[datetime, MessageStatus, int]],
    ) -> None:
        """What a transaction that moves the counters by `moves` adds (nothing without a grid)."""
        if grid is None:
            return
        latest: dict[int, datetime] = {}
        with self._lock:
            for at, status, n in moves:
                if not n:
                    continue
                bucket = grid.bucket(at)
                part = part_of(bucket)
                buckets = self._buckets.setdefault((mailing_id, part), {})
                buckets[bucket] = buckets.get(bucket, MessageCounts()) + MessageCounts(
                    **{status.value: n}
                )
                latest[part] = max(latest.get(part, at), at)
            for part, at in latest.items():
                self._changed[mailing_id, part] = at

    def read(self, mailing_id: str, grid: TimelineGrid, now: datetime) -> Activity:
        with self._lock:
            buckets: dict[int, MessageCounts] = {}
            changed = []
            for part in parts_until(grid, now):
                buckets.update(self._buckets.get((mailing_id, part), {}))
                if (mailing_id, part) in self._changed:
                    changed.append(self._changed[mailing_id, part])
            return Activity(buckets, max(changed) if changed else None)

    def drop(self, mailing_id: str) -> None:
        with self._lock:
            for key in [key for key in self._buckets if key[0] == mailing_id]:
                del self._buckets[key]
                self._changed.pop(key, None)
