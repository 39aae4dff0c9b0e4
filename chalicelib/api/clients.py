"""Client directory routes."""

from __future__ import annotations

from chalicelib.api.http import ApiBlueprint
from chalicelib.api.mapping import client_fields, client_out, page_limit
from chalicelib.api.security import bearer_auth
from chalicelib.container import services
from chalicelib.schemas import (
    ClientCreate,
    ClientListQuery,
    ClientOut,
    ClientPage,
    ClientPatch,
    OptOutIn,
)

api = ApiBlueprint(__name__, "clients", authorizer=bearer_auth)


@api.route(
    "/clients",
    "POST",
    summary="Add a client",
    body=ClientCreate,
    response=ClientOut,
    status=201,
    errors=(400, 409, 413, 415, 422),
    idempotent=True,
)
def create_client(body: ClientCreate) -> ClientOut:
    """Add a client. The phone number must not belong to another client."""
    return client_out(services().clients.create(client_fields(body)))


@api.route(
    "/clients",
    "GET",
    summary="List clients",
    query=ClientListQuery,
    response=ClientPage,
    errors=(400,),
)
def list_clients(query: ClientListQuery) -> ClientPage:
    """Clients a page at a time, optionally only those with an operator code and/or tag, or
    the one with a phone number."""
    page = services().clients.list(
        limit=page_limit(query.limit, services().settings),
        cursor=query.cursor,
        operator_code=query.operator_code,
        tag=query.tag,
        phone=query.phone,
    )
    return ClientPage(items=[client_out(c) for c in page.items], next_cursor=page.next_cursor)


@api.route("/clients/{client_id}", "GET", summary="Get a client", response=ClientOut, errors=(404,))
def get_client(client_id: str) -> ClientOut:
    return client_out(services().clients.get(client_id))


@api.route(
    "/clients/{client_id}",
    "PUT",
    summary="Replace a client",
    body=ClientCreate,
    response=ClientOut,
    errors=(400, 404, 409, 413, 415, 422),
)
def replace_client(client_id: str, body: ClientCreate) -> ClientOut:
    """Replace every field; omitted optional fields take their defaults."""
    return client_out(services().clients.replace(client_id, client_fields(body)))


@api.route(
    "/clients/{client_id}",
    "PATCH",
    summary="Change some fields of a client",
    body=ClientPatch,
    response=ClientOut,
    errors=(400, 404, 409, 413, 415, 422),
)
def patch_client(client_id: str, body: ClientPatch) -> ClientOut:
    """Change the given fields only; the operator code is kept unless given."""
    return client_out(services().clients.update(client_id, body.model_dump(exclude_unset=True)))


@api.route(
    "/clients/{client_id}", "DELETE", summary="Delete a client", status=204, errors=(404, 409)
)
def delete_client(client_id: str) -> None:
    """Delete a client; it is never sent to again and its phone number becomes free."""
    services().clients.delete(client_id)


@api.route(
    "/opt-outs",
    "POST",
    summary="Opt a client out by phone number",
    body=OptOutIn,
    response=ClientOut,
    errors=(400, 404, 409, 413, 415, 422),
    idempotent=True,
)
def opt_out(body: OptOutIn) -> ClientOut:
    """For a STOP reply webhook: the client with this phone is never sent to again (its
    messages become `skipped`). Idempotent; `PATCH /clients/{id}` with `opted_out: false`
    opts back in. 404 when no client has the number."""
    return client_out(services().clients.opt_out(body.phone))
