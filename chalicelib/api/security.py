"""The Chalice authorizer guarding every route but /health, /docs and /openapi.json."""

from __future__ import annotations

import logging

from chalice import AuthResponse, Blueprint

from chalicelib.auth import AuthError, parse_bearer
from chalicelib.container import services

logger = logging.getLogger(__name__)

blueprint = Blueprint(__name__)

# API Gateway caches a decision per token; short, so a revoked or expiring token stops soon.
AUTH_CACHE_SECONDS = 60


@blueprint.authorizer(ttl_seconds=AUTH_CACHE_SECONDS)
def bearer_auth(auth_request):
    """Allow the request when its bearer token is valid; deny it (403) otherwise."""
    try:
        principal = services().verifier.verify(parse_bearer(auth_request.token))
        return AuthResponse(
            routes=["*"],
            principal_id=principal.subject,
            # The route boundary (api.http) checks this role against roles.ROUTE_ROLES.
            context={"auth_mode": principal.mode, "role": principal.role.value},
        )
    except AuthError as exc:
        logger.info("request denied: %s", exc)
        return AuthResponse(routes=[], principal_id="anonymous")
    except Exception:
        # A broken configuration must fail closed, never open and never as a 5xx.
        logger.exception("authorizer failed; denying the request")
        return AuthResponse(routes=[], principal_id="anonymous")
