"""Domain errors. `chalicelib.api.http` maps them to HTTP responses in one place."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Something the caller did or asked for cannot be done; never a server fault."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class MalformedRequest(DomainError):
    status = 400
    code = "bad_request"


class ValidationFailed(DomainError):
    status = 422
    code = "validation_error"


class Forbidden(DomainError):
    """The caller is authenticated, but its role may not do this."""

    status = 403
    code = "forbidden"


class NotFound(DomainError):
    status = 404
    code = "not_found"


class Conflict(DomainError):
    status = 409
    code = "conflict"


class PayloadTooLarge(DomainError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(DomainError):
    status = 415
    code = "unsupported_media_type"


class ServiceUnavailable(Exception):
    """Storage or a queue is throttling or unreachable: a retryable server-side condition; the
    message says what was done and what was not."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class StorageBusy(ServiceUnavailable):
    """Storage was throttling or the write met a concurrent transaction: nothing was written,
    and the same request may succeed when sent again."""

    def __init__(self, message: str = "storage is busy; retry shortly") -> None:
        super().__init__(message, retry_after=1)


class UpstreamFailed(DomainError):
    """A service we depend on (SES) refused the request: a configuration to fix, not a bug."""

    status = 502
    code = "upstream_error"


class IdempotencyKeyReused(DomainError):
    """An Idempotency-Key sent again with another request than the one it was first used for."""

    status = 422
    code = "idempotency_key_reused"


class RequestInProgress(DomainError):
    """The first request with this Idempotency-Key has not finished: retry after a moment."""

    status = 409
    code = "request_in_progress"
    retry_after = 1
