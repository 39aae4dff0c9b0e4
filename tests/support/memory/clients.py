"""`ClientRepository` in memory: the same answers as DynamoDB's, without an emulator."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import datetime

from chalicelib.domain import AudienceFilter, Client, PageOf
from chalicelib.domain.client import ClientChanged, ClientNotFound, PhoneTaken, Recipient
from chalicelib.domain.sms_parts import ClientValues
from chalicelib.storage.clients import BATCH_READ_RETRY, AudienceSummary
from chalicelib.storage.errors import Retry
from chalicelib.storage.pagination import invalid_cursor


def offset_cursor(scope: str, offset: int) -> str:
    return f"{scope}:{offset}"


def read_offset(scope: str, cursor: str | None) -> int:
    """Where a page starts; a cursor of another listing is refused as DynamoDB's pager does."""
    if cursor is None:
        return 0
    prefix, _, offset = cursor.rpartition(":")
    if prefix != scope or not offset.isdigit():
        raise invalid_cursor()
    return int(offset)


class MemoryClientRepository:
    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self.phones: dict[str, str] = {}

    def get(self, client_id: str) -> Client:
        try:
            return self.clients[client_id]
        except KeyError:
            raise ClientNotFound(client_id) from None

    def find_many(
        self, client_ids: list[str], *, retry: Retry = BATCH_READ_RETRY
    ) -> tuple[dict[str, Client], dict[str, str]]:
        found = {c: self.clients[c] for c in client_ids if c in self.clients}
        missing = "client record is missing (the client was deleted)"
        return found, {c: missing for c in client_ids if c not in found}

    def owner_of(self, phone: str) -> str | None:
        return self.phones.get(phone)

    def owners_of(self, phones: list[str]) -> dict[str, str]:
        return {p: self.phones[p] for p in phones if p in self.phones}

    def get_many(self, client_ids: list[str]) -> tuple[dict[str, Client], set[str]]:
        return {c: self.clients[c] for c in client_ids if c in self.clients}, set()

    def page(self, audience: AudienceFilter, *, limit: int, cursor: str | None) -> PageOf[Client]:
        scope = repr((audience.operator_codes, audience.tags))
        start = read_offset(scope, cursor)
        selected = self._selected(audience)
        end = start + limit
        next_cursor = offset_cursor(scope, end) if end < len(selected) else None
        return PageOf(selected[start:end], next_cursor)

    def recipients(
        self, audience: AudienceFilter, *, scope: str, cursor: str | None, limit: int
    ) -> PageOf[Recipient]:
        start = read_offset(scope, cursor)
        selected = self._selected(audience)
        end = start + limit
        recipients = [Recipient(c.id, c.phone) for c in selected[start:end]]
        return PageOf(recipients, offset_cursor(scope, end) if end < len(selected) else None)

    def summarize(
        self, audience: AudienceFilter, sample_size: int, *, exact: bool = False
    ) -> AudienceSummary:
        # Always exact: the contract lets any audience be counted exactly, and memory is cheap.
        selected = self._selected(audience)
        sample = [c.id for c in selected[:sample_size]]
        values = Counter(
            ClientValues(c.operator_code, c.tag, c.timezone) for c in selected if not c.opted_out
        )
        return AudienceSummary.exact(
            len(selected), sum(c.opted_out for c in selected), sample, values
        )

    def add(self, client: Client) -> Client:
        if client.id in self.clients or client.phone in self.phones:
            raise PhoneTaken(client.phone)
        return self._put(client)

    def save(self, client: Client, *, previous: Client) -> Client:
        if client.phone != previous.phone:
            owner = self.phones.get(client.phone)
            if owner not in (None, client.id):
                raise PhoneTaken(client.phone)
        if self._stored_version(client.id) != client.version:
            raise ClientChanged(f"client {client.id} was changed or deleted by another request")
        if client.phone != previous.phone:
            self.phones.pop(previous.phone, None)
        return self._put(client)

    def delete(self, client: Client) -> None:
        if self._stored_version(client.id) != client.version:
            raise ClientChanged(f"client {client.id} was changed or deleted by another request")
        del self.clients[client.id]
        self.phones.pop(client.phone, None)

    def opt_out(self, client: Client, at: datetime) -> Client:
        stored = self.clients.get(client.id)
        if stored is None or stored.phone != client.phone or stored.version != client.version:
            raise ClientChanged(f"client {client.id} was changed by another request")
        return self._put(replace(stored, opted_out=True, updated_at=at))

    def _put(self, client: Client) -> Client:
        stored = replace(client, version=client.version + 1)
        self.clients[client.id] = stored
        self.phones[client.phone] = client.id
        return stored

    def _stored_version(self, client_id: str) -> int | None:
        stored = self.clients.get(client_id)
        return None if stored is None else stored.version

    def _selected(self, audience: AudienceFilter) -> list[Client]:
        return [
            c for _, c in sorted(self.clients.items()) if audience.matches(c.operator_code, c.tag)
        ]
