"""Inbound SMS as stored: clients' replies, newest first, and the counts of every inbound SMS.

A reply lives in the messages table under `#inbound#<client_id>` (no mailing id looks like
that), so a client's replies are one Query, newest first, paged; a TTL removes each
MESSAGE_RETENTION_DAYS after it came. The counts (replies kept, opt-outs, unknown numbers) are
ADDed on the mailings table's totals item, a reply's in the transaction that stores it, so the
count always equals the replies stored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from pynamodb.attributes import NumberAttribute
from pynamodb.connection import Connection
from pynamodb.exceptions import DoesNotExist
from pynamodb.expressions.update import Action
from pynamodb.transactions import TransactWrite

from chalicelib.domain.inbound import InboundCounts, InboundReply, InboundResult
from chalicelib.domain.paging import PageOf
from chalicelib.storage.models import (
    INBOUND_PREFIX,
    TOTALS_KEY,
    InboundReplyRecord,
    MailingRecord,
    Models,
    inbound_key,
)
from chalicelib.storage.pagination import Segment, fingerprint, index_query, paginate


class InboundRepository(Protocol):
    """Clients' replies and the counts of inbound SMS."""

    def add_reply(self, reply: InboundReply, expires_at: datetime | None) -> InboundReply:
        """Keep a reply on its client's page and count it, in one write."""
        ...

    def count(self, result: InboundResult) -> None:
        """Count an inbound SMS that kept nothing (an opt-out, an unknown number)."""
        ...

    def page(self, client_id: str, *, limit: int, cursor: str | None) -> PageOf[InboundReply]:
        """One page of the client's replies, newest first; a cursor this listing did not hand
        out is a MalformedRequest."""
        ...

    def counts(self) -> InboundCounts:
        """Every inbound SMS so far, by what it did."""
        ...


class DynamoInboundRepository:
    """`InboundRepository` on the stage's messages table (replies) and mailings table (counts)."""

    def __init__(self, models: Models, connection: Connection) -> None:
        self._models = models
        self._connection = connection

    def add_reply(self, reply: InboundReply, expires_at: datetime | None) -> InboundReply:
        Reply, Mailing = self._models.InboundReply, self._models.Mailing
        actions: list[Action] = [
            Reply.phone.set(reply.phone),
            Reply.text.set(reply.text),
            Reply.received_at.set(reply.received_at),
        ]
        if expires_at is not None:
            actions.append(Reply.expires_at.set(expires_at))
        # An update, not a put: the API's role updates messages-table items and puts none.
        with TransactWrite(connection=self._connection) as tx:
            tx.update(
                Reply(inbound_key(reply.client_id), reply.id),
                actions=actions,
                condition=Reply.client_id.does_not_exist(),
            )
            tx.update(Mailing(TOTALS_KEY), actions=[Mailing.inbound_replies.add(1)])
        return reply

    def count(self, result: InboundResult) -> None:
        Mailing = self._models.Mailing
        Mailing(TOTALS_KEY).update(actions=[_counter(Mailing, result).add(1)])

    def page(self, client_id: str, *, limit: int, cursor: str | None) -> PageOf[InboundReply]:
        Reply = self._models.InboundReply
        query = index_query(Reply.query, inbound_key(client_id), forward=False)
        items, next_cursor = paginate(
            [Segment(query, ("mailing_id", "client_id"))],
            fingerprint("inbound", client_id),
            cursor,
            limit,
            _reply,
        )
        return PageOf(items, next_cursor)

    def counts(self) -> InboundCounts:
        Mailing = self._models.Mailing
        try:
            item = Mailing.get(
                TOTALS_KEY,
                attributes_to_get=["inbound_replies", "inbound_opt_outs", "inbound_unknown"],
            )
        except DoesNotExist:
            return InboundCounts()
        return InboundCounts(
            replies=int(item.inbound_replies or 0),
            opt_outs=int(item.inbound_opt_outs or 0),
            unknown=int(item.inbound_unknown or 0),
        )


def _counter(Mailing: type[MailingRecord], result: InboundResult) -> NumberAttribute:
    if result is InboundResult.STORED:
        return Mailing.inbound_replies
    if result is InboundResult.UNKNOWN_PHONE:
        return Mailing.inbound_unknown
    return Mailing.inbound_opt_outs


def _reply(item: InboundReplyRecord) -> InboundReply:
    return InboundReply(
        id=item.client_id,
        client_id=item.mailing_id.removeprefix(INBOUND_PREFIX),
        phone=item.phone,
        text=item.text,
        received_at=item.received_at,
    )
