"""The OpenAPI 3.1 document, generated from the routes' pydantic models (never hand-written)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from chalicelib.api.http import OPERATIONS, Operation
from chalicelib.roles import roles_for
from chalicelib.schemas import ErrorBody, without_null

TITLE = "SMS campaign service"
VERSION = "1.0.0"
_REF = "#/components/schemas/{model}"
_AUTH_ERRORS = (401, 403)
_RETRY_AFTER = {
    "description": "Seconds to wait before sending the same request again",
    "schema": {"type": "integer", "minimum": 1},
}


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Any 1 to 255 printable ASCII characters, new for each new request. The same "
    "key with the same body again (for a day, IDEMPOTENCY_TTL_HOURS) replays the first "
    "response with `Idempotent-Replay: true`; with another body it is a 422; while the first "
    "request runs, a 409 with `Retry-After`. Keys are scoped to the caller.",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        # Printable ASCII; no space at either end (HTTP strips it).
        "pattern": "^[\\x21-\\x7e]([\\x20-\\x7e]*[\\x21-\\x7e])?$",
    },
}
_IDEMPOTENCY_ERRORS = {
    400: "the Idempotency-Key is not 1 to 255 printable ASCII characters",
    409: "the first request with this Idempotency-Key is still running (see `Retry-After`)",
    422: "the Idempotency-Key was already used with another body",
}
_REPLAY = {
    "description": "`true` when this is the saved response to an earlier request with the key",
    "schema": {"type": "string", "enum": ["true"]},
}


def _error_description(status: int) -> str:
    return {
        400: "Malformed request: bad JSON, query parameter or cursor",
        401: "Missing bearer token",
        403: "Invalid, expired or unaccepted bearer token, or a role that may not do this",
        404: "No such record",
        409: "Conflicts with the current state (e.g. duplicate phone, concurrent edit)",
        413: "Request body too large",
        415: "Request body is not application/json",
        422: "Request body failed validation",
        503: "Storage is busy (a write met a concurrent one, or AWS throttled it); nothing "
        "changed: retry after the `Retry-After` seconds",
    }.get(status, HTTPStatus(status).phrase)


def _schemas(operations: Iterable[Operation]) -> tuple[dict, dict[tuple[type, str], dict]]:
    pairs: list[tuple[type[BaseModel], Any]] = [(ErrorBody, "serialization")]
    for op in operations:
        if op.body is not None:
            pairs.append((op.body, "validation"))
        if op.query is not None:
            pairs.append((op.query, "validation"))
        if op.response is not None:
            pairs.append((op.response, "serialization"))
    unique = list(dict.fromkeys(pairs))
    refs, top = models_json_schema(unique, ref_template=_REF)
    return top.get("$defs", {}), refs


def _query_parameters(model: type[BaseModel], components: dict) -> list[dict]:
    schema = model.model_json_schema(ref_template=_REF)
    required = set(schema.get("required", []))
    params = []
    for name, prop in schema.get("properties", {}).items():
        # A query says "none" by leaving the parameter out; it cannot carry a null.
        prop = without_null(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        param: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": prop,
        }
        if description:
            param["description"] = description
        params.append(param)
    for name, definition in schema.get("$defs", {}).items():
        components.setdefault(name, definition)
    return params


def build_spec(operations: Iterable[Operation] | None = None) -> dict[str, Any]:
    """The OpenAPI document describing every registered route."""
    ops = list(OPERATIONS if operations is None else operations)
    components, refs = _schemas(ops)
    error_ref = refs[(ErrorBody, "serialization")]
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        entry: dict[str, Any] = {
            "operationId": op.name,
            "summary": op.summary,
            "tags": [op.tag],
        }
        description = op.description or ""
        if not op.public:
            allowed = sorted(roles_for(op.method, op.path))
            entry["x-roles"] = allowed
            sentence = f"Roles: {', '.join(allowed)}; any other role gets a 403."
            description = f"{description}\n\n{sentence}" if description else sentence
        if description:
            entry["description"] = description
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in op.path_params
        ]
        if op.query is not None:
            params.extend(_query_parameters(op.query, components))
        if op.idempotent:
            params.append(_IDEMPOTENCY_KEY)
        if params:
            entry["parameters"] = params
        if op.body is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(op.body, "validation")]}},
            }
        elif op.consumes is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {op.consumes: {"schema": {"type": "string", "minLength": 1}}},
            }
        responses: dict[str, Any] = {}
        if op.response is not None:
            responses[str(op.status)] = {
                "description": HTTPStatus(op.status).phrase,
                "content": {op.produces: {"schema": refs[(op.response, "serialization")]}},
            }
        elif op.produces != "application/json":
            responses[str(op.status)] = {
                "description": HTTPStatus(op.status).phrase,
                "content": {op.produces: {"schema": {"type": "string"}}},
            }
        else:
            responses[str(op.status)] = {"description": HTTPStatus(op.status).phrase}
        if op.idempotent:
            responses[str(op.status)]["headers"] = {"Idempotent-Replay": _REPLAY}
        statuses = set(op.errors) | ({*_AUTH_ERRORS} if not op.public else set())
        if not op.public:
            statuses.add(503)
        for status in sorted(statuses):
            # 401 and 403 too: API Gateway writes them, in the same shape (its gateway responses).
            content = {"application/json": {"schema": error_ref}}
            description = _error_description(status)
            if status == 415 and op.consumes is not None:
                description = f"Request body is not {op.consumes}"
            if op.idempotent and status in _IDEMPOTENCY_ERRORS:
                description = f"{description}; or {_IDEMPOTENCY_ERRORS[status]}"
            responses[str(status)] = {"description": description, "content": content}
            if status == 503 or (status == 409 and op.idempotent):
                responses[str(status)]["headers"] = {"Retry-After": _RETRY_AFTER}
        entry["responses"] = responses
        if op.public:
            entry["security"] = []
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": (
                "Operators load a client directory, create mailings, and read delivery "
                "statistics. Every route except /health, /docs and /openapi.json needs "
                "`Authorization: Bearer <token>`. Errors have the shape of `ErrorBody`."
            ),
        },
        "servers": [{"url": "."}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A static API token or an OIDC-issued RS256 JWT",
                }
            },
        },
    }


@cache
def cached_spec() -> dict[str, Any]:
    return build_spec()
