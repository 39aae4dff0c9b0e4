"""API fuzzing: schemathesis drives every operation of /openapi.json against the running stack.

Bounded so CI stays fast: a fixed seed, derandomized generation, no shrinking and a couple of
dozen generated cases per operation (plus schemathesis' examples and coverage cases, which send
methods no route has, TRACE included). Every check schemathesis has runs: answers are never a
5xx and match the documented statuses, content types, headers and schemas, a request the
document calls valid is accepted, an invalid one refused, a method a path lacks is a 405 with
`Allow`. The one exclusion, stated in UNSTATED_RULES below, is a refusal by a rule OpenAPI
cannot express. Every 4xx, those API Gateway writes (401, 403, no route) included, carries the
`ErrorBody` shape.

For a deeper run: FUZZ_MAX_EXAMPLES=300 FUZZ_SEED=7 pytest -m e2e tests/e2e/test_api_fuzz_e2e.py
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import strategies as st

from tests.support.local_stack import Stack, running_stack

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("FUZZ_SEED", "20261122"))
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "25"))
ERROR_KEYS = frozenset({"error", "message", "details"})


@dataclass(frozen=True)
class Seeded:
    """Records created before fuzzing, by path parameter, so an id can name an existing record.

    DELETE gets records of its own: otherwise it would soon leave the others nothing to find.
    """

    kept: dict[str, list[str]]
    disposable: dict[str, list[str]]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # No scheduler tick after startup: fuzzed mailings must not start sending during the run.
    with running_stack(SCHEDULER_INTERVAL_SECONDS="3600") as started:
        yield started


def _create(http: requests.Session, url: str, payload: dict[str, Any]) -> str:
    response = http.post(url, json=payload, timeout=5)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _mailing(tag: str) -> dict[str, Any]:
    # Far enough ahead never to start during the run, within the 366-day horizon.
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=300)
    return {
        "text": "Fuzzing",
        "start_at": start.isoformat(),
        "end_at": (start + timedelta(days=1)).isoformat(),
        "filter": {"tags": [tag]},
        "send_window": {"start": "09:00", "end": "21:00"},
    }


@pytest.fixture(scope="module")
def seeded(stack: Stack) -> Seeded:
    with requests.Session() as http:
        http.headers.update(stack.auth)
        clients = [
            _create(http, f"{stack.url}/clients", {"phone": f"790055500{n:02d}", "tag": tag})
            for n, tag in enumerate(("vip", "fuzz", "", "vip", "fuzz"))
        ]
        mailings = [_create(http, f"{stack.url}/mailings", _mailing(tag)) for tag in ("vip", "")]
    return Seeded(
        kept={"client_id": clients[:3], "mailing_id": mailings[:1]},
        disposable={"client_id": clients[3:], "mailing_id": mailings[1:]},
    )


@pytest.fixture(scope="module")
def api_schema(stack: Stack, seeded: Seeded) -> schemathesis.BaseSchema:
    """The stack's own OpenAPI document, with generation bounded and real ids mixed in."""
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "base-url": stack.url,
            "headers": stack.auth,
            "request-timeout": 10,
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "no-shrink": True,
                "database": "none",
            },
            "phases": {"stateful": {"enabled": False}},
        }
    )
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json", config=config, timeout=10)

    @schema.hook
    def flatmap_path_parameters(
        context: schemathesis.HookContext, path_parameters: dict[str, Any] | None
    ) -> st.SearchStrategy:
        # Half the time an id that exists: a generated one is almost always a 404.
        pools = seeded.disposable if context.operation.method.upper() == "DELETE" else seeded.kept
        for name, ids in pools.items():
            if isinstance(path_parameters, dict) and name in path_parameters:
                existing = st.sampled_from(ids).map(lambda i, n=name: {**path_parameters, n: i})
                return st.one_of(st.just(path_parameters), existing)
        return st.just(path_parameters)

    return schema


@schemathesis.check
def error_body_on_4xx(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """Every 4xx, 401 and 403 included, is JSON with `error`, `message` and `details`."""
    if not 400 <= response.status_code < 500:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), (
        f"{response.status_code} with Content-Type {content_type!r}, not the error body"
    )
    body = json.loads(response.content)
    assert isinstance(body, dict), f"{response.status_code} body is not an object: {body!r}"
    assert set(body) == ERROR_KEYS, f"{response.status_code} body has keys {sorted(body)}"
    return True


# What the API enforces that OpenAPI cannot state, by the `type` of the error detail naming it.
# The document states the rest (patterns, enums, formats, lengths, timezone names, placeholders).
UNSTATED_RULES = {
    # Values compared with each other or with the clock, which JSON Schema cannot do: a
    # mailing's end_at after its start_at (the stored one, for PATCH), in the future, within
    # 366 days; a send window's start different from its end.
    "range": "values compared with each other or with now",
    # A cursor is opaque: only a `next_cursor` the server issued for the same listing (it
    # carries a digest of it) is accepted; a schema cannot say "one the server issued".
    "cursor": "a cursor the server issued",
    # JSON Schema counts 15.0 as an integer; the API, strict, asks for the literal 15.
    "int_type": "an integer written as a number with a fraction (15.0)",
    # A CSV file's columns and cells: the document can only type the body as text.
    "csv": "the content of a CSV file",
    # An Idempotency-Key names one request: the same key with another body (or route) is a 422,
    # and a generated key may well repeat.
    "idempotency_key_reused": "an Idempotency-Key sent before with another body",
    # A mailing's text given beside its variants must be the first variant's text (or, on a
    # PATCH, the stored one's): two values compared.
    "variants_text": "a mailing's text compared with its first variant's",
}


def _unstated_rule(case: schemathesis.Case, response: schemathesis.Response) -> str | None:
    """The rule the document cannot state that refused this request, or None if there is none."""
    if response.status_code not in (400, 422):
        return None
    if case.media_type == "text/csv":
        return UNSTATED_RULES["csv"]
    details = json.loads(response.content).get("details") or []
    reasons = {UNSTATED_RULES.get(detail.get("type"), "") for detail in details}
    return "; ".join(sorted(reasons)) if reasons and "" not in reasons else None


@schemathesis.check
def positive_data_acceptance_where_stated(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """schemathesis' positive_data_acceptance, except for a refusal by a rule it cannot state."""
    if _unstated_rule(case, response) is not None:
        return None
    return schemathesis.checks.positive_data_acceptance(ctx, response, case)


schema = schemathesis.pytest.from_fixture("api_schema")
schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32 names each operation's subtest through `Item._nodeid`, which pytest 9 no
    # longer has (it keeps `_id`); without it the lazy loader fails before sending anything.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
def test_every_operation_answers_as_documented(case: schemathesis.Case, stack: Stack) -> None:
    # Given a request the document allows (or, in negative mode, one it does not)
    # When it is sent to the running stack
    # Then every check schemathesis has passes (the answer is documented, never a 5xx, a
    # method the path lacks is a 405 naming the others, valid data is accepted ...), and a 4xx
    # carries the error body
    # The token is passed here too: with a header parameter of its own in the document (the
    # Idempotency-Key), schemathesis otherwise takes the configured Authorization for a
    # generated one and reports a success with it as "accepts invalid authentication".
    case.call_and_validate(
        headers=stack.auth,
        excluded_checks=[schemathesis.checks.positive_data_acceptance],
        additional_checks=[error_body_on_4xx, positive_data_acceptance_where_stated],
    )


def test_method_a_path_lacks_is_405_with_the_error_body(stack: Stack) -> None:
    # When a path is asked for a method it does not have
    response = requests.put(f"{stack.url}/clients", headers=stack.auth, timeout=5)
    # Then the answer names the methods it has, in the service's error shape
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST, GET"
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {
        "error": "method_not_allowed",
        "message": "PUT is not supported here; use POST, GET",
        "details": [],
    }


def test_document_offers_null_only_where_the_api_accepts_it(stack: Stack) -> None:
    spec = requests.get(f"{stack.url}/openapi.json", timeout=5).json()
    text = json.dumps
    # Then no query parameter can be null (a query string cannot carry one)
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                assert '"null"' not in text(parameter["schema"]), (method, path, parameter)
    # And a PATCH body offers null only for `send_window`, the one field it removes
    for name in ("ClientPatch", "MailingPatch"):
        properties = spec["components"]["schemas"][name]["properties"]
        nullable = {field for field, prop in properties.items() if '"null"' in text(prop)}
        assert nullable == ({"send_window"} if name == "MailingPatch" else set()), name


SECRET = "Bearer not-a-token-the-service-issued-4f2a"


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "code"),
    [
        ("GET", "/clients", {}, 401, "unauthorized"),
        ("GET", "/clients", {"Authorization": SECRET}, 403, "forbidden"),
        ("GET", "/no-such-route", {"Authorization": SECRET}, 404, "not_found"),
        ("GET", "/no-such-route", {}, 404, "not_found"),
        ("TRACE", "/clients", {"Authorization": SECRET}, 405, "method_not_allowed"),
        ("CONNECT", "/mailings", {}, 405, "method_not_allowed"),
        ("TRACE", "/no-such-route", {}, 404, "not_found"),
    ],
    ids=["401", "403", "404-with-token", "404", "405-trace", "405-connect", "404-trace"],
)
def test_what_the_gateway_answers_itself_is_in_the_error_shape(
    stack: Stack, method: str, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    # When a request is refused before any route's code runs (no token, a wrong token, no such
    # route, a method API Gateway does not route)
    response = requests.request(method, f"{stack.url}{path}", headers=headers, timeout=5)
    # Then the answer is the service's error shape, and never quotes the caller's token
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == ERROR_KEYS
    assert body["error"] == code
    assert body["details"] == []
    assert "not-a-token" not in response.text
    if status == 405:
        assert response.headers["Allow"]
