"""A CSV import of clients: its status, counts and row problems."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class ImportStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class RowProblem:
    """What is wrong with one row of an imported file; `field` None: the row as a whole."""

    row: int
    field: str | None
    message: str


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
