"""The local stack as a developer runs it (`make run`), started as a subprocess for e2e tests.

`running_stack(**env)` starts it on a free port with a known API token, waits for its READY
line, and stops it with SIGTERM afterwards, failing the test if it does not exit cleanly.
`running_stack(AWS_FAULTS="conflict=0.15,seed=7")` turns on AWS faults; once it has stopped,
`aws_faults_injected(stack)` reads how many of each kind were injected.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.stack import BANNER_END

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "e2e-token-" + "x" * 24
READY_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 30  # a busy machine (two suites at once) stops slower
_PID_LINE = re.compile(r"starting the local stack \(pid (\d+)\)")
# What a developer's shell may hold that would point the stack elsewhere or change its faults.
_INHERITED_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AUTH_MODE",
    "TABLE_PREFIX",
    "HOST",
    "SENDER_API_URL",
    "SENDER_API_TOKEN",
    "SEND_QUEUE_URL",
    "SEND_DLQ_URL",
    "FANOUT_QUEUE_URL",
    "IMPORT_QUEUE_URL",
    "SCHEDULER_INTERVAL_SECONDS",
    "SENDER_BATCH_SIZE",
    "SENDER_POLLERS",
    "SEND_VISIBILITY_TIMEOUT_SECONDS",
    "AWS_FAULTS",
    "LAMBDA_TIMEOUTS",
    # Every e2e run checks each function's AWS calls against its role, as AWS would.
    "LOCAL_IAM",
    "LOCAL_IAM_TEMPLATE",
    # The console format and `chalice local`'s attachment are chosen per test.
    "LOG_FORMAT",
    "LOCAL_STACK_ATTACH",
)


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
    return [sys.executable, "-m", "devstack"]


def stack_environment(**overrides: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in _INHERITED_VARIABLES and not name.startswith("SANDBOX_")
    }
    # Reports a test triggers (the API fuzzer posts to every route) stay out of build/outbox.
    outbox = tempfile.mkdtemp(prefix="sms-outbox-")
    # Each test's stack tells where it serves in a file of its own, never the developer's.
    stack_file = os.path.join(tempfile.mkdtemp(prefix="sms-stack-"), "local-stack.json")
    env.update(
        PYTHONUNBUFFERED="1", MOTO_PORT="0", REPORT_OUTBOX_DIR=outbox, LOCAL_STACK_FILE=stack_file
    )
    env.update(overrides)
    return env


@dataclass
class CollectedProcess:
    """A started process with its output collected as it arrives; `ready` is set once a line
    says it is ready (`is_ready_line`), or when it ends."""

    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def collect(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if self.is_ready_line(line):
                self.ready.set()
        self.ready.set()  # the process ended: whoever waits should stop waiting

    def is_ready_line(self, line: str) -> bool:
        return False


@dataclass
class RunningStack(CollectedProcess):
    """A started `make run` with its output collected as it arrives."""

    ready_url: str | None = None
    sandbox_url: str | None = None

    def is_ready_line(self, line: str) -> bool:
        if line.startswith("SANDBOX "):
            self.sandbox_url = line.split(" ", 1)[1].strip()
        if line.startswith("READY "):
            self.ready_url = line.split(" ", 1)[1].strip()
        # The banner follows READY: the start-up output is whole once it has ended.
        return bool(self.ready_url) and line.strip() == BANNER_END

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
    """A local stack that serves: where to reach it and how long it took to start."""

    url: str
    startup_seconds: float
    auth: dict[str, str]
    running: RunningStack
    sandbox_url: str | None = None


# What the local stack logs for each AWS call a function's role does not allow.
IAM_DENIAL = "IAM denied"


def iam_denials(output: str) -> list[str]:
    """The stack's log lines of AWS calls denied by a function's role."""
    return [line for line in output.splitlines() if IAM_DENIAL in line]


@contextmanager
def running_stack(*, iam_denials_expected: bool = False, **env: str) -> Iterator[Stack]:
    """The local stack started as `make run` starts it, on a free port, stopped with SIGTERM.

    `env` adds to (or overrides) its environment; API_TOKENS defaults to TOKEN. IAM is enforced
    (LOCAL_IAM), and a call some function's role denied fails the test unless it expects them:
    on AWS that call would fail the same way.
    """
    port = free_port()
    env.setdefault("API_TOKENS", TOKEN)
    token = env["API_TOKENS"].split(",")[0].strip()
    started = time.monotonic()
    running = spawn(stack_environment(PORT=str(port), **env))
    try:
        running.ready.wait(READY_TIMEOUT_SECONDS)
        if running.ready_url is None:
            pytest.fail(f"no READY line within {READY_TIMEOUT_SECONDS} s:\n{running.output}")
        startup = time.monotonic() - started
        assert running.ready_url == f"http://127.0.0.1:{port}"
        yield Stack(
            running.ready_url,
            startup,
            {"Authorization": f"Bearer {token}"},
            running,
            running.sandbox_url,
        )

        os.kill(running.stack_pid(), signal.SIGTERM)
        try:
            exit_code = running.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_TIMEOUT_SECONDS} s after SIGTERM:\n{running.output}")
        assert exit_code == 0, f"exit code {exit_code}\n{running.output}"
        denied = iam_denials(running.output)
        if not iam_denials_expected:
            assert not denied, "a role lacks a grant the code needs:\n" + "\n".join(denied)
    finally:
        if running.process.poll() is None:
            os.killpg(running.process.pid, signal.SIGKILL)
            running.process.wait()


def aws_faults_injected(stack: Stack) -> dict[str, int]:
    """The AWS faults a stopped stack injected, by kind (it prints them when AWS_FAULTS is set)."""
    for line in stack.running.lines:
        if line.startswith("AWS_FAULTS_INJECTED "):
            return json.loads(line.split(" ", 1)[1])
    raise AssertionError(
        f"no AWS_FAULTS_INJECTED line (is AWS_FAULTS set?):\n{stack.running.output}"
    )


def messages_with_status(
    http: requests.Session, url: str, mailing_id: str, status: str
) -> list[dict[str, Any]]:
    """Every message of the mailing listed under `status`, all pages."""
    messages: list[dict[str, Any]] = []
    params: dict[str, Any] = {"status": status, "limit": 500}
    while True:
        response = http.get(f"{url}/mailings/{mailing_id}/stats", params=params, timeout=10)
        assert response.status_code == 200, response.text
        page = response.json()
        messages += page["messages"]
        if not page["next_cursor"]:
            return messages
        params["cursor"] = page["next_cursor"]
