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
from datetime import timedelta
from typing import Any

from pynamodb.connection import Connection
from pynamodb.exceptions import DoesNotExist, TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from chalicelib.domain import Client, ClientImport, Clock, ImportStatus, PageOf, RowProblem
from chalicelib.errors import DomainError, NotFound
from chalicelib.pagination import Segment, fingerprint, index_query, paginate
from chalicelib.services.clients import ClientDirectory, ClientFields
from chalicelib.services.queues import IMPORT_CHUNK_MAX_ROWS, ImportChunk, ImportRow, Queues
from chalicelib.storage.clients import client_of, client_record
from chalicelib.storage.errors import looks_like_id
from chalicelib.storage.models import (
    IMPORT_JOB,
    IMPORT_LISTING_KEY,
    Models,
    RowError,
    import_chunk_part,
    import_invalid_part,
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
_ABANDONED = "abandoned"
_OUTCOMES = ("created", "updated", "unchanged", "failed")


class ImportNotQueued(DomainError):
    """The job is stored but its rows could not be queued: the caller should send it again."""

    status = 503
    code = "unavailable"


@dataclass
class _Outcome:
    """What one row of a chunk comes to, and the records it writes."""

    row: ImportRow
    kind: str  # one of _OUTCOMES
    client: Any = None
    claim: Any = None
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


def imported_client_id(import_id: str, phone: str) -> str:
    """The id a new client gets from an import: the same in every attempt of its chunk."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{import_id}/{phone}"))


class ClientImports:
    """CSV imports: start a job, write its chunks, report its progress."""

    def __init__(
        self,
        models: Models,
        connection: Connection,
        directory: ClientDirectory,
        queues: Queues,
        clock: Clock,
        *,
        retention_days: int = 30,
        chunk_rows: int = IMPORT_CHUNK_MAX_ROWS,
        part_rows: int = PART_ROWS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._models = models
        self._connection = connection
        self._directory = directory
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
        Import = self._models.ClientImport
        now = self._clock()
        import_id = str(uuid.uuid4())
        chunks = [
            ImportChunk.model_construct(v=1, import_id=import_id, chunk=n, rows=part)
            for n, part in enumerate(self._chunk_rows_of(valid))
        ]
        expires = now + self._retention
        job = Import(
            import_id,
            IMPORT_JOB,
            status=(ImportStatus.QUEUED if chunks else ImportStatus.DONE).value,
            created_at=now,
            updated_at=now,
            listing_key=IMPORT_LISTING_KEY,
            rows=rows,
            valid=len(valid),
            invalid=invalid,
            chunks=len(chunks),
            abandoned_chunks=0,
            created=0,
            updated=0,
            unchanged=0,
            failed=0,
            errors_omitted=problems_omitted,
            expires_at=expires,
        )
        pages = [
            Import(
                import_id,
                import_invalid_part(n),
                errors=[_stored(p) for p in problems[start : start + PROBLEMS_PER_PAGE]],
                expires_at=expires,
            )
            for n, start in enumerate(range(0, len(problems), PROBLEMS_PER_PAGE))
        ]
        # One put per page (four at most: the API keeps 1,000 problems), not a batch write: the
        # API's role may put items in the imports table; BatchWriteItem is an action of its own.
        for page in pages:
            page.save()
        job.save(condition=Import.import_id.does_not_exist())
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
            job.update(
                actions=[
                    Import.status.set(ImportStatus.FAILED.value),
                    Import.updated_at.set(self._clock()),
                ]
            )
            raise ImportNotQueued(
                f"import {import_id} could not be queued; send the file again (importing the "
                "same file twice is safe)"
            ) from None
        logger.info("import queued", extra=log)
        return self._to_domain(job, list(problems))

    def get(self, import_id: str) -> ClientImport:
        """An import with its report, or NotFound."""
        if not looks_like_id(import_id):
            raise NotFound(f"import {import_id} not found")
        job = None
        problems: list[RowProblem] = []
        omitted = 0
        for item in self._models.ClientImport.query(import_id, consistent_read=True):
            if item.part == IMPORT_JOB:
                job = item
            else:
                problems.extend(_problem(error) for error in item.errors or ())
                if item.part.startswith("chunk#"):
                    omitted += int(item.errors_omitted or 0)
        if job is None:
            raise NotFound(f"import {import_id} not found")
        problems.sort(key=lambda p: p.row)
        result = self._to_domain(job, problems[:SHOWN_PROBLEMS])
        extra = max(0, len(problems) - SHOWN_PROBLEMS) + omitted
        return replace(result, errors_omitted=result.errors_omitted + extra)

    def list(self, *, limit: int, cursor: str | None) -> PageOf:
        """One page of imports, newest first, without their per-row reports."""
        Import = self._models.ClientImport
        query = index_query(Import.by_created.query, IMPORT_LISTING_KEY, forward=False)
        segment = Segment(query, ("listing_key", "created_at", "import_id", "part"))
        ids, next_cursor = paginate(
            [segment], fingerprint("imports"), cursor, limit, lambda key: key.import_id
        )
        found = {item.import_id: item for item in Import.batch_get([(i, IMPORT_JOB) for i in ids])}
        return PageOf([self._to_domain(found[i], []) for i in ids if i in found], next_cursor)

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
        job, state = self._read(chunk)
        if job is None:
            logger.warning("import chunk of an unknown import dropped", extra=log)
            return
        if state is not None and state.finished:
            self._settle(chunk, state)
            return
        if job.status == ImportStatus.QUEUED.value:
            self._mark_running(job)
        done = {int(k) for k in (state.done_parts or ())} if state is not None else set()
        kept = len(state.errors or ()) if state is not None else 0
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
        state = self._finish_chunk(chunk, quiet)
        logger.info("import chunk written", extra={**log, **_totals(state)})
        self._settle(chunk, state)

    def _read(self, chunk: ImportChunk) -> tuple[Any, Any]:
        Import = self._models.ClientImport
        part = import_chunk_part(chunk.chunk)
        found = {
            item.part: item
            for item in Import.batch_get(
                [(chunk.import_id, IMPORT_JOB), (chunk.import_id, part)], consistent_read=True
            )
        }
        return found.get(IMPORT_JOB), found.get(part)

    def _mark_running(self, job: Any) -> None:
        Import = self._models.ClientImport
        try:
            job.update(
                actions=[
                    Import.status.set(ImportStatus.RUNNING.value),
                    Import.updated_at.set(self._clock()),
                ],
                condition=Import.status == ImportStatus.QUEUED.value,
            )
        except UpdateError as exc:
            # A failed condition: another chunk moved the import on already.
            if not _conditional(exc):
                raise

    def _existing(
        self, rows: Sequence[ImportRow]
    ) -> tuple[dict[str, str], dict[str, Any], set[str]]:
        """Who owns each phone (the claims), those clients, and those that cannot be read."""
        Phone, Client = self._models.Phone, self._models.Client
        phones = [row[1] for row in rows]
        owners = {
            claim.phone: claim.client_id for claim in Phone.batch_get(phones, consistent_read=True)
        }
        ids = list(dict.fromkeys(owners.values()))
        unreadable: set[str] = set()
        try:
            clients = {c.client_id: c for c in Client.batch_get(ids, consistent_read=True)}
        except Exception:  # a record that does not deserialise: read them one by one
            clients = {}
            for client_id in ids:
                try:
                    clients[client_id] = Client.get(client_id, consistent_read=True)
                except DoesNotExist:
                    continue
                except Exception:
                    unreadable.add(client_id)
        return owners, clients, unreadable

    def _plan(
        self,
        chunk: ImportChunk,
        row: ImportRow,
        owners: dict[str, str],
        clients: dict[str, Any],
        unreadable: set[str],
    ) -> _Outcome:
        """What a row comes to: a new client, an update, nothing, or a problem."""
        _, phone, operator_code, tag, timezone = row
        now = self._clock()
        owner = owners.get(phone)
        if owner is None:
            client_id = imported_client_id(chunk.import_id, phone)
            fields = ClientFields(
                phone=phone,
                operator_code=operator_code,
                tag="" if tag is None else tag,
                timezone=timezone or "UTC",
            )
            item = client_record(self._models.Client, Client.new(client_id, fields, now))
            claim = self._models.Phone(phone, client_id=client_id)
            return _Outcome(row, "created", client=item, claim=claim)
        item = clients.get(owner)
        if owner in unreadable:
            return _failed(row, "phone", f"the client {owner} with this phone cannot be read")
        if item is None or item.phone != phone:
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
        if all(getattr(item, name) == value for name, value in given.items()):
            return _Outcome(row, "unchanged")
        current = client_of(item)
        changed = current.with_fields(replace(current.fields, **given), now)
        item = client_record(self._models.Client, changed)
        return _Outcome(row, "updated", client=item)

    def _commit_part(
        self, chunk: ImportChunk, number: int, outcomes: list[_Outcome], room: int
    ) -> int:
        """Write one part and its counts in one transaction; the problems it kept."""
        Import, Client, Phone = self._models.ClientImport, self._models.Client, self._models.Phone
        conflicts = 0
        while True:
            tally = _Tally()
            tally.add(outcomes, max(0, room))
            owners: list[_Outcome] = []  # the outcome of each put, in order
            state = Import(chunk.import_id, import_chunk_part(chunk.chunk))
            actions = [Import.done_parts.add({number}), *self._count_actions(tally)]
            try:
                with TransactWrite(connection=self._connection) as tx:
                    for outcome in outcomes:
                        if outcome.kind == "created":
                            tx.save(outcome.client, condition=Client.client_id.does_not_exist())
                            tx.save(outcome.claim, condition=Phone.phone.does_not_exist())
                            owners += [outcome, outcome]
                        elif outcome.kind == "updated":
                            tx.save(outcome.client)  # conditional on the version it was read at
                            owners.append(outcome)
                    tx.update(
                        state,
                        actions=actions,
                        condition=~Import.done_parts.contains(number)
                        & Import.finished.does_not_exist(),
                    )
            except TransactWriteError as exc:
                reasons = [getattr(r, "code", None) for r in exc.cancellation_reasons or ()]
                if len(reasons) != len(owners) + 1:
                    raise
                if reasons[-1] == "ConditionalCheckFailed":
                    return 0  # this part is in already (an earlier delivery of the chunk)
                lost = {id(owners[i]) for i, code in enumerate(reasons[:-1]) if code == _CCF}
                if lost:
                    outcomes = [_lost(o) if id(o) in lost else o for o in outcomes]
                    if not any(o.kind in ("created", "updated") for o in outcomes):
                        return self._commit_counts(chunk, number, outcomes, room)
                    continue
                if "TransactionConflict" in reasons and conflicts < _CONFLICT_RETRIES:
                    conflicts += 1
                    self._sleep(0.05 * 2**conflicts)
                    continue
                raise
            return len(tally.problems)

    def _commit_counts(
        self, chunk: ImportChunk, number: int, outcomes: list[_Outcome], room: int
    ) -> int:
        """A part whose writes all failed: its counts and problems, once."""
        Import = self._models.ClientImport
        tally = _Tally()
        tally.add(outcomes, max(0, room))
        state = Import(chunk.import_id, import_chunk_part(chunk.chunk))
        try:
            state.update(
                actions=[Import.done_parts.add({number}), *self._count_actions(tally)],
                condition=~Import.done_parts.contains(number) & Import.finished.does_not_exist(),
            )
        except UpdateError as exc:
            if _conditional(exc):
                return 0
            raise
        return len(tally.problems)

    def _count_actions(self, tally: _Tally) -> list[Any]:
        Import = self._models.ClientImport
        actions = [getattr(Import, name).add(tally.counts[name]) for name in _OUTCOMES]
        actions.append(Import.expires_at.set(self._clock() + self._retention))
        if tally.problems:
            new = [_stored(p) for p in tally.problems]
            actions.append(Import.errors.set((Import.errors | []).append(new)))
        if tally.omitted:
            actions.append(Import.errors_omitted.add(tally.omitted))
        return actions

    def _finish_chunk(self, chunk: ImportChunk, quiet: _Tally, *, abandoned: bool = False) -> Any:
        """Close the chunk's record with the counts of its parts that wrote nothing; the
        record with its totals (as another delivery closed it, if one did first)."""
        Import = self._models.ClientImport
        state = Import(chunk.import_id, import_chunk_part(chunk.chunk))
        actions = [Import.finished.set(True), *self._count_actions(quiet)]
        if abandoned:
            actions.append(Import.status.set(_ABANDONED))
        try:
            state.update(actions=actions, condition=Import.finished.does_not_exist())
        except UpdateError as exc:
            if not _conditional(exc):
                raise
            state.refresh(consistent_read=True)
        return state

    def _settle(self, chunk: ImportChunk, state: Any) -> None:
        """Add a finished chunk's totals to its job, once; the last one ends the job."""
        Import = self._models.ClientImport
        job = Import(chunk.import_id, IMPORT_JOB)
        now = self._clock()
        try:
            job.update(
                actions=[
                    Import.settled_chunks.add({chunk.chunk}),
                    *(getattr(Import, n).add(int(getattr(state, n) or 0)) for n in _OUTCOMES),
                    Import.abandoned_chunks.add(1 if state.status == _ABANDONED else 0),
                    Import.updated_at.set(now),
                ],
                condition=Import.import_id.exists() & ~Import.settled_chunks.contains(chunk.chunk),
            )
        except UpdateError as exc:
            if not _conditional(exc):
                raise
            try:
                job.refresh(consistent_read=True)
            except DoesNotExist:
                return
        settled = len(job.settled_chunks or ())
        running = (ImportStatus.QUEUED.value, ImportStatus.RUNNING.value)
        if settled < int(job.chunks or 0) or job.status not in running:
            return
        final = ImportStatus.FAILED if job.abandoned_chunks else ImportStatus.DONE
        try:
            job.update(
                actions=[Import.status.set(final.value), Import.updated_at.set(now)],
                condition=Import.status.is_in(*running),
            )
        except UpdateError as exc:
            if not _conditional(exc):
                raise
            return
        logger.info(
            "import %s",
            final.value,
            extra={"import_id": chunk.import_id, **_totals(job)},
        )

    def _abandon(self, chunk: ImportChunk, error: Exception) -> None:
        """Give a chunk up after its last attempt: its rows not written yet count as failed."""
        log = {"import_id": chunk.import_id, "chunk": chunk.chunk}
        try:
            job, state = self._read(chunk)
            if job is None:
                return
            if state is None or not state.finished:
                done = {int(k) for k in (state.done_parts or ())} if state is not None else set()
                kept = len(state.errors or ()) if state is not None else 0
                reason = (
                    f"could not be written ({type(error).__name__}); import the file again "
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
                state = self._finish_chunk(chunk, quiet, abandoned=True)
            self._settle(chunk, state)
            logger.error("import chunk given up", extra=log)
        except Exception:
            logger.exception("import chunk given up, but its rows could not be counted", extra=log)

    # ---------------------------------------------------------------- helpers

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

    @staticmethod
    def _to_domain(job: Any, problems: list[RowProblem]) -> ClientImport:
        return ClientImport(
            id=job.import_id,
            status=ImportStatus(job.status),
            rows=int(job.rows or 0),
            valid=int(job.valid or 0),
            invalid=int(job.invalid or 0),
            created=int(job.created or 0),
            updated=int(job.updated or 0),
            unchanged=int(job.unchanged or 0),
            failed=int(job.failed or 0),
            errors=tuple(problems),
            errors_omitted=int(job.errors_omitted or 0),
            created_at=job.created_at,
            updated_at=job.updated_at,
        )


_CCF = "ConditionalCheckFailed"


def _conditional(exc: Exception) -> bool:
    return getattr(exc, "cause_response_code", None) == "ConditionalCheckFailedException"


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


def _totals(item: Any) -> dict[str, int]:
    # Log fields: `created` itself is an attribute of every log record.
    return {f"rows_{name}": int(getattr(item, name) or 0) for name in _OUTCOMES}


def _stored(problem: RowProblem) -> RowError:
    return RowError(row=problem.row, field=problem.field, message=problem.message)


def _problem(error: Any) -> RowProblem:
    return RowProblem(int(error.row), error.field, error.message)
