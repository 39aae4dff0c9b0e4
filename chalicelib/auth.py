"""Bearer-token verification: static API tokens or OIDC-issued RS256 JWTs.

Nothing here knows about Chalice; the API layer turns AuthError into a 401.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from chalicelib.roles import ADMIN, Role, role_from_claim, split_token_entry
from chalicelib.settings import AuthMode, Settings, SettingsError

logger = logging.getLogger(__name__)

MAX_HEADER_CHARS = 8 * 1024
_MAX_JWKS_BYTES = 1024 * 1024
# Key rotation needs a refetch on an unknown kid, but a forged kid must not let anyone
# turn our API into a load generator against the identity provider.
_MIN_REFETCH_SECONDS = 30.0
_MIN_RSA_BITS = 2048
_ALGORITHM = "RS256"
_REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub")
# RFC 6750 b64token is stricter, but static tokens may hold any visible ASCII character.
_TOKEN_PATTERN = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class Principal:
    """Who made an authenticated request; safe to log."""

    subject: str
    mode: str
    role: Role = ADMIN


class AuthError(Exception):
    """The request is not authenticated; the message is safe to log and to show the caller."""


def parse_bearer(header: str | None) -> str:
    """Extract the token from an `Authorization: Bearer <token>` header value."""
    if header is None or not header.strip():
        raise AuthError("missing bearer token")
    # Checked before any parsing so a huge header costs nothing beyond its length.
    if len(header) > MAX_HEADER_CHARS:
        raise AuthError("authorization header is too long")
    parts = header.split()
    if parts[0].lower() != "bearer":
        raise AuthError("authorization header must use the Bearer scheme")
    if len(parts) != 2 or not _TOKEN_PATTERN.fullmatch(parts[1]):
        raise AuthError("malformed bearer token")
    return parts[1]


def _digest(token: str) -> bytes:
    # surrogatepass: a caller bypassing parse_bearer must get a rejection, not a crash.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class StaticTokenVerifier:
    """Accepts only tokens from a fixed, configured list; each entry is `TOKEN` (admin) or
    `ROLE:TOKEN` (settings.check_api_tokens has checked them)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        # Digests have equal length, so compare_digest does not leak a token's length.
        pairs = (split_token_entry(entry) for entry in tokens if entry)
        self._digests = tuple((_digest(token), role) for role, token in pairs if token)

    def verify(self, token: str) -> Principal:
        """Return the principal for a configured token, else raise AuthError."""
        candidate = _digest(token)
        matched: Role | None = None
        # Every configured token is compared so timing says nothing about which one matched.
        for digest, role in self._digests:
            if hmac.compare_digest(candidate, digest):
                matched = role
        if not token or matched is None:
            raise AuthError("invalid token")
        return Principal(subject=f"static:{candidate.hex()[:8]}", mode="static", role=matched)


class LoadedTokenVerifier:
    """Static tokens loaded on first use (in AWS from Secrets Manager), then read again at most
    every `refresh_seconds` (API_TOKENS_REFRESH_SECONDS), so a token removed from the secret is
    refused within that time even by a warm authorizer.

    A load that fails (a missing secret, a denied read, a bad value) denies every request and
    logs why, never a token. It is tried again at most every `retry_seconds`, so a secret
    created or fixed after the deployment is picked up without one, and a broken secret does not
    turn every request into a Secrets Manager call. A failed re-read after a good one also denies:
    the old list may hold the very token someone is revoking.
    """

    def __init__(
        self,
        load: Callable[[], Sequence[str]],
        *,
        clock: Callable[[], float] = time.monotonic,
        retry_seconds: float = _MIN_REFETCH_SECONDS,
        refresh_seconds: float = 300.0,
    ) -> None:
        self._load = load
        self._clock = clock
        self._retry_seconds = retry_seconds
        self._refresh_seconds = refresh_seconds
        self._verifier: StaticTokenVerifier | None = None
        self._loaded_at: float | None = None
        self._failed_at: float | None = None
        self._lock = threading.Lock()

    def verify(self, token: str) -> Principal:
        """Return the principal for a loaded token, else raise AuthError."""
        return self._loaded().verify(token)

    def _loaded(self) -> StaticTokenVerifier:
        with self._lock:
            if (
                self._loaded_at is not None
                and self._clock() - self._loaded_at >= self._refresh_seconds
            ):
                self._verifier = None
                self._loaded_at = None
            if self._verifier is None:
                self._try_load()
            if self._verifier is None:
                raise AuthError("API tokens are unavailable")
            return self._verifier

    def _try_load(self) -> None:
        now = self._clock()
        if self._failed_at is not None and now - self._failed_at < self._retry_seconds:
            return
        try:
            tokens = tuple(self._load())
            if not tokens:
                raise SettingsError("no API token was loaded")
        except SettingsError as exc:
            # Our own messages: they name the setting and the rule, never a token.
            self._failed(now, str(exc))
            return
        except Exception as exc:  # an injected loader may fail in any way; callers get a 403
            self._failed(now, type(exc).__name__)
            return
        self._verifier = StaticTokenVerifier(tokens)
        self._loaded_at = now
        self._failed_at = None
        logger.info("API tokens loaded", extra={"token_count": len(tokens)})

    def _failed(self, now: float, reason: str) -> None:
        self._failed_at = now
        logger.error(
            "API tokens cannot be loaded; every request is denied until they can be: %s",
            reason,
            extra={"retry_seconds": self._retry_seconds},
        )


def fetch_jwks_over_http(url: str, timeout_seconds: float) -> dict[str, Any]:
    """Download a JWKS document; any network or format problem raises AuthError."""
    try:
        with requests.get(url, timeout=timeout_seconds, stream=True) as response:
            response.raise_for_status()
            body = bytearray()
            for chunk in response.iter_content(chunk_size=64 * 1024):
                body += chunk
                # A JWKS is a few KiB; refuse to buffer whatever a misbehaving URL streams.
                if len(body) > _MAX_JWKS_BYTES:
                    raise ValueError("JWKS response is too large")
        document = json.loads(body)
    except (requests.RequestException, ValueError, OSError) as exc:
        logger.warning(
            "JWKS fetch failed", extra={"jwks_url": url, "error_type": type(exc).__name__}
        )
        raise AuthError("signing keys are unavailable") from None
    if not _looks_like_jwks(document):
        logger.warning("JWKS response is not a key set", extra={"jwks_url": url})
        raise AuthError("signing keys are unavailable")
    return document


def _looks_like_jwks(document: object) -> bool:
    return isinstance(document, dict) and isinstance(document.get("keys"), list)


def _usable_keys(document: Mapping[str, Any]) -> dict[str, jwt.PyJWK]:
    """RS256 signing keys of a JWKS by kid; other or broken entries are skipped."""
    keys: dict[str, jwt.PyJWK] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or entry.get("kty") != "RSA":
            continue
        if entry.get("use", "sig") != "sig" or entry.get("alg", _ALGORITHM) != _ALGORITHM:
            continue
        try:
            key = jwt.PyJWK(entry, algorithm=_ALGORITHM)
        except jwt.PyJWTError:
            continue
        # A JWKS entry carrying "d" is a leaked private key; short keys can be factored.
        if not isinstance(key.key, rsa.RSAPublicKey) or key.key.key_size < _MIN_RSA_BITS:
            continue
        keys[kid] = key
    return keys


def _is_time(value: object) -> bool:
    # bool is an int subclass, and NaN compares false both ways, so neither is a time.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class OidcVerifier:
    """Verifies RS256 JWTs from one OIDC issuer for one audience against its JWKS."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks_url: str,
        *,
        fetch_jwks: Callable[[str], dict] | None = None,
        clock: Callable[[], float] = time.time,
        leeway_seconds: int = 30,
        jwks_cache_seconds: int = 300,
        timeout_seconds: float = 3.0,
        roles_claim: str | None = None,
        role_map: tuple[tuple[str, Role], ...] = (),
    ) -> None:
        self._roles_claim = roles_claim
        self._role_map = role_map
        self._issuer = issuer
        self._audience = audience
        self._jwks_url = jwks_url
        self._fetch = fetch_jwks or (lambda url: fetch_jwks_over_http(url, timeout_seconds))
        self._clock = clock
        self._leeway = leeway_seconds
        self._cache_seconds = jwks_cache_seconds
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = threading.Lock()

    def verify(self, token: str) -> Principal:
        """Return the principal named by a valid token's `sub` claim, else raise AuthError."""
        # A JWT is base64url ASCII; anything else would only reach PyJWT to fail less politely.
        if not token or len(token) > MAX_HEADER_CHARS or not token.isascii():
            raise AuthError("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        # Decided before any key lookup so `none` and HMAC tokens never reach the JWKS.
        if header.get("alg") != _ALGORITHM:
            raise AuthError("token algorithm is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("token does not name its signing key")
        key = self._signing_key(kid)
        claims = self._decode(token, key)
        self._check_times(claims)
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise AuthError("token subject is invalid")
        return Principal(subject=subject, mode="oidc", role=self._role(claims))

    def _role(self, claims: Mapping[str, Any]) -> Role:
        # Without a roles claim configured every signed-in user is admin, as before roles.
        if self._roles_claim is None:
            return ADMIN
        role = role_from_claim(claims.get(self._roles_claim), self._role_map)
        if role is None:
            raise AuthError(f"token's {self._roles_claim} claim maps to no role")
        return role

    def _decode(self, token: str, key: jwt.PyJWK) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key=key,
                algorithms=[_ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                # PyJWT reads the wall clock; times are checked in _check_times against ours.
                options={
                    "require": list(_REQUIRED_CLAIMS),
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature is invalid") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer is not accepted") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience is not accepted") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm is not accepted") from None
        except jwt.PyJWTError:
            raise AuthError("token is invalid") from None

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        for name in ("exp", "iat", "nbf"):
            if name in claims and not _is_time(claims[name]):
                raise AuthError(f"token {name} claim is not a time")
        if claims["exp"] <= now - self._leeway:
            raise AuthError("token has expired")
        if "nbf" in claims and claims["nbf"] > now + self._leeway:
            raise AuthError("token is not yet valid")
        if claims["iat"] > now + self._leeway:
            raise AuthError("token was issued in the future")

    def _signing_key(self, kid: str) -> jwt.PyJWK:
        with self._lock:
            now = self._clock()
            if not self._keys_are_fresh(now) or kid not in self._keys:
                self._refresh(now)
            # Keys older than the cache lifetime may have been revoked; never trust them.
            if not self._keys_are_fresh(now):
                raise AuthError("signing keys are unavailable")
            key = self._keys.get(kid)
        if key is None:
            raise AuthError("token signing key is unknown")
        return key

    def _keys_are_fresh(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at < self._cache_seconds

    def _refresh(self, now: float) -> None:
        # Failed attempts count too, so an unreachable JWKS is not retried on every request.
        if self._attempted_at is not None and now - self._attempted_at < _MIN_REFETCH_SECONDS:
            return
        self._attempted_at = now
        try:
            document = self._fetch(self._jwks_url)
        except AuthError:
            raise
        except Exception as exc:  # an injected fetcher may fail in any way; callers get a 401
            logger.warning("JWKS fetch failed", extra={"error_type": type(exc).__name__})
            raise AuthError("signing keys are unavailable") from None
        if not _looks_like_jwks(document):
            raise AuthError("signing keys are unavailable")
        self._keys = _usable_keys(document)
        self._fetched_at = now


Verifier = StaticTokenVerifier | LoadedTokenVerifier | OidcVerifier


def build_verifier(
    settings: Settings, load_tokens: Callable[[], Sequence[str]] | None = None
) -> Verifier:
    """The verifier that settings.auth_mode asks for. Static tokens are API_TOKENS; without them,
    those that `load_tokens` reads from the secret API_TOKENS_SECRET_ID names, on first use."""
    if settings.auth_mode is AuthMode.OIDC:
        if not (settings.oidc_issuer and settings.oidc_audience and settings.oidc_jwks_url):
            raise SettingsError("AUTH_MODE=oidc needs OIDC_ISSUER, OIDC_AUDIENCE, OIDC_JWKS_URL")
        return OidcVerifier(
            settings.oidc_issuer,
            settings.oidc_audience,
            settings.oidc_jwks_url,
            roles_claim=settings.oidc_roles_claim,
            role_map=settings.oidc_role_map,
        )
    if settings.api_tokens or not settings.api_tokens_secret_id:
        return StaticTokenVerifier(settings.api_tokens)
    if load_tokens is None:
        raise SettingsError("API_TOKENS_SECRET_ID is set, but nothing reads the secret")
    return LoadedTokenVerifier(load_tokens, refresh_seconds=settings.api_tokens_refresh_seconds)
