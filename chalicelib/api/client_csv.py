"""Reading a CSV file of clients: the file's shape first, then every row as POST /clients reads it.

A data row is the JSON object of its non-empty cells, named by the header: it is valid exactly
when POST /clients would accept that object (`ClientCreate`, the same model). An empty cell, or a
column the file does not have, is a field left out: a new client gets POST's default for it, an
existing one keeps its value (PATCH). A phone that an earlier valid row has is an error: the
first row wins.

Problems with the file as a whole (not UTF-8, not CSV, no usable header, too many rows) refuse
it: the caller gets a 422 and nothing is imported. Problems with rows are reported per row.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from chalicelib.domain import RowProblem
from chalicelib.errors import ValidationFailed
from chalicelib.schemas import ClientCreate, error_in_words
from chalicelib.services.queues import ImportRow

COLUMNS = ("phone", "operator_code", "tag", "timezone")
# The report keeps the first problems of a file (in row order) and counts the rest.
MAX_PROBLEMS_KEPT = 1000
MAX_MESSAGE_LENGTH = 300


@dataclass
class ParsedFile:
    """A CSV file read and checked row by row."""

    rows: int = 0
    valid: list[ImportRow] = field(default_factory=list)
    invalid: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    problems_omitted: int = 0

    def report(self, row: int, column: str | None, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(RowProblem(row, column, message[:MAX_MESSAGE_LENGTH]))
        else:
            self.problems_omitted += 1


def read_clients_csv(raw: bytes, *, max_rows: int) -> ParsedFile:
    """Check a whole file (UTF-8, a BOM allowed) and each of its rows; ValidationFailed when
    the file itself cannot be imported."""
    text = _decode(raw)
    records = _records(text)
    columns = _columns(next(records, None))
    parsed = ParsedFile()
    first_row_of: dict[str, int] = {}
    for number, cells in enumerate(records, start=1):
        if not cells:
            continue  # a blank line: skipped, but it keeps its number
        parsed.rows += 1
        if parsed.rows > max_rows:
            raise ValidationFailed(
                f"the file has more than {max_rows} rows; split it into files of at most "
                f"{max_rows}",
                [_detail("body", f"more than {max_rows} data rows", "too_many_rows")],
            )
        row = _row(number, columns, cells, parsed)
        if row is None:
            parsed.invalid += 1
            continue
        phone = row[1]
        if phone in first_row_of:
            parsed.invalid += 1
            parsed.report(
                number,
                "phone",
                f"phone {phone} is also in row {first_row_of[phone]}; only the first is imported",
            )
            continue
        first_row_of[phone] = number
        parsed.valid.append(row)
    return parsed


def _decode(raw: bytes) -> str:
    if not raw.strip():
        raise ValidationFailed(
            f"the file is empty; its first line must name the columns, e.g. {','.join(COLUMNS)}",
            [_detail("body", "no content", "empty_file")],
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValidationFailed(
            "the file is not UTF-8 text; save it as CSV UTF-8",
            [_detail("body", f"byte {exc.start} is not UTF-8", "not_utf8")],
        ) from None
    if "\x00" in text:
        raise ValidationFailed(
            "the file is not CSV text: it contains NUL characters",
            [_detail("body", "contains NUL characters", "not_csv")],
        )
    return text


def _records(text: str) -> Iterator[list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ValidationFailed(
                f"the file is not valid CSV: line {reader.line_num}: {exc}",
                [_detail("body", f"line {reader.line_num}: {exc}", "not_csv")],
            ) from None


def _columns(header: list[str] | None) -> tuple[str, ...]:
    expected = ", ".join(COLUMNS)
    if not header or not any(cell.strip() for cell in header):
        raise ValidationFailed(
            f"the first line must name the columns ({expected}, comma-separated)",
            [_detail("header", "no column names", "missing_header")],
        )
    names = tuple(cell.strip().lower() for cell in header)
    details = []
    for position, name in enumerate(names):
        if name not in COLUMNS:
            shown = repr(header[position]) if name else "(empty)"
            details.append(
                _detail(f"header.{position}", f"unknown column {shown}", "unknown_column")
            )
        elif names.index(name) != position:
            details.append(_detail(f"header.{position}", f"{name} again", "duplicate_column"))
    if "phone" not in names:
        details.append(_detail("header", "no phone column", "missing_column"))
    if details:
        raise ValidationFailed(
            f"the first line must name the columns: phone, and any of operator_code, tag, "
            f"timezone, each once (got {','.join(header)[:200]!r})",
            details,
        )
    return names


def _row(
    number: int, columns: tuple[str, ...], cells: list[str], parsed: ParsedFile
) -> ImportRow | None:
    """The row's fields if POST /clients would accept them; otherwise its problems are reported."""
    if len(cells) != len(columns):
        parsed.report(
            number,
            None,
            f"the row has {len(cells)} cells; the header names {len(columns)} columns",
        )
        return None
    given = {name: cell for name, cell in zip(columns, cells, strict=True) if cell != ""}
    try:
        client = ClientCreate.model_validate(given)
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            column = str(error["loc"][0]) if error["loc"] else None
            parsed.report(number, column, error_in_words(error))
        return None
    return (
        number,
        client.phone,
        client.operator_code if "operator_code" in given else None,
        client.tag if "tag" in given else None,
        client.timezone if "timezone" in given else None,
    )


def _detail(location: str, message: str, kind: str) -> dict[str, Any]:
    return {"field": location, "message": message, "type": kind}
