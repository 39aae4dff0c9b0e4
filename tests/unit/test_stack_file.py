"""The file a running local stack writes so `chalice local --stage local` serves beside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import stack_file

EMULATOR = "http://127.0.0.1:45123"


def stack_environ(path: Path) -> dict[str, str]:
    """What `make run`'s environment holds once it serves (abridged)."""
    return {
        "LOCAL_STACK_FILE": str(path),
        "AWS_ENDPOINT_URL": EMULATOR,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "TABLE_PREFIX": "sms-local",
        "SEND_QUEUE_URL": f"{EMULATOR}/123456789012/sms-local-send",
        "API_TOKENS": "run-token-abcdefghijklmnop",
        "LOG_FORMAT": "text",
        "REPORT_OUTBOX_DIR": "/work/build/outbox",
        "HOME": "/home/someone",  # not the service's: stays out of the file
    }


def written_by_this_process(path: Path) -> None:
    stack_file.write(
        stack_environ(path),
        pid=os.getpid(),
        api_url="http://127.0.0.1:8000",
        embedded_emulator=True,
    )


def test_chalice_local_gets_the_stacks_endpoint_tables_queues_and_token(tmp_path: Path) -> None:
    # Given a running stack's file
    path = tmp_path / "local-stack.json"
    written_by_this_process(path)
    # When chalice local attaches with nothing else set
    environ = {"LOCAL_STACK_FILE": str(path), "STAGE": "local", "AWS_PROFILE": "work"}
    api_url = stack_file.attach(environ)
    # Then it reaches the same emulator, tables, queues and token, with no real credentials
    assert api_url == "http://127.0.0.1:8000"
    assert environ["AWS_ENDPOINT_URL"] == EMULATOR
    assert environ["TABLE_PREFIX"] == "sms-local"
    assert environ["SEND_QUEUE_URL"].endswith("/sms-local-send")
    assert environ["API_TOKENS"] == "run-token-abcdefghijklmnop"
    assert environ["LOG_FORMAT"] == "text"
    # And its daily reports go to the stack's outbox too
    assert environ["REPORT_OUTBOX_DIR"] == "/work/build/outbox"
    assert "AWS_PROFILE" not in environ
    assert "HOME" not in environ
    # And the stage chalice local runs keeps its own name
    assert environ["STAGE"] == "local"


def test_variables_already_set_win_over_the_file(tmp_path: Path) -> None:
    # Given a running stack's file, and AWS_ENDPOINT_URL and LOG_FORMAT set by the developer
    path = tmp_path / "local-stack.json"
    written_by_this_process(path)
    environ = {
        "LOCAL_STACK_FILE": str(path),
        "AWS_ENDPOINT_URL": "http://127.0.0.1:4566",
        "LOG_FORMAT": "json",
    }
    # When chalice local attaches
    stack_file.attach(environ)
    # Then theirs are kept
    assert environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:4566"
    assert environ["LOG_FORMAT"] == "json"


def test_the_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    # When a stack writes its file (it holds the API token)
    path = tmp_path / "local-stack.json"
    written_by_this_process(path)
    # Then nobody else may read it
    assert path.stat().st_mode & 0o077 == 0


def test_without_a_stack_attaching_says_so_in_one_line(tmp_path: Path) -> None:
    # Given no stack has written a file
    environ = {"LOCAL_STACK_FILE": str(tmp_path / "missing.json")}
    # When chalice local attaches
    with pytest.raises(stack_file.NoLocalStack) as refused:
        stack_file.attach(environ)
    # Then one line says what is missing and what to do
    message = str(refused.value)
    assert "\n" not in message
    assert "no local stack found" in message
    assert "start `make run` first" in message


def test_the_file_of_a_stopped_stack_is_not_used(tmp_path: Path) -> None:
    # Given a file left by a stack that was killed (its process is gone)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    path = tmp_path / "local-stack.json"
    stack_file.write(
        stack_environ(path), pid=int(gone.stdout), api_url="http://x", embedded_emulator=True
    )
    # When chalice local attaches, then it refuses, saying that stack has stopped
    with pytest.raises(stack_file.NoLocalStack, match=r"has stopped.*start `make run` first"):
        stack_file.attach({"LOCAL_STACK_FILE": str(path)})


def test_a_stack_removes_only_its_own_file(tmp_path: Path) -> None:
    # Given the file of another, newer stack
    path = tmp_path / "local-stack.json"
    written_by_this_process(path)
    # When an older stack (another pid) stops, then the file stays
    stack_file.remove({"LOCAL_STACK_FILE": str(path)}, pid=os.getpid() + 100000)
    assert path.exists()
    # And when its own stack stops, it goes
    stack_file.remove({"LOCAL_STACK_FILE": str(path)}, pid=os.getpid())
    assert not path.exists()
