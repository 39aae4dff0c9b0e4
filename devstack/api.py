"""`chalice local`'s API Gateway, with each request tagged with the Lambda it runs in.

On AWS a request runs two functions: the route in the API handler (`api_handler`), after the
route's authorizer in its own function (`bearer_auth`), each under its own role. chalice local
runs both in the server's thread; these subclasses run each inside
`invocation.running(<function>)`, so the local stack's IAM checks know which role a call
belongs to.

What API Gateway answers itself (401, 403, no such route) comes out in the service's one error
shape, with the words of the gateway responses in infra/resources.yaml (tests hold the two
equal); a method API Gateway does not route (TRACE, CONNECT, ...) is a 405 in that shape, not
http.server's 501 HTML page.
"""

from __future__ import annotations

import functools
import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

from chalice.app import ChaliceAuthorizer
from chalice.local import (
    ChaliceRequestHandler,
    ForbiddenError,
    InvalidAuthorizerError,
    LocalGateway,
    LocalGatewayAuthorizer,
    LocalGatewayException,
    NotAuthorizedError,
)

from devstack import invocation

# The Lambda that serves every route, as `chalice package` names it.
API_FUNCTION = "api_handler"
# The methods API Gateway routes; anything else never reaches a Lambda.
ROUTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

# As the gateway responses of infra/resources.yaml say them: (status, error code, message).
UNAUTHORIZED = (401, "unauthorized", "a bearer token is required in the Authorization header")
ACCESS_DENIED = (403, "forbidden", "the bearer token is invalid, expired or not accepted")
NO_ROUTE = (404, "not_found", "no route matches this method and path")
AUTHORIZER_FAILED = (500, "gateway_error", "the authorizer did not answer")


def _error_body(status: int, code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message, "details": []}).encode()


def _gateway_error(error: LocalGatewayException, no_route: bool) -> LocalGatewayException:
    """Chalice's emulation of an API Gateway error, in the service's shape and words."""
    if no_route:
        status, code, message = NO_ROUTE
    elif isinstance(error, NotAuthorizedError):
        status, code, message = UNAUTHORIZED
    elif isinstance(error, ForbiddenError):
        status, code, message = ACCESS_DENIED
    elif isinstance(error, InvalidAuthorizerError):
        status, code, message = AUTHORIZER_FAILED
    else:
        return error
    headers = {"x-amzn-RequestId": error.headers.get("x-amzn-RequestId", "")}
    headers["x-amzn-ErrorType"] = error.headers.get("x-amzn-ErrorType", "")
    if status == HTTPStatus.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    shaped = type(error)(headers, _error_body(status, code, message))
    shaped.CODE = status
    return shaped


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
            try:
                return super().handle_request(method, path, headers, body)
            except LocalGatewayException as error:
                # Chalice answers a path no route matches with a 403 that (given any
                # Authorization header) quotes the caller's token back; API Gateway's is a 403
                # "Missing Authentication Token", which the template turns into a 404.
                raise _gateway_error(error, no_route=not self.has_route(path)) from None

    def has_route(self, path: str) -> bool:
        try:
            self.event_converter.create_lambda_event(method="GET", path=path, headers={})
        except ValueError:
            return False
        return True

    def allowed_methods(self, path: str) -> list[str]:
        """The methods the path's route has (empty: no route matches the path)."""
        try:
            event = self.event_converter.create_lambda_event(method="GET", path=path, headers={})
        except ValueError:
            return []
        return list(self._app_object.routes[event["requestContext"]["resourcePath"]])


class _TaggedRequestHandler(ChaliceRequestHandler):
    def __init__(
        self, request: Any, client_address: Any, server: Any, app_object: Any, config: Any
    ) -> None:
        # As ChaliceRequestHandler.__init__, with the tagged gateway: the base class handles the
        # request inside its __init__, so the gateway must be in place before it runs.
        self.local_gateway = TaggedGateway(app_object, config)
        BaseHTTPRequestHandler.__init__(self, request, client_address, server)

    log_request = quiet_access_log

    def __getattr__(self, name: str) -> Any:
        # http.server looks up `do_<METHOD>` and answers 501 with an HTML page when it is missing.
        if name.startswith("do_") and name[3:] not in ROUTED_METHODS:
            return self._method_not_routed
        raise AttributeError(name)

    def _method_not_routed(self) -> None:
        self._parse_payload()  # read the body, so the connection stays usable
        allowed = self.local_gateway.allowed_methods(self.path)
        if not allowed:
            status, code, message = NO_ROUTE
            headers: dict[str, str] = {}
        else:
            status, code = HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed"
            message = f"{self.command} is not supported here; use {', '.join(allowed)}"
            headers = {"Allow": ", ".join(allowed)}
        self._send_http_response(status, headers, _error_body(status, code, message))


def serve_chalice_local_as_the_stack_does() -> None:
    """Make `chalice local`'s own request handler answer as the stack's: it builds its gateway
    from the module's `LocalGateway` on every request, and http.server finds `do_<METHOD>` and
    `log_request` on the class, so patching those is all it takes (chalice local only)."""
    import chalice.local as chalice_local

    chalice_local.LocalGateway = TaggedGateway  # type: ignore[misc]
    handler = chalice_local.ChaliceRequestHandler
    handler.log_request = quiet_access_log  # type: ignore[method-assign]
    handler.__getattr__ = _TaggedRequestHandler.__getattr__  # type: ignore[attr-defined]
    handler._method_not_routed = _TaggedRequestHandler._method_not_routed  # type: ignore[attr-defined]


def tag_requests(local_server: Any, app: Any, config: Any) -> None:
    """Make a server from chalice.local.create_local_server tag each request it serves."""
    local_server.server.RequestHandlerClass = functools.partial(
        _TaggedRequestHandler, app_object=app, config=config
    )
