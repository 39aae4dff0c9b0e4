"""CSV imports of clients: upload a file, then follow the import it starts."""

from __future__ import annotations

from chalice import Response
from chalice.app import Request

from chalicelib import domain
from chalicelib.api.client_csv import COLUMNS, read_clients_csv
from chalicelib.api.http import ApiBlueprint, json_response
from chalicelib.api.mapping import page_limit
from chalicelib.api.security import bearer_auth
from chalicelib.container import services
from chalicelib.errors import PayloadTooLarge, UnsupportedMediaType
from chalicelib.schemas import (
    ClientImportOut,
    ClientImportPage,
    ClientImportSummary,
    ImportRowError,
    PageQuery,
)

api = ApiBlueprint(__name__, "clients", authorizer=bearer_auth)

CSV = "text/csv"
IMPORT_PATH = "/clients/import"
_UTF8 = {"utf-8", "utf8"}


@api.route(
    IMPORT_PATH,
    "POST",
    summary="Import clients from a CSV file",
    consumes=CSV,
    response=ClientImportOut,
    status=202,
    errors=(400, 409, 413, 415, 422),
    idempotent=True,
)
def start_client_import() -> Response:
    """A UTF-8 CSV file (`Content-Type: text/csv`) whose first line names its columns: `phone`,
    and any of `operator_code`, `tag`, `timezone`. Each row is checked exactly as `POST
    /clients` checks a body made of the row's non-empty cells: a new phone becomes a client
    (omitted fields take POST's defaults), a known one has the given fields changed (PATCH), or
    nothing when they are already so; importing the same file again changes nothing. A phone
    repeated in the file: the first row wins, the others are errors. Answers 202 with the import:
    the invalid rows are all in `errors` at once; the valid ones are written in the background
    (follow `Location`). A file that cannot be read at all (not UTF-8 CSV, no header naming a
    `phone` column, an unknown column, too many rows, empty) is a 422, too large a 413."""
    current = services()
    request = api.blueprint.current_request
    raw = _csv_body(request, current.settings.import_max_bytes)
    parsed = read_clients_csv(raw, max_rows=current.settings.import_max_rows)
    started = current.imports.start(
        rows=parsed.rows,
        valid=parsed.valid,
        invalid=parsed.invalid,
        problems=parsed.problems,
        problems_omitted=parsed.problems_omitted,
    )
    return json_response(import_out(started), 202, {"Location": _location(request, started.id)})


@api.route(
    "/clients/imports",
    "GET",
    summary="List CSV imports",
    query=PageQuery,
    response=ClientImportPage,
    errors=(400,),
)
def list_imports(query: PageQuery) -> ClientImportPage:
    """Imports a page at a time, newest first, with their counts (the errors are on each one)."""
    page = services().imports.list(
        limit=page_limit(query.limit, services().settings), cursor=query.cursor
    )
    return ClientImportPage(
        items=[import_summary(job) for job in page.items], next_cursor=page.next_cursor
    )


@api.route(
    "/clients/imports/{import_id}",
    "GET",
    summary="Get a CSV import",
    response=ClientImportOut,
    errors=(404,),
)
def get_import(import_id: str) -> ClientImportOut:
    """The import's status, counts so far and errors."""
    return import_out(services().imports.get(import_id))


def _csv_body(request: Request, max_bytes: int) -> bytes:
    media_type, _, parameters = (request.headers.get("content-type") or "").partition(";")
    media_type = media_type.strip().lower()
    if media_type != CSV:
        raise UnsupportedMediaType(
            f"send the file as {CSV} (got {media_type or 'no Content-Type'}); its first line "
            f"names the columns: {','.join(COLUMNS)}"
        )
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in _UTF8:
            raise UnsupportedMediaType(f"send the file in UTF-8 (got charset={charset})")
    raw = request.raw_body or b""
    if len(raw) > max_bytes:
        raise PayloadTooLarge(
            f"the file is {len(raw)} bytes; at most {max_bytes} are accepted: split it"
        )
    return raw


def _location(request: Request, import_id: str) -> str:
    # API Gateway's path carries the stage ("/api/clients/import"); the local server's does not.
    path = (request.context or {}).get("path") or ""
    prefix = path[: -len(IMPORT_PATH)] if path.endswith(IMPORT_PATH) else ""
    return f"{prefix}/clients/imports/{import_id}"


def import_summary(job: domain.ClientImport) -> ClientImportSummary:
    return ClientImportSummary(**_counts(job))


def import_out(job: domain.ClientImport) -> ClientImportOut:
    return ClientImportOut(
        **_counts(job),
        errors=[ImportRowError(row=p.row, field=p.field, message=p.message) for p in job.errors],
        errors_omitted=job.errors_omitted,
    )


def _counts(job: domain.ClientImport) -> dict[str, object]:
    return {
        "id": job.id,
        "status": job.status,
        "rows": job.rows,
        "valid": job.valid,
        "invalid": job.invalid,
        "created": job.created,
        "updated": job.updated,
        "unchanged": job.unchanged,
        "failed": job.failed,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }
