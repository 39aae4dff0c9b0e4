"""The OpenAPI document and the Swagger UI: complete, valid, generated, and served offline."""

from __future__ import annotations

import re
from zoneinfo import available_timezones

import jsonschema
import pytest
from openapi_spec_validator import validate

from tests.conftest import body


@pytest.fixture
def spec(api):
    response = api.get("/openapi.json", headers={})
    assert response.status_code == 200
    return body(response)


def test_every_route_of_the_app_is_in_the_document(spec):
    """Given the app's routes, when they are compared with the OpenAPI document, then each route is
    documented and nothing else is."""
    from app import app

    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    routed = {(path, method) for path, methods in app.routes.items() for method in methods}
    assert routed == documented


def test_document_is_valid_openapi(spec):
    """Given the OpenAPI document, when it is validated, then it is valid OpenAPI 3.1."""
    assert spec["openapi"].startswith("3.1")
    validate(spec)  # raises on any violation


def test_document_is_generated_from_the_pydantic_models(spec):
    """Given the ClientCreate model, when its schema is read from the document, then it has the
    model's fields, the phone pattern and no extra properties."""
    from chalicelib.schemas import ClientCreate

    documented = spec["components"]["schemas"]["ClientCreate"]
    assert set(documented["properties"]) == set(ClientCreate.model_fields)
    assert documented["properties"]["phone"]["pattern"] == "^7[0-9]{10}$"
    assert documented["additionalProperties"] is False


def test_protected_routes_declare_bearer_auth_and_public_ones_do_not(spec):
    """Given the document, when each operation is read, then public ones need no token and every
    other needs the bearer token and documents its 401."""
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    public = {"/health", "/docs", "/openapi.json", "/docs/assets/{name}"}
    public |= {"/admin", "/admin/assets/{name}", "/admin/config.json"}
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            if path in public:
                assert operation["security"] == []
            else:
                assert "security" not in operation  # inherits the global bearer requirement
                assert "401" in operation["responses"]


def _resolve(schema, spec):
    return {**schema, "components": spec["components"]}


def test_real_responses_match_the_documented_schemas(api, spec):
    """Given real answers of the API (created, listed, refused), when they are checked against the
    document, then each matches its documented schema."""
    client = api.post("/clients", {"phone": "79001234567", "tag": "vip"})
    mailing = api.post(
        "/mailings",
        {"text": "Hi", "start_at": "2026-11-23T09:00:00Z", "end_at": "2026-11-24T09:00:00Z"},
    )
    error = api.post("/clients", {"phone": "1"})
    samples = [
        ("/clients", "post", "201", client),
        ("/clients", "get", "200", api.get("/clients")),
        ("/mailings", "post", "201", mailing),
        ("/mailings", "get", "200", api.get("/mailings")),
        ("/stats", "get", "200", api.get("/stats")),
        ("/clients", "post", "422", error),
    ]
    for path, method, status, response in samples:
        assert str(response.status_code) == status
        documented = spec["paths"][path][method]["responses"][status]
        schema = documented["content"]["application/json"]["schema"]
        jsonschema.validate(body(response), _resolve(schema, spec))


def test_docs_page_loads_only_assets_the_service_serves(api):
    """Given the docs page, when each asset it loads is asked for, then the service serves it, CSS
    or JavaScript, and no other host is named."""
    page = api.get("/docs", headers={})
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    html = page.body.decode()
    assert "://" not in html, "no CDN or other host: machines may be offline"
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets
    for asset in assets:
        response = api.get("/" + asset, headers={})
        assert response.status_code == 200, asset
        assert response.body
        assert response.headers["Content-Type"].split(";")[0] in {"text/css", "text/javascript"}


def test_docs_page_runs_no_inline_script_and_keeps_tokens_out_of_storage(api):
    # Given the documentation page
    page = api.get("/docs", headers={})
    html = page.body.decode()
    # Then its policy forbids inline scripts and other origins, as the admin page's does,
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy
    assert "default-src 'none'" in policy
    # and the page has none: every script is a served file
    assert re.findall(r"<script(?![^>]*\ssrc=)[^>]*>", html) == []
    # and the token typed into "Authorize" is not persisted in localStorage
    init = api.get("/docs/assets/docs.js", headers={}).body.decode()
    assert "persistAuthorization: false" in init


def test_docs_use_swagger_ui_5_which_reads_openapi_3_1(api):
    """Given the served Swagger UI bundle, when its version is read, then it is 5 or later (4
    cannot render OpenAPI 3.1)."""
    # Swagger UI 4 answers "Unable to render this definition" for an OpenAPI 3.1 document.
    bundle = api.get("/docs/assets/swagger-ui-bundle.js", headers={}).body.decode()
    match = re.search(r'PACKAGE_VERSION:"(\d+)\.\d+\.\d+"', bundle)
    assert match is not None
    assert int(match.group(1)) >= 5


def test_unknown_docs_asset_is_404(api):
    """Given a docs asset path climbing out of its folder, when it is asked for, then the answer is
    a 404 not_found."""
    response = api.get("/docs/assets/..%2F..%2Fapp.py", headers={})
    assert response.status_code == 404
    assert body(response)["error"] == "not_found"


def test_health_needs_no_token(api):
    """Given no token, when /health is asked, then it answers 200 ok."""
    response = api.get("/health", headers={})
    assert response.status_code == 200
    assert body(response)["status"] == "ok"


def test_auth_errors_are_documented_in_the_error_shape(spec):
    # Given a protected operation
    operation = spec["paths"]["/clients"]["get"]
    # Then its 401 and 403 are documented as the service's error body, as the gateway writes them
    for status in ("401", "403"):
        schema = operation["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorBody"}, status


@pytest.mark.parametrize(
    ("field", "accepted", "refused"),
    [
        ("tag", ["vip", "", "ночь"], ["a\tb", "x\x7f"]),
        ("text", ["Hi {phone}", "{{literal}}"], ["Hi {name}", "{", "   "]),
    ],
)
def test_the_document_states_the_text_rules_the_api_enforces(spec, field, accepted, refused):
    # Given the document's schema for a field with rules beyond its type
    model = "ClientCreate" if field == "tag" else "MailingCreate"
    prop = spec["components"]["schemas"][model]["properties"][field]
    # A mailing's text may be omitted for its variants: the string branch of anyOf.
    prop = next((p for p in prop.get("anyOf", []) if p.get("type") == "string"), prop)
    patterns = [prop["pattern"], *(part["pattern"] for part in prop.get("allOf", []))]

    def allowed(value: str) -> bool:
        return all(re.search(pattern, value) for pattern in patterns)

    # Then a value the API accepts matches it, and one it refuses does not
    assert [value for value in accepted if not allowed(value)] == []
    assert [value for value in refused if allowed(value)] == []


def test_the_document_lists_the_timezones_the_api_accepts(spec):
    # Given the document's timezone field
    prop = spec["components"]["schemas"]["ClientCreate"]["properties"]["timezone"]
    # Then it lists exactly the zone names the API accepts
    assert set(prop["enum"]) == available_timezones()
    assert "Mars/Olympus" not in prop["enum"]
