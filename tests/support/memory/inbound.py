"""Inbound SMS in memory: `InboundRepository` (tests/integration/test_inbound_repository.py
runs it and the DynamoDB one)."""

from __future__ import annotations

import threading
from datetime import datetime

from chalicelib.domain.inbound import InboundCounts, InboundReply, InboundResult
from chalicelib.domain.paging import PageOf
from chalicelib.storage.pagination import fingerprint, invalid_cursor


class MemoryInboundRepository:
    """Replies in a list; a cursor is the listing's digest and how many replies were read."""

    def __init__(self) -> None:
        self._replies: list[InboundReply] = []
        self._counts = InboundCounts()
        self._lock = threading.Lock()

    def add_reply(self, reply: InboundReply, expires_at: datetime | None) -> InboundReply:
        with self._lock:
            self._replies.append(reply)
            self._counts = InboundCounts(
                self._counts.replies + 1, self._counts.opt_outs, self._counts.unknown
            )
        return reply

    def count(self, result: InboundResult) -> None:
        with self._lock:
            c = self._counts
            if result is InboundResult.STORED:
                self._counts = InboundCounts(c.replies + 1, c.opt_outs, c.unknown)
            elif result is InboundResult.UNKNOWN_PHONE:
                self._counts = InboundCounts(c.replies, c.opt_outs, c.unknown + 1)
            else:
                self._counts = InboundCounts(c.replies, c.opt_outs + 1, c.unknown)

    def page(self, client_id: str, *, limit: int, cursor: str | None) -> PageOf[InboundReply]:
        scope = fingerprint("inbound", client_id)
        start = 0
        if cursor is not None:
            given, _, offset = cursor.partition(":")
            if given != scope or not offset.isdigit():
                raise invalid_cursor()
            start = int(offset)
        with self._lock:
            mine = sorted(
                (r for r in self._replies if r.client_id == client_id),
                key=lambda r: r.id,
                reverse=True,
            )
        end = start + limit
        return PageOf(mine[start:end], f"{scope}:{end}" if end < len(mine) else None)

    def counts(self) -> InboundCounts:
        with self._lock:
            return self._counts
