"""The API as a test calls it: authenticated JSON requests to the in-process Chalice test client."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

API_TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
JSON_HEADERS = {"Content-Type": "application/json", **AUTH}


@dataclass(frozen=True)
class ApiResponse:
    """One answer: its status, headers and raw body, and the body parsed as JSON."""

    status_code: int
    headers: dict[str, str]
    body: bytes

    @property
    def status(self) -> int:
        return self.status_code

    @property
    def json(self) -> Any:
        """The body parsed; a body that is not JSON fails the test here."""
        return json.loads(self.body)


@dataclass
class Api:
    """JSON requests with the test's token over `chalice.test.Client(...).http`; a dict or list
    body is sent as JSON, a str or bytes body as it is, and `headers=` replaces the defaults."""

    http: Any  # chalice.test's HTTP client
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON_HEADERS))

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> ApiResponse:
        headers = kwargs.pop("headers", self.headers)
        payload = body if isinstance(body, (str, bytes)) or body is None else json.dumps(body)
        answer = self.http.request(method, path, headers=headers, body=payload or b"", **kwargs)
        return ApiResponse(answer.status_code, answer.headers, answer.body)

    def get(self, path: str, **kwargs: Any) -> ApiResponse:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> ApiResponse:
        return self.call("POST", path, body, **kwargs)

    def put(self, path: str, body: Any = None, **kwargs: Any) -> ApiResponse:
        return self.call("PUT", path, body, **kwargs)

    def patch(self, path: str, body: Any = None, **kwargs: Any) -> ApiResponse:
        return self.call("PATCH", path, body, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> ApiResponse:
        return self.call("DELETE", path, **kwargs)
