"""The admin UI as the service serves it: the page, its allow-listed assets, and the sign-in
configuration, with and without single sign-on. (tests/e2e/test_admin_browser_e2e.py drives the
UI.)"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

OIDC = {
    "auth_mode": "oidc",
    "oidc_issuer": "https://login.example.com/",
    "oidc_audience": "sms-admin",
    "oidc_jwks_url": "https://login.example.com/.well-known/jwks.json",
}
SIGN_IN = {
    "oidc_client_id": "sms-admin",
    "oidc_authorization_url": "https://login.example.com/oauth2/authorize",
    "oidc_token_url": "https://tokens.example.com/oauth2/token",
}


def header(response: Any, name: str) -> str:
    return {key.lower(): value for key, value in response.headers.items()}[name.lower()]


@pytest.fixture
def with_settings(services: Any) -> Iterator[Any]:
    """Put in use a copy of the services with settings the test chooses, built anew and
    validated (routes read them per call)."""
    from chalicelib.container import use_services

    def use(**changes: Any) -> None:
        settings = type(services.settings)(**{**services.settings.model_dump(), **changes})
        use_services(replace(services, settings=settings))

    yield use
    use_services(services)


def test_the_page_is_html_for_anyone_and_loads_nothing_from_another_host(api):
    # When anyone, without a token, opens the admin page
    page = api.get("/admin", headers={})
    # Then it is an HTML page that never caches stale and loads only this service's files
    assert page.status_code == 200
    assert header(page, "Content-Type") == "text/html; charset=utf-8"
    assert header(page, "Cache-Control") == "no-cache"
    html = page.body.decode()
    assert "<title>SMS campaigns admin</title>" in html
    assert "://" not in html, "no CDN or other host: machines may be offline"
    assert "default-src 'none'" in header(page, "Content-Security-Policy")
    assert "script-src 'self'" in header(page, "Content-Security-Policy")


def test_every_asset_the_page_links_is_served_with_its_type_and_cached_for_good(api):
    html = api.get("/admin", headers={}).body.decode()
    links = set(re.findall(r'(?:src|href)="(admin/assets/[^"]+)"', html))
    assert {link.split("?")[0] for link in links} == {
        "admin/assets/app.js",
        "admin/assets/app.css",
        "admin/assets/icon.svg",
    }
    expected = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for link in links:
        # When the browser follows a link as the page writes it (with the content hash)
        response = api.get("/" + link, headers={})
        # Then the file arrives with its type, cacheable for a year, never sniffed
        assert response.status_code == 200, link
        suffix = re.search(r"\.[a-z]+(?=\?)", link).group(0)
        assert header(response, "Content-Type").split(";")[0] == expected[suffix]
        assert header(response, "Cache-Control") == "public, max-age=31536000, immutable"
        assert header(response, "X-Content-Type-Options") == "nosniff"
        assert len(response.body) > 200


def test_an_asset_asked_for_without_its_hash_is_cached_briefly(api):
    """Given an admin asset, when it is asked for without its content hash or with a stale one,
    then it may be cached for five minutes only."""
    response = api.get("/admin/assets/app.js", headers={})
    assert response.status_code == 200
    assert header(response, "Cache-Control") == "public, max-age=300"
    stale = api.get("/admin/assets/app.js?v=0123abcd", headers={})
    assert header(stale, "Cache-Control") == "public, max-age=300"


@pytest.mark.parametrize(
    "name", ["index.html", "app.py", "..%2F..%2Fsettings.py", "APP.JS", "app.js.map"]
)
def test_any_other_asset_name_is_404(api, name):
    """Given a name not on the assets' allow-list, when it is asked for, then the answer is a 404
    in the error shape."""
    response = api.get(f"/admin/assets/{name}", headers={})
    assert response.status_code == 404
    assert response.json["error"] == "not_found"


def test_a_malformed_version_is_400(api):
    """Given an asset version that is not a hash, when the asset is asked for, then the answer is a
    400 naming query.v."""
    response = api.get("/admin/assets/app.js?v=<script>", headers={})
    assert response.status_code == 400
    assert response.json["details"][0]["field"] == "query.v"


def test_with_static_tokens_the_ui_asks_for_a_token(api):
    """Given static tokens, when the UI reads its configuration, then it is told to ask for a token
    (no single sign-on)."""
    response = api.get("/admin/config.json", headers={})
    assert response.status_code == 200
    assert response.json == {"auth_mode": "static", "oidc": None}


def test_with_oidc_but_no_client_the_ui_asks_for_a_token(api, with_settings):
    """Given OIDC without a sign-in client, when the UI reads its configuration, then it is told to
    ask for a token."""
    with_settings(**OIDC)
    assert api.get("/admin/config.json", headers={}).json == {"auth_mode": "oidc", "oidc": None}


def test_with_a_client_id_the_ui_offers_single_sign_on(api, with_settings):
    # Given OIDC with the admin UI's client and a wider scope
    with_settings(**OIDC, **SIGN_IN, oidc_scope="openid email")
    # When the UI reads its configuration
    response = api.get("/admin/config.json", headers={})
    # Then it gets the provider's endpoints for the authorization code flow
    assert response.json == {
        "auth_mode": "oidc",
        "oidc": {
            "authorization_endpoint": "https://login.example.com/oauth2/authorize",
            "token_endpoint": "https://tokens.example.com/oauth2/token",
            "client_id": "sms-admin",
            "scope": "openid email",
        },
    }
    # And the page may call the token endpoint, and nothing else outside this origin
    policy = header(api.get("/admin", headers={}), "Content-Security-Policy")
    assert "connect-src 'self' https://tokens.example.com;" in policy


def test_the_admin_routes_are_public_and_documented(api):
    """Given the OpenAPI document, when the admin routes are looked up, then each is public and the
    configuration's schema is AdminConfig."""
    spec = api.get("/openapi.json", headers={}).json
    for path in ("/admin", "/admin/assets/{name}", "/admin/config.json"):
        assert spec["paths"][path]["get"]["security"] == [], path
    config = spec["paths"]["/admin/config.json"]["get"]["responses"]["200"]
    assert config["content"]["application/json"]["schema"]["$ref"].endswith("/AdminConfig")


# ---------------------------------------------------------------- settings


def test_sign_in_settings_default_to_none_and_the_scope_to_openid():
    """Given an empty environment, when the settings are read, then single sign-on is off and the
    scope is openid."""
    from chalicelib.settings import Settings

    settings = Settings.from_env({})
    assert not settings.single_sign_on
    assert settings.oidc_scope == "openid"


def test_sign_in_settings_are_read_from_the_environment():
    """Given the OIDC and sign-in variables, when the settings are read, then single sign-on is on
    with the client and scope given."""
    from chalicelib.settings import Settings

    env = {key.upper(): value for key, value in {**OIDC, **SIGN_IN}.items()}
    settings = Settings.from_env({**env, "OIDC_SCOPE": "openid profile"})
    assert settings.single_sign_on
    assert settings.oidc_client_id == "sms-admin"
    assert settings.oidc_scope == "openid profile"


@pytest.mark.parametrize("given", sorted(SIGN_IN))
def test_one_sign_in_setting_alone_is_refused_naming_the_missing_ones(given):
    """Given one of the three sign-in settings alone, when the settings are read, then they are
    refused naming the two missing."""
    from chalicelib.settings import Settings, SettingsError

    env = {key.upper(): value for key, value in OIDC.items()}
    env[given.upper()] = SIGN_IN[given]
    missing = [name.upper() for name in SIGN_IN if name != given]
    with pytest.raises(SettingsError, match=f"{missing[0]}, {missing[1]} must be set"):
        Settings.from_env(env)


def test_sign_in_settings_without_oidc_tokens_are_refused():
    """Given sign-in settings with static tokens, when the settings are read, then they are
    refused: they need AUTH_MODE=oidc."""
    from chalicelib.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="need AUTH_MODE=oidc"):
        Settings.from_env({key.upper(): value for key, value in SIGN_IN.items()})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OIDC_AUTHORIZATION_URL", "javascript:alert(1)"),
        ("OIDC_TOKEN_URL", "https://tokens.example.com/a b"),
        ("OIDC_CLIENT_ID", "two words"),
        ("OIDC_SCOPE", "openid\nemail"),
    ],
)
def test_a_bad_sign_in_value_is_refused_naming_the_variable(variable, value):
    """Given a malformed sign-in value, when the settings are read, then they are refused naming
    the variable."""
    from chalicelib.settings import Settings, SettingsError

    env = {key.upper(): val for key, val in {**OIDC, **SIGN_IN}.items()}
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({**env, variable: value})


SECURITY_HEADERS = (
    "Content-Security-Policy",
    "X-Frame-Options",
    "Referrer-Policy",
    "X-Content-Type-Options",
    "Cross-Origin-Opener-Policy",
)


@pytest.mark.parametrize("sign_on", [False, True], ids=["tokens", "single-sign-on"])
def test_docs_and_admin_pages_send_the_same_security_headers(api, with_settings, sign_on):
    # Given the service with or without single sign-on
    if sign_on:
        with_settings(**OIDC, **SIGN_IN)
    # When a browser opens the API reference and the admin UI
    pages = {path: api.get(path, headers={}) for path in ("/docs", "/admin")}
    # Then both pages send every security header, with the same values
    sent = {
        path: {name: header(page, name) for name in SECURITY_HEADERS}
        for path, page in pages.items()
    }
    assert sent["/docs"] == sent["/admin"]
    # and neither may be framed, sniffed, or leak its address through a Referer
    headers = sent["/admin"]
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
