"""CSV import of clients over HTTP: the per-row report, the background writes, and their limits.

In process on moto's DynamoDB; SQS is the pipeline tests' virtual queue (chunks wait there until
`run_imports` hands them to the `import_clients` Lambda, as its event source would, with the
receive count Lambda passes), so a test can deliver a chunk twice or crash one half-way.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta
from typing import Any

import botocore.client
import pytest

from tests.conftest import API_TOKEN, AUTH, GATEWAY_TOKEN, body
from tests.support.pipeline import Pipeline, VirtualSqs, pipeline_settings

IMPORT_URL = "virtual://import"
CSV_HEADERS = {**AUTH, "Content-Type": "text/csv"}
PHONE_RULE = "phone must be 11 ASCII digits starting with 7, like 79001234567"


# ---------------------------------------------------------------- the world


@pytest.fixture
def settings(sandbox, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    monkeypatch.setenv("API_TOKENS", API_TOKEN)
    overrides = getattr(request, "param", {})  # indirect parametrisation
    return pipeline_settings(
        sandbox.url, sender_api_token=GATEWAY_TOKEN, import_queue_url=IMPORT_URL, **overrides
    )


@pytest.fixture
def sqs(clock) -> VirtualSqs:
    queues = VirtualSqs(clock)
    queues.queues[IMPORT_URL] = []
    return queues


@pytest.fixture
def services(aws, settings, clock, sqs):
    from chalicelib.container import Services, use_services
    from chalicelib.storage.models import create_tables

    built = Services.build(settings, clock=clock, sqs=sqs, wait_until=clock.wait_until)
    create_tables(built.models)
    use_services(built)
    yield built
    use_services(None)


@pytest.fixture
def small_chunks(services, clock):
    """Chunks of 5 rows written in parts of 2, so a few rows exercise chunks and parts."""
    from pynamodb.connection import Connection

    from chalicelib.services.imports import ClientImports
    from chalicelib.storage.clients import DynamoClientRepository
    from chalicelib.storage.imports import DynamoImportRepository

    connection = Connection(region=services.settings.aws_region)
    services.imports = ClientImports(
        DynamoImportRepository(services.models, connection),
        DynamoClientRepository(services.models, connection),
        services.queues,
        clock,
        chunk_rows=5,
        part_rows=2,
    )
    return services.imports


@pytest.fixture
def lambdas(services):
    from chalice.test import Client

    from app import app

    with Client(app, stage_name="dev") as client:
        yield client


def post_csv(api, text: str | bytes, headers: dict[str, str] | None = None) -> Any:
    payload = text.encode() if isinstance(text, str) else text
    return api.post("/clients/import", payload, headers=headers or CSV_HEADERS)


def start(api, text: str) -> dict:
    response = post_csv(api, text)
    assert response.status_code == 202, response.body
    return body(response)


def run_imports(sqs: VirtualSqs, lambdas, *, limit: int = 1000) -> int:
    """Deliver every queued chunk to the import_clients Lambda, one per invocation, as its
    event source would; a chunk whose invocation fails comes back. Returns the invocations."""
    invocations = 0
    while invocations < limit:
        ready = sqs.take_ready(IMPORT_URL, 1)
        if not ready:
            return invocations
        [message] = ready
        event = lambdas.events.generate_sqs_event([message.body], queue_name="sms-test-import")
        event["Records"][0]["attributes"]["ApproximateReceiveCount"] = str(message.receives)
        invocations += 1
        try:
            lambdas.lambda_.invoke("import_clients", event)
        except Exception:
            if message.receives < 5:  # the queue's redrive: after 5 receives, the DLQ
                sqs.put_back(IMPORT_URL, message, 0)
    return invocations


def imported(api, import_id: str) -> dict:
    response = api.get(f"/clients/imports/{import_id}")
    assert response.status_code == 200, response.body
    return body(response)


def clients_by_phone(api) -> dict[str, dict]:
    items = body(api.get("/clients?limit=500"))["items"]
    return {client["phone"]: client for client in items}


def counts(job: dict) -> dict[str, int]:
    names = ("rows", "valid", "invalid", "created", "updated", "unchanged", "failed")
    return {name: job[name] for name in names}


@pytest.fixture
def dynamodb_writes(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """(operation, table) of every DynamoDB write, parts of batches and transactions included."""
    writes: Counter = Counter()
    original = botocore.client.BaseClient._make_api_call

    def recording(self, operation_name, api_params):
        if self.meta.service_model.service_name == "dynamodb":
            if operation_name in ("PutItem", "UpdateItem", "DeleteItem"):
                writes[(operation_name, api_params["TableName"])] += 1
            elif operation_name == "BatchWriteItem":
                for table, requests in api_params["RequestItems"].items():
                    writes[(operation_name, table)] += len(requests)
            elif operation_name == "TransactWriteItems":
                for item in api_params["TransactItems"]:
                    [(part, request)] = item.items()
                    writes[(f"Transact{part}", request["TableName"])] += 1
        return original(self, operation_name, api_params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", recording)
    return writes


def client_writes(writes: Counter) -> Counter:
    """Writes of client data: not the import's own records, nor the audit trail's entry."""
    return Counter(
        {key: n for key, n in writes.items() if not key[1].endswith(("-imports", "-audit"))}
    )


# ---------------------------------------------------------------- the report


FILE = "\ufeff" + (
    "phone,operator_code,tag,timezone\n"
    "79001234567,,vip,Europe/Moscow\n"  # 1: operator code from the phone
    "79011234568,999,,\n"  # 2: tag and timezone left out
    "7900123456,,vip,UTC\n"  # 3: phone too short
    "79001234569,90,,Mars/Olympus\n"  # 4: two bad fields
    "\n"  # 5: a blank line: skipped, keeps its number
    '79001234570,,"a ""quoted"", tag",Asia/Vladivostok\n'  # 6: CSV quoting
    "79001234571,,vip\n"  # 7: a cell short
    "79001234567,,other,UTC\n"  # 8: phone of row 1 again
    ",,vip,UTC\n"  # 9: no phone
)


def test_invalid_rows_are_reported_at_once_and_valid_ones_become_clients(api, sqs, lambdas, clock):
    # Given a file with valid rows, invalid rows and a duplicate phone
    # When it is imported
    response = post_csv(api, FILE)
    # Then the answer is 202 with every invalid row and why, before anything is written
    assert response.status_code == 202, response.body
    job = body(response)
    assert response.headers["Location"] == f"/clients/imports/{job['id']}"
    assert job["status"] == "queued"
    assert counts(job) == {
        "rows": 8,
        "valid": 3,
        "invalid": 5,
        "created": 0,
        "updated": 0,
        "unchanged": 0,
        "failed": 0,
    }
    assert job["errors"] == [
        {"row": 3, "field": "phone", "message": PHONE_RULE},
        {
            "row": 4,
            "field": "operator_code",
            "message": "operator code must be 3 ASCII digits, like 900",
        },
        {
            "row": 4,
            "field": "timezone",
            "message": "unknown IANA timezone 'Mars/Olympus' (examples: 'UTC', 'Europe/Moscow')",
        },
        {"row": 7, "field": None, "message": "the row has 3 cells; the header names 4 columns"},
        {
            "row": 8,
            "field": "phone",
            "message": "phone 79001234567 is also in row 1; only the first is imported",
        },
        {"row": 9, "field": "phone", "message": "phone is required"},
    ]
    assert job["errors_omitted"] == 0
    assert clients_by_phone(api) == {}

    # When the worker has written the chunk
    clock.advance(seconds=1)
    assert run_imports(sqs, lambdas) == 1
    # Then the valid rows are clients, with POST /clients' defaults for what they left out
    done = imported(api, job["id"])
    assert done["status"] == "done"
    assert (done["created"], done["failed"]) == (3, 0)
    assert done["errors"] == job["errors"]
    assert done["updated_at"] > done["created_at"]
    clients = clients_by_phone(api)
    fields = {phone: (c["operator_code"], c["tag"], c["timezone"]) for phone, c in clients.items()}
    assert fields == {
        "79001234567": ("900", "vip", "Europe/Moscow"),
        "79011234568": ("999", "", "UTC"),
        "79001234570": ("900", 'a "quoted", tag', "Asia/Vladivostok"),
    }


ROWS = {
    "phone only": {"phone": "79001234567"},
    "every field": {
        "phone": "79001234567",
        "operator_code": "999",
        "tag": "vip",
        "timezone": "Asia/Vladivostok",
    },
    "tag of 64 characters": {"phone": "79001234567", "tag": "x" * 64},
    "tag with spaces": {"phone": "79001234567", "tag": " vip "},
    "phone too short": {"phone": "7900123456"},
    "phone with plus": {"phone": "+79001234567"},
    "phone not starting with 7": {"phone": "89001234567"},
    "phone with a space": {"phone": " 79001234567"},
    "operator code of two digits": {"phone": "79001234567", "operator_code": "90"},
    "operator code of letters": {"phone": "79001234567", "operator_code": "abc"},
    "tag of 65 characters": {"phone": "79001234567", "tag": "x" * 65},
    "tag with a control character": {"phone": "79001234567", "tag": "a\tb"},
    "unknown timezone": {"phone": "79001234567", "timezone": "Mars/Olympus"},
    "timezone in the wrong case": {"phone": "79001234567", "timezone": "europe/moscow"},
    "timezone path traversal": {"phone": "79001234567", "timezone": "../../etc/passwd"},
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_a_row_is_valid_exactly_when_post_clients_accepts_the_same_fields(api, row):
    # Given a row, and the same fields as a JSON body
    columns = list(row)
    text = ",".join(columns) + "\n" + ",".join(f'"{row[c]}"' for c in columns) + "\n"
    # When both are sent
    job = start(api, text)
    posted = api.post("/clients", row)
    # Then the row is valid exactly when POST /clients takes the body
    assert posted.status_code in (201, 422)
    assert (job["valid"], job["invalid"]) == ((1, 0) if posted.status_code == 201 else (0, 1))
    if posted.status_code == 422:
        reasons = {(d["field"], d["message"]) for d in body(posted)["details"]}
        assert {(f"body.{e['field']}", e["message"]) for e in job["errors"]} == reasons


def test_the_report_states_each_rule_in_words(api):
    # Given rows breaking a length rule and a text rule, and a row of a known phone with a tag
    long_tag = "x" * 65
    text = f"phone,tag\n79001234567,{long_tag}\n79001234568,a\x01b\n"
    # When the file is imported
    response = post_csv(api, text)
    # Then each row's error says the rule in words, never a pattern or pydantic's wording
    assert response.status_code == 202, response.body
    assert body(response)["errors"] == [
        {"row": 1, "field": "tag", "message": "tag must be at most 64 characters"},
        {"row": 2, "field": "tag", "message": "tag must not contain control characters"},
    ]


def test_a_phone_of_non_ascii_digits_is_a_reported_row_and_never_a_client(api, sqs, lambdas, clock):
    # Given a file whose second and third rows spell 79001234567 and 79001234568 with a 7 and then
    # Arabic-Indic or full-width digits (which `int()` would read as those ASCII numbers)
    arabic = "7\u0669\u0660\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667"
    full_width = "7\uff19\uff10\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff18"
    job = start(api, f"phone,tag\n79001234560,ok\n{arabic},a\n{full_width},b\n")
    # Then those rows are reported by column, in the operator's words
    assert (job["valid"], job["invalid"]) == (1, 2)
    assert job["errors"] == [
        {"row": 2, "field": "phone", "message": PHONE_RULE},
        {"row": 3, "field": "phone", "message": PHONE_RULE},
    ]
    # And once the import has run, only the ASCII row is a client
    clock.advance(seconds=1)
    run_imports(sqs, lambdas)
    assert imported(api, job["id"])["created"] == 1
    assert list(clients_by_phone(api)) == ["79001234560"]


def test_the_first_row_of_a_phone_wins_and_the_others_are_reported(api, sqs, lambdas):
    """Given a file with a phone in three rows, when it is imported, then the first row is kept and
    the others are reported as duplicates of it."""
    job = start(
        api,
        "phone,tag\n79001234567,first\n79001234568,other\n79001234567,second\n79001234567,third\n",
    )
    assert [(e["row"], e["field"]) for e in job["errors"]] == [(3, "phone"), (4, "phone")]
    assert all("also in row 1" in e["message"] for e in job["errors"])
    run_imports(sqs, lambdas)
    assert clients_by_phone(api)["79001234567"]["tag"] == "first"
    assert imported(api, job["id"])["created"] == 2


def test_columns_may_come_in_any_order_and_case_and_optional_ones_may_be_missing(api, sqs, lambdas):
    """Given a header in another order and case without the optional columns, when it is imported,
    then the client is created with the defaults."""
    job = start(api, " Tag ,PHONE\nvip,79001234567\n")
    run_imports(sqs, lambdas)
    assert imported(api, job["id"])["created"] == 1
    client = clients_by_phone(api)["79001234567"]
    assert (client["tag"], client["operator_code"], client["timezone"]) == ("vip", "900", "UTC")


def test_the_report_lists_the_first_thousand_errors_and_counts_the_rest(api, sqs, lambdas):
    # Given a file of 1,500 invalid rows and one valid row
    text = "phone\n" + "bad\n" * 1500 + "79001234567\n"
    # When it is imported
    job = start(api, text)
    run_imports(sqs, lambdas)
    # Then the first 1,000 errors are listed, in row order, and the other 500 counted
    done = imported(api, job["id"])
    assert (done["invalid"], done["valid"], done["created"]) == (1500, 1, 1)
    assert [e["row"] for e in done["errors"]] == list(range(1, 1001))
    assert done["errors_omitted"] == 500


# ---------------------------------------------------------------- files refused as a whole


def refused(api, response, status: int, error: str) -> dict:
    assert response.status_code == status, response.body
    answer = body(response)
    assert set(answer) == {"error", "message", "details"}
    assert answer["error"] == error
    assert body(api.get("/clients/imports"))["items"] == []
    return answer


BAD_FILES = {
    "empty body": (b"", "empty_file"),
    "only blank lines": (b"\n\n", "empty_file"),
    "not UTF-8": ("phone,tag\n79001234567,Zürich\n".encode("latin-1"), "not_utf8"),
    "NUL characters": (b"phone\x00\n79001234567\n", "not_csv"),
    "an unterminated quote": (b'phone,tag\n79001234567,"vip\n', "not_csv"),
    "text after a closing quote": (b'phone,tag\n79001234567,"vip"x\n', "not_csv"),
    "no header (a data row first)": (b"79001234567,vip\n", "unknown_column"),
    "a blank first line": (b"\nphone\n79001234567\n", "missing_header"),
    "no phone column": (b"tag,timezone\nvip,UTC\n", "missing_column"),
    "an unknown column": (b"phone,name\n79001234567,Ivan\n", "unknown_column"),
    "a column twice": (b"phone,tag,tag\n79001234567,a,b\n", "duplicate_column"),
    "a column without a name": (b"phone,\n79001234567,\n", "unknown_column"),
}


@pytest.mark.parametrize(("text", "kind"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_file_that_cannot_be_read_is_refused_with_422_and_nothing_starts(api, sqs, text, kind):
    """Given a file that is not CSV or has a bad header, when it is uploaded, then the answer is a
    422 naming the problem and nothing is queued."""
    answer = refused(api, post_csv(api, text), 422, "validation_error")
    assert kind in {detail["type"] for detail in answer["details"]}
    assert sqs.depth(IMPORT_URL) == 0


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "text/plain",
        "multipart/form-data; boundary=x",
        "text/csv; charset=latin-1",
        "",
    ],
)
def test_a_body_that_is_not_a_utf8_csv_file_is_415(api, content_type):
    """Given a body that is not declared as UTF-8 CSV, when it is uploaded, then the answer is a
    415."""
    headers = {**AUTH, "Content-Type": content_type} if content_type else dict(AUTH)
    refused(api, post_csv(api, "phone\n79001234567\n", headers), 415, "unsupported_media_type")


def test_csv_with_a_utf8_charset_is_accepted(api):
    """Given text/csv with a UTF-8 charset, when it is uploaded, then the import starts (202)."""
    headers = {**AUTH, "Content-Type": 'text/csv; charset="UTF-8"'}
    assert post_csv(api, "phone\n79001234567\n", headers).status_code == 202


@pytest.mark.parametrize("settings", [{"import_max_bytes": 1024}], indirect=True)
def test_a_file_over_import_max_bytes_is_413(api):
    """Given a file just over IMPORT_MAX_BYTES, when it is uploaded, then the answer is a 413; a
    file under it starts."""
    text = "phone\n" + "79001234567\n" * 86  # 1,038 bytes
    refused(api, post_csv(api, text), 413, "payload_too_large")
    assert post_csv(api, "phone\n" + "79001234567\n" * 80).status_code == 202


@pytest.mark.parametrize("settings", [{"import_max_rows": 3}], indirect=True)
def test_a_file_over_import_max_rows_is_422(api):
    """Given a file over IMPORT_MAX_ROWS, when it is uploaded, then the answer is a 422
    too_many_rows; blank lines do not count as rows."""
    # Blank lines are not rows: three rows and a blank line are accepted, four rows are not
    assert post_csv(api, "phone\n79001234567\n\n79001234568\n79001234569\n").status_code == 202
    response = post_csv(api, "phone\n" + "79001234567\n" * 4)
    assert response.status_code == 422, response.body
    assert body(response)["details"][0]["type"] == "too_many_rows"
    assert "more than 3 rows" in body(response)["message"]


def test_a_file_without_a_valid_row_is_a_finished_import_that_writes_nothing(
    api, sqs, dynamodb_writes
):
    """Given a file without a valid row, when it is uploaded, then the import is done at once,
    nothing is queued and no client is written."""
    for text in ("phone,tag\n", "phone\nbad\n"):
        job = start(api, text)
        assert job["status"] == "done"
        assert imported(api, job["id"])["status"] == "done"
    assert sqs.depth(IMPORT_URL) == 0
    assert client_writes(dynamodb_writes) == Counter()


def test_an_unknown_import_is_404(api):
    """Given no such import (or an id that is not one), when it is read, then the answer is a 404
    not_found."""
    for import_id in ("5c7b0125-ec18-5a8b-b413-e08616291d28", "not-an-id"):
        response = api.get(f"/clients/imports/{import_id}")
        assert response.status_code == 404
        assert body(response)["error"] == "not_found"


def test_imports_are_listed_newest_first_a_page_at_a_time(api, clock):
    """Given three imports, when they are listed two at a time, then they come newest first,
    without their row errors."""
    ids = []
    for n in range(3):
        ids.append(start(api, f"phone\n7900123456{n}\n")["id"])
        clock.advance(seconds=1)
    first = body(api.get("/clients/imports?limit=2"))
    second = body(api.get(f"/clients/imports?limit=2&cursor={first['next_cursor']}"))
    assert [job["id"] for job in first["items"] + second["items"]] == ids[::-1]
    assert second["next_cursor"] is None
    assert "errors" not in first["items"][0]


# ---------------------------------------------------------------- idempotence and updates


def test_importing_the_same_file_again_changes_nothing_and_writes_no_client(
    api, sqs, lambdas, clock, dynamodb_writes
):
    # Given a file that was imported
    first = start(api, FILE)
    run_imports(sqs, lambdas)
    before = clients_by_phone(api)
    dynamodb_writes.clear()
    # When the same file is imported again
    clock.advance(minutes=5)
    again = start(api, FILE)
    run_imports(sqs, lambdas)
    # Then every valid row is unchanged, and no client or phone record was written
    done = imported(api, again["id"])
    assert counts(done) == {**counts(imported(api, first["id"])), "created": 0, "unchanged": 3}
    assert done["status"] == "done"
    assert clients_by_phone(api) == before
    assert client_writes(dynamodb_writes) == Counter()


def test_a_known_phone_takes_the_fields_its_row_gives_and_keeps_the_others(
    api, sqs, lambdas, clock
):
    # Given clients created over the API, one of them opted out
    for payload in (
        {"phone": "79001234567", "operator_code": "901", "tag": "vip", "timezone": "Asia/Omsk"},
        {"phone": "79001234568", "tag": "old"},
        {"phone": "79001234569", "tag": "same"},
    ):
        assert api.post("/clients", payload).status_code == 201
    assert api.post("/opt-outs", {"phone": "79001234567"}).status_code in (200, 201)
    before = clients_by_phone(api)
    clock.advance(minutes=1)
    # When a file changes the tag of one, the operator code of another and repeats the third
    job = start(
        api,
        "phone,operator_code,tag,timezone\n"
        "79001234567,,new,\n"
        "79001234568,999,,\n"
        "79001234569,,same,\n",
    )
    run_imports(sqs, lambdas)
    # Then the first two are updated with those fields only, the third is left alone
    done = imported(api, job["id"])
    assert (done["created"], done["updated"], done["unchanged"]) == (0, 2, 1)
    after = clients_by_phone(api)
    first, second, third = (after[p] for p in ("79001234567", "79001234568", "79001234569"))
    assert (first["tag"], first["operator_code"], first["timezone"]) == ("new", "901", "Asia/Omsk")
    assert first["opted_out"] is True
    assert (second["tag"], second["operator_code"]) == ("old", "999")
    assert third == before["79001234569"]
    for phone in ("79001234567", "79001234568"):
        assert after[phone]["id"] == before[phone]["id"]
        assert after[phone]["updated_at"] > before[phone]["updated_at"]
    # And a changed client is found by the audience indexes under its new tag only
    assert [c["phone"] for c in body(api.get("/clients?tag=new"))["items"]] == ["79001234567"]
    assert body(api.get("/clients?tag=vip"))["items"] == []


# ---------------------------------------------------------------- delivery to imported clients


def test_a_mailing_reaches_imported_clients_as_it_reaches_created_ones(
    api, sqs, lambdas, services, clock, sandbox
):
    # Given clients imported from a file, and one created over the API
    text = "phone,operator_code,tag\n" + "".join(
        f"7900555{n:04d},{'900' if n % 2 else '901'},{'vip' if n % 3 else 'other'}\n"
        for n in range(30)
    )
    start(api, text)
    run_imports(sqs, lambdas)
    assert api.post("/clients", {"phone": "79005559999", "tag": "vip"}).status_code == 201
    # When a mailing to operator 900's vip clients and one to everyone run
    targeted = api.post(
        "/mailings",
        {
            "text": "For you",
            "start_at": clock().isoformat(),
            "end_at": (clock() + timedelta(hours=1)).isoformat(),
            "filter": {"operator_codes": ["900"], "tags": ["vip"]},
        },
    )
    everyone = api.post(
        "/mailings",
        {
            "text": "For all",
            "start_at": clock().isoformat(),
            "end_at": (clock() + timedelta(hours=1)).isoformat(),
        },
    )
    assert targeted.status_code == everyone.status_code == 201
    Pipeline(services, sqs, clock).settle()
    # Then each reaches exactly the clients its filter selects, imported ones included
    sent = Counter((s.text, str(s.phone)) for s in sandbox.accepted())
    expected_targeted = {f"7900555{n:04d}" for n in range(30) if n % 2 and n % 3} | {"79005559999"}
    assert {p for (t, p) in sent if t == "For you"} == expected_targeted
    assert {p for (t, p) in sent if t == "For all"} == {f"7900555{n:04d}" for n in range(30)} | {
        "79005559999"
    }
    assert set(sent.values()) == {1}


# ---------------------------------------------------------------- chunks, retries, failures


def test_a_large_file_is_written_in_chunks_and_the_import_runs_until_the_last(
    api, sqs, lambdas, small_chunks
):
    # Given a file of 12 rows (chunks of 5: three of them)
    text = "phone\n" + "".join(f"790012345{n:02d}\n" for n in range(12))
    job = start(api, text)
    assert sqs.depth(IMPORT_URL) == 3
    # When one chunk is written, the import is running and counts it
    run_imports(sqs, lambdas, limit=1)
    partial = imported(api, job["id"])
    assert (partial["status"], partial["created"]) == ("running", 5)
    # When the others are written, it is done
    run_imports(sqs, lambdas)
    done = imported(api, job["id"])
    assert (done["status"], done["created"]) == ("done", 12)
    assert len(clients_by_phone(api)) == 12


def test_a_chunk_delivered_twice_is_written_and_counted_once(
    api, sqs, lambdas, small_chunks, dynamodb_writes
):
    # Given a chunk that SQS delivers again after it was processed
    job = start(api, "phone\n" + "".join(f"790012345{n:02d}\n" for n in range(5)))
    [message] = sqs.queues[IMPORT_URL]
    sqs.queues[IMPORT_URL].append(message)
    # When both deliveries run
    assert run_imports(sqs, lambdas) == 2
    # Then the second wrote no client and counted nothing
    done = imported(api, job["id"])
    assert (done["status"], done["created"], done["unchanged"]) == ("done", 5, 0)
    assert client_writes(dynamodb_writes)[("TransactPut", "sms-test-clients")] == 5


def test_a_chunk_that_crashed_half_way_counts_each_row_once_when_it_comes_back(
    api, sqs, lambdas, small_chunks, monkeypatch
):
    # Given the worker dies after the first part of a chunk is written (2 of 5 rows)
    from pynamodb.transactions import TransactWrite

    job = start(api, "phone,tag\n" + "".join(f"790012345{n:02d},t\n" for n in range(5)))
    commit = TransactWrite._commit
    commits = Counter()

    def dying(self):
        commits["n"] += 1
        if commits["n"] == 2:
            raise RuntimeError("Lambda timed out")
        return commit(self)

    monkeypatch.setattr(TransactWrite, "_commit", dying)
    # When SQS delivers the chunk again and it completes
    assert run_imports(sqs, lambdas) == 2
    # Then every row is created once and counted once
    done = imported(api, job["id"])
    assert (done["status"], done["created"], done["unchanged"], done["failed"]) == (
        "done",
        5,
        0,
        0,
    )
    assert len(clients_by_phone(api)) == 5


def test_a_chunk_that_died_before_adding_its_totals_adds_them_once(
    api, sqs, lambdas, small_chunks, monkeypatch
):
    # Given the worker dies after the chunk's record is complete, before the import's totals
    from chalicelib.services.imports import ClientImports

    job = start(api, "phone\n" + "".join(f"790012345{n:02d}\n" for n in range(5)))
    settle = ClientImports._settle
    calls = Counter()

    def dying(self, chunk, state):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("Lambda timed out")
        return settle(self, chunk, state)

    monkeypatch.setattr(ClientImports, "_settle", dying)
    # When the chunk comes back
    assert run_imports(sqs, lambdas) == 2
    # Then its totals are in once
    done = imported(api, job["id"])
    assert (done["status"], done["created"]) == ("done", 5)


def test_rows_that_meet_a_change_made_meanwhile_fail_alone(
    api, sqs, lambdas, small_chunks, monkeypatch
):
    # Given a client that exists, and a file that changes it and adds two phones
    made = body(api.post("/clients", {"phone": "79001234567", "tag": "old"}))
    job = start(api, "phone,tag\n79001234567,new\n79001234568,new\n79001234569,new\n")
    # When, after the worker has read them, the client is edited and a phone is taken
    from chalicelib.services.imports import ClientImports

    existing = ClientImports._existing

    def and_meanwhile(self, rows):
        found = existing(self, rows)
        assert api.patch(f"/clients/{made['id']}", {"tag": "edited"}).status_code == 200
        assert api.post("/clients", {"phone": "79001234568"}).status_code == 201
        return found

    monkeypatch.setattr(ClientImports, "_existing", and_meanwhile)
    run_imports(sqs, lambdas)
    # Then those two rows fail with the reason, the third row is written, the edits stand
    done = imported(api, job["id"])
    assert (done["status"], done["created"], done["updated"], done["failed"]) == (
        "done",
        1,
        0,
        2,
    )
    assert [(e["row"], e["field"]) for e in done["errors"]] == [(1, None), (2, "phone")]
    assert "changed by another request meanwhile" in done["errors"][0]["message"]
    assert "given to another client meanwhile" in done["errors"][1]["message"]
    clients = clients_by_phone(api)
    assert clients["79001234567"]["tag"] == "edited"
    assert clients["79001234568"]["tag"] == ""
    assert clients["79001234569"]["tag"] == "new"


def test_a_chunk_that_keeps_failing_is_given_up_and_the_import_fails(
    api, sqs, lambdas, small_chunks, monkeypatch
):
    # Given a file of two chunks, and a worker that can never write the second
    text = "phone\n" + "".join(f"790012345{n:02d}\n" for n in range(7))
    job = start(api, text)
    from chalicelib.services.imports import ClientImports

    process = ClientImports._process

    def failing(self, chunk):
        if chunk.chunk == 1:
            raise RuntimeError("DynamoDB is unreachable")
        return process(self, chunk)

    monkeypatch.setattr(ClientImports, "_process", failing)
    # When SQS has delivered it five times
    assert run_imports(sqs, lambdas) == 6
    # Then its rows count as failed, each with the reason, and the import ends failed
    done = imported(api, job["id"])
    assert (done["status"], done["created"], done["failed"]) == ("failed", 5, 2)
    assert [e["row"] for e in done["errors"]] == [6, 7]
    assert all("could not be written (RuntimeError)" in e["message"] for e in done["errors"])
    # And importing the file again once the fault is gone writes only what is missing
    monkeypatch.setattr(ClientImports, "_process", process)
    again = start(api, text)
    run_imports(sqs, lambdas)
    finished = imported(api, again["id"])
    assert finished["status"] == "done"
    assert (finished["created"], finished["unchanged"], finished["failed"]) == (2, 5, 0)


def test_queued_rows_that_cannot_be_queued_fail_the_import_with_503(api, sqs, monkeypatch):
    """Given SQS refusing the rows, when a file is uploaded, then the answer is a 503 and the
    import is failed."""

    def refuse(*args, **kwargs):
        raise RuntimeError("SQS is unreachable")

    monkeypatch.setattr(sqs, "send_message_batch", refuse)
    response = post_csv(api, "phone\n79001234567\n")
    assert response.status_code == 503
    assert body(response)["error"] == "unavailable"
    [job] = body(api.get("/clients/imports"))["items"]
    assert job["status"] == "failed"


def test_a_malformed_chunk_is_dropped(lambdas, services, caplog):
    """Given a chunk message that is not one, when the import worker handles it, then it is dropped
    and logged."""
    event = lambdas.events.generate_sqs_event([json.dumps({"rows": "x"})], queue_name="q")
    lambdas.lambda_.invoke("import_clients", event)
    assert "malformed import chunk dropped" in caplog.text
