"""`chalice local --stage local` beside `make run`: the full API on the same local stack, with
no variable set by hand; alone, one line saying what to start first."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from tests.support.local_stack import (
    REPO_ROOT,
    CollectedProcess,
    free_port,
    running_stack,
    stack_environment,
)

pytestmark = pytest.mark.e2e

CHALICE = str(Path(sys.executable).parent / "chalice")
START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 15
DELIVERY_TIMEOUT_SECONDS = 45
PHONE = "79005550101"
# `16:29:25 INFO    client created  client=…`: time, level, message, ids.
TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR)\s+\S")


@dataclass
class ChaliceLocal(CollectedProcess):
    """A running `chalice local` and its output, collected as it arrives."""

    url: str = ""

    def is_ready_line(self, line: str) -> bool:
        return line.startswith("Serving on ")


def chalice_local_command(port: int) -> list[str]:
    """What the docs tell a developer to run, with a port of the test's choosing."""
    return [CHALICE, "local", "--stage", "local", "--port", str(port)]


@contextmanager
def chalice_local(stack_file: Path) -> Iterator[ChaliceLocal]:
    """`chalice local --stage local` started as a developer starts it, stopped with Ctrl+C."""
    port = free_port()
    process = subprocess.Popen(
        chalice_local_command(port),
        cwd=REPO_ROOT,
        env=stack_environment(LOCAL_STACK_FILE=str(stack_file)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its reloader runs the server in a child: stop them together
    )
    local = ChaliceLocal(process, url=f"http://127.0.0.1:{port}")
    threading.Thread(target=local.collect, daemon=True).start()
    try:
        local.ready.wait(START_TIMEOUT_SECONDS)
        if process.poll() is not None or not local.ready.is_set():
            pytest.fail(f"chalice local did not serve:\n{local.output}")
        yield local
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_chalice_local_serves_the_api_of_the_running_stack(tmp_path: Path) -> None:
    # Given `make run` running, and `chalice local --stage local` started beside it with no
    # variable set by hand (both find each other through the stack's file)
    stack_file = tmp_path / "local-stack.json"
    with (
        running_stack(SCHEDULER_INTERVAL_SECONDS="1", LOCAL_STACK_FILE=str(stack_file)) as stack,
        chalice_local(stack_file) as local,
    ):
        http = requests.Session()
        http.headers.update(stack.auth)  # the stack's token is accepted by chalice local too
        # When a client is created through chalice local
        created = http.post(f"{local.url}/clients", json={"phone": PHONE}, timeout=10)
        assert created.status_code == 201, created.text + local.output
        client_id = created.json()["id"]
        # Then both APIs list it: they serve the same tables
        for url in (local.url, stack.url):
            listed = http.get(f"{url}/clients", timeout=10)
            assert listed.status_code == 200, listed.text
            assert [c["id"] for c in listed.json()["items"]] == [client_id]

        # When a mailing to it starts through chalice local
        start = datetime.now(UTC)
        mailing = http.post(
            f"{local.url}/mailings",
            json={
                "text": "Spring sale",
                "start_at": start.isoformat(),
                "end_at": (start + timedelta(hours=1)).isoformat(),
            },
            timeout=10,
        )
        assert mailing.status_code == 201, mailing.text
        mailing_id = mailing.json()["id"]
        # Then the stack's workers deliver it, and chalice local's statistics say so
        deadline = time.monotonic() + DELIVERY_TIMEOUT_SECONDS
        while True:
            stats = http.get(f"{local.url}/mailings/{mailing_id}/stats", timeout=10)
            assert stats.status_code == 200, stats.text
            if stats.json()["stats"]["sent"] == 1:
                break
            assert time.monotonic() < deadline, f"{stats.json()}\n{stack.running.output}"
            time.sleep(0.3)
        # And the sandbox gateway got the one SMS
        ledger = requests.get(f"{stack.sandbox_url}/_sandbox/ledger", timeout=5).json()
        assert [str(send["phone"]) for send in ledger["accepted"]] == [PHONE]
        # And its errors are the stack's: a missing token, an unknown route (its token never
        # quoted back) and a method the path lacks, each in the one error shape
        token = stack.auth["Authorization"].split()[1]
        anonymous = requests.get(f"{local.url}/clients", timeout=10)
        unknown = http.get(f"{local.url}/no-such-route", timeout=10)
        wrong = http.request("TRACE", f"{local.url}/clients", timeout=10)
        assert (anonymous.status_code, anonymous.json()["error"]) == (401, "unauthorized")
        assert (unknown.status_code, unknown.json()["error"]) == (404, "not_found")
        assert token not in unknown.text
        assert (wrong.status_code, wrong.json()["error"]) == (405, "method_not_allowed")

    # And chalice local wrote each log line once, as one readable line
    lines = local.output.splitlines()
    created_lines = [line for line in lines if "client created" in line]
    assert len(created_lines) == 1, local.output
    assert TEXT_LINE.match(created_lines[0])
    assert f"client={client_id}" in created_lines[0]
    assert not [line for line in lines if line.startswith("{")], local.output
    # And each request is one line, the service's (no second access line from the server)
    assert len([line for line in lines if "POST /clients" in line]) == 1, local.output


def test_chalice_local_without_a_stack_stops_at_start_with_one_line(tmp_path: Path) -> None:
    # Given no `make run` running (no stack file)
    port = free_port()
    # When chalice local --stage local starts
    started = time.monotonic()
    process = subprocess.Popen(
        chalice_local_command(port),
        cwd=REPO_ROOT,
        env=stack_environment(LOCAL_STACK_FILE=str(tmp_path / "local-stack.json")),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        printed, _ = process.communicate(timeout=START_TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:  # still serving: the reloader's server child goes too
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # Then it stops at once, with one line saying what is missing and what to do
    output = printed.strip().splitlines()
    assert len(output) == 1, output
    assert output[0].startswith("error: no local stack found"), output
    assert "start `make run` first" in output[0]
    assert time.monotonic() - started < START_TIMEOUT_SECONDS
    # And nothing is left serving on its port (never a 500 per request)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
