"""Health, the OpenAPI document and the Swagger UI, all served without authentication."""

from __future__ import annotations

import json
import mimetypes
import re

from chalice import Response
from swagger_ui_bundle import swagger_ui_path

from chalicelib.api.http import ApiBlueprint
from chalicelib.api.openapi import TITLE, cached_spec
from chalicelib.container import services
from chalicelib.errors import NotFound
from chalicelib.schemas import Health

api = ApiBlueprint(__name__, "service")

# Only the files the page loads; everything is served from the installed package (no CDN).
_ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js")
_ASSET_NAME = re.compile(r"^[a-z-]+\.(css|js)$")

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
  <script src="docs/assets/swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      persistAuthorization: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
      layout: "StandaloneLayout"
    }});
  </script>
</body>
</html>
"""


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
        headers={"Content-Type": "text/html; charset=utf-8"},
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
    if name not in _ASSETS or not _ASSET_NAME.match(name):
        raise NotFound(f"no documentation asset named {name}")
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    body = (swagger_ui_path / name).read_text(encoding="utf-8")
    return Response(
        body=body,
        status_code=200,
        headers={
            "Content-Type": f"{content_type}; charset=utf-8",
            "Cache-Control": "public, max-age=86400",
        },
    )
