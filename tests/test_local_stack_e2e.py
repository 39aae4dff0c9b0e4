"""The local stack as a developer runs it (`make run`): a subprocess spoken to over HTTP."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "e2e-token-" + "x" * 24
READY_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 10
_PID_LINE = re.compile(r"starting the local stack \(pid (\d+)\)")
SCRIPT = ("text/javascript", "application/javascript")
STYLESHEET = ("text/css",)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stack_command() -> list[str]:
    """`make run` when the repo's .venv exists; otherwise what `make run` runs, on this Python.

    `make run` first builds .venv (a pip install) when it is missing, which a test must not do
    and a sandbox without an index cannot do; the packages are already importable here.
    """
    if (REPO_ROOT / ".venv" / "bin" / "python").exists():
        return ["make", "run"]
    return [sys.executable, "-m", "chalicelib.local"]


def stack_environment(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("AWS_ENDPOINT_URL", "AUTH_MODE", "TABLE_PREFIX", "HOST"):
        env.pop(name, None)
    env.update(PYTHONUNBUFFERED="1", MOTO_PORT="0", **overrides)
    return env


@dataclass
class RunningStack:
    """A started `make run` with its output collected as it arrives."""

    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    ready_url: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def collect(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("READY "):
                self.ready_url = line.split(" ", 1)[1].strip()
                self.ready.set()
        self.ready.set()  # the process ended: whoever waits should stop waiting

    def stack_pid(self) -> int:
        """The Python process serving the API (under `make run`, a child of make)."""
        match = _PID_LINE.search(self.output)
        return int(match.group(1)) if match else self.process.pid


def spawn(env: dict[str, str]) -> RunningStack:
    process = subprocess.Popen(
        stack_command(),
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: teardown can never miss a child
    )
    running = RunningStack(process)
    threading.Thread(target=running.collect, daemon=True).start()
    return running


@dataclass
class Stack:
    url: str
    startup_seconds: float
    auth: dict[str, str]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """The local stack started as `make run` starts it, on a free port, stopped with SIGTERM."""
    port = free_port()
    started = time.monotonic()
    running = spawn(stack_environment(PORT=str(port), API_TOKENS=TOKEN))
    try:
        running.ready.wait(READY_TIMEOUT_SECONDS)
        if running.ready_url is None:
            pytest.fail(f"no READY line within {READY_TIMEOUT_SECONDS} s:\n{running.output}")
        startup = time.monotonic() - started
        assert running.ready_url == f"http://127.0.0.1:{port}"
        yield Stack(running.ready_url, startup, {"Authorization": f"Bearer {TOKEN}"})

        os.kill(running.stack_pid(), signal.SIGTERM)
        try:
            exit_code = running.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_TIMEOUT_SECONDS} s after SIGTERM:\n{running.output}")
        assert exit_code == 0, running.output
    finally:
        if running.process.poll() is None:
            os.killpg(running.process.pid, signal.SIGKILL)
            running.process.wait()


def test_startup_time_is_reported(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\nlocal stack: spawn to READY in {stack.startup_seconds:.2f} s")
    assert stack.startup_seconds < READY_TIMEOUT_SECONDS


def test_health_needs_no_token(stack: Stack) -> None:
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


def test_request_without_token_is_401(stack: Stack) -> None:
    assert requests.get(f"{stack.url}/clients", timeout=5).status_code == 401


def test_request_with_wrong_token_is_403(stack: Stack) -> None:
    wrong = {"Authorization": "Bearer " + "w" * 32}
    assert requests.get(f"{stack.url}/clients", headers=wrong, timeout=5).status_code == 403


def test_bad_body_is_a_json_error(stack: Stack) -> None:
    response = requests.post(
        f"{stack.url}/clients", json={"phone": "12345"}, headers=stack.auth, timeout=5
    )
    assert 400 <= response.status_code < 500
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()
    assert set(error) == {"error", "message", "details"}
    assert any(detail["field"] == "body.phone" for detail in error["details"])


def test_too_short_token_is_refused_before_anything_starts() -> None:
    # Given a token that could be guessed
    env = stack_environment(PORT=str(free_port()), API_TOKENS="short")
    # When the stack is started with it
    started = time.monotonic()
    result = subprocess.run(
        stack_command(),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_SECONDS,
        start_new_session=True,
    )
    # Then it exits at once, naming the setting, and never serves
    assert result.returncode != 0
    assert "API_TOKENS" in result.stderr
    assert "at least 16 characters" in result.stderr
    assert "READY" not in result.stdout
    assert time.monotonic() - started < 15
