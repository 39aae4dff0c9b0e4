"""OIDC test support: an identity provider's RSA keys, its JWKS served over real HTTP, and tokens.

tests/conftest.py makes the fixtures here available to every test module; being module-scoped,
the keys and the server are made afresh for each module that asks for them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISSUER = "https://id.example.test/"
AUDIENCE = "sms-campaigns"
KID = "key-1"


class JwksServer:
    """A real HTTP server on 127.0.0.1 that serves whatever JWKS the test sets, counting fetches."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b'{"keys": []}'
        self.fetches = 0
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                state.fetches += 1
                self.send_response(state.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(state.body)))
                self.end_headers()
                self.wfile.write(state.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep pytest output free of access-log lines

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/jwks.json"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def serve(self, document: Any, status: int = 200) -> None:
        """Answer with `document` (JSON-encoded unless already bytes) and `status` from now on."""
        self.status = status
        self.body = document if isinstance(document, bytes) else json.dumps(document).encode()

    def publish(self, *keys: dict[str, Any]) -> None:
        """Serve a key set holding exactly `keys`."""
        self.serve({"keys": list(keys)})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def public_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


def claims_at(now: int, **overrides: Any) -> dict[str, Any]:
    """Claims valid at `now`; overrides replace them, and an override of None removes that claim."""
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-42",
        "iat": now,
        "exp": now + 300,
    }
    payload.update(overrides)
    return {name: value for name, value in payload.items() if value is not None}


def sign(key: rsa.RSAPrivateKey, payload: dict[str, Any], kid: str = KID) -> str:
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_token(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A JWT built without PyJWT, which refuses to produce these attack tokens."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    if secret is None:
        return signing_input + "."
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def unsigned_token(payload: dict[str, Any]) -> str:
    """An alg-none JWT naming the issuer's key id, with an empty signature."""
    return hand_made_token({"alg": "none", "typ": "JWT", "kid": KID}, payload, secret=None)


def unused_local_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens once the socket is closed, so a connection is refused at once.
    return f"http://127.0.0.1:{port}/jwks.json"


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


@pytest.fixture
def jwks(
    jwks_server: JwksServer, signing_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> JwksServer:
    """The JWKS server publishing only the signing key, with its fetch count back at zero."""
    # A proxy configured on the test machine must not intercept the local JWKS server.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    jwks_server.publish(public_jwk(signing_key, KID))
    jwks_server.fetches = 0
    return jwks_server
