"""Bearer-token verification: static tokens, OIDC JWTs, and the JWKS they are checked against."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chalicelib.auth import (
    AuthError,
    LoadedTokenVerifier,
    OidcVerifier,
    Principal,
    StaticTokenVerifier,
    build_verifier,
    parse_bearer,
)
from chalicelib.settings import AuthMode, Settings, SettingsError
from tests.support.oidc import (
    AUDIENCE,
    ISSUER,
    KID,
    JwksServer,
    claims_at,
    hand_made_token,
    public_jwk,
    sign,
    unused_local_url,
)

ROTATED_KID = "key-2"
NOW = 1_700_000_000.0
STATIC_TOKEN = "s3cr3t-static-token-0123456789"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims at NOW; an override of None removes that claim."""
    return claims_at(int(NOW), **overrides)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def verifier(jwks: JwksServer, clock: FakeClock) -> OidcVerifier:
    return OidcVerifier(ISSUER, AUDIENCE, jwks.url, clock=clock, timeout_seconds=1.0)


# --- static tokens ---------------------------------------------------------------------------


def test_a_configured_static_token_is_accepted_under_a_non_secret_subject() -> None:
    # Given a verifier configured with two tokens
    verifier = StaticTokenVerifier(["another-token-abcdefghijkl", STATIC_TOKEN])

    # When the second one is presented
    principal = verifier.verify(STATIC_TOKEN)

    # Then the caller is authenticated under a subject that does not reveal the token
    digest = hashlib.sha256(STATIC_TOKEN.encode()).hexdigest()
    assert principal == Principal(subject=f"static:{digest[:8]}", mode="static")
    assert STATIC_TOKEN not in principal.subject


def test_a_wrong_static_token_is_rejected() -> None:
    # Given a verifier configured with one token
    verifier = StaticTokenVerifier([STATIC_TOKEN])

    # When a token differing in its last character is presented
    # Then it is rejected
    with pytest.raises(AuthError):
        verifier.verify(STATIC_TOKEN[:-1] + "X")


@pytest.mark.parametrize("token", [STATIC_TOKEN, "", "anything-at-all-0123456789"])
def test_without_configured_tokens_every_token_is_rejected(token: str) -> None:
    # Given a verifier with no tokens configured
    verifier = StaticTokenVerifier([])

    # When any token is presented
    # Then it is rejected
    with pytest.raises(AuthError):
        verifier.verify(token)


# --- parse_bearer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "Bearer abc.def-ghi",
        "bearer abc.def-ghi",
        "BEARER abc.def-ghi",
        "  Bearer   abc.def-ghi \r\n",
    ],
)
def test_a_bearer_header_yields_its_token(header: str) -> None:
    # Given an Authorization header with the Bearer scheme in any case and spacing
    # When it is parsed
    # Then the token comes back without the scheme or whitespace
    assert parse_bearer(header) == "abc.def-ghi"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "   ",
        "Bearer",
        "Bearer    ",
        "Basic dXNlcjpwYXNz",
        "Token abc",
        "abc.def-ghi",
        "Bearer abc def",
        "Bearer abc\x00def",
        "Bearer t\u00f6ken",
        "Bearer " + "a" * (8 * 1024),
    ],
    ids=[
        "missing",
        "empty",
        "blank",
        "scheme-only",
        "scheme-and-spaces",
        "basic",
        "other-scheme",
        "no-scheme",
        "two-tokens",
        "control-char",
        "non-ascii",
        "over-8KiB",
    ],
)
def test_an_unusable_authorization_header_is_rejected(header: str | None) -> None:
    # Given a header that does not carry exactly one bearer token
    # When it is parsed
    # Then the caller is refused
    with pytest.raises(AuthError):
        parse_bearer(header)


def test_a_header_of_exactly_8kib_is_still_accepted() -> None:
    # Given a header at the size limit
    token = "a" * (8 * 1024 - len("Bearer "))

    # When it is parsed
    # Then the token comes back
    assert parse_bearer("Bearer " + token) == token


# --- OIDC tokens -------------------------------------------------------------------------------


def test_a_valid_oidc_token_authenticates_its_subject(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    # Given a token signed by the issuer's published key
    token = sign(signing_key, claims())

    # When it is verified
    principal = verifier.verify(token)

    # Then the caller is its subject
    assert principal == Principal(subject="user-42", mode="oidc")


def test_an_expired_token_is_rejected(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    # Given a token whose expiry passed longer ago than the leeway
    token = sign(signing_key, claims(exp=int(NOW) + 300))
    clock.advance(300 + 31)

    # When it is verified
    # Then it is rejected as expired
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(token)


def test_a_token_expired_within_the_leeway_is_accepted(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    # Given a token that expired a few seconds ago, within the clock-skew leeway
    token = sign(signing_key, claims(exp=int(NOW) + 300))
    clock.advance(300 + 10)

    # When it is verified
    # Then it is still accepted
    assert verifier.verify(token).subject == "user-42"


def test_a_token_not_yet_valid_is_rejected(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    # Given a token whose nbf lies beyond the leeway in the future
    token = sign(signing_key, claims(nbf=int(NOW) + 120))

    # When it is verified
    # Then it is rejected as not yet valid
    with pytest.raises(AuthError, match="not yet valid"):
        verifier.verify(token)


def test_a_token_from_another_issuer_is_rejected(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    # Given a correctly signed token naming a different issuer
    token = sign(signing_key, claims(iss="https://evil.example.test/"))

    # When it is verified
    # Then it is rejected for its issuer
    with pytest.raises(AuthError, match="issuer"):
        verifier.verify(token)


def test_a_token_for_another_audience_is_rejected(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    # Given a correctly signed token meant for another service
    token = sign(signing_key, claims(aud="billing-service"))

    # When it is verified
    # Then it is rejected for its audience
    with pytest.raises(AuthError, match="audience"):
        verifier.verify(token)


def test_a_token_whose_audience_list_includes_ours_is_accepted(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    # Given a token addressed to several audiences, ours among them
    token = sign(signing_key, claims(aud=["billing-service", AUDIENCE]))

    # When it is verified
    # Then it is accepted
    assert verifier.verify(token).subject == "user-42"


def test_an_unsigned_token_is_rejected(verifier: OidcVerifier, jwks: JwksServer) -> None:
    # Given a token with alg "none" and no signature
    token = hand_made_token({"alg": "none", "typ": "JWT", "kid": KID}, claims(), secret=None)

    # When it is verified
    # Then it is rejected without even fetching keys
    with pytest.raises(AuthError, match="algorithm"):
        verifier.verify(token)
    assert jwks.fetches == 0


def test_an_rs256_token_with_its_signature_stripped_is_rejected(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    # Given a genuine token whose signature segment was removed
    header_and_payload = sign(signing_key, claims()).rsplit(".", 1)[0]

    # When it is verified
    # Then it is rejected
    with pytest.raises(AuthError):
        verifier.verify(header_and_payload + ".")


def test_an_hs256_token_keyed_with_the_public_key_is_rejected(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    # Given an algorithm-confusion token: HMAC-signed with the issuer's public key as secret
    public_pem = signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = hand_made_token({"alg": "HS256", "typ": "JWT", "kid": KID}, claims(), public_pem)

    # When it is verified
    # Then it is rejected
    with pytest.raises(AuthError, match="algorithm"):
        verifier.verify(token)


def test_a_token_signed_by_another_key_is_rejected(
    verifier: OidcVerifier, other_key: rsa.RSAPrivateKey
) -> None:
    # Given a token naming the issuer's kid but signed by an attacker's RSA key
    token = sign(other_key, claims(), kid=KID)

    # When it is verified
    # Then its signature is refused
    with pytest.raises(AuthError, match="signature"):
        verifier.verify(token)


@pytest.mark.parametrize("missing", ["sub", "exp", "iat", "iss", "aud"])
def test_a_token_missing_a_required_claim_is_rejected(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey, missing: str
) -> None:
    # Given a correctly signed token without one required claim
    token = sign(signing_key, claims(**{missing: None}))

    # When it is verified
    # Then it is rejected naming the missing claim
    with pytest.raises(AuthError, match=missing):
        verifier.verify(token)


# --- JWKS fetching, caching and rotation -------------------------------------------------------


def test_the_jwks_is_fetched_once_and_reused_while_cached(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey, jwks: JwksServer, clock: FakeClock
) -> None:
    # Given a verifier that has verified one token
    token = sign(signing_key, claims(exp=int(NOW) + 3600))
    verifier.verify(token)

    # When more tokens arrive within the cache lifetime
    clock.advance(299)
    verifier.verify(token)
    verifier.verify(token)

    # Then the JWKS was downloaded only once
    assert jwks.fetches == 1


def test_the_jwks_is_fetched_again_once_the_cache_expires(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey, jwks: JwksServer, clock: FakeClock
) -> None:
    # Given a verifier whose cached JWKS has reached its lifetime
    token = sign(signing_key, claims(exp=int(NOW) + 3600))
    verifier.verify(token)
    clock.advance(300)

    # When another token arrives
    verifier.verify(token)

    # Then the JWKS is downloaded again
    assert jwks.fetches == 2


def test_a_rotated_key_is_picked_up_by_one_refetch(
    verifier: OidcVerifier,
    signing_key: rsa.RSAPrivateKey,
    other_key: rsa.RSAPrivateKey,
    jwks: JwksServer,
    clock: FakeClock,
) -> None:
    # Given a verifier that cached the JWKS, after which the issuer rotated to a new key
    verifier.verify(sign(signing_key, claims()))
    jwks.serve({"keys": [public_jwk(signing_key, KID), public_jwk(other_key, ROTATED_KID)]})
    clock.advance(31)

    # When a token signed with the new key arrives
    principal = verifier.verify(sign(other_key, claims(), kid=ROTATED_KID))

    # Then it is accepted after exactly one more download
    assert principal.subject == "user-42"
    assert jwks.fetches == 2


def test_unknown_kids_refetch_the_jwks_at_most_once_per_30_seconds(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey, jwks: JwksServer, clock: FakeClock
) -> None:
    # Given a verifier that has just fetched the JWKS
    verifier.verify(sign(signing_key, claims()))

    # When tokens with unknown kids keep arriving within 30 seconds
    for seconds in range(5):
        clock.now = NOW + seconds * 7
        with pytest.raises(AuthError, match="unknown"):
            verifier.verify(sign(signing_key, claims(), kid=f"forged-{seconds}"))

    # Then the JWKS was downloaded only once, and again only after 30 seconds
    assert jwks.fetches == 1
    clock.now = NOW + 30
    with pytest.raises(AuthError, match="unknown"):
        verifier.verify(sign(signing_key, claims(), kid="forged-late"))
    assert jwks.fetches == 2


def test_an_unreachable_jwks_url_rejects_the_token(
    signing_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    # Given a verifier whose JWKS URL has nothing listening
    verifier = OidcVerifier(ISSUER, AUDIENCE, unused_local_url(), clock=clock, timeout_seconds=1.0)

    # When a token is verified
    # Then the caller gets an authentication error, not a crash
    with pytest.raises(AuthError, match="signing keys are unavailable"):
        verifier.verify(sign(signing_key, claims()))


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"keys": []}, 500),
        (b"<html>not json</html>", 200),
        ({"no": "keys"}, 200),
        (["keys"], 200),
    ],
    ids=["server-error", "not-json", "no-keys-member", "not-an-object"],
)
def test_a_broken_jwks_response_rejects_the_token(
    verifier: OidcVerifier,
    signing_key: rsa.RSAPrivateKey,
    jwks: JwksServer,
    body: Any,
    status: int,
) -> None:
    # Given a JWKS URL that answers with something other than a key set
    jwks.serve(body, status=status)

    # When a token is verified
    # Then the caller gets an authentication error
    with pytest.raises(AuthError, match="signing keys are unavailable"):
        verifier.verify(sign(signing_key, claims()))


def test_a_failed_jwks_fetch_is_not_retried_for_30_seconds(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey, jwks: JwksServer, clock: FakeClock
) -> None:
    # Given a JWKS URL that failed once
    jwks.serve(b"oops", status=503)
    token = sign(signing_key, claims(exp=int(NOW) + 3600))
    with pytest.raises(AuthError):
        verifier.verify(token)

    # When it recovers and tokens arrive within 30 seconds, then later
    jwks.serve({"keys": [public_jwk(signing_key, KID)]})
    clock.advance(29)
    with pytest.raises(AuthError):
        verifier.verify(token)
    clock.advance(1)
    principal = verifier.verify(token)

    # Then it was only asked again once 30 seconds had passed
    assert principal.subject == "user-42"
    assert jwks.fetches == 2


# --- what error messages reveal ----------------------------------------------------------------


def test_static_token_errors_never_contain_the_token() -> None:
    # Given a verifier and a near-miss token
    verifier = StaticTokenVerifier([STATIC_TOKEN])
    presented = STATIC_TOKEN[:-1] + "X"

    # When it is rejected
    with pytest.raises(AuthError) as raised:
        verifier.verify(presented)

    # Then neither the presented nor the configured token shows in the message
    assert presented not in str(raised.value)
    assert STATIC_TOKEN not in str(raised.value)
    assert STATIC_TOKEN[:8] not in str(raised.value)


@pytest.mark.parametrize(
    "make_token",
    [
        lambda key: sign(key, claims(exp=int(NOW) - 3600)),
        lambda key: sign(key, claims(aud="billing-service")),
        lambda key: sign(key, claims(sub=None)),
        lambda key: sign(key, claims(), kid="forged"),
        lambda key: sign(key, claims()) + "tampered",
        lambda key: "not.a.jwt",
        lambda key: hand_made_token({"alg": "none", "kid": KID}, claims(), secret=None),
    ],
    ids=["expired", "audience", "no-sub", "unknown-kid", "bad-signature", "garbage", "alg-none"],
)
def test_oidc_errors_never_contain_the_token(
    verifier: OidcVerifier, signing_key: rsa.RSAPrivateKey, make_token: Any
) -> None:
    # Given a token that will be rejected
    token = make_token(signing_key)

    # When it is verified
    with pytest.raises(AuthError) as raised:
        verifier.verify(token)

    # Then the message repeats no part of the token
    message = str(raised.value)
    assert all(segment not in message for segment in token.split(".") if len(segment) > 3)


def test_header_errors_never_contain_the_header() -> None:
    # Given a header carrying a secret under the wrong scheme
    header = f"Basic {STATIC_TOKEN}"

    # When it is parsed
    with pytest.raises(AuthError) as raised:
        parse_bearer(header)

    # Then the secret is not echoed
    assert STATIC_TOKEN not in str(raised.value)


# --- choosing a verifier -----------------------------------------------------------------------


def test_static_mode_builds_a_verifier_that_accepts_the_configured_tokens() -> None:
    # Given static-mode settings with one token
    settings = Settings(auth_mode=AuthMode.STATIC, api_tokens=(STATIC_TOKEN,))

    # When the verifier is built
    verifier = build_verifier(settings)

    # Then it accepts that token
    assert verifier.verify(STATIC_TOKEN).mode == "static"


def test_a_token_secret_builds_a_verifier_that_loads_the_tokens_at_its_first_use() -> None:
    # Given static-mode settings naming a secret instead of tokens, and a loader for it
    settings = Settings(auth_mode=AuthMode.STATIC, api_tokens_secret_id="sms/prod/api-tokens")
    loads: list[str] = []

    def load() -> list[str]:
        loads.append(settings.api_tokens_secret_id or "")
        return [STATIC_TOKEN]

    # When the verifier is built, then used twice
    verifier = build_verifier(settings, load_tokens=load)
    built_loads = len(loads)
    principals = [verifier.verify(STATIC_TOKEN), verifier.verify(STATIC_TOKEN)]

    # Then building read nothing, the first use read the secret once, and the token is accepted
    assert isinstance(verifier, LoadedTokenVerifier)
    assert built_loads == 0
    assert loads == ["sms/prod/api-tokens"]
    assert {principal.mode for principal in principals} == {"static"}
    # A secret is named but nothing can read it: refused while building, not at a request
    with pytest.raises(SettingsError, match="API_TOKENS_SECRET_ID"):
        build_verifier(settings)


def test_a_loader_failing_unexpectedly_denies_and_logs_only_the_kind_of_failure(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a token loader that fails in a way nobody planned for, with a token in its message
    def load() -> list[str]:
        raise RuntimeError(f"could not parse {STATIC_TOKEN}")

    verifier = LoadedTokenVerifier(load, clock=clock, retry_seconds=30)

    # When a token is presented
    with pytest.raises(AuthError, match="API tokens are unavailable"):
        verifier.verify(STATIC_TOKEN)

    # Then the request is denied and the log names the failure's type, not its text
    assert "RuntimeError" in caplog.text
    assert STATIC_TOKEN not in caplog.text


def test_a_failed_load_is_retried_only_after_the_retry_interval(clock: FakeClock) -> None:
    # Given a loader that fails once, then succeeds
    answers: list[Any] = [SettingsError("API_TOKENS_SECRET_ID: the secret holds no token")]

    def load() -> list[str]:
        calls.append(clock())
        if answers:
            raise answers.pop()
        return [STATIC_TOKEN]

    calls: list[float] = []
    verifier = LoadedTokenVerifier(load, clock=clock, retry_seconds=30)

    # When tokens are presented now, 29 s later and 30 s later
    outcomes = []
    for step in (0, 29, 1):
        clock.advance(step)
        try:
            outcomes.append(verifier.verify(STATIC_TOKEN).mode)
        except AuthError:
            outcomes.append("denied")

    # Then the failure is not retried before 30 s, and the retry then lets the token through
    assert outcomes == ["denied", "denied", "static"]
    assert calls == [NOW, NOW + 30]


def test_a_failed_re_read_denies_rather_than_keeping_a_possibly_revoked_list(
    clock: FakeClock,
) -> None:
    # Given a verifier that loaded a token, and a secret that then cannot be read
    answers: list[Any] = [[STATIC_TOKEN], SettingsError("API_TOKENS_SECRET_ID: access denied")]

    def load() -> list[str]:
        answer = answers.pop(0) if answers else [STATIC_TOKEN]
        if isinstance(answer, Exception):
            raise answer
        return answer

    verifier = LoadedTokenVerifier(load, clock=clock, retry_seconds=30, refresh_seconds=300)
    first = verifier.verify(STATIC_TOKEN)

    # When the refresh interval has passed and the re-read fails
    clock.advance(300)
    # Then the token is denied until a read succeeds (30 s later)
    with pytest.raises(AuthError, match="API tokens are unavailable"):
        verifier.verify(STATIC_TOKEN)
    clock.advance(30)
    assert first.mode == verifier.verify(STATIC_TOKEN).mode == "static"


def test_narrow_static_tokens_carry_their_role_and_a_plain_token_is_an_admin() -> None:
    # Given a metrics token and a plain one
    verifier = StaticTokenVerifier([f"metrics:{STATIC_TOKEN}", "another-token-abcdefghijkl"])

    # When each is presented
    # Then the narrow one is a metrics caller and the plain one an admin
    assert verifier.verify(STATIC_TOKEN).role == "metrics"
    assert verifier.verify("another-token-abcdefghijkl").role == "admin"
    # And the role prefix alone is not the token
    with pytest.raises(AuthError):
        verifier.verify(f"metrics:{STATIC_TOKEN}")


def test_oidc_mode_builds_a_verifier_that_checks_the_issuer_jwks(
    jwks: JwksServer, signing_key: rsa.RSAPrivateKey
) -> None:
    # Given OIDC settings pointing at the issuer's JWKS
    settings = Settings(
        auth_mode=AuthMode.OIDC,
        oidc_issuer=ISSUER,
        oidc_audience=AUDIENCE,
        oidc_jwks_url=jwks.url,
    )

    # When the verifier is built and sees a token valid right now
    verifier = build_verifier(settings)
    now = int(time.time())
    principal = verifier.verify(sign(signing_key, claims(iat=now, exp=now + 60)))

    # Then it authenticates the token's subject from the issuer's keys
    assert principal == Principal(subject="user-42", mode="oidc")
    assert jwks.fetches == 1
