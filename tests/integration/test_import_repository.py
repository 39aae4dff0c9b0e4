"""The import repository's contract, run against DynamoDB (in-process moto) and in memory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from chalicelib.domain.client import Client, ClientFields
from chalicelib.domain.client_import import (
    ImportJob,
    ImportStatus,
    ImportTally,
    ImportTotals,
    InvalidRowsPage,
    RowProblem,
)
from chalicelib.storage.imports import ClientWrite, PartAlreadyIn, PartWritten, WritesLost
from tests.support.memory.clients import MemoryClientRepository
from tests.support.memory.imports import MemoryImportRepository

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
EXPIRES = NOW + timedelta(days=30)
IMPORT_ID = "00000000-0000-4000-8000-000000000001"


@dataclass
class Stores:
    imports: Any
    clients: Any


@pytest.fixture(params=["dynamodb", "memory"])
def stores(request: pytest.FixtureRequest) -> Iterator[Stores]:
    if request.param == "memory":
        clients = MemoryClientRepository()
        yield Stores(MemoryImportRepository(clients), clients)
        return
    request.getfixturevalue("aws")
    from pynamodb.connection import Connection

    from chalicelib.storage.clients import DynamoClientRepository
    from chalicelib.storage.imports import DynamoImportRepository
    from chalicelib.storage.models import build_models

    settings = request.getfixturevalue("settings")
    models = build_models(settings)
    for model in (models.ClientImport, models.Client, models.Phone):
        model.create_table(wait=True)
    connection = Connection(region=settings.aws_region)
    yield Stores(
        DynamoImportRepository(models, connection), DynamoClientRepository(models, connection)
    )


def job(import_id: str = IMPORT_ID, chunks: int = 2, at: datetime = NOW) -> ImportJob:
    return ImportJob(
        id=import_id,
        status=ImportStatus.QUEUED,
        rows=10,
        valid=8,
        invalid=2,
        chunks=chunks,
        totals=ImportTotals(),
        errors_omitted=0,
        created_at=at,
        updated_at=at,
    )


def new_client(n: int) -> Client:
    fields = ClientFields(f"7900000000{n}", None, "", "UTC")
    return Client.new(f"00000000-0000-4000-8000-{n:012d}", fields, NOW)


def tally(created: int = 0, failed: int = 0, *problems: RowProblem) -> ImportTally:
    return ImportTally(ImportTotals(created=created, failed=failed), tuple(problems))


def test_a_created_job_reads_back_with_its_invalid_rows(stores):
    # Given a job with two pages of invalid rows
    pages = [
        InvalidRowsPage(IMPORT_ID, 0, (RowProblem(2, "phone", "not a phone"),)),
        InvalidRowsPage(IMPORT_ID, 1, (RowProblem(7, None, "too many cells"),)),
    ]
    # When it is created
    stores.imports.create(job(), pages, EXPIRES)
    # Then it reads back as it was, with its pages and no chunk yet
    parts = stores.imports.parts(IMPORT_ID)
    assert parts.job == job()
    assert parts.invalid_pages == pages
    assert parts.chunks == []


def test_an_unknown_import_has_no_parts(stores):
    assert stores.imports.parts(IMPORT_ID) is None
    assert stores.imports.read_chunk(IMPORT_ID, 0) == (None, None)


def test_jobs_are_listed_newest_first_a_page_at_a_time(stores):
    # Given three jobs made a minute apart
    ids = [f"00000000-0000-4000-8000-00000000000{n}" for n in range(1, 4)]
    for n, import_id in enumerate(ids):
        stores.imports.create(job(import_id, at=NOW + timedelta(minutes=n)), [], EXPIRES)
    # When they are listed two at a time
    first = stores.imports.page(limit=2, cursor=None)
    second = stores.imports.page(limit=2, cursor=first.next_cursor)
    # Then they come newest first, each once
    assert [j.id for j in first.items + second.items] == ids[::-1]
    assert second.next_cursor is None


def test_only_a_queued_job_is_marked_running(stores):
    # Given a queued job and a failed one
    other = "00000000-0000-4000-8000-000000000002"
    stores.imports.create(job(), [], EXPIRES)
    stores.imports.create(job(other), [], EXPIRES)
    stores.imports.set_status(other, ImportStatus.FAILED, NOW)
    # When both are marked running
    later = NOW + timedelta(seconds=5)
    stores.imports.mark_running(IMPORT_ID, later)
    stores.imports.mark_running(other, later)
    # Then only the queued one is
    running, failed = stores.imports.read_chunk(IMPORT_ID, 0)[0], stores.imports.parts(other).job
    assert (running.status, running.updated_at) == (ImportStatus.RUNNING, later)
    assert failed.status == ImportStatus.FAILED


def test_a_part_writes_its_clients_and_counts_once(stores):
    # Given a job
    stores.imports.create(job(), [], EXPIRES)
    writes = [ClientWrite(new_client(1), new=True), ClientWrite(new_client(2), new=True)]
    problem = RowProblem(3, "phone", "the phone was given to another client meanwhile")
    # When a part with two new clients is committed twice (SQS delivered the chunk again)
    first = stores.imports.commit_part(IMPORT_ID, 0, 0, writes, tally(2, 1, problem), EXPIRES)
    again = stores.imports.commit_part(IMPORT_ID, 0, 0, writes, tally(2, 1, problem), EXPIRES)
    # Then the clients are stored, and the chunk counts them once
    assert (first, again) == (PartWritten(), PartAlreadyIn())
    assert stores.clients.owner_of("79000000001") == new_client(1).id
    assert stores.clients.get(new_client(2).id).phone == "79000000002"
    _, progress = stores.imports.read_chunk(IMPORT_ID, 0)
    assert progress.done_parts == {0}
    assert progress.totals == ImportTotals(created=2, failed=1)
    assert progress.problems == (problem,)


def test_a_part_whose_writes_meet_a_change_writes_nothing_and_names_them(stores):
    # Given a job, a client that was changed after it was read, and a phone taken meanwhile
    stores.imports.create(job(), [], EXPIRES)
    read = stores.clients.add(new_client(1))
    stores.clients.save(read.with_fields(replace(read.fields, tag="edited"), NOW), previous=read)
    stores.clients.add(new_client(2))
    taken = replace(new_client(2), id="00000000-0000-4000-8000-000000000099")
    writes = [
        ClientWrite(read.with_fields(replace(read.fields, tag="import"), NOW), new=False),
        ClientWrite(new_client(3), new=True),
        ClientWrite(taken, new=True),
    ]
    # When the part is committed
    outcome = stores.imports.commit_part(IMPORT_ID, 0, 0, writes, tally(2), EXPIRES)
    # Then the two stale writes are named, and nothing at all was written
    assert outcome == WritesLost(frozenset({0, 2}))
    assert stores.clients.get(read.id).tag == "edited"
    assert stores.clients.owner_of("79000000003") is None
    _, progress = stores.imports.read_chunk(IMPORT_ID, 0)
    assert progress is None or progress.totals == ImportTotals()


def test_a_part_without_writes_adds_its_tally_once(stores):
    stores.imports.create(job(), [], EXPIRES)
    assert stores.imports.commit_tally(IMPORT_ID, 0, 1, tally(failed=2), EXPIRES) is True
    assert stores.imports.commit_tally(IMPORT_ID, 0, 1, tally(failed=2), EXPIRES) is False
    _, progress = stores.imports.read_chunk(IMPORT_ID, 0)
    assert (progress.done_parts, progress.totals) == ({1}, ImportTotals(failed=2))


def test_a_finished_chunk_keeps_its_first_totals_and_takes_no_more_parts(stores):
    # Given a chunk with one part in
    stores.imports.create(job(), [], EXPIRES)
    stores.imports.commit_tally(IMPORT_ID, 0, 0, tally(failed=1), EXPIRES)
    # When it is finished twice, each time with the tally of its quiet parts
    first = stores.imports.finish_chunk(IMPORT_ID, 0, tally(failed=2), EXPIRES)
    second = stores.imports.finish_chunk(IMPORT_ID, 0, tally(failed=2), EXPIRES)
    # Then the first close counts, the second sees it, and no later part gets in
    assert first.finished
    assert not first.abandoned
    assert first.totals == second.totals == ImportTotals(failed=3)
    late = stores.imports.commit_part(
        IMPORT_ID, 0, 5, [ClientWrite(new_client(1), new=True)], tally(1), EXPIRES
    )
    assert late == PartAlreadyIn()


def test_settled_chunks_add_to_the_job_once_and_the_last_ends_it(stores):
    # Given a job of two chunks, both finished, the second given up
    stores.imports.create(job(chunks=2), [], EXPIRES)
    stores.imports.commit_tally(IMPORT_ID, 0, 0, tally(created=3), EXPIRES)
    one = stores.imports.finish_chunk(IMPORT_ID, 0, tally(), EXPIRES)
    two = stores.imports.finish_chunk(IMPORT_ID, 1, tally(failed=4), EXPIRES, abandoned=True)
    # When the first is settled twice and the second once
    after_one = stores.imports.settle(one, NOW)
    again = stores.imports.settle(one, NOW)
    after_two = stores.imports.settle(two, NOW)
    # Then each counted once, and the job is ready to end as failed
    assert after_one.totals == again.totals == ImportTotals(created=3)
    assert not after_one.all_settled
    assert after_two.totals == ImportTotals(created=3, failed=4)
    assert after_two.all_settled
    assert after_two.final_status == ImportStatus.FAILED
    # And it ends once
    assert stores.imports.end(IMPORT_ID, ImportStatus.FAILED, NOW) is True
    assert stores.imports.end(IMPORT_ID, ImportStatus.DONE, NOW) is False
    assert stores.imports.parts(IMPORT_ID).job.status == ImportStatus.FAILED


def test_a_chunk_of_a_deleted_import_settles_nowhere(stores):
    stores.imports.create(job(), [], EXPIRES)
    progress = stores.imports.finish_chunk(IMPORT_ID, 0, tally(created=1), EXPIRES)
    gone = replace(progress, import_id="00000000-0000-4000-8000-000000000077")
    assert stores.imports.settle(gone, NOW) is None
