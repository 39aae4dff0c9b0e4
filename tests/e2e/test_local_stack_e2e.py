"""The local stack as a developer runs it (`make run`): a subprocess spoken to over HTTP."""

from __future__ import annotations

import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from tests.support.local_stack import (
    READY_TIMEOUT_SECONDS,
    REPO_ROOT,
    Stack,
    free_port,
    running_stack,
    stack_command,
    stack_environment,
)

pytestmark = pytest.mark.e2e

SCRIPT = ("text/javascript", "application/javascript")
STYLESHEET = ("text/css",)


DAY = timedelta(days=1)


@pytest.fixture(scope="module")
def outbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outbox")


@pytest.fixture(scope="module")
def stack(outbox: Path) -> Iterator[Stack]:
    """The local stack started as `make run` starts it, on a free port, stopped with SIGTERM."""
    with running_stack(REPORT_OUTBOX_DIR=str(outbox)) as started:
        yield started


def test_startup_time_is_reported(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    """Given the local stack started, when its startup time is read, then it is printed and under
    the ready timeout."""
    with capsys.disabled():
        print(f"\nlocal stack: spawn to READY in {stack.startup_seconds:.2f} s")
    assert stack.startup_seconds < READY_TIMEOUT_SECONDS


def test_health_needs_no_token(stack: Stack) -> None:
    """Given no token, when /health is asked, then the stack answers 200 with its stage."""
    response = requests.get(f"{stack.url}/health", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "stage": "dev"}


def test_docs_page_and_every_asset_it_loads_are_served(stack: Stack) -> None:
    # Given the interactive docs page
    page = requests.get(f"{stack.url}/docs", timeout=5)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assets = re.findall(r'(?:href|src)="(docs/assets/[^"]+)"', page.text)
    assert len(assets) >= 3
    # When the browser loads what it references
    for asset in assets:
        response = requests.get(f"{stack.url}/{asset}", timeout=5)
        # Then each one arrives as a script or a stylesheet
        assert response.status_code == 200, asset
        content_type = response.headers["Content-Type"].split(";")[0]
        expected = STYLESHEET if asset.endswith(".css") else SCRIPT
        assert content_type in expected, (asset, content_type)


def test_openapi_document_is_served(stack: Stack) -> None:
    """Given no token, when /openapi.json is asked, then an OpenAPI 3 document is served."""
    response = requests.get(f"{stack.url}/openapi.json", timeout=5)
    assert response.status_code == 200
    assert response.json()["openapi"].startswith("3.")


def test_client_lifecycle_over_http(stack: Stack) -> None:
    tag = f"e2e-{uuid.uuid4().hex[:8]}"
    with requests.Session() as http:
        http.headers.update(stack.auth)
        # Given a client created over HTTP
        created = http.post(
            f"{stack.url}/clients", json={"phone": "79161234567", "tag": tag}, timeout=5
        )
        assert created.status_code == 201, created.text
        client = created.json()
        # Then it can be read back and found by its tag
        assert http.get(f"{stack.url}/clients/{client['id']}", timeout=5).json() == client
        listed = http.get(f"{stack.url}/clients", params={"tag": tag}, timeout=5)
        assert listed.status_code == 200
        assert [c["id"] for c in listed.json()["items"]] == [client["id"]]
        # When it is deleted, it is gone
        assert http.delete(f"{stack.url}/clients/{client['id']}", timeout=5).status_code == 204
        assert http.get(f"{stack.url}/clients/{client['id']}", timeout=5).status_code == 404


def test_concurrent_creates_with_one_idempotency_key_make_one_mailing(stack: Stack) -> None:
    text = f"Once {uuid.uuid4().hex[:8]}"
    start = datetime.now(UTC) + timedelta(hours=1)
    mailing = {"text": text, "start_at": start.isoformat(), "end_at": (start + DAY).isoformat()}
    headers = {**stack.auth, "Idempotency-Key": f"e2e-{uuid.uuid4()}"}
    go = threading.Barrier(6)

    def create(_: int) -> requests.Response:
        go.wait(10)
        return requests.post(f"{stack.url}/mailings", json=mailing, headers=headers, timeout=10)

    # When six clients send the same create with one key at once, through the local stack
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(create, range(6)))
    # Then each is the created mailing (first or replayed) or "in progress, retry" ...
    assert {a.status_code for a in answers} <= {201, 409}, [a.text for a in answers]
    created = {a.json()["id"] for a in answers if a.status_code == 201}
    assert len(created) == 1, created
    # ... and the service holds exactly one such mailing
    listed = requests.get(f"{stack.url}/mailings?limit=500", headers=stack.auth, timeout=10)
    assert [m["id"] for m in listed.json()["items"] if m["text"] == text] == list(created)


def test_daily_report_is_emailed_through_the_emulators_ses_into_the_outbox(
    stack: Stack, outbox: Path
) -> None:
    # When an operator asks for the daily report on the local stack
    response = requests.post(f"{stack.url}/reports/daily", headers=stack.auth, timeout=30)

    # Then SES (the embedded emulator) accepted it and a readable copy is in the outbox
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["ses_message_id"]
    assert report["recipients"] == ["operator@sms-campaigns.local"]
    copies = sorted(path.suffix for path in outbox.iterdir())
    assert copies == [".eml", ".html"]


def test_metrics_are_prometheus_text_and_requests_carry_a_correlation_id(stack: Stack) -> None:
    """Given a request with a correlation id, when /metrics is read, then it is Prometheus text
    with the service's families and the id comes back."""
    from prometheus_client.parser import text_string_to_metric_families

    response = requests.get(
        f"{stack.url}/metrics", headers={**stack.auth, "X-Correlation-Id": "e2e-1"}, timeout=10
    )
    assert response.status_code == 200
    assert response.headers["X-Correlation-Id"] == "e2e-1"
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"sms_messages", "sms_mailings", "sms_queue_messages"} <= names


def test_request_without_token_is_401(stack: Stack) -> None:
    """Given no token, when clients are listed, then the answer is a 401."""
    assert requests.get(f"{stack.url}/clients", timeout=5).status_code == 401


def test_request_with_wrong_token_is_403(stack: Stack) -> None:
    """Given a wrong token, when clients are listed, then the answer is a 403."""
    wrong = {"Authorization": "Bearer " + "w" * 32}
    assert requests.get(f"{stack.url}/clients", headers=wrong, timeout=5).status_code == 403


def test_bad_body_is_a_json_error(stack: Stack) -> None:
    """Given an invalid phone, when a client is created, then the 4xx answer is JSON in the error
    shape naming body.phone."""
    response = requests.post(
        f"{stack.url}/clients", json={"phone": "12345"}, headers=stack.auth, timeout=5
    )
    assert 400 <= response.status_code < 500
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()
    assert set(error) == {"error", "message", "details"}
    assert any(detail["field"] == "body.phone" for detail in error["details"])


def start_refused(**env: str) -> subprocess.CompletedProcess[str]:
    """Start the stack with a setting it must refuse; the finished process."""
    return subprocess.run(
        stack_command(),
        cwd=REPO_ROOT,
        env=stack_environment(PORT=str(free_port()), **env),
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_SECONDS,
        start_new_session=True,
    )


def test_too_short_token_is_refused_before_anything_starts() -> None:
    # Given a token that could be guessed, when the stack is started with it
    started = time.monotonic()
    result = start_refused(API_TOKENS="short")
    # Then it exits at once, naming the setting, and never serves
    assert result.returncode != 0
    assert "API_TOKENS" in result.stderr
    assert "at least 16 characters" in result.stderr
    assert "READY" not in result.stdout
    assert time.monotonic() - started < 15


@pytest.mark.parametrize(
    ("name", "value", "explanation"),
    [
        ("SANDBOX_ERROR_RATE", "1.5", "must be between 0 and 1"),
        ("SCHEDULER_INTERVAL_SECONDS", "0", "must be a positive number of seconds"),
        ("LOCAL_IAM", "maybe", "must be enforce or off"),
        ("LOCAL_IAM_TEMPLATE", "infra/missing.yaml", "must name an existing file"),
    ],
)
def test_bad_pipeline_setting_is_refused_with_exit_code_2(
    name: str, value: str, explanation: str
) -> None:
    # Given a delivery pipeline setting the stack cannot run with, when the stack starts
    result = start_refused(**{name: value})
    # Then it exits with the code of a bad setting, naming it and what is wrong
    assert result.returncode == 2, result.stderr
    assert f"error: {name} {explanation}" in result.stderr
    assert "READY" not in result.stdout


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LOG_LEVEL", "chatty"),
        ("REPORT_SENDER", "not-an-address"),
        ("REPORT_RECIPIENTS", "ops@example.com,nobody"),
        ("SENDER_API_TOKEN_SECRET_ID", "not a secret id"),
    ],
)
def test_bad_operations_setting_is_refused_by_name_with_exit_code_2(name: str, value: str) -> None:
    # Given an operations setting the service cannot run with, when the stack starts
    result = start_refused(**{name: value})
    # Then it exits with the code of a bad setting, naming it, and never serves
    assert result.returncode == 2, result.stderr
    assert "error: invalid settings:" in result.stderr
    assert name in result.stderr
    assert "Traceback" not in result.stderr
    assert "READY" not in result.stdout


def test_a_bad_aws_faults_value_is_refused_with_exit_code_2() -> None:
    # Given AWS_FAULTS naming a fault that does not exist, when the stack starts
    result = start_refused(AWS_FAULTS="conflicts=0.1")
    # Then it exits with the code of a bad setting, naming it and what is wrong
    assert result.returncode == 2, result.stderr
    assert "error: AWS_FAULTS: unknown fault 'conflicts'" in result.stderr
    assert "READY" not in result.stdout


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("send_messages=0.5", "'send_messages=0.5' is not function=seconds"),
        ("send_messages", "'send_messages' is not function=seconds"),
        ("send_messages=fast", "'send_messages=fast' is not function=seconds"),
        ("sender=5", "LAMBDA_TIMEOUTS names sender; the local stack's functions are"),
    ],
)
def test_a_bad_lambda_timeouts_value_is_refused_with_exit_code_2(
    value: str, complaint: str
) -> None:
    # Given LAMBDA_TIMEOUTS with a bad entry, when the stack starts
    result = start_refused(LAMBDA_TIMEOUTS=value)
    # Then it exits with the code of a bad setting, saying what is wrong, and never serves
    assert result.returncode == 2, result.stderr
    assert complaint in result.stderr
    assert "READY" not in result.stdout
