"""`ImportRepository` in memory: the same answers as DynamoDB's, without an emulator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from chalicelib.domain import PageOf
from chalicelib.domain.client_import import (
    RUNNING_STATUSES,
    ChunkProgress,
    ImportJob,
    ImportStatus,
    ImportTally,
    ImportTotals,
    InvalidRowsPage,
)
from chalicelib.storage.imports import (
    ClientWrite,
    ImportParts,
    PartAlreadyIn,
    PartOutcome,
    PartWritten,
    WritesLost,
)
from tests.support.memory.clients import MemoryClientRepository, offset_cursor, read_offset


def _plus(a: ImportTotals, b: ImportTotals) -> ImportTotals:
    return ImportTotals(
        a.created + b.created, a.updated + b.updated, a.unchanged + b.unchanged, a.failed + b.failed
    )


class MemoryImportRepository:
    def __init__(self, clients: MemoryClientRepository) -> None:
        self.clients = clients
        self.jobs: dict[str, ImportJob] = {}
        self.pages: dict[str, list[InvalidRowsPage]] = {}
        self.chunks: dict[tuple[str, int], ChunkProgress] = {}

    def create(
        self, job: ImportJob, invalid_pages: Sequence[InvalidRowsPage], expires_at: datetime
    ) -> None:
        if job.id in self.jobs:
            raise RuntimeError(f"import {job.id} exists")
        self.pages[job.id] = list(invalid_pages)
        self.jobs[job.id] = job

    def set_status(self, import_id: str, status: ImportStatus, at: datetime) -> None:
        self.jobs[import_id] = replace(self.jobs[import_id], status=status, updated_at=at)

    def mark_running(self, import_id: str, at: datetime) -> None:
        if self.jobs[import_id].status == ImportStatus.QUEUED:
            self.set_status(import_id, ImportStatus.RUNNING, at)

    def parts(self, import_id: str) -> ImportParts | None:
        job = self.jobs.get(import_id)
        if job is None:
            return None
        chunks = [p for (i, _), p in sorted(self.chunks.items()) if i == import_id]
        return ImportParts(job, list(self.pages.get(import_id, [])), chunks)

    def page(self, *, limit: int, cursor: str | None) -> PageOf[ImportJob]:
        start = read_offset("imports", cursor)
        jobs = sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)
        end = start + limit
        return PageOf(jobs[start:end], offset_cursor("imports", end) if end < len(jobs) else None)

    def read_chunk(
        self, import_id: str, chunk: int
    ) -> tuple[ImportJob | None, ChunkProgress | None]:
        return self.jobs.get(import_id), self.chunks.get((import_id, chunk))

    def commit_part(
        self,
        import_id: str,
        chunk: int,
        part: int,
        writes: Sequence[ClientWrite],
        tally: ImportTally,
        expires_at: datetime,
    ) -> PartOutcome:
        progress = self._progress(import_id, chunk)
        if part in progress.done_parts or progress.finished:
            return PartAlreadyIn()
        lost = frozenset(i for i, write in enumerate(writes) if not self._may_write(write))
        if lost:
            return WritesLost(lost)
        for write in writes:
            if write.new:
                self.clients.add(write.client)
            else:
                previous = self.clients.get(write.client.id)
                self.clients.save(write.client, previous=previous)
        self._add(progress, tally, done_part=part)
        return PartWritten()

    def commit_tally(
        self, import_id: str, chunk: int, part: int, tally: ImportTally, expires_at: datetime
    ) -> bool:
        progress = self._progress(import_id, chunk)
        if part in progress.done_parts or progress.finished:
            return False
        self._add(progress, tally, done_part=part)
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
        progress = self._progress(import_id, chunk)
        if not progress.finished:
            self._add(progress, tally, finished=True, abandoned=abandoned)
        return self.chunks[(import_id, chunk)]

    def settle(self, progress: ChunkProgress, at: datetime) -> ImportJob | None:
        job = self.jobs.get(progress.import_id)
        if job is None or progress.chunk in job.settled_chunks:
            return job
        job = replace(
            job,
            totals=_plus(job.totals, progress.totals),
            settled_chunks=job.settled_chunks | {progress.chunk},
            abandoned_chunks=job.abandoned_chunks + progress.abandoned,
            updated_at=at,
        )
        self.jobs[job.id] = job
        return job

    def end(self, import_id: str, status: ImportStatus, at: datetime) -> bool:
        if self.jobs[import_id].status not in RUNNING_STATUSES:
            return False
        self.set_status(import_id, status, at)
        return True

    def _may_write(self, write: ClientWrite) -> bool:
        stored = self.clients.clients.get(write.client.id)
        if write.new:
            return stored is None and self.clients.owner_of(write.client.phone) is None
        return stored is not None and stored.version == write.client.version

    def _progress(self, import_id: str, chunk: int) -> ChunkProgress:
        return self.chunks.get((import_id, chunk)) or ChunkProgress(import_id, chunk)

    def _add(
        self,
        progress: ChunkProgress,
        tally: ImportTally,
        *,
        done_part: int | None = None,
        finished: bool = False,
        abandoned: bool = False,
    ) -> None:
        self.chunks[(progress.import_id, progress.chunk)] = replace(
            progress,
            done_parts=progress.done_parts | ({done_part} if done_part is not None else set()),
            finished=progress.finished or finished,
            abandoned=progress.abandoned or abandoned,
            totals=_plus(progress.totals, tally.totals),
            problems=progress.problems + tally.problems,
            problems_omitted=progress.problems_omitted + tally.omitted,
        )
