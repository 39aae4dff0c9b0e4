"""What `make run` shows a developer: one readable line per event, then the banner, last."""

from __future__ import annotations

import json
import re

import pytest
import requests

from devstack.stack import BANNER_END
from tests.support.local_stack import running_stack

pytestmark = pytest.mark.e2e

# `16:29:25 INFO    client created  client=…`: time, level, message, ids.
TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR)\s+\S")
BANNER_START = "SMS campaign service - local stack"


def test_the_console_shows_readable_lines_and_the_banner_last() -> None:
    # Given `make run` with no LOG_FORMAT set
    with running_stack() as stack:
        # When it has started and a client is created
        created = requests.post(
            f"{stack.url}/clients", json={"phone": "79005550111"}, headers=stack.auth, timeout=10
        )
        assert created.status_code == 201, created.text
        lines = stack.running.output.splitlines()
    # Then its start-up lines are readable text lines, none of them JSON
    banner_at = next(i for i, line in enumerate(lines) if line.startswith(BANNER_START))
    start_up = [line for line in lines[:banner_at] if TEXT_LINE.match(line)]
    assert any("starting the local stack" in line for line in start_up), lines
    assert any("scheduler started" in line for line in start_up), lines
    assert not [line for line in lines if line.startswith("{")], stack.running.output
    # And the banner comes after everything start-up printed (READY included), whole
    assert any(line.startswith("READY ") for line in lines[:banner_at])
    banner_end = lines.index(BANNER_END)
    banner = lines[banner_at + 1 : banner_end]
    assert all(line.startswith("  ") for line in banner), banner
    assert any(line.startswith("  Token    ") for line in banner)
    assert not any(TEXT_LINE.match(line) and "started" in line for line in lines[banner_end:])
    # And what happened after it carries the ids on one line each
    [client_line] = [line for line in lines[banner_end:] if "client created" in line]
    assert TEXT_LINE.match(client_line)
    assert f"client={created.json()['id']}" in client_line
    # And the request is one line, the service's (no second access line from the server)
    assert len([line for line in lines if "POST /clients" in line]) == 1, lines


def test_log_format_json_makes_the_console_json() -> None:
    # Given `make run` with LOG_FORMAT=json
    with running_stack(LOG_FORMAT="json") as stack:
        lines = stack.running.output.splitlines()
    # Then its log lines are Powertools' JSON objects, and no text line is among them
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(record["message"].startswith("starting the local stack") for record in logged)
    assert all({"level", "message", "timestamp", "service"} <= set(record) for record in logged)
    assert not [line for line in lines if TEXT_LINE.match(line)], stack.running.output
