"""Authentication as a caller meets it: the real Chalice app, its authorizer, and moto behind it."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from chalice.test import Client
from cryptography.hazmat.primitives.asymmetric import rsa

from app import app
from chalicelib import logs
from chalicelib.api.http import OPERATIONS, Operation
from chalicelib.auth import LoadedTokenVerifier
from chalicelib.container import Services, use_services
from chalicelib.secrets import Secrets
from chalicelib.settings import Settings, get_settings
from chalicelib.storage.models import create_tables
from tests.conftest import API_TOKEN, AUTH, Api, FakeClock
from tests.support.oidc import (
    AUDIENCE,
    ISSUER,
    KID,
    JwksServer,
    claims_at,
    sign,
    unsigned_token,
    unused_local_url,
)

WRONG_TOKEN = API_TOKEN[:-1] + ("X" if API_TOKEN[-1] != "X" else "Y")

PROTECTED = [op for op in OPERATIONS if not op.public]
PUBLIC_PATHS = ["/health", "/docs", "/openapi.json"]
# The documentation page also loads its assets without a token; the admin UI's page, assets and
# sign-in configuration load before anyone has signed in (docs/api.md, "Authentication").
ADMIN_PATHS = ["/admin", "/admin/assets/{name}", "/admin/config.json"]
PUBLIC_ROUTES = {("GET", path) for path in [*PUBLIC_PATHS, "/docs/assets/{name}", *ADMIN_PATHS]}


def route_id(op: Operation) -> str:
    return f"{op.method} {op.path}"


def concrete_path(op: Operation) -> str:
    """The route's path with a fresh random id in every path parameter."""
    path = op.path
    for name in op.path_params:
        path = path.replace("{" + name + "}", str(uuid.uuid4()))
    return path


def request(http: Any, op: Operation, headers: dict[str, str]) -> Any:
    # A plausible JSON body, so a rejection can only come from the authorizer, not from parsing.
    body = b"{}" if op.body is not None else b""
    all_headers = {"Content-Type": "application/json", **headers}
    return http.request(op.method, concrete_path(op), headers=all_headers, body=body)


def text_of(response: Any) -> str:
    """Everything a caller can read in a response: status line aside, headers and body."""
    body = response.body.decode("utf-8", "replace") if response.body else ""
    return json.dumps(dict(response.headers or {})) + body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def claims(**overrides: Any) -> dict[str, Any]:
    """Claims valid right now (the verifier reads the wall clock); overrides replace them."""
    return claims_at(int(time.time()), **overrides)


@contextmanager
def running_app(services: Services) -> Iterator[Any]:
    """The real app in a Chalice test client, serving `services` on the moto world."""
    create_tables(services.models)
    use_services(services)
    try:
        with Client(app, stage_name="dev") as client:
            yield client.http
    finally:
        use_services(None)


def oidc_settings(jwks_url: str, **extra: Any) -> Settings:
    return Settings(
        table_prefix="sms-test",
        auth_mode="oidc",
        oidc_issuer=ISSUER,
        oidc_audience=AUDIENCE,
        oidc_jwks_url=jwks_url,
        **extra,
    )


@pytest.fixture
def oidc_http(aws: None, clock: FakeClock, jwks: JwksServer) -> Iterator[Any]:
    """The app in OIDC mode, trusting the keys the local JWKS server publishes."""
    with running_app(Services.build(oidc_settings(jwks.url), clock=clock)) as http:
        yield http


# --- static tokens -------------------------------------------------------------------------------


def test_only_health_and_documentation_routes_are_left_without_the_authorizer() -> None:
    # Given the routes the app registers with Chalice
    registered = {
        (method, path): entry
        for path, methods in app.routes.items()
        for method, entry in methods.items()
    }

    # When those without an authorizer are picked out
    unguarded = {key for key, entry in registered.items() if entry.authorizer is None}

    # Then they are exactly the public ones, and the operations enumerated below cover every route
    assert unguarded == PUBLIC_ROUTES
    assert {(op.method, op.path) for op in PROTECTED} == set(registered) - PUBLIC_ROUTES


@pytest.mark.parametrize("op", PROTECTED, ids=route_id)
def test_a_protected_route_answers_401_without_an_authorization_header(
    api: Api, op: Operation
) -> None:
    # Given the app in static-token mode
    # When a protected route is called with no Authorization header
    response = request(api.http, op, headers={})

    # Then the caller is told to authenticate, and learns nothing of the configured token
    assert response.status_code == 401
    assert API_TOKEN not in text_of(response)


@pytest.mark.parametrize("op", PROTECTED, ids=route_id)
def test_a_protected_route_answers_403_to_a_wrong_token(api: Api, op: Operation) -> None:
    # Given the app in static-token mode
    # When a protected route is called with a token one character off the configured one
    response = request(api.http, op, headers=bearer(WRONG_TOKEN))

    # Then access is refused, and neither token is echoed back
    assert response.status_code == 403
    assert API_TOKEN not in text_of(response)
    assert WRONG_TOKEN not in text_of(response)


@pytest.mark.parametrize(
    "authorization",
    [f"Basic {API_TOKEN}", API_TOKEN, f"Bearer {API_TOKEN} extra", "Bearer", ""],
    ids=["basic-scheme", "no-scheme", "two-tokens", "scheme-only", "empty"],
)
def test_the_right_token_in_an_unusable_header_is_refused(api: Api, authorization: str) -> None:
    # Given the app in static-token mode
    # When the configured token arrives in a header that is not a single bearer token
    response = api.get("/clients", headers={"Authorization": authorization})

    # Then access is refused rather than guessed at
    assert response.status_code in (401, 403)
    assert API_TOKEN not in text_of(response)


@pytest.mark.parametrize("path", PUBLIC_PATHS)
def test_a_public_route_answers_without_a_token(api: Api, path: str) -> None:
    # Given the app in static-token mode
    # When a public route is called with no Authorization header
    response = api.get(path, headers={})

    # Then it answers
    assert response.status_code == 200


def test_the_configured_token_reaches_the_route(api: Api) -> None:
    # Given the app in static-token mode
    # When a protected route is called with the configured token
    response = api.get("/clients", headers=AUTH)

    # Then the route answers with its content
    assert response.status_code == 200
    assert json.loads(response.body)["items"] == []


# --- static tokens from Secrets Manager (how AWS configures them) --------------------------------

SECRET_TOKEN = "secret-token-0123456789abcdef"
OTHER_SECRET_TOKEN = "other-secret-token-fedcba9876543210"


def stored_secret(value: str, name: str = "sms-test/api-tokens") -> str:
    """Given: the API tokens stored in (moto's) Secrets Manager; returns the secret's ARN."""
    import boto3

    client = boto3.client("secretsmanager", region_name="us-east-1")
    return client.create_secret(Name=name, SecretString=value)["ARN"]


def secret_settings(secret_id: str) -> Settings:
    """What the stack gives the authorizer: no API_TOKENS, only the secret's ARN."""
    return Settings(table_prefix="sms-test", auth_mode="static", api_tokens_secret_id=secret_id)


@pytest.fixture
def secret_reads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The parameters of every GetSecretValue call made through botocore."""
    import botocore.client

    reads: list[dict[str, Any]] = []
    original = botocore.client.BaseClient._make_api_call

    def recording(self: Any, operation_name: str, api_params: dict) -> Any:
        if operation_name == "GetSecretValue":
            reads.append(api_params)
        return original(self, operation_name, api_params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", recording)
    return reads


@pytest.fixture
def service_logs(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[io.StringIO, Any]]:
    """The JSON lines the service writes (redacted, as in Lambda) and the raw records."""
    stream = io.StringIO()
    logs.configure(level="INFO", stream=stream)
    caplog.set_level(logging.INFO)
    yield stream, caplog
    logs.reset()


def raw_log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every record as the code logged it, before any redaction."""
    return "\n".join(
        f"{record.getMessage()} {json.dumps(record.__dict__, default=str)}"
        for record in caplog.records
    )


@pytest.mark.parametrize(
    "stored",
    [
        f"{SECRET_TOKEN},{OTHER_SECRET_TOKEN}",
        f" {SECRET_TOKEN} ,\n{OTHER_SECRET_TOKEN}\n",
        json.dumps({"tokens": [SECRET_TOKEN, OTHER_SECRET_TOKEN]}),
    ],
    ids=["comma-separated", "spaces-and-line-breaks-around", "json"],
)
def test_tokens_stored_in_secrets_manager_reach_the_route(
    aws: None, clock: FakeClock, stored: str
) -> None:
    # Given the authorizer configured as the stack does: only the ARN of a secret with two tokens
    settings = secret_settings(stored_secret(stored))

    with running_app(Services.build(settings, clock=clock)) as http:
        # When a protected route is called with each stored token, and with a wrong one
        answers = [
            http.request("GET", "/clients", headers=bearer(token), body=b"").status_code
            for token in (SECRET_TOKEN, OTHER_SECRET_TOKEN, WRONG_TOKEN)
        ]

    # Then both stored tokens are let through and the wrong one is refused
    assert answers == [200, 200, 403]


def test_the_secret_is_read_once_within_the_refresh_interval(
    aws: None, clock: FakeClock, secret_reads: list[dict[str, Any]]
) -> None:
    # Given the authorizer reading its tokens from a secret
    arn = stored_secret(SECRET_TOKEN)
    settings = secret_settings(arn)
    services = Services.build(settings, clock=clock)
    assert secret_reads == []  # building the services reads nothing

    with running_app(services) as http:
        # When several requests arrive, and the secret changes meanwhile
        first = [
            http.request("GET", "/clients", headers=bearer(SECRET_TOKEN), body=b"").status_code
            for _ in range(3)
        ]
        import boto3

        boto3.client("secretsmanager", region_name="us-east-1").put_secret_value(
            SecretId=arn, SecretString=OTHER_SECRET_TOKEN
        )
        later = http.request("GET", "/clients", headers=bearer(SECRET_TOKEN), body=b"")

    # Then the secret was read once, at the first request, and its value kept (the refresh
    # interval, API_TOKENS_REFRESH_SECONDS, has not passed)
    assert first == [200, 200, 200]
    assert later.status_code == 200
    assert secret_reads == [{"SecretId": arn}]

    # And the next cold start reads the new value: the old token is refused, the new one passes
    with running_app(Services.build(settings, clock=clock)) as http:
        old = http.request("GET", "/clients", headers=bearer(SECRET_TOKEN), body=b"")
        new = http.request("GET", "/clients", headers=bearer(OTHER_SECRET_TOKEN), body=b"")
    assert (old.status_code, new.status_code) == (403, 200)
    assert len(secret_reads) == 2


def test_api_tokens_win_over_the_secret(
    aws: None, clock: FakeClock, secret_reads: list[dict[str, Any]]
) -> None:
    # Given API_TOKENS set beside API_TOKENS_SECRET_ID
    settings = secret_settings(stored_secret(SECRET_TOKEN)).model_copy(
        update={"api_tokens": (API_TOKEN,)}
    )

    with running_app(Services.build(settings, clock=clock)) as http:
        # When a protected route is called with each token
        answers = [
            http.request("GET", "/clients", headers=bearer(token), body=b"").status_code
            for token in (API_TOKEN, SECRET_TOKEN)
        ]

    # Then only API_TOKENS count, and the secret is never read
    assert answers == [200, 403]
    assert secret_reads == []


@pytest.mark.parametrize(
    ("stored", "reason"),
    [
        (None, "the secret cannot be read (An error occurred (ResourceNotFoundException)"),
        ("  \n", "the secret holds no token"),
        (" , ,", "the secret holds no token"),
        (f"{SECRET_TOKEN},short-token", "at least 16 characters"),
        (f"{SECRET_TOKEN} {OTHER_SECRET_TOKEN}", "only visible ASCII characters"),
        (json.dumps({"token": SECRET_TOKEN}), 'needs a "tokens" key holding a list of strings'),
        (json.dumps({"tokens": SECRET_TOKEN}), 'needs a "tokens" key holding a list of strings'),
        ("{" + SECRET_TOKEN, 'needs a "tokens" key holding a list of strings'),
    ],
    ids=[
        "missing",
        "blank",
        "only-commas",
        "a-short-token",
        "a-space-inside",
        "json-without-tokens",
        "json-tokens-not-a-list",
        "broken-json",
    ],
)
def test_an_unusable_secret_denies_every_request_and_logs_why_without_a_token(
    aws: None,
    clock: FakeClock,
    service_logs: tuple[io.StringIO, Any],
    stored: str | None,
    reason: str,
) -> None:
    # Given the authorizer pointed at a secret that is missing or holds no usable token list
    arn = (
        stored_secret(stored)
        if stored is not None
        else "arn:aws:secretsmanager:us-east-1:123456789012:secret:sms-test/none-AbC123"
    )
    stream, caplog = service_logs

    with running_app(Services.build(secret_settings(arn), clock=clock)) as http:
        # When protected routes are called, with tokens that are (or look like) the stored ones
        answers = [
            http.request("GET", "/clients", headers=bearer(token), body=b"").status_code
            for token in (SECRET_TOKEN, OTHER_SECRET_TOKEN, API_TOKEN)
        ]

    # Then every request is refused (403, never a 5xx)
    assert answers == [403, 403, 403]
    # And the log says why, naming the setting, and holds no token, not even before redaction
    [line] = [
        json.loads(text)
        for text in stream.getvalue().splitlines()
        if "API tokens cannot be loaded" in text
    ]
    assert line["level"] == "ERROR"
    assert "API_TOKENS_SECRET_ID: " in line["message"]
    assert reason in line["message"]
    for token in (SECRET_TOKEN, OTHER_SECRET_TOKEN, "short-token"):
        assert token not in stream.getvalue()
        assert token not in raw_log_text(caplog)


def test_the_tokens_read_from_the_secret_are_never_logged(
    aws: None, clock: FakeClock, service_logs: tuple[io.StringIO, Any]
) -> None:
    # Given the authorizer has read its tokens from the secret
    settings = secret_settings(stored_secret(f"{SECRET_TOKEN},{OTHER_SECRET_TOKEN}"))
    stream, _ = service_logs
    with running_app(Services.build(settings, clock=clock)) as http:
        response = http.request("GET", "/clients", headers=bearer(SECRET_TOKEN), body=b"")
    assert response.status_code == 200

    # When any code later logs a text holding one of them
    logging.getLogger("chalicelib.test").warning("header was Token %s", OTHER_SECRET_TOKEN)

    # Then the line carries no token: each was registered as a secret when it was read
    assert OTHER_SECRET_TOKEN not in stream.getvalue()
    assert SECRET_TOKEN not in stream.getvalue()
    assert logs.REDACTED in stream.getvalue()


def test_a_narrow_token_read_from_the_secret_is_never_logged_without_its_role(
    aws: None, clock: FakeClock, service_logs: tuple[io.StringIO, Any]
) -> None:
    # Given the authorizer has read a viewer's ROLE:TOKEN entry from the secret
    settings = secret_settings(stored_secret(f"viewer:{SECRET_TOKEN}"))
    stream, _ = service_logs
    with running_app(Services.build(settings, clock=clock)) as http:
        response = http.request("GET", "/clients", headers=bearer(SECRET_TOKEN), body=b"")
    assert response.status_code == 200

    # When any code later logs the bare token (what a caller sends)
    logging.getLogger("chalicelib.test").warning("header was Token %s", SECRET_TOKEN)

    # Then the line carries no token
    assert SECRET_TOKEN not in stream.getvalue()
    assert logs.REDACTED in stream.getvalue()


def test_a_secret_created_after_the_deploy_is_picked_up_without_a_cold_start(
    aws: None, clock: FakeClock, secret_reads: list[dict[str, Any]]
) -> None:
    # Given the authorizer deployed before its secret exists, its retries timed by a test clock
    name = "sms-test/created-later"
    settings = secret_settings(name)
    seconds = [0.0]
    verifier = LoadedTokenVerifier(
        Secrets(settings).api_tokens, clock=lambda: seconds[0], retry_seconds=30
    )
    services = replace(Services.build(settings, clock=clock), verifier=verifier)

    def status() -> int:
        return http.request("GET", "/clients", headers=bearer(SECRET_TOKEN), body=b"").status_code

    with running_app(services) as http:
        # When requests arrive before the secret exists, it is created, and requests go on
        missing = [status(), status()]
        stored_secret(SECRET_TOKEN, name=name)
        seconds[0] = 29.0
        too_soon = status()
        seconds[0] = 30.0
        after = [status(), status()]

    # Then requests are refused while it is missing, with one read per 30 s at most, and once
    # it exists the next attempt reads it and lets the token through
    assert missing == [403, 403]
    assert too_soon == 403
    assert after == [200, 200]
    assert len(secret_reads) == 2


def test_a_token_removed_from_the_secret_is_refused_after_the_refresh_interval(
    aws: None, clock: FakeClock, secret_reads: list[dict[str, Any]]
) -> None:
    import boto3

    # Given a warm authorizer that has read a secret with two tokens, its refresh timed by a
    # test clock
    arn = stored_secret(f"{SECRET_TOKEN},{OTHER_SECRET_TOKEN}")
    settings = secret_settings(arn)
    seconds = [0.0]
    verifier = LoadedTokenVerifier(
        Secrets(settings).api_tokens,
        clock=lambda: seconds[0],
        refresh_seconds=settings.api_tokens_refresh_seconds,
    )
    services = replace(Services.build(settings, clock=clock), verifier=verifier)

    def status(token: str) -> int:
        return http.request("GET", "/clients", headers=bearer(token), body=b"").status_code

    with running_app(services) as http:
        before = status(SECRET_TOKEN)
        # When the operator removes one token from the secret
        boto3.client("secretsmanager", region_name="us-east-1").put_secret_value(
            SecretId=arn, SecretString=OTHER_SECRET_TOKEN
        )
        seconds[0] = settings.api_tokens_refresh_seconds - 1.0
        just_before = status(SECRET_TOKEN)
        seconds[0] = float(settings.api_tokens_refresh_seconds)
        revoked = status(SECRET_TOKEN)
        kept = status(OTHER_SECRET_TOKEN)

    # Then it still works until the refresh interval has passed, and is refused from then on,
    # while the token left in the secret goes on working; the secret was read twice in all
    assert (before, just_before) == (200, 200)
    assert (revoked, kept) == (403, 200)
    assert len(secret_reads) == 2


# --- OIDC tokens ---------------------------------------------------------------------------------


def test_a_valid_oidc_token_reaches_the_route(
    oidc_http: Any, signing_key: rsa.RSAPrivateKey
) -> None:
    # Given the app in OIDC mode and a token signed with the issuer's published key
    token = sign(signing_key, claims())

    # When a protected route is called with it
    response = oidc_http.request("GET", "/clients", headers=bearer(token), body=b"")

    # Then the route answers with its content
    assert response.status_code == 200
    assert json.loads(response.body)["items"] == []


@pytest.mark.parametrize(
    "make_token",
    [
        lambda key, other: sign(key, claims(exp=int(time.time()) - 3600)),
        lambda key, other: sign(key, claims(iss="https://evil.example.test/")),
        lambda key, other: sign(key, claims(aud="billing-service")),
        lambda key, other: unsigned_token(claims()),
        lambda key, other: sign(other, claims(), kid=KID),
        lambda key, other: sign(key, claims(), kid="key-nobody-published"),
    ],
    ids=["expired", "wrong-issuer", "wrong-audience", "alg-none", "other-key", "unknown-kid"],
)
def test_an_invalid_oidc_token_is_refused(
    oidc_http: Any,
    signing_key: rsa.RSAPrivateKey,
    other_key: rsa.RSAPrivateKey,
    make_token: Any,
) -> None:
    # Given the app in OIDC mode and a token that must not be trusted
    token = make_token(signing_key, other_key)

    # When a protected route is called with it
    response = oidc_http.request("GET", "/clients", headers=bearer(token), body=b"")

    # Then access is refused, and the token is not echoed back
    assert response.status_code == 403
    assert token not in text_of(response)


def test_a_static_api_token_is_refused_in_oidc_mode(
    aws: None, clock: FakeClock, jwks: JwksServer
) -> None:
    # Given the app in OIDC mode, even with a static API token still configured
    settings = oidc_settings(jwks.url, api_tokens=(API_TOKEN,))

    with running_app(Services.build(settings, clock=clock)) as http:
        # When a protected route is called with that static token
        response = http.request("GET", "/clients", headers=AUTH, body=b"")

    # Then access is refused
    assert response.status_code == 403
    assert API_TOKEN not in text_of(response)


def test_an_unreachable_jwks_refuses_the_request_instead_of_failing(
    aws: None, clock: FakeClock, signing_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the app in OIDC mode whose JWKS URL has nothing listening
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    settings = oidc_settings(unused_local_url())

    with running_app(Services.build(settings, clock=clock)) as http:
        # When a protected route is called with an otherwise valid token
        response = http.request(
            "GET", "/clients", headers=bearer(sign(signing_key, claims())), body=b""
        )

    # Then access is refused, not answered with a server error
    assert response.status_code == 403


# --- a broken configuration fails closed ---------------------------------------------------------


class ExplodingVerifier:
    """A verifier broken in a way nobody planned for."""

    def verify(self, token: str) -> Any:
        raise RuntimeError("verifier misconfigured")


class NothingVerifier:
    """A verifier that breaks its contract by returning no principal."""

    def verify(self, token: str) -> Any:
        return None


@pytest.mark.parametrize(
    "broken_verifier",
    [ExplodingVerifier(), NothingVerifier()],
    ids=["crashes", "returns-no-principal"],
)
def test_a_broken_verifier_refuses_the_request(
    aws: None, settings: Settings, clock: FakeClock, broken_verifier: Any
) -> None:
    # Given the app whose verifier raises an unexpected exception, or returns no principal
    broken = replace(Services.build(settings, clock=clock), verifier=broken_verifier)

    with running_app(broken) as http:
        # When a protected route is called, even with the configured token
        response = http.request("GET", "/clients", headers=AUTH, body=b"")

    # Then access is refused, not answered with a server error
    assert response.status_code == 403


@pytest.fixture
def unbuildable_services(aws: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A deployment asking for OIDC without saying which issuer, so no services can be built."""
    monkeypatch.setenv("AUTH_MODE", "oidc")
    for name in ("OIDC_ISSUER", "OIDC_AUDIENCE", "OIDC_JWKS_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    use_services(None)
    yield
    use_services(None)
    get_settings.cache_clear()


def test_settings_that_cannot_build_a_verifier_refuse_the_request(
    unbuildable_services: None,
) -> None:
    # Given the app deployed with AUTH_MODE=oidc but no issuer, audience or JWKS URL
    with Client(app, stage_name="dev") as client:
        # When a protected route is called with a token
        response = client.http.request("GET", "/clients", headers=AUTH, body=b"")

    # Then access is refused, not answered with a server error
    assert response.status_code == 403
