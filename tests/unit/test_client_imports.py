"""The CSV import's orchestration over the in-memory repositories: no emulator, no queue."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from chalicelib.domain import ImportStatus, RowProblem
from chalicelib.domain.client import ClientFields
from chalicelib.services.clients import ClientDirectory
from chalicelib.services.imports import ClientImports, ImportNotQueued
from chalicelib.services.queues import ImportChunk, ImportRow
from tests.support.memory.clients import MemoryClientRepository
from tests.support.memory.imports import MemoryImportRepository

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


class QueuedChunks:
    """The import queue: what was sent, or a refusal."""

    def __init__(self) -> None:
        self.chunks: list[ImportChunk] = []
        self.refuse = False

    def enqueue_import(self, chunks: Sequence[ImportChunk]) -> None:
        if self.refuse:
            raise RuntimeError("SQS is unreachable")
        self.chunks += chunks


@pytest.fixture
def clients() -> MemoryClientRepository:
    return MemoryClientRepository()


@pytest.fixture
def queue() -> QueuedChunks:
    return QueuedChunks()


@pytest.fixture
def imports(clients: MemoryClientRepository, queue: QueuedChunks) -> ClientImports:
    store = MemoryImportRepository(clients)
    return ClientImports(store, clients, queue, lambda: NOW, chunk_rows=3, part_rows=2)


def rows(*cells: tuple[str, str | None, str | None, str | None]) -> list[ImportRow]:
    return [(n, *row) for n, row in enumerate(cells, start=1)]


def start(imports: ClientImports, valid: list[ImportRow], problems: Sequence[RowProblem] = ()):
    return imports.start(
        rows=len(valid) + len(problems),
        valid=valid,
        invalid=len(problems),
        problems=problems,
        problems_omitted=0,
    )


def deliver_all(imports: ClientImports, queue: QueuedChunks) -> None:
    for chunk in queue.chunks:
        imports.process(chunk)
    queue.chunks = []


def test_an_import_of_new_phones_creates_them_and_ends_done(imports, queue, clients):
    # Given a file of four new phones (two chunks) and one invalid row
    valid = rows(*((f"7900000000{n}", None, "vip", None) for n in range(4)))
    problem = RowProblem(5, "phone", "not a phone")
    job = start(imports, valid, [problem])
    assert (job.status, len(queue.chunks)) == (ImportStatus.QUEUED, 2)
    # When its chunks are written
    deliver_all(imports, queue)
    # Then the clients exist with POST's defaults, and the import is done with its counts
    done = imports.get(job.id)
    assert (done.status, done.created, done.updated, done.failed) == (ImportStatus.DONE, 4, 0, 0)
    assert done.errors == (problem,)
    client = clients.get(clients.owner_of("79000000002"))
    assert (client.operator_code, client.tag, client.timezone) == ("900", "vip", "UTC")


def test_a_chunk_delivered_again_counts_once(imports, queue):
    job = start(imports, rows(("79000000001", None, None, None)))
    [chunk] = queue.chunks
    imports.process(chunk)
    imports.process(chunk)
    done = imports.get(job.id)
    assert (done.status, done.created, done.unchanged) == (ImportStatus.DONE, 1, 0)


def test_a_known_phone_has_only_the_given_fields_changed(imports, queue, clients):
    # Given a client of operator 901
    directory = ClientDirectory(clients, lambda: NOW)
    known = directory.create(ClientFields("79000000001", "901", "old", "Europe/Moscow"))
    # When a file gives its phone a new tag, and the same file is imported once more
    first = start(imports, rows(("79000000001", None, "new", None)))
    deliver_all(imports, queue)
    again = start(imports, rows(("79000000001", None, "new", None)))
    deliver_all(imports, queue)
    # Then the tag changed, the rest stayed, and the second import changed nothing
    client = clients.get(known.id)
    assert (client.operator_code, client.tag, client.timezone) == ("901", "new", "Europe/Moscow")
    assert imports.get(first.id).updated == 1
    assert imports.get(again.id).unchanged == 1


def test_an_import_that_cannot_be_queued_fails_at_once(imports, queue):
    queue.refuse = True
    with pytest.raises(ImportNotQueued):
        start(imports, rows(("79000000001", None, None, None)))
    [job] = imports.list(limit=10, cursor=None).items
    assert job.status == ImportStatus.FAILED


def test_a_chunk_given_up_fails_its_rows_and_the_import(imports, queue, monkeypatch):
    # Given a chunk whose writes keep failing
    job = start(imports, rows(("79000000001", None, None, None), ("79000000002", None, None, None)))
    [chunk] = queue.chunks

    def broken(*args, **kwargs):
        raise RuntimeError("storage is down")

    monkeypatch.setattr(imports, "_existing", broken)
    # When its last attempt fails too
    with pytest.raises(RuntimeError):
        imports.process(chunk, last_attempt=True)
    # Then its rows count as failed, with the reason, and the import failed
    done = imports.get(job.id)
    assert (done.status, done.failed) == (ImportStatus.FAILED, 2)
    assert all("could not be written (RuntimeError)" in e.message for e in done.errors)
