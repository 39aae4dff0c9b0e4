"""Roles as callers meet them: every authorised route and every role, through the real app and its
authorizer, is either let through or refused with a 403 in the error shape."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from app import app
from chalicelib.api.http import OPERATIONS, Operation
from chalicelib.api.openapi import build_spec
from chalicelib.container import Services
from chalicelib.roles import ADMIN, ROUTE_ROLES, Role, parse_role_map, role_from_claim
from chalicelib.settings import Settings
from tests.conftest import FakeClock
from tests.integration.test_api_auth import bearer, oidc_settings, request, route_id, running_app
from tests.support.oidc import JwksServer, claims_at, sign

# One narrow token per role, and a plain token (no role prefix), which is an admin as before.
ROLE_TOKENS = {role: f"{role.value}-token-0123456789abcdef" for role in Role}
PLAIN_TOKEN = "plain-token-0123456789abcdef"
CALLERS = [*((role.value, role) for role in Role), ("plain", ADMIN)]

PROTECTED = [op for op in OPERATIONS if not op.public]


def token_of(caller: str) -> str:
    return PLAIN_TOKEN if caller == "plain" else ROLE_TOKENS[Role(caller)]


@pytest.fixture(scope="module")
def role_http() -> Iterator[Any]:
    """The app in static-token mode with one token per role and one plain token."""
    from moto import mock_aws

    from chalicelib import aws as aws_factories
    from chalicelib.storage.models import build_models
    from devstack.emulator import patch_moto

    patch_moto()
    entries = (*(f"{role.value}:{token}" for role, token in ROLE_TOKENS.items()), PLAIN_TOKEN)
    settings = Settings(table_prefix="sms-test", api_tokens=entries)
    with mock_aws():
        build_models.cache_clear()
        aws_factories.reset()
        with running_app(Services.build(settings)) as http:
            yield http
    build_models.cache_clear()


def test_every_authorised_route_has_a_row_in_the_roles_table() -> None:
    # Given the routes the app registers behind the authorizer
    guarded = {
        (method, path)
        for path, methods in app.routes.items()
        for method, entry in methods.items()
        if entry.authorizer is not None
    }

    # Then each has a row naming its roles, and no row names a route that does not exist
    assert guarded == set(ROUTE_ROLES)


@pytest.mark.parametrize(("caller", "role"), CALLERS, ids=[name for name, _ in CALLERS])
@pytest.mark.parametrize("op", PROTECTED, ids=route_id)
def test_each_role_reaches_only_the_routes_its_row_allows(
    role_http: Any, op: Operation, caller: str, role: Role
) -> None:
    # Given a token of this role
    headers = bearer(token_of(caller))

    # When it calls the route
    response = request(role_http, op, headers)

    # Then a role in the route's row gets past the role check (the route answers on its own
    # terms: 200, 404, 422 …), and any other role is refused with a 403 that names its role
    if role in ROUTE_ROLES[(op.method, op.path)]:
        assert response.status_code not in (401, 403), response.body
    else:
        assert response.status_code == 403
        body = json.loads(response.body)
        assert body["error"] == "forbidden"
        assert f"your role {role.value} may not {op.method} {op.path}" in body["message"]


@pytest.mark.parametrize(("caller", "role"), CALLERS, ids=[name for name, _ in CALLERS])
def test_me_tells_the_caller_its_role(role_http: Any, caller: str, role: Role) -> None:
    # When a caller asks who it is
    response = role_http.request("GET", "/me", headers=bearer(token_of(caller)), body=b"")

    # Then it learns its role (the admin UI hides what that role may not do)
    assert response.status_code == 200
    assert json.loads(response.body) == {"role": role.value, "auth_mode": "static"}


def test_the_openapi_document_shows_each_operations_roles() -> None:
    # Given the OpenAPI document
    spec = build_spec()

    # Then every protected operation lists its roles, in data and in words
    for op in PROTECTED:
        entry = spec["paths"][op.path][op.method.lower()]
        expected = sorted(ROUTE_ROLES[(op.method, op.path)])
        assert entry["x-roles"] == expected
        assert f"Roles: {', '.join(expected)};" in entry["description"]


# --- OIDC: roles from a claim ---------------------------------------------------------------------


@pytest.fixture
def oidc_role_http(aws: None, clock: FakeClock, jwks: JwksServer) -> Iterator[Any]:
    settings = oidc_settings(
        jwks.url, oidc_roles_claim="groups", oidc_role_map="sms-ops=operator,sms-read=viewer"
    )
    with running_app(Services.build(settings, clock=clock)) as http:
        yield http


def oidc_token(key: rsa.RSAPrivateKey, **extra: Any) -> str:
    return sign(key, {**claims_at(int(time.time())), **extra})


def test_an_oidc_user_gets_the_role_its_group_maps_to(
    oidc_role_http: Any, signing_key: rsa.RSAPrivateKey
) -> None:
    # Given a user in the viewers' group
    token = oidc_token(signing_key, groups=["staff", "sms-read"])

    # When it reads clients and then tries to create one
    read = oidc_role_http.request("GET", "/clients", headers=bearer(token), body=b"")
    create = request(
        oidc_role_http, next(o for o in PROTECTED if o.name == "create_client"), bearer(token)
    )

    # Then it may read, and creating is refused with a 403 naming its role
    assert read.status_code == 200
    assert create.status_code == 403
    assert "your role viewer may not" in json.loads(create.body)["message"]


def test_an_oidc_user_without_a_mapped_group_gets_nothing(
    oidc_role_http: Any, signing_key: rsa.RSAPrivateKey
) -> None:
    # Given a user the identity provider signs in, but in no mapped group
    token = oidc_token(signing_key, groups=["staff"])

    # When it reads anything
    response = oidc_role_http.request("GET", "/me", headers=bearer(token), body=b"")

    # Then it is refused
    assert response.status_code == 403


@pytest.mark.parametrize(
    ("claim", "expected"),
    [
        (["sms-ops", "sms-admins"], Role.ADMIN),
        ("openid sms-ops", Role.OPERATOR),
        (["other"], None),
        ("", None),
        (None, None),
        (42, None),
    ],
    ids=[
        "widest-of-several",
        "space-separated-scope",
        "unmapped",
        "empty",
        "missing",
        "not-a-list",
    ],
)
def test_a_roles_claim_maps_to_the_widest_mapped_role(claim: object, expected: Role | None) -> None:
    # Given a mapping from group names to roles
    role_map = parse_role_map("sms-admins=admin,sms-ops=operator")

    # When a token's claim is mapped
    # Then the widest mapped role wins, and no mapped value means no role
    assert role_from_claim(claim, role_map) == expected


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("boss:token-0123456789abcdef", "role must be one of"),
        ("viewer:token:0123456789abcdef", "may not hold ':'"),
        ("viewer:short", "at least 16 characters"),
    ],
    ids=["unknown-role", "colon-in-token", "short-token"],
)
def test_a_bad_token_entry_stops_the_start_with_a_clear_error(entry: str, message: str) -> None:
    # When the settings hold a bad ROLE:TOKEN entry
    # Then they are refused at start, saying why
    with pytest.raises(ValueError, match=message):
        Settings(table_prefix="sms-test", api_tokens=(entry,))


def test_the_local_demo_uses_a_token_whose_role_may_write() -> None:
    from devstack.stack import _writing_token

    # Given a local stack whose first token is a narrow metrics token
    settings = Settings(
        table_prefix="sms-test",
        api_tokens=(
            f"metrics:{ROLE_TOKENS[Role.METRICS]}",
            f"operator:{ROLE_TOKENS[Role.OPERATOR]}",
        ),
    )

    # Then the demo (which creates clients and a mailing) sends the operator's bare token
    assert _writing_token(settings) == ROLE_TOKENS[Role.OPERATOR]


def test_the_api_guide_shows_the_same_table() -> None:
    # Given the route table in docs/api.md, section Roles
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(GET|POST|PUT|PATCH|DELETE) (\S+)` \| ([a-z, ]+) \|$", text, re.M)
    documented = {(method, path): frozenset(roles.split(", ")) for method, path, roles in rows}

    # Then it says what the code enforces, route by route
    assert documented == {key: frozenset(r.value for r in v) for key, v in ROUTE_ROLES.items()}
