"""CSV imports of clients: a job per file, its valid rows written by a worker in chunks.

The API reads and checks the file (`chalicelib.api.client_csv`), stores the job with the report
of the invalid rows, and queues the valid rows in chunks of up to 1,000 (each chunk one SQS
message, so nothing but the report is stored for the rows). The `import_clients` Lambda writes
one chunk per invocation:

1. It reads which phones belong to clients already (BatchGetItem on the phone claims), and those
   clients (BatchGetItem). A new phone becomes a new client; an existing one is updated with the
   fields the row gives (PATCH), or left alone when they are what it has.
2. The chunk's rows are written in parts of 49, each part in **one transaction**: every new
   client with its phone claim (each conditional on not existing, exactly as POST /clients
   writes them), every update (conditional on the client's version), and the chunk's record
   (`ADD` of the part's counts and of the part's number, conditional on that number not being
   there). So a part's writes and its counts commit together or not at all, and a chunk that SQS
   delivers again skips the parts already in: nothing is counted twice. A part whose rows need
   no write (a file imported again) writes nothing at all; its counts go with the chunk's total.
3. When the chunk is done, its totals are added to the job once (`ADD`, conditional on the
   chunk's number not being among the job's settled chunks); the chunk that completes the set
   moves the job to `done`.

A row whose write meets a change made meanwhile (the phone was given to another client, the
client was edited) fails with that reason, and its part is written without it. New clients get
ids derived from the import and the phone (uuid5), so every attempt writes the same records.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from chalicelib.domain import Client, ClientImport, Clock, ImportStatus, PageOf, RowProblem
from chalicelib.domain.client import ClientFields
from chalicelib.domain.client_import import (
    RUNNING_STATUSES,
    ChunkProgress,
    ImportJob,
    ImportTally,
    ImportTotals,
    InvalidRowsPage,
)
from chalicelib.errors import DomainError, NotFound, StorageBusy
from chalicelib.services.queues import IMPORT_CHUNK_MAX_ROWS, ImportChunk, ImportRow, Queues
from chalicelib.storage.clients import ClientRepository
from chalicelib.storage.errors import looks_like_id
from chalicelib.storage.imports import (
    ClientWrite,
    ImportRepository,
    PartAlreadyIn,
    WritesLost,
)

logger = logging.getLogger(__name__)

# 49 new clients and their phone claims (98 items) and the chunk's record: DynamoDB's 100.
PART_ROWS = 49
# An SQS message holds 256 KiB; a chunk's rows stay well inside it (see _chunk_rows).
CHUNK_MAX_BYTES = 200 * 1024
# Invalid rows are stored in pages of this many problems, written with the job.
PROBLEMS_PER_PAGE = 250
# Write-time problems kept per chunk (the others are counted); the job shows the first 1,000.
CHUNK_PROBLEMS_KEPT = 100
SHOWN_PROBLEMS = 1000
_CONFLICT_RETRIES = 5
_ID_NAMESPACE = uuid.UUID("6f1c3e9a-2d4b-4c8e-9a57-3b0d2e1f4a6c")
_OUTCOMES = ("created", "updated", "unchanged", "failed")


class ImportNotQueued(DomainError):
    """The job is stored but its rows could not be queued: the caller should send it again."""

    status = 503
    code = "unavailable"


@dataclass
class _Outcome:
    """What one row of a chunk comes to, and the client it writes."""

    row: ImportRow
    kind: str  # one of _OUTCOMES
    client: Client | None = None
    problem: RowProblem | None = None


@dataclass
class _Tally:
    """Counts and kept problems of some rows of a chunk."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_OUTCOMES, 0))
    problems: list[RowProblem] = field(default_factory=list)
    omitted: int = 0

    def add(self, outcomes: Iterable[_Outcome], room: int) -> None:
        """Count `outcomes`, keeping at most `room` more of their problems."""
        for outcome in outcomes:
            self.counts[outcome.kind] += 1
            if outcome.problem is not None:
                if room > 0:
                    self.problems.append(outcome.problem)
                    room -= 1
                else:
                    self.omitted += 1

    def frozen(self) -> ImportTally:
        return ImportTally(ImportTotals(**self.counts), tuple(self.problems), self.omitted)


def imported_client_id(import_id: str, phone: str) -> str:
    """The id a new client gets from an import: the same in every attempt of its chunk."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{import_id}/{phone}"))


class ClientImports:
    """CSV imports: start a job, write its chunks, report its progress."""

    def __init__(
        self,
        imports: ImportRepository,
        clients: ClientRepository,
        queues: Queues,
        clock: Clock,
        *,
        retention_days: int = 30,
        chunk_rows: int = IMPORT_CHUNK_MAX_ROWS,
        part_rows: int = PART_ROWS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._imports = imports
        self._clients = clients
        self._queues = queues
        self._clock = clock
        self._retention = timedelta(days=retention_days)
        self._chunk_rows = min(chunk_rows, IMPORT_CHUNK_MAX_ROWS)
        self._part_rows = min(part_rows, PART_ROWS)
        self._sleep = sleep

    # ---------------------------------------------------------------- the API's side

    def start(
        self,
        *,
        rows: int,
        valid: Sequence[ImportRow],
        invalid: int,
        problems: Sequence[RowProblem],
        problems_omitted: int,
    ) -> ClientImport:
        """Store a job for a checked file and queue its valid rows; the job as it starts."""
        now = self._clock()
        import_id = str(uuid.uuid4())
        chunks = [
            ImportChunk.model_construct(v=1, import_id=import_id, chunk=n, rows=part)
            for n, part in enumerate(self._chunk_rows_of(valid))
        ]
        job = ImportJob(
            id=import_id,
            status=ImportStatus.QUEUED if chunks else ImportStatus.DONE,
            rows=rows,
            valid=len(valid),
            invalid=invalid,
            chunks=len(chunks),
            totals=ImportTotals(),
            errors_omitted=problems_omitted,
            created_at=now,
            updated_at=now,
        )
        pages = [
            InvalidRowsPage(import_id, n, tuple(problems[start : start + PROBLEMS_PER_PAGE]))
            for n, start in enumerate(range(0, len(problems), PROBLEMS_PER_PAGE))
        ]
        self._imports.create(job, pages, now + self._retention)
        log = {
            "import_id": import_id,
            "rows": rows,
            "rows_valid": len(valid),
            "chunks": len(chunks),
        }
        try:
            self._queues.enqueue_import(chunks)
        except Exception:
            logger.exception("import could not be queued", extra=log)
            self._imports.set_status(import_id, ImportStatus.FAILED, self._clock())
            raise ImportNotQueued(
                f"import {import_id} could not be queued; send the file again (importing the "
                "same file twice is safe)"
            ) from None
        logger.info("import queued", extra=log)
        return job.report(tuple(problems))

    def get(self, import_id: str) -> ClientImport:
        """An import with its report, or NotFound."""
        parts = self._imports.parts(import_id) if looks_like_id(import_id) else None
        if parts is None:
            raise NotFound(f"import {import_id} not found")
        problems: list[RowProblem] = []
        omitted = 0
        for progress in parts.chunks:
            problems.extend(progress.problems)
            omitted += progress.problems_omitted
        for page in parts.invalid_pages:
            problems.extend(page.problems)
        problems.sort(key=lambda p: p.row)
        extra = max(0, len(problems) - SHOWN_PROBLEMS) + omitted
        return parts.job.report(tuple(problems[:SHOWN_PROBLEMS]), extra)

    def list(self, *, limit: int, cursor: str | None) -> PageOf[ClientImport]:
        """One page of imports, newest first, without their per-row reports."""
        page = self._imports.page(limit=limit, cursor=cursor)
        return PageOf([job.report(()) for job in page.items], page.next_cursor)

    # ---------------------------------------------------------------- the worker's side

    def process(self, chunk: ImportChunk, *, last_attempt: bool = False) -> None:
        """Write one chunk of an import (idempotent: SQS may deliver it more than once).

        On the last attempt SQS allows, a chunk that still fails is given up: its rows not
        written yet are counted as failed, so the job ends (`failed`) instead of running on.
        """
        try:
            self._process(chunk)
        except Exception as exc:
            if last_attempt:
                self._abandon(chunk, exc)
            raise

    def _process(self, chunk: ImportChunk) -> None:
        log = {"import_id": chunk.import_id, "chunk": chunk.chunk}
        job, state = self._imports.read_chunk(chunk.import_id, chunk.chunk)
        if job is None:
            logger.warning("import chunk of an unknown import dropped", extra=log)
            return
        if state is not None and state.finished:
            self._settle(chunk, state)
            return
        if job.status == ImportStatus.QUEUED:
            self._imports.mark_running(chunk.import_id, self._clock())
        done = state.done_parts if state is not None else frozenset()
        kept = len(state.problems) if state is not None else 0
        parts = [
            (number, chunk.rows[start : start + self._part_rows])
            for number, start in enumerate(range(0, len(chunk.rows), self._part_rows))
            if number not in done
        ]
        owners, clients, unreadable = self._existing([row for _, part in parts for row in part])
        quiet = _Tally()
        for number, part in parts:
            outcomes = [self._plan(chunk, row, owners, clients, unreadable) for row in part]
            if any(o.kind in ("created", "updated") for o in outcomes):
                kept += self._commit_part(chunk, number, outcomes, CHUNK_PROBLEMS_KEPT - kept)
            else:
                before = len(quiet.problems)
                quiet.add(outcomes, CHUNK_PROBLEMS_KEPT - kept)
                kept += len(quiet.problems) - before
        state = self._imports.finish_chunk(
            chunk.import_id, chunk.chunk, quiet.frozen(), self._expiry()
        )
        logger.info("import chunk written", extra={**log, **_totals(state.totals)})
        self._settle(chunk, state)

    def _existing(
        self, rows: Sequence[ImportRow]
    ) -> tuple[dict[str, str], dict[str, Client], set[str]]:
        """Who owns each phone (the claims), those clients, and those that cannot be read."""
        owners = self._clients.owners_of([row[1] for row in rows])
        clients, unreadable = self._clients.get_many(list(dict.fromkeys(owners.values())))
        return owners, clients, unreadable

    def _plan(
        self,
        chunk: ImportChunk,
        row: ImportRow,
        owners: dict[str, str],
        clients: dict[str, Client],
        unreadable: set[str],
    ) -> _Outcome:
        """What a row comes to: a new client, an update, nothing, or a problem."""
        _, phone, operator_code, tag, timezone = row
        now = self._clock()
        owner = owners.get(phone)
        if owner is None:
            fields = ClientFields(
                phone=phone,
                operator_code=operator_code,
                tag="" if tag is None else tag,
                timezone=timezone or "UTC",
            )
            client_id = imported_client_id(chunk.import_id, phone)
            return _Outcome(row, "created", client=Client.new(client_id, fields, now))
        current = clients.get(owner)
        if owner in unreadable:
            return _failed(row, "phone", f"the client {owner} with this phone cannot be read")
        if current is None or current.phone != phone:
            return _failed(
                row, "phone", "the client with this phone is being changed or deleted; try again"
            )
        given = {
            name: value
            for name, value in (
                ("operator_code", operator_code),
                ("tag", tag),
                ("timezone", timezone),
            )
            if value is not None
        }
        if all(getattr(current, name) == value for name, value in given.items()):
            return _Outcome(row, "unchanged")
        changed = current.with_fields(replace(current.fields, **given), now)
        return _Outcome(row, "updated", client=changed)

    def _commit_part(
        self, chunk: ImportChunk, number: int, outcomes: list[_Outcome], room: int
    ) -> int:
        """Write one part and its counts in one transaction; the problems it kept."""
        conflicts = 0
        while True:
            tally = _Tally()
            tally.add(outcomes, max(0, room))
            # The outcomes that write a client, in the order of their writes.
            writing = [(o, o.client) for o in outcomes if o.client is not None]
            writes = [ClientWrite(client, new=o.kind == "created") for o, client in writing]
            try:
                outcome = self._imports.commit_part(
                    chunk.import_id, chunk.chunk, number, writes, tally.frozen(), self._expiry()
                )
            except StorageBusy:
                # Another transaction held one of the items: nothing was written; try again.
                if conflicts >= _CONFLICT_RETRIES:
                    raise
                conflicts += 1
                self._sleep(0.05 * 2**conflicts)
                continue
            if isinstance(outcome, PartAlreadyIn):
                return 0  # this part is in already (an earlier delivery of the chunk)
            if isinstance(outcome, WritesLost):
                lost = {id(writing[i][0]) for i in outcome.indexes}
                outcomes = [_lost(o) if id(o) in lost else o for o in outcomes]
                if not any(o.kind in ("created", "updated") for o in outcomes):
                    return self._commit_counts(chunk, number, outcomes, room)
                continue
            return len(tally.problems)

    def _commit_counts(
        self, chunk: ImportChunk, number: int, outcomes: list[_Outcome], room: int
    ) -> int:
        """A part whose writes all failed: its counts and problems, once."""
        tally = _Tally()
        tally.add(outcomes, max(0, room))
        added = self._imports.commit_tally(
            chunk.import_id, chunk.chunk, number, tally.frozen(), self._expiry()
        )
        return len(tally.problems) if added else 0

    def _settle(self, chunk: ImportChunk, state: ChunkProgress) -> None:
        """Add a finished chunk's totals to its job, once; the last one ends the job."""
        now = self._clock()
        job = self._imports.settle(state, now)
        if job is None or not job.all_settled or job.status not in RUNNING_STATUSES:
            return
        final = job.final_status
        if not self._imports.end(chunk.import_id, final, now):
            return
        logger.info(
            "import %s",
            final.value,
            extra={"import_id": chunk.import_id, **_totals(job.totals)},
        )

    def _abandon(self, chunk: ImportChunk, error: Exception) -> None:
        """Give a chunk up after its last attempt: its rows not written yet count as failed."""
        log = {"import_id": chunk.import_id, "chunk": chunk.chunk}
        try:
            job, state = self._imports.read_chunk(chunk.import_id, chunk.chunk)
            if job is None:
                return
            if state is None or not state.finished:
                done = state.done_parts if state is not None else frozenset()
                kept = len(state.problems) if state is not None else 0
                reason = (
                    f"could not be written ({_error_name(error)}); import the file again "
                    "to retry the rows that failed"
                )
                left = [
                    _failed(row, None, reason)
                    for number, start in enumerate(range(0, len(chunk.rows), self._part_rows))
                    if number not in done
                    for row in chunk.rows[start : start + self._part_rows]
                ]
                quiet = _Tally()
                quiet.add(left, CHUNK_PROBLEMS_KEPT - kept)
                state = self._imports.finish_chunk(
                    chunk.import_id, chunk.chunk, quiet.frozen(), self._expiry(), abandoned=True
                )
            self._settle(chunk, state)
            logger.error("import chunk given up", extra=log)
        except Exception:
            logger.exception("import chunk given up, but its rows could not be counted", extra=log)

    # ---------------------------------------------------------------- helpers

    def _expiry(self) -> datetime:
        return self._clock() + self._retention

    def _chunk_rows_of(self, rows: Sequence[ImportRow]) -> Iterable[list[ImportRow]]:
        """Consecutive rows, at most `chunk_rows` and CHUNK_MAX_BYTES of JSON each."""
        current: list[ImportRow] = []
        size = 0
        for row in rows:
            # An upper bound of the row's JSON: every character escaped, plus the punctuation.
            length = 40 + 2 * sum(len(value.encode()) for value in row[1:] if value is not None)
            if current and (len(current) >= self._chunk_rows or size + length > CHUNK_MAX_BYTES):
                yield current
                current, size = [], 0
            current.append(row)
            size += length
        if current:
            yield current


def _error_name(error: Exception) -> str:
    """The kind of failure a row is given up for: the storage error behind a `StorageBusy`."""
    cause = error.__cause__ if isinstance(error, StorageBusy) else None
    return type(cause or error).__name__


def _failed(row: ImportRow, column: str | None, message: str) -> _Outcome:
    return _Outcome(row, "failed", problem=RowProblem(row[0], column, message))


def _lost(outcome: _Outcome) -> _Outcome:
    """A write that met a change made since the chunk was read."""
    if outcome.kind == "created":
        return _failed(outcome.row, "phone", "the phone was given to another client meanwhile")
    return _failed(
        outcome.row,
        None,
        "the client with this phone was changed by another request meanwhile; import the row again",
    )


def _totals(totals: ImportTotals) -> dict[str, int]:
    # Log fields: `created` itself is an attribute of every log record.
    return {f"rows_{name}": count for name, count in totals.as_dict().items()}
