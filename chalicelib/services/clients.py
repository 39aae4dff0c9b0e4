"""The client directory: create, edit, delete and find clients; phone numbers stay unique."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from chalicelib.domain import AudienceFilter, Client, Clock, PageOf
from chalicelib.domain.client import ClientFields, ClientNotFound, Recipient
from chalicelib.domain.sms_parts import PartsEstimate, Prices
from chalicelib.errors import NotFound
from chalicelib.services.parts import parts_over
from chalicelib.storage.clients import BATCH_READ_RETRY, ClientRepository, DynamoClientRepository
from chalicelib.storage.errors import Retry
from chalicelib.storage.pagination import Segment

logger = logging.getLogger(__name__)

__all__ = ["AudiencePreview", "ClientDirectory", "ClientFields"]


@dataclass(frozen=True)
class AudiencePreview:
    """An audience counted (exactly, or estimated with a 95 % interval) and its first clients."""

    count: int
    opted_out: int
    approximate: bool
    count_low: int
    count_high: int
    sample: list[Client]
    # The parts (and cost) of a text sent to them, when the preview was given one.
    parts: PartsEstimate | None = None


class ClientDirectory:
    """Clients and the audience queries over them."""

    def __init__(
        self, clients: ClientRepository, clock: Clock, *, prices: Prices | None = None
    ) -> None:
        self._clients = clients
        self._clock = clock
        self._prices = prices

    # ---------------------------------------------------------------- reads

    def get(self, client_id: str) -> Client:
        """The client, or NotFound."""
        return self._clients.get(client_id)

    def find_many(
        self, client_ids: list[str], *, retry: Retry = BATCH_READ_RETRY
    ) -> tuple[dict[str, Client], dict[str, str]]:
        """The usable clients among `client_ids`, by id, and what is wrong with the others.

        A record that is corrupt or from an older schema is reported, never raised: one bad
        record must not stop the work on the good ones. A read that keeps failing transiently
        (after `retry`) is raised: it says nothing about the records.
        """
        return self._clients.find_many(client_ids, retry=retry)

    def by_phone(self, phone: str) -> Client | None:
        """The client that has this phone number, if any."""
        owner = self._clients.owner_of(phone)
        if owner is None:
            return None
        try:
            return self._clients.get(owner)
        except ClientNotFound:  # deleted between the two reads
            return None

    def list(
        self,
        *,
        limit: int,
        cursor: str | None,
        operator_code: str | None = None,
        tag: str | None = None,
        phone: str | None = None,
    ) -> PageOf[Client]:
        """One page of clients, optionally only those with this operator code and/or tag; with
        a phone number, the one client that has it (if it matches the others), in one page."""
        audience = AudienceFilter(
            operator_codes=(operator_code,) if operator_code is not None else (),
            tags=(tag,) if tag is not None else (),
        )
        if phone is not None:
            return self._with_phone(phone, audience)
        return self._clients.page(audience, limit=limit, cursor=cursor)

    def preview(
        self,
        audience: AudienceFilter,
        sample_size: int,
        *,
        exact: bool = False,
        text: str | None = None,
    ) -> AudiencePreview:
        """How many clients `audience` selects, how many of those opted out, and the first
        `sample_size` of them, without creating anything. A large audience is estimated from a
        bounded read unless `exact`, which reads all of it. With a `text`, also the parts (and
        cost) of sending it to them, from the same read."""
        summary = self._clients.summarize(audience, sample_size, exact=exact)
        found, _ = self.find_many(summary.sample_ids)
        sample = [found[i] for i in summary.sample_ids if i in found]
        return AudiencePreview(
            count=summary.count,
            opted_out=summary.opted_out,
            approximate=summary.approximate,
            count_low=summary.count_low,
            count_high=summary.count_high,
            sample=sample,
            parts=None if text is None else parts_over(text, summary, audience, self._prices),
        )

    def recipients(
        self, audience: AudienceFilter, *, scope: str, cursor: str | None, limit: int
    ) -> PageOf[Recipient]:
        """One page of a mailing's fan-out: the id and phone of each client `audience` selects,
        from the checkpoint `cursor` (made for the same `scope`)."""
        return self._clients.recipients(audience, scope=scope, cursor=cursor, limit=limit)

    def audience_segments(
        self, audience: AudienceFilter, *, attributes: Sequence[str] | None = None
    ) -> list[Segment]:
        """The Queries whose union is exactly the clients `audience` selects (the fan-out's)."""
        # The fan-out pages through DynamoDB queries itself; only the DynamoDB store has them.
        assert isinstance(self._clients, DynamoClientRepository)
        return self._clients.audience_segments(audience, attributes=attributes)

    # ---------------------------------------------------------------- writes

    def create(self, fields: ClientFields) -> Client:
        """Add a client; a phone number that another client has is a Conflict."""
        client = self._clients.add(Client.new(str(uuid.uuid4()), fields, self._clock()))
        logger.info("client created", extra={"client_id": client.id})
        return client

    def replace(self, client_id: str, fields: ClientFields) -> Client:
        """Overwrite every field of a client (PUT)."""
        client = self._change(client_id, fields=fields)
        logger.info("client replaced", extra={"client_id": client_id})
        return client

    def update(self, client_id: str, changes: dict[str, object]) -> Client:
        """Change only the given fields (PATCH); the operator code is kept unless given."""
        client = self._change(client_id, changes=changes)
        logger.info(
            "client updated: %s", ", ".join(sorted(changes)), extra={"client_id": client_id}
        )
        return client

    def delete(self, client_id: str) -> None:
        """Remove a client and free its phone number."""
        self._clients.delete(self._clients.get(client_id))
        logger.info("client deleted", extra={"client_id": client_id})

    def opt_out(self, phone: str) -> Client:
        """Mark the client with this phone as opted out (a STOP reply); idempotent."""
        client_id = self._clients.owner_of(phone)
        if client_id is None:
            raise NotFound(f"no client has the phone number {phone}")
        client = self._clients.get(client_id)
        if client.opted_out:
            return client
        client = self._clients.opt_out(client, self._clock())
        logger.info("client opted out", extra={"client_id": client_id})
        return client

    # ---------------------------------------------------------------- helpers

    def _change(
        self,
        client_id: str,
        *,
        fields: ClientFields | None = None,
        changes: dict[str, object] | None = None,
    ) -> Client:
        current = self._clients.get(client_id)
        wanted = fields if fields is not None else replace(current.fields, **(changes or {}))
        return self._clients.save(current.with_fields(wanted, self._clock()), previous=current)

    def _with_phone(self, phone: str, audience: AudienceFilter) -> PageOf[Client]:
        # Phones are unique: their claim names the one client, with no index to page through.
        owner = self._clients.owner_of(phone)
        try:
            client = self._clients.get(owner) if owner is not None else None
        except ClientNotFound:  # deleted between the two reads
            client = None
        if client is None or not audience.matches(client.operator_code, client.tag):
            return PageOf([], None)
        return PageOf([client], None)
