"""Who may call what: the roles and the one table of routes → allowed roles.

Pure: the authorizer puts the caller's role in its context and the route boundary
(api.http.ApiBlueprint) asks `may` before the handler runs; the OpenAPI document and
docs/api.md show the same table.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"
    OPTOUT = "optout"
    METRICS = "metrics"


VIEWER, OPERATOR, ADMIN, OPTOUT, METRICS = Role
# Reading: everyone who works in the service (nothing the API returns is a secret).
_READ = frozenset({VIEWER, OPERATOR, ADMIN})
# Clients, imports, mailings and their actions.
_OPERATE = frozenset({OPERATOR, ADMIN})
# Who may write at all (the admin UI shows writing controls to these only; admin/app.js).
WRITING_ROLES = _OPERATE
_ADMIN = frozenset({ADMIN})

# (method, path template) → the roles that may call it. Every authorised route has a row;
# tests/test_roles.py fails for a route without one, so a new route cannot be open by omission.
ROUTE_ROLES: dict[tuple[str, str], frozenset[Role]] = {
    ("GET", "/me"): frozenset(Role),
    ("GET", "/clients"): _READ,
    ("POST", "/clients"): _OPERATE,
    ("GET", "/clients/{client_id}"): _READ,
    ("PUT", "/clients/{client_id}"): _OPERATE,
    ("PATCH", "/clients/{client_id}"): _OPERATE,
    ("DELETE", "/clients/{client_id}"): _OPERATE,
    ("POST", "/opt-outs"): frozenset({OPERATOR, ADMIN, OPTOUT}),
    # The gateway's webhooks (a token of the narrow optout role) and the replies they keep.
    ("POST", "/inbound-sms"): frozenset({OPERATOR, ADMIN, OPTOUT}),
    ("POST", "/delivery-receipts"): frozenset({OPERATOR, ADMIN, OPTOUT}),
    ("GET", "/clients/{client_id}/replies"): _READ,
    ("POST", "/clients/import"): _OPERATE,
    ("GET", "/clients/imports"): _READ,
    ("GET", "/clients/imports/{import_id}"): _READ,
    ("GET", "/mailings"): _READ,
    ("POST", "/mailings"): _OPERATE,
    ("GET", "/mailings/{mailing_id}"): _READ,
    ("PUT", "/mailings/{mailing_id}"): _OPERATE,
    ("PATCH", "/mailings/{mailing_id}"): _OPERATE,
    ("DELETE", "/mailings/{mailing_id}"): _OPERATE,
    ("POST", "/mailings/{mailing_id}/cancel"): _OPERATE,
    # A preview writes nothing, but only those who may create a mailing need it.
    ("POST", "/mailings/preview"): _OPERATE,
    ("POST", "/mailings/{mailing_id}/pause"): _OPERATE,
    ("POST", "/mailings/{mailing_id}/resume"): _OPERATE,
    ("POST", "/mailings/{mailing_id}/retry-failed"): _OPERATE,
    ("GET", "/mailings/{mailing_id}/stats"): _READ,
    ("GET", "/mailings/{mailing_id}/timeline"): _READ,
    ("GET", "/stats"): _READ,
    ("GET", "/gateway"): _READ,
    ("GET", "/metrics"): frozenset({*_READ, METRICS}),
    ("POST", "/reports/daily"): _ADMIN,
    # Who changed what: for admins only.
    ("GET", "/audit"): _ADMIN,
}


def roles_for(method: str, path: str) -> frozenset[Role]:
    """The roles that may call a route; none for a route without a row (closed by default)."""
    return ROUTE_ROLES.get((method.upper(), path), frozenset())


def may(role: str | None, method: str, path: str) -> bool:
    """Whether `role` may call the route `method path` (path as the route template)."""
    return role is not None and role in roles_for(method, path)


def split_token_entry(entry: str) -> tuple[Role, str]:
    """An API_TOKENS entry `TOKEN` (admin) or `ROLE:TOKEN` as (role, token); ValueError names
    the unknown role, never the token."""
    role, sep, token = entry.partition(":")
    if not sep:
        return ADMIN, entry
    try:
        return Role(role.strip().lower()), token
    except ValueError:
        names = ", ".join(r.value for r in Role)
        raise ValueError(f"an API token's role must be one of {names} (got {role!r})") from None


def parse_role_map(value: str) -> tuple[tuple[str, Role], ...]:
    """OIDC_ROLE_MAP `claim-value=role,...` as pairs; ValueError names a bad entry."""
    pairs = []
    for item in value.split(","):
        if not item.strip():
            continue
        claim, sep, role = item.partition("=")
        if not sep or not claim.strip():
            raise ValueError(f"OIDC_ROLE_MAP entries are claim-value=role (got {item.strip()!r})")
        try:
            pairs.append((claim.strip(), Role(role.strip().lower())))
        except ValueError:
            names = ", ".join(r.value for r in Role)
            raise ValueError(
                f"OIDC_ROLE_MAP: the role must be one of {names} (got {role!r})"
            ) from None
    return tuple(pairs)


# The most powerful first: a user in several mapped groups gets the widest role.
_PRECEDENCE = (ADMIN, OPERATOR, VIEWER, OPTOUT, METRICS)


def role_from_claim(claim: object, role_map: tuple[tuple[str, Role], ...]) -> Role | None:
    """The role a token's roles claim (a list, or a space-separated string like `scope`) maps
    to; None when no value is mapped."""
    if isinstance(claim, str):
        values = set(claim.split())
    elif isinstance(claim, list):
        values = {item for item in claim if isinstance(item, str)}
    else:
        return None
    mapped = {role for value, role in role_map if value in values}
    return next((role for role in _PRECEDENCE if role in mapped), None)
