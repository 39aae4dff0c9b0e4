"""Health, the OpenAPI document and the Swagger UI, all served without authentication."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from chalice import Response

from chalicelib.api.http import ApiBlueprint
from chalicelib.api.openapi import TITLE, cached_spec
from chalicelib.api.page_headers import page_security_headers
from chalicelib.container import services
from chalicelib.errors import NotFound
from chalicelib.schemas import Health

api = ApiBlueprint(__name__, "service")

_DOCS_DIR = Path(__file__).resolve().parent.parent / "apidocs"
# The only files the page loads, all inside the package (no CDN): Swagger UI 5 (vendored, see
# apidocs/swagger-ui/SOURCE.txt) and the script that starts it. Nothing else there is reachable.
_ASSETS = {
    "swagger-ui.css": ("swagger-ui/swagger-ui.css", "text/css; charset=utf-8"),
    "swagger-ui-bundle.js": ("swagger-ui/swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "docs.js": ("docs.js", "text/javascript; charset=utf-8"),
}

# Relative URLs, so the page works behind API Gateway's stage prefix (/api/docs) and locally.
_DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{title} - API docs</title>
  <link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/assets/swagger-ui-bundle.js"></script>
  <script src="docs/assets/docs.js"></script>
</body>
</html>
"""


@cache
def _asset_text(name: str) -> str:
    """A documentation asset's text (shipped inside the package; read once per container)."""
    return (_DOCS_DIR / _ASSETS[name][0]).read_text(encoding="utf-8")


@api.route("/health", "GET", summary="Liveness check", response=Health, public=True)
def health() -> Health:
    return Health(status="ok", stage=services().settings.stage)


@api.route(
    "/openapi.json",
    "GET",
    summary="This API's OpenAPI 3.1 document",
    public=True,
    produces="application/json",
)
def openapi_document() -> Response:
    return Response(
        body=json.dumps(cached_spec()),
        status_code=200,
        headers={"Content-Type": "application/json", "Cache-Control": "public, max-age=300"},
    )


@api.route(
    "/docs", "GET", summary="Interactive API documentation", public=True, produces="text/html"
)
def docs_page() -> Response:
    return Response(
        body=_DOCS_PAGE.format(title=TITLE),
        status_code=200,
        headers={
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-cache",
            **page_security_headers(services().settings),
        },
    )


@api.route(
    "/docs/assets/{name}",
    "GET",
    summary="Static files of the documentation page",
    public=True,
    produces="text/plain",
    errors=(404,),
)
def docs_asset(name: str) -> Response:
    if name not in _ASSETS:
        raise NotFound(f"no documentation asset named {name}")
    return Response(
        body=_asset_text(name),
        status_code=200,
        headers={
            "Content-Type": _ASSETS[name][1],
            # Short: the names are not versioned, and a deploy may change docs.js or Swagger UI.
            "Cache-Control": "public, max-age=3600",
            "X-Content-Type-Options": "nosniff",
        },
    )
