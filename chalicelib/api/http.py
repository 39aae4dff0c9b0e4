"""The HTTP boundary: request parsing, the one place errors become responses, route metadata.

Every route is declared through `ApiBlueprint.route`, which records what the route takes and
returns (the OpenAPI document is generated from those records) and wraps the handler so that
bad input becomes a 4xx JSON error and nothing escapes as an unformatted 5xx.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from chalice import Blueprint, Chalice, Response
from pydantic import BaseModel, ValidationError

from chalicelib import logs, roles
from chalicelib.errors import (
    DomainError,
    Forbidden,
    MalformedRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from chalicelib.schemas import ErrorBody, error_in_words
from chalicelib.services.audit import Actor, AuditEntry
from chalicelib.services.idempotency import IdempotencyStore, SavedResponse
from chalicelib.storage.errors import error_code, is_transient

logger = logging.getLogger(__name__)

JSON = "application/json"
# Accept every content type at the Chalice layer so a wrong one gets our 415 body, not Chalice's.
_ANY_CONTENT_TYPE = ["*/*"]


@dataclass
class Operation:
    """What one route takes and returns; the OpenAPI document is built from these."""

    method: str
    path: str
    name: str
    summary: str
    tag: str
    description: str | None = None
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    public: bool = False
    errors: tuple[int, ...] = ()
    produces: str = JSON
    # A body that is not a JSON model (a CSV file): its media type; the handler reads it.
    consumes: str | None = None
    path_params: list[str] = field(default_factory=list)
    # Takes an Idempotency-Key header: a retry replays the first response, never creates twice.
    idempotent: bool = False
    # A write: each success leaves an audit entry (GET /audit).
    audited: bool = False


OPERATIONS: list[Operation] = []


# A 503 is always "try again": callers (and SDKs honouring the header) wait this long first.
RETRY_AFTER_SECONDS = 1


def error_response(
    status: int, code: str, message: str, details: list[dict] | None = None
) -> Response:
    """A JSON error in the service's one error shape; a 503 says when to retry."""
    body = ErrorBody(error=code, message=message, details=details or [])
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return json_response(body, status, headers)


def domain_error_response(exc: DomainError) -> Response:
    response = error_response(exc.status, exc.code, exc.message, exc.details)
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def json_response(
    model: BaseModel | None, status: int = 200, headers: dict | None = None
) -> Response:
    all_headers = {"Content-Type": JSON, **(headers or {})}
    if model is None:
        return Response(body="", status_code=status, headers={})
    return Response(body=model.model_dump_json(), status_code=status, headers=all_headers)


def validation_details(exc: ValidationError, prefix: str) -> list[dict[str, Any]]:
    """Pydantic errors as `details` entries naming the offending field, the rule in words."""
    details = []
    for err in exc.errors(include_url=False, include_input=False):
        location = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "")
        details.append(
            {"field": location or None, "message": error_in_words(err), "type": err["type"]}
        )
    return details


def chalice_errors_as_error_body(request: Any, get_response: Callable[[Any], Response]) -> Response:
    """Chalice's own errors, written before any view runs, in the service's one error shape.

    Locally that is a 405 for a method the path does not have (on AWS, the path's ANY method in
    infra/resources.yaml answers it in the same shape before the Lambda runs); Chalice's body is
    `{"Code", "Message"}`, not `ErrorBody`.
    """
    response = get_response(request)
    body = response.body
    if not (isinstance(body, dict) and set(body) == {"Code", "Message"}):
        return response
    status = response.status_code
    message = str(body["Message"])
    allowed = response.headers.get("Allow")
    if status == HTTPStatus.METHOD_NOT_ALLOWED and allowed:
        message = f"{request.method} is not supported here; use {allowed}"
    error = ErrorBody(error=HTTPStatus(status).name.lower(), message=message, details=[])
    return json_response(error, status, {**response.headers, "Content-Type": JSON})


CORRELATION_HEADER = "X-Correlation-Id"
_CORRELATION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Creating routes whose new record's id is in the response body: (method, route) -> log field.
_CREATED_IDS = {("POST", "/mailings"): "mailing_id", ("POST", "/clients"): "client_id"}


def correlation_id(request: Any) -> str:
    """The caller's correlation id if it sent a usable one, else API Gateway's request id."""
    given = request.headers.get(CORRELATION_HEADER) or ""
    if _CORRELATION_ID.match(given):
        return given
    request_id = (request.context or {}).get("requestId") or ""
    return request_id if _CORRELATION_ID.match(request_id) else uuid.uuid4().hex


def access_log(request: Any, get_response: Callable[[Any], Response]) -> Response:
    """One log line per API request (method, route, path, status, latency) carrying the
    correlation id and the mailing or client it is about; the id goes back as a header, and
    every line logged while the request runs carries the same ids."""
    started = time.perf_counter()
    correlation = correlation_id(request)
    params = request.uri_params or {}
    ids = {key: params[key] for key in ("mailing_id", "client_id") if key in params}
    with logs.bind(correlation_id=correlation, **ids):
        response = get_response(request)
        created = _created_id(request, response)
        status = response.status_code
        logger.log(
            logging.ERROR if status >= 500 else logging.INFO,
            "%s %s %d",
            request.method,
            request.path,
            status,
            extra={
                **created,
                "http_method": request.method,
                "route": request.path,
                "path": request.to_original_event().get("path") or request.path,
                "http_status": status,
                "latency_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
    response.headers[CORRELATION_HEADER] = correlation
    return response


def _created_id(request: Any, response: Response) -> dict[str, str]:
    field_name = _CREATED_IDS.get((request.method, request.path))
    if field_name is None or response.status_code != HTTPStatus.CREATED:
        return {}
    try:
        return {field_name: str(json.loads(response.body)["id"])}
    except (TypeError, ValueError, KeyError):
        return {}


class _BoundaryBlueprint(Blueprint):
    """A Blueprint that, once per app, installs the access log and the middleware giving
    Chalice's errors our shape."""

    def register(self, app: Chalice, options: dict[str, Any]) -> None:
        super().register(app, options)
        for middleware in (access_log, chalice_errors_as_error_body):
            if (middleware, "http") not in app.middleware_handlers:
                app.register_middleware(middleware, "http")


class ApiBlueprint:
    """A Chalice Blueprint whose routes carry their own schema and error handling."""

    def __init__(self, import_name: str, tag: str, *, authorizer: Any = None) -> None:
        self.blueprint = _BoundaryBlueprint(import_name)
        self.tag = tag
        self._authorizer = authorizer
        self._max_body_bytes: Callable[[], int] = lambda: 64 * 1024
        self._idempotency: Callable[[], IdempotencyStore] | None = None
        self._audit_log: Callable[[], Any] | None = None

    def limit_bodies(self, max_body_bytes: Callable[[], int]) -> None:
        self._max_body_bytes = max_body_bytes

    def keep_idempotency_keys(self, store: Callable[[], IdempotencyStore]) -> None:
        """Where the `idempotent` routes keep their keys (read at request time)."""
        self._idempotency = store

    def audit_writes(self, audit_log: Callable[[], Any]) -> None:
        """Record each successful write of these routes in `audit_log()` (an AuditLog)."""
        self._audit_log = audit_log

    def route(
        self,
        path: str,
        method: str,
        *,
        summary: str,
        body: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        status: int = 200,
        public: bool = False,
        errors: tuple[int, ...] = (),
        produces: str = JSON,
        consumes: str | None = None,
        description: str | None = None,
        idempotent: bool = False,
        audited: bool | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a handler `fn(**path_params, body=?, query=?)` returning a model or Response;
        an `idempotent` one honours an Idempotency-Key header. Every authenticated route but a
        GET is a write and audited, unless `audited=False`."""

        def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
            operation = Operation(
                method=method,
                path=path,
                name=handler.__name__,
                summary=summary,
                tag=self.tag,
                description=description or (handler.__doc__ or "").strip() or None,
                body=body,
                query=query,
                response=response,
                status=status,
                public=public,
                errors=errors,
                produces=produces,
                consumes=consumes,
                path_params=re.findall(r"{(\w+)}", path),
                idempotent=idempotent,
                audited=(method != "GET" and not public) if audited is None else audited,
            )
            OPERATIONS.append(operation)

            @functools.wraps(handler)
            def view(**path_params: Any) -> Response:
                request = self.blueprint.current_request
                if idempotent:
                    return self._idempotently(request, lambda: respond(request, path_params))
                return respond(request, path_params)

            def respond(request: Any, path_params: dict[str, Any]) -> Response:
                try:
                    if not public and self._authorizer is not None:
                        check_role(request, method, path)
                    kwargs: dict[str, Any] = dict(path_params)
                    if query is not None:
                        kwargs["query"] = parse_query(query, request.query_params)
                    if body is not None:
                        kwargs["body"] = self._parse_body(body, request)
                    result = handler(**kwargs)
                except DomainError as exc:
                    return domain_error_response(exc)
                except Exception as exc:  # the boundary: nothing leaves unformatted
                    return unexpected_error(exc, request.method, request.path)
                response = result if isinstance(result, Response) else json_response(result, status)
                if changed_something(operation, response):
                    self._audit(operation, request, path_params, kwargs.get("body"), response)
                return response

            route_kwargs: dict[str, Any] = {"methods": [method], "content_types": _ANY_CONTENT_TYPE}
            if not public and self._authorizer is not None:
                route_kwargs["authorizer"] = self._authorizer
            self.blueprint.route(path, **route_kwargs)(view)
            return view

        return decorate

    def _idempotently(self, request: Any, respond: Callable[[], Response]) -> Response:
        """Run the request once per (caller, Idempotency-Key): a repeat gets the first response.

        A 5xx is not kept: the key is given back so that the same request may be sent again.
        """
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is None or self._idempotency is None:
            return respond()
        try:
            if not _IDEMPOTENCY_KEY.fullmatch(key):
                raise MalformedRequest(
                    f"the {IDEMPOTENCY_HEADER} header must be 1 to 255 printable ASCII characters"
                )
            store = self._idempotency()
            outcome = store.claim(caller(request), key, request_fingerprint(request))
        except DomainError as exc:
            return domain_error_response(exc)
        except Exception as exc:  # the boundary: nothing leaves unformatted
            return unexpected_error(exc, request.method, request.path)
        if isinstance(outcome, SavedResponse):
            headers = {REPLAY_HEADER: "true"}
            if outcome.content_type:
                headers["Content-Type"] = outcome.content_type
            return Response(body=outcome.body, status_code=outcome.status, headers=headers)
        response = respond()
        try:
            if response.status_code >= 500:
                store.release(outcome)
            else:
                store.save(outcome, saved(response))
        except Exception:
            # The request itself is done: answer it; a retry after the claim lapses runs again.
            logger.exception("could not keep the response of %s %s", request.method, request.path)
        return response

    def _audit(
        self,
        operation: Operation,
        request: Any,
        path_params: dict[str, Any],
        body: BaseModel | None,
        response: Response,
    ) -> None:
        if self._audit_log is None:
            return
        try:
            entry = audit_entry(operation, request, path_params, body, response)
        except Exception:  # describing the write must never fail it
            logger.exception("audit entry not built for %s", operation.name)
            return
        self._audit_log().record(entry)

    def _parse_body(self, model: type[BaseModel], request: Any) -> BaseModel:
        content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if content_type != JSON:
            raise UnsupportedMediaType(
                f"send the body as {JSON} (got {content_type or 'no Content-Type'})"
            )
        raw = request.raw_body or b""
        limit = self._max_body_bytes()
        if len(raw) > limit:
            raise PayloadTooLarge(f"request body is {len(raw)} bytes; at most {limit} are accepted")
        if not raw.strip():
            raise MalformedRequest("a JSON request body is required")
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            if any(err["type"] == "json_invalid" for err in exc.errors()):
                raise MalformedRequest(
                    "request body is not valid JSON", validation_details(exc, "body")
                ) from None
            raise ValidationFailed(
                "request body is not valid", validation_details(exc, "body")
            ) from None


def caller_role(request: Any) -> str | None:
    """The role the authorizer put in its context; None when no authorizer ran."""
    return ((request.context or {}).get("authorizer") or {}).get("role")


def check_role(request: Any, method: str, path: str) -> None:
    """Forbidden unless the caller's role may call this route (roles.ROUTE_ROLES)."""
    role = caller_role(request)
    if not roles.may(role, method, path):
        allowed = ", ".join(sorted(roles.roles_for(method, path))) or "no role"
        raise Forbidden(f"your role {role or 'none'} may not {method} {path} (allowed: {allowed})")


IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAY_HEADER = "Idempotent-Replay"
# 1 to 255 printable ASCII characters; HTTP would strip a space at either end, so none there.
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?")


def caller(request: Any) -> str:
    """The principal id the authorizer gave the request: keys are scoped to it."""
    authorizer = (request.context or {}).get("authorizer") or {}
    return str(authorizer.get("principalId") or "anonymous")


def request_fingerprint(request: Any) -> str:
    """What makes two requests with one key "the same": method, path and body (JSON compared
    as data, so key order and spacing do not matter)."""
    raw = request.raw_body or b""
    body: Any = raw
    with contextlib.suppress(ValueError):
        body = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    params = json.dumps(request.uri_params or {}, sort_keys=True)
    digest = hashlib.sha256(f"{request.method} {request.path} {params}\n".encode())
    digest.update(body)
    return digest.hexdigest()


def saved(response: Response) -> SavedResponse:
    body = response.body
    text = body.decode() if isinstance(body, bytes) else str(body or "")
    headers = {name.lower(): value for name, value in (response.headers or {}).items()}
    return SavedResponse(response.status_code, text, headers.get("content-type"))


def changed_something(operation: Operation, response: Response) -> bool:
    """Whether this answer of a write route records a change: a success, not a replay."""
    replayed = (response.headers or {}).get(REPLAY_HEADER, "").lower() == "true"
    return operation.audited and response.status_code < 400 and not replayed


def audit_entry(
    operation: Operation,
    request: Any,
    path_params: dict[str, Any],
    body: BaseModel | None,
    response: Response,
) -> AuditEntry:
    """What a successful write did, from its request and response: ids and field names only,
    never a value (phone numbers are client data) and never a token."""
    context = request.context or {}
    authorizer = context.get("authorizer") or {}
    actor = Actor(
        id=str(authorizer.get("principalId") or "unknown"),
        role=authorizer.get("role"),
        auth_mode=authorizer.get("auth_mode"),
    )
    answer = _json_object(response.body)
    target = next(iter(path_params.values()), None) or answer.get("id") or operation.path
    status = answer.get("status")
    if not isinstance(status, str):
        status = (answer.get("mailing") or {}).get("status")
    return AuditEntry(
        actor=actor,
        action=operation.name,
        target_type=operation.tag,
        target_id=str(target),
        http_status=response.status_code,
        # chalice local has no request id: there, the X-Correlation-Id its response carries.
        request_id=context.get("requestId") or logs.bound().get("correlation_id"),
        fields=tuple(sorted(body.model_dump(exclude_unset=True))) if body is not None else (),
        status=status if isinstance(status, str) else None,
    )


def _json_object(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text) if isinstance(text, (str, bytes)) and text else None
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def parse_query(model: type[BaseModel], params: dict[str, str] | None) -> BaseModel:
    """Validate query parameters; an unknown or malformed one is a 400 naming it."""
    try:
        return model.model_validate(dict(params or {}))
    except ValidationError as exc:
        raise MalformedRequest(
            "query parameters are not valid", validation_details(exc, "query")
        ) from None


def unexpected_error(exc: Exception, method: str, path: str) -> Response:
    """Storage trouble is a 503 the caller may retry; anything else is logged as a bug."""
    if isinstance(exc, ServiceUnavailable):
        logger.warning("unavailable during %s %s: %s", method, path, exc.message)
        response = error_response(503, "unavailable", exc.message)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    # A transaction cancelled for a conflict, or a throttle left after the SDK's own retries:
    # nothing was written, so the same request may succeed when sent again.
    if is_transient(exc):
        logger.warning("storage busy during %s %s: %s", method, path, error_code(exc))
        return error_response(503, "unavailable", "storage is busy; retry shortly")
    logger.exception("unhandled error during %s %s", method, path)
    return error_response(500, "internal_error", "an internal error occurred; it has been logged")


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))
