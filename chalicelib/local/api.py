"""`chalice local`'s API Gateway, with each request tagged with the Lambda it runs in.

On AWS a request runs two functions: the route in the API handler (`api_handler`), after the
route's authorizer in its own function (`bearer_auth`), each under its own role. chalice local
runs both in the server's thread; these subclasses run each inside
`invocation.running(<function>)`, so the local stack's IAM checks know which role a call
belongs to.
"""

from __future__ import annotations

import functools
from http.server import BaseHTTPRequestHandler
from typing import Any

from chalice.app import ChaliceAuthorizer
from chalice.local import (
    ChaliceRequestHandler,
    LocalGateway,
    LocalGatewayAuthorizer,
)

from chalicelib.local import invocation

# The Lambda that serves every route, as `chalice package` names it.
API_FUNCTION = "api_handler"


def quiet_access_log(self: BaseHTTPRequestHandler, code: Any = "-", size: Any = "-") -> None:
    """No http.server access line: the service logs each request itself, once (method, path,
    status, latency, correlation id). Errors (log_error) are still printed."""


class _TaggedAuthorizer(LocalGatewayAuthorizer):
    def authorize(self, raw_path: str, lambda_event: Any, lambda_context: Any) -> Any:
        route = self._route_for_event(lambda_event)
        authorizer = route.authorizer if route is not None else None
        if not isinstance(authorizer, ChaliceAuthorizer):
            return super().authorize(raw_path, lambda_event, lambda_context)
        with invocation.running(authorizer.name):
            return super().authorize(raw_path, lambda_event, lambda_context)


class TaggedGateway(LocalGateway):
    """LocalGateway running the route as `api_handler` and its authorizer as itself."""

    def __init__(self, app_object: Any, config: Any) -> None:
        super().__init__(app_object, config)
        self._authorizer = _TaggedAuthorizer(app_object)

    def handle_request(self, method: str, path: str, headers: Any, body: Any) -> Any:
        with invocation.running(API_FUNCTION):
            return super().handle_request(method, path, headers, body)


class _TaggedRequestHandler(ChaliceRequestHandler):
    def __init__(
        self, request: Any, client_address: Any, server: Any, app_object: Any, config: Any
    ) -> None:
        # As ChaliceRequestHandler.__init__, with the tagged gateway: the base class handles the
        # request inside its __init__, so the gateway must be in place before it runs.
        self.local_gateway = TaggedGateway(app_object, config)
        BaseHTTPRequestHandler.__init__(self, request, client_address, server)

    log_request = quiet_access_log


def tag_requests(local_server: Any, app: Any, config: Any) -> None:
    """Make a server from chalice.local.create_local_server tag each request it serves."""
    local_server.server.RequestHandlerClass = functools.partial(
        _TaggedRequestHandler, app_object=app, config=config
    )
