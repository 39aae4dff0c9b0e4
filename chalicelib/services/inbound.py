"""Inbound SMS, as the gateway's reply webhook hands them over (`POST /inbound-sms`).

A text made only of an opt-out keyword (INBOUND_OPT_OUT_KEYWORDS) opts its sender out through
the client directory, as `POST /opt-outs` does. Any other reply from a client is kept on the
client's page and counted. A number no client has is counted and answered as accepted: the
gateway has nothing to fix, and would otherwise send it again and again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta

from chalicelib.domain import Clock, PageOf
from chalicelib.domain.inbound import (
    REPLY_TEXT_LIMIT,
    InboundCounts,
    InboundReply,
    InboundResult,
    is_opt_out,
)
from chalicelib.errors import NotFound
from chalicelib.services.clients import ClientDirectory
from chalicelib.services.receipts import WEBHOOK_WRITES
from chalicelib.storage.errors import busy_if_transient
from chalicelib.storage.inbound import InboundRepository

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InboundOutcome:
    """What one inbound SMS did, and to which client (None: the number is nobody's)."""

    result: InboundResult
    client_id: str | None


class InboundSms:
    """Handles clients' replies: opt-out keywords, and the other replies kept per client."""

    def __init__(
        self,
        clients: ClientDirectory,
        inbound: InboundRepository,
        clock: Clock,
        *,
        keywords: Sequence[str],
        retention_days: int,
    ) -> None:
        self._clients = clients
        self._inbound = inbound
        self._clock = clock
        self._keywords = tuple(keywords)
        self._retention = timedelta(days=retention_days)

    def receive(self, phone: str, text: str) -> InboundOutcome:
        """Act on one inbound SMS from `phone`."""
        with busy_if_transient():
            client = self._clients.by_phone(phone)
            if client is None:
                self._count(InboundResult.UNKNOWN_PHONE)
                logger.info("inbound SMS from a number no client has")
                return InboundOutcome(InboundResult.UNKNOWN_PHONE, None)
            if is_opt_out(text, self._keywords):
                return self._opt_out(phone, client.id, already=client.opted_out)
            now = self._clock()
            reply = InboundReply(
                id=f"{now:%Y-%m-%dT%H:%M:%S.%fZ}#{uuid.uuid4().hex[:12]}",
                client_id=client.id,
                phone=phone,
                text=text[:REPLY_TEXT_LIMIT],
                received_at=now,
            )
            # The count is on the statistics' totals item, which settling mailings also write.
            replace(WEBHOOK_WRITES, what="keeping an inbound reply")(
                lambda: self._inbound.add_reply(reply, now + self._retention)
            )
        logger.info("inbound reply kept", extra={"client_id": client.id})
        return InboundOutcome(InboundResult.STORED, client.id)

    def replies(self, client_id: str, *, limit: int, cursor: str | None) -> PageOf[InboundReply]:
        """One page of the client's replies, newest first; NotFound for an unknown client."""
        self._clients.get(client_id)
        return self._inbound.page(client_id, limit=limit, cursor=cursor)

    def counts(self) -> InboundCounts:
        """Every inbound SMS so far, by what it did."""
        return self._inbound.counts()

    def _count(self, result: InboundResult) -> None:
        replace(WEBHOOK_WRITES, what="counting an inbound SMS")(lambda: self._inbound.count(result))

    def _opt_out(self, phone: str, client_id: str, *, already: bool) -> InboundOutcome:
        if already:
            self._count(InboundResult.ALREADY_OPTED_OUT)
            logger.info("opt-out keyword again", extra={"client_id": client_id})
            return InboundOutcome(InboundResult.ALREADY_OPTED_OUT, client_id)
        try:
            client = self._clients.opt_out(phone)
        except NotFound:
            # Deleted, or its number changed, between the two reads.
            self._count(InboundResult.UNKNOWN_PHONE)
            return InboundOutcome(InboundResult.UNKNOWN_PHONE, None)
        self._count(InboundResult.OPTED_OUT)
        return InboundOutcome(InboundResult.OPTED_OUT, client.id)
