"""The admin web UI: one HTML page and its static assets from the package, and the sign-in
configuration it reads before anyone signs in. All public: the page holds no data, and every
call it makes to the API carries the operator's bearer token."""

from __future__ import annotations

import hashlib
import re
from functools import cache
from pathlib import Path

from chalice import Response

from chalicelib.api.http import ApiBlueprint
from chalicelib.api.page_headers import page_security_headers
from chalicelib.container import services
from chalicelib.errors import NotFound
from chalicelib.schemas import AdminAssetQuery, AdminConfig, AdminSingleSignOn

api = ApiBlueprint(__name__, "admin")

ASSET_DIR = Path(__file__).resolve().parent.parent / "admin"
# The only files served, with their types: nothing else under ASSET_DIR is reachable.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
# Versioned links (`?v=<hash>`, as the page writes them) never change: cache them for a year.
# An unversioned request may be a stale link, so it is cached briefly.
_IMMUTABLE = "public, max-age=31536000, immutable"
_SHORT = "public, max-age=300"
_ASSET_LINK = re.compile(r'"(admin/assets/([a-z]+\.[a-z]+))"')


@cache
def asset(name: str) -> tuple[str, str]:
    """An asset's text and content hash (the files ship inside the package; read once)."""
    text = (ASSET_DIR / name).read_text(encoding="utf-8")
    return text, hashlib.sha256(text.encode()).hexdigest()[:16]


@cache
def page() -> str:
    """index.html with each asset link carrying its content hash, so a deploy is seen at once."""
    html = (ASSET_DIR / "index.html").read_text(encoding="utf-8")
    return _ASSET_LINK.sub(lambda m: f'"{m.group(1)}?v={asset(m.group(2))[1]}"', html)


@api.route(
    "/admin", "GET", summary="The admin web UI", public=True, produces="text/html", errors=()
)
def admin_page() -> Response:
    """A single page: sign in, then manage clients and mailings and watch their statistics."""
    return Response(
        body=page(),
        status_code=200,
        headers={
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-cache",
            **page_security_headers(services().settings),
        },
    )


@api.route(
    "/admin/assets/{name}",
    "GET",
    summary="Static files of the admin UI",
    query=AdminAssetQuery,
    public=True,
    produces="text/plain",
    errors=(400, 404),
)
def admin_asset(name: str, query: AdminAssetQuery) -> Response:
    """The UI's script, stylesheet and icon; any other name is a 404."""
    if name not in ASSETS:
        raise NotFound(f"no admin asset named {name}")
    text, version = asset(name)
    return Response(
        body=text,
        status_code=200,
        headers={
            "Content-Type": ASSETS[name],
            "Cache-Control": _IMMUTABLE if query.v == version else _SHORT,
            "X-Content-Type-Options": "nosniff",
        },
    )


@api.route(
    "/admin/config.json",
    "GET",
    summary="How the admin UI signs in",
    response=AdminConfig,
    public=True,
)
def admin_config() -> AdminConfig:
    """The auth mode, and the OIDC provider's endpoints when single sign-on is configured."""
    settings = services().settings
    sso = None
    if settings.single_sign_on:
        sso = AdminSingleSignOn(
            authorization_endpoint=settings.oidc_authorization_url or "",
            token_endpoint=settings.oidc_token_url or "",
            client_id=settings.oidc_client_id or "",
            scope=settings.oidc_scope,
        )
    return AdminConfig(auth_mode=settings.auth_mode.value, oidc=sso)
