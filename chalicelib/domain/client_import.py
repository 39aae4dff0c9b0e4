"""A CSV import of clients: its job, the chunks its valid rows are written in, and the problems
found in its rows.

An import is stored as several records (see `storage.imports`): the job (status, the file's counts
and the totals of the chunks settled so far), pages of the file's invalid rows (written with the
job), and one progress record per chunk of valid rows (written by the worker, part by part).
`ClientImport` is what a caller sees of them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class ImportStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


# The job's statuses in which chunks may still be settled.
RUNNING_STATUSES = (ImportStatus.QUEUED, ImportStatus.RUNNING)


@dataclass(frozen=True)
class RowProblem:
    """What is wrong with one row of an imported file; `field` None: the row as a whole."""

    row: int
    field: str | None
    message: str


@dataclass(frozen=True)
class ImportTotals:
    """What the valid rows came to: new clients, changed ones, ones left alone, and failures."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "created": self.created,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "failed": self.failed,
        }


@dataclass(frozen=True)
class ImportTally:
    """What some rows of a chunk add to it: their totals, the problems kept, and how many more
    problems were only counted."""

    totals: ImportTotals = field(default_factory=ImportTotals)
    problems: tuple[RowProblem, ...] = ()
    omitted: int = 0


@dataclass(frozen=True)
class ImportJob:
    """The job of an import: its status, the file's counts, and the totals of its settled chunks
    (`settled_chunks` makes each chunk's totals count once)."""

    id: str
    status: ImportStatus
    rows: int
    valid: int
    invalid: int
    chunks: int
    totals: ImportTotals
    errors_omitted: int
    created_at: datetime
    updated_at: datetime
    settled_chunks: frozenset[int] = frozenset()
    abandoned_chunks: int = 0

    @property
    def all_settled(self) -> bool:
        return len(self.settled_chunks) >= self.chunks

    @property
    def final_status(self) -> ImportStatus:
        """How the import ends once every chunk is settled."""
        return ImportStatus.FAILED if self.abandoned_chunks else ImportStatus.DONE

    def report(self, problems: tuple[RowProblem, ...], more_omitted: int = 0) -> ClientImport:
        """What a caller sees: the job with the problems shown and how many more there are."""
        return ClientImport(
            id=self.id,
            status=self.status,
            rows=self.rows,
            valid=self.valid,
            invalid=self.invalid,
            **self.totals.as_dict(),
            errors=problems,
            errors_omitted=self.errors_omitted + more_omitted,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


@dataclass(frozen=True)
class InvalidRowsPage:
    """A page of the problems found in the file's invalid rows, stored with the job."""

    import_id: str
    page: int
    problems: tuple[RowProblem, ...]


@dataclass(frozen=True)
class ChunkProgress:
    """How far the worker got with one chunk: the parts written (each with its totals, once),
    whether it is finished (or given up), and the problems met while writing."""

    import_id: str
    chunk: int
    done_parts: frozenset[int] = frozenset()
    finished: bool = False
    abandoned: bool = False
    totals: ImportTotals = field(default_factory=ImportTotals)
    problems: tuple[RowProblem, ...] = ()
    problems_omitted: int = 0


@dataclass(frozen=True)
class ClientImport:
    """A CSV import of clients: the file's counts, the outcome of its valid rows so far, and
    the problems found (the first `errors` of them, in row order; `errors_omitted` more)."""

    id: str
    status: ImportStatus
    rows: int
    valid: int
    invalid: int
    created: int
    updated: int
    unchanged: int
    failed: int
    errors: tuple[RowProblem, ...]
    errors_omitted: int
    created_at: datetime
    updated_at: datetime
