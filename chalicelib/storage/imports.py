"""CSV imports in DynamoDB: several items per import in the imports table, told apart by `part`.

- "job": the `ImportJob`;
- "invalid#NNN": an `InvalidRowsPage`, written with the job;
- "chunk#NNNNN": a chunk's `ChunkProgress`, written by the worker one part at a time. A part's
  client writes and its counts go in one transaction with the progress record, whose condition
  (the part is not among `done_parts`) makes a part count once however often SQS delivers it.

All of them share one record class (`ClientImportRecord`), so the table keeps its shape; this
module maps each kind to its own domain type.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pynamodb.connection import Connection
from pynamodb.exceptions import DoesNotExist, PynamoDBException, TransactWriteError
from pynamodb.expressions.update import Action
from pynamodb.transactions import TransactWrite

from chalicelib.domain.client import Client
from chalicelib.domain.client_import import (
    RUNNING_STATUSES,
    ChunkProgress,
    ImportJob,
    ImportStatus,
    ImportTally,
    ImportTotals,
    InvalidRowsPage,
    RowProblem,
)
from chalicelib.domain.paging import PageOf
from chalicelib.errors import StorageBusy
from chalicelib.storage.clients import client_record
from chalicelib.storage.errors import CONDITION_FAILED, busy_if_transient, is_conditional_failure
from chalicelib.storage.models import (
    IMPORT_JOB,
    IMPORT_LISTING_KEY,
    ClientImportRecord,
    Models,
    RowError,
    import_chunk_part,
    import_invalid_part,
)
from chalicelib.storage.pagination import Segment, fingerprint, index_query, paginate

logger = logging.getLogger(__name__)

_ABANDONED = "abandoned"
_OUTCOMES = ("created", "updated", "unchanged", "failed")


@dataclass(frozen=True)
class ClientWrite:
    """A client a part of a chunk writes: a new one (with its phone claim) or a changed one
    (conditional on the version it was read at)."""

    client: Client
    new: bool


@dataclass(frozen=True)
class PartWritten:
    """The part's writes and counts are in."""


@dataclass(frozen=True)
class PartAlreadyIn:
    """An earlier delivery of the chunk wrote this part (or finished the chunk): nothing done."""


@dataclass(frozen=True)
class WritesLost:
    """Nothing written: these writes (indexes into the part's writes) met a change made since
    the clients were read (the phone given to another client, the client edited)."""

    indexes: frozenset[int]


PartOutcome = PartWritten | PartAlreadyIn | WritesLost


@dataclass(frozen=True)
class ImportParts:
    """Everything stored about one import."""

    job: ImportJob
    invalid_pages: list[InvalidRowsPage]
    chunks: list[ChunkProgress]


class ImportRepository(Protocol):
    """The stored imports. `StorageBusy` when storage throttles or a concurrent transaction got
    in the way of a part (nothing was written)."""

    def create(
        self, job: ImportJob, invalid_pages: Sequence[InvalidRowsPage], expires_at: datetime
    ) -> None:
        """Store a new job and the pages of its invalid rows, removed after `expires_at`."""
        ...

    def set_status(self, import_id: str, status: ImportStatus, at: datetime) -> None:
        """Give the job this status, whatever it had."""
        ...

    def mark_running(self, import_id: str, at: datetime) -> None:
        """Move a queued job to running; a job already moved on stays as it is."""
        ...

    def parts(self, import_id: str) -> ImportParts | None:
        """The job with its invalid rows and its chunks' progress, if the import exists."""
        ...

    def page(self, *, limit: int, cursor: str | None) -> PageOf[ImportJob]:
        """One page of jobs, newest first."""
        ...

    def read_chunk(
        self, import_id: str, chunk: int
    ) -> tuple[ImportJob | None, ChunkProgress | None]:
        """The job and the progress of one of its chunks, each if stored."""
        ...

    def commit_part(
        self,
        import_id: str,
        chunk: int,
        part: int,
        writes: Sequence[ClientWrite],
        tally: ImportTally,
        expires_at: datetime,
    ) -> PartOutcome:
        """Write a part's clients and add its tally to the chunk, all or nothing, once."""
        ...

    def commit_tally(
        self, import_id: str, chunk: int, part: int, tally: ImportTally, expires_at: datetime
    ) -> bool:
        """Add a part that writes no client to the chunk, once; False if it was in already."""
        ...

    def finish_chunk(
        self,
        import_id: str,
        chunk: int,
        tally: ImportTally,
        expires_at: datetime,
        *,
        abandoned: bool = False,
    ) -> ChunkProgress:
        """Close the chunk with the tally of its parts that wrote nothing; the chunk as closed
        (by another delivery, if one did first)."""
        ...

    def settle(self, progress: ChunkProgress, at: datetime) -> ImportJob | None:
        """Add a finished chunk's totals to its job, once; the job after (None if it is gone)."""
        ...

    def end(self, import_id: str, status: ImportStatus, at: datetime) -> bool:
        """Give a still running job its final status; False if it had one already."""
        ...


def _stored(problem: RowProblem) -> RowError:
    return RowError(  # type: ignore[no-untyped-call]  # MapAttribute's __init__ is untyped
        row=problem.row, field=problem.field, message=problem.message
    )


def _problem(error: Any) -> RowProblem:
    return RowProblem(int(error.row), error.field, error.message)


def _totals(record: ClientImportRecord) -> ImportTotals:
    return ImportTotals(
        created=int(record.created or 0),
        updated=int(record.updated or 0),
        unchanged=int(record.unchanged or 0),
        failed=int(record.failed or 0),
    )


def job_of(record: ClientImportRecord) -> ImportJob:
    """The job an import's "job" item holds."""
    return ImportJob(
        id=record.import_id,
        status=ImportStatus(record.status),
        rows=int(record.rows or 0),
        valid=int(record.valid or 0),
        invalid=int(record.invalid or 0),
        chunks=int(record.chunks or 0),
        totals=_totals(record),
        errors_omitted=int(record.errors_omitted or 0),
        created_at=record.created_at,
        updated_at=record.updated_at,
        settled_chunks=frozenset(int(n) for n in record.settled_chunks or ()),
        abandoned_chunks=int(record.abandoned_chunks or 0),
    )


def chunk_of(record: ClientImportRecord, chunk: int) -> ChunkProgress:
    """The progress a "chunk#" item holds."""
    return ChunkProgress(
        import_id=record.import_id,
        chunk=chunk,
        done_parts=frozenset(int(n) for n in record.done_parts or ()),
        finished=bool(record.finished),
        abandoned=record.status == _ABANDONED,
        totals=_totals(record),
        problems=tuple(_problem(e) for e in record.errors or ()),
        problems_omitted=int(record.errors_omitted or 0),
    )


class DynamoImportRepository:
    """`ImportRepository` over the imports table (and the clients and phones tables, which a
    part writes in the same transaction as its counts)."""

    def __init__(self, models: Models, connection: Connection) -> None:
        self._models = models
        self._connection = connection

    # ---------------------------------------------------------------- the API's side

    def create(
        self, job: ImportJob, invalid_pages: Sequence[InvalidRowsPage], expires_at: datetime
    ) -> None:
        Import = self._models.ClientImport
        record = Import(
            job.id,
            IMPORT_JOB,
            status=job.status.value,
            created_at=job.created_at,
            updated_at=job.updated_at,
            listing_key=IMPORT_LISTING_KEY,
            rows=job.rows,
            valid=job.valid,
            invalid=job.invalid,
            chunks=job.chunks,
            abandoned_chunks=job.abandoned_chunks,
            created=job.totals.created,
            updated=job.totals.updated,
            unchanged=job.totals.unchanged,
            failed=job.totals.failed,
            errors_omitted=job.errors_omitted,
            expires_at=expires_at,
        )
        pages = [
            Import(
                job.id,
                import_invalid_part(page.page),
                errors=[_stored(p) for p in page.problems],
                expires_at=expires_at,
            )
            for page in invalid_pages
        ]
        with busy_if_transient():
            # One put per page (four at most: the API keeps 1,000 problems), not a batch write:
            # the API's role may put items in the imports table; BatchWriteItem is an action of
            # its own.
            for page_record in pages:
                page_record.save()
            record.save(condition=Import.import_id.does_not_exist())

    def set_status(self, import_id: str, status: ImportStatus, at: datetime) -> None:
        Import = self._models.ClientImport
        with busy_if_transient():
            Import(import_id, IMPORT_JOB).update(
                actions=[Import.status.set(status.value), Import.updated_at.set(at)]
            )

    def parts(self, import_id: str) -> ImportParts | None:
        job = None
        pages: list[InvalidRowsPage] = []
        chunks: list[ChunkProgress] = []
        with busy_if_transient():
            items = list(self._models.ClientImport.query(import_id, consistent_read=True))
        for item in items:
            kind, _, number = item.part.partition("#")
            if item.part == IMPORT_JOB:
                job = job_of(item)
            elif kind == "chunk":
                chunks.append(chunk_of(item, int(number)))
            else:
                problems = tuple(_problem(e) for e in item.errors or ())
                pages.append(InvalidRowsPage(import_id, int(number), problems))
        return None if job is None else ImportParts(job, pages, chunks)

    def page(self, *, limit: int, cursor: str | None) -> PageOf[ImportJob]:
        Import = self._models.ClientImport
        query = index_query(Import.by_created.query, IMPORT_LISTING_KEY, forward=False)
        segment = Segment(query, ("listing_key", "created_at", "import_id", "part"))
        with busy_if_transient():
            ids, next_cursor = paginate(
                [segment], fingerprint("imports"), cursor, limit, lambda key: key.import_id
            )
            found = {
                item.import_id: item for item in Import.batch_get([(i, IMPORT_JOB) for i in ids])
            }
        return PageOf([job_of(found[i]) for i in ids if i in found], next_cursor)

    # ---------------------------------------------------------------- the worker's side

    def read_chunk(
        self, import_id: str, chunk: int
    ) -> tuple[ImportJob | None, ChunkProgress | None]:
        part = import_chunk_part(chunk)
        found = {
            item.part: item
            for item in self._models.ClientImport.batch_get(
                [(import_id, IMPORT_JOB), (import_id, part)], consistent_read=True
            )
        }
        job, progress = found.get(IMPORT_JOB), found.get(part)
        return (
            None if job is None else job_of(job),
            None if progress is None else chunk_of(progress, chunk),
        )

    def mark_running(self, import_id: str, at: datetime) -> None:
        Import = self._models.ClientImport
        try:
            Import(import_id, IMPORT_JOB).update(
                actions=[
                    Import.status.set(ImportStatus.RUNNING.value),
                    Import.updated_at.set(at),
                ],
                condition=Import.status == ImportStatus.QUEUED.value,
            )
        except PynamoDBException as exc:
            # A failed condition: another chunk moved the import on already.
            if not is_conditional_failure(exc):
                raise

    def commit_part(
        self,
        import_id: str,
        chunk: int,
        part: int,
        writes: Sequence[ClientWrite],
        tally: ImportTally,
        expires_at: datetime,
    ) -> PartOutcome:
        Import, Client_, Phone = (
            self._models.ClientImport,
            self._models.Client,
            self._models.Phone,
        )
        owners: list[int] = []  # the write behind each put, in order
        progress = Import(import_id, import_chunk_part(chunk))
        actions = [Import.done_parts.add({part}), *self._tally_actions(tally, expires_at)]
        try:
            with TransactWrite(connection=self._connection) as tx:
                for index, write in enumerate(writes):
                    item = client_record(Client_, write.client)
                    if write.new:
                        tx.save(item, condition=Client_.client_id.does_not_exist())
                        claim = Phone(write.client.phone, client_id=write.client.id)
                        tx.save(claim, condition=Phone.phone.does_not_exist())
                        owners += [index, index]
                    else:
                        tx.save(item)  # conditional on the version it was read at
                        owners.append(index)
                tx.update(
                    progress,
                    actions=actions,
                    condition=~Import.done_parts.contains(part) & Import.finished.does_not_exist(),
                )
        except TransactWriteError as exc:
            reasons = [getattr(r, "code", None) for r in exc.cancellation_reasons or ()]
            if len(reasons) != len(owners) + 1:
                raise
            if reasons[-1] == CONDITION_FAILED:
                return PartAlreadyIn()
            lost = frozenset(
                owners[i] for i, code in enumerate(reasons[:-1]) if code == CONDITION_FAILED
            )
            if lost:
                return WritesLost(lost)
            if "TransactionConflict" in reasons:
                raise StorageBusy() from exc
            raise
        return PartWritten()

    def commit_tally(
        self, import_id: str, chunk: int, part: int, tally: ImportTally, expires_at: datetime
    ) -> bool:
        Import = self._models.ClientImport
        progress = Import(import_id, import_chunk_part(chunk))
        try:
            progress.update(
                actions=[Import.done_parts.add({part}), *self._tally_actions(tally, expires_at)],
                condition=~Import.done_parts.contains(part) & Import.finished.does_not_exist(),
            )
        except PynamoDBException as exc:
            if is_conditional_failure(exc):
                return False
            raise
        return True

    def finish_chunk(
        self,
        import_id: str,
        chunk: int,
        tally: ImportTally,
        expires_at: datetime,
        *,
        abandoned: bool = False,
    ) -> ChunkProgress:
        Import = self._models.ClientImport
        progress = Import(import_id, import_chunk_part(chunk))
        actions = [Import.finished.set(True), *self._tally_actions(tally, expires_at)]
        if abandoned:
            actions.append(Import.status.set(_ABANDONED))
        try:
            progress.update(actions=actions, condition=Import.finished.does_not_exist())
        except PynamoDBException as exc:
            if not is_conditional_failure(exc):
                raise
            progress.refresh(consistent_read=True)
        return chunk_of(progress, chunk)

    def settle(self, progress: ChunkProgress, at: datetime) -> ImportJob | None:
        Import = self._models.ClientImport
        job = Import(progress.import_id, IMPORT_JOB)
        totals = progress.totals.as_dict()
        try:
            job.update(
                actions=[
                    Import.settled_chunks.add({progress.chunk}),
                    *(getattr(Import, name).add(totals[name]) for name in _OUTCOMES),
                    Import.abandoned_chunks.add(1 if progress.abandoned else 0),
                    Import.updated_at.set(at),
                ],
                condition=Import.import_id.exists()
                & ~Import.settled_chunks.contains(progress.chunk),
            )
        except PynamoDBException as exc:
            if not is_conditional_failure(exc):
                raise
            try:
                job.refresh(consistent_read=True)
            except DoesNotExist:
                return None
        return job_of(job)

    def end(self, import_id: str, status: ImportStatus, at: datetime) -> bool:
        Import = self._models.ClientImport
        try:
            Import(import_id, IMPORT_JOB).update(
                actions=[Import.status.set(status.value), Import.updated_at.set(at)],
                condition=Import.status.is_in(*(s.value for s in RUNNING_STATUSES)),
            )
        except PynamoDBException as exc:
            if not is_conditional_failure(exc):
                raise
            return False
        return True

    def _tally_actions(self, tally: ImportTally, expires_at: datetime) -> list[Action]:
        Import = self._models.ClientImport
        totals = tally.totals.as_dict()
        actions = [getattr(Import, name).add(totals[name]) for name in _OUTCOMES]
        actions.append(Import.expires_at.set(expires_at))
        if tally.problems:
            new = [_stored(p) for p in tally.problems]
            actions.append(Import.errors.set((Import.errors | []).append(new)))
        if tally.omitted:
            actions.append(Import.errors_omitted.add(tally.omitted))
        return actions


def _conforms(store: DynamoImportRepository) -> ImportRepository:
    return store  # mypy checks here that the DynamoDB store keeps the whole contract
