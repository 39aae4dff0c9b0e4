"""Processes for the crash suite: what must outlive a SIGKILL of the worker, and the worker.

The AWS emulator and the sandbox gateway run as processes of their own, so tables, queues and the
gateway's ledger survive when the local stack (API, scheduler, fan-out worker and sender in one
process) is killed with SIGKILL and started again against them with the same TABLE_PREFIX.

`python -m tests.support.crash` runs a sandbox gateway on a port of its own (SANDBOX_* variables
set its faults), prints `SANDBOX <url>` and serves until terminated or its parent dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import pytest

from tests.support.local_stack import (
    READY_TIMEOUT_SECONDS,
    REPO_ROOT,
    STOP_TIMEOUT_SECONDS,
    TOKEN,
    RunningStack,
    free_port,
    iam_denials,
    spawn,
    stack_environment,
)

GATEWAY_TOKEN = "crash-suite-gateway-token"
# The emulator accepts any credentials; these make sure no real ones are ever sent.
DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_BANNER_TIMEOUT_SECONDS = 20.0
_PARENT_CHECK_SECONDS = 0.5


# ---------------------------------------------------------------- long-lived processes


@contextmanager
def helper_process(command: list[str], banner: str) -> Iterator[str]:
    """Run `command` until the block ends; yields what it prints after `<banner> `."""
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env={**stack_environment(), **DUMMY_AWS},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        lines: list[str] = []
        reader = threading.Thread(
            target=lambda: lines.append(process.stdout.readline()), daemon=True
        )
        reader.start()
        reader.join(_BANNER_TIMEOUT_SECONDS)
        if not lines or not lines[0].startswith(f"{banner} "):
            pytest.fail(f"{' '.join(command)} printed no {banner} line: {lines!r}")
        yield lines[0].split(" ", 1)[1].strip()
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def emulator() -> AbstractContextManager[str]:
    """The local stack's AWS emulator in a process of its own; yields its endpoint URL."""
    return helper_process([sys.executable, "-m", "devstack.emulator", "127.0.0.1", "0"], "EMULATOR")


def sandbox_gateway() -> AbstractContextManager[str]:
    """A sandbox gateway (see `serve_sandbox`) in a process of its own; yields its base URL."""
    return helper_process([sys.executable, "-m", "tests.support.crash"], "SANDBOX")


# ---------------------------------------------------------------- the stack that gets killed


@dataclass
class Incarnation:
    """One run of the stack process: where it serves and when it started serving."""

    url: str
    started_at: float  # wall clock, as the gateway's ledger records time
    startup_seconds: float
    running: RunningStack


class RestartableStack:
    """The local stack against an outside emulator and gateway: start, SIGKILL, start again."""

    def __init__(self, **env: str) -> None:
        self._env = {"API_TOKENS": TOKEN, **DUMMY_AWS, **env}
        self.auth = {"Authorization": f"Bearer {TOKEN}"}
        self.current: Incarnation | None = None
        self.outputs: list[str] = []

    @property
    def url(self) -> str:
        if self.current is None:
            raise RuntimeError("the stack is not running")
        return self.current.url

    def start(self) -> Incarnation:
        """Start a new stack process and wait until it serves."""
        if self.current is not None:
            raise RuntimeError("the stack is already running")
        port = free_port()
        started_at, started = time.time(), time.monotonic()
        running = spawn(stack_environment(PORT=str(port), **self._env))
        running.ready.wait(READY_TIMEOUT_SECONDS)
        if running.ready_url is None:
            self._end(running)
            pytest.fail(f"no READY line within {READY_TIMEOUT_SECONDS} s:\n{running.output}")
        self.current = Incarnation(
            running.ready_url, started_at, time.monotonic() - started, running
        )
        return self.current

    def ensure_running(self) -> Incarnation:
        """The running stack, started first if a failed test left it killed."""
        return self.current or self.start()

    def kill(self) -> float:
        """SIGKILL the stack's whole process group; returns the wall-clock time of the kill."""
        if self.current is None:
            raise RuntimeError("the stack is not running")
        running, self.current = self.current.running, None
        killed_at = time.time()
        os.killpg(running.process.pid, signal.SIGKILL)
        running.process.wait()
        self.outputs.append(running.output)
        _refuse_iam_denials(running.output)
        return killed_at

    def stop(self) -> None:
        """SIGTERM the running stack (if any); fails the test unless it exits cleanly."""
        if self.current is None:
            return
        running, self.current = self.current.running, None
        os.kill(running.stack_pid(), signal.SIGTERM)
        try:
            exit_code = running.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._end(running)
            pytest.fail(f"still running {STOP_TIMEOUT_SECONDS} s after SIGTERM:\n{running.output}")
        self.outputs.append(running.output)
        assert exit_code == 0, running.output
        _refuse_iam_denials(running.output)

    def close(self) -> None:
        """Make sure no stack process is left behind, however the suite ended."""
        if self.current is not None:
            running, self.current = self.current.running, None
            self._end(running)

    def _end(self, running: RunningStack) -> None:
        if running.process.poll() is None:
            os.killpg(running.process.pid, signal.SIGKILL)
            running.process.wait()
        self.outputs.append(running.output)


def _refuse_iam_denials(output: str) -> None:
    """IAM is enforced (LOCAL_IAM): a call a role denied would fail the same way on AWS."""
    denied = iam_denials(output)
    assert not denied, "a role lacks a grant the code needs:\n" + "\n".join(denied)


# ---------------------------------------------------------------- the sandbox process


def serve_sandbox() -> None:
    """Serve a sandbox gateway until SIGTERM or SIGINT, or until the parent process is gone."""
    from devstack.gateway import FaultProfile, SandboxGateway

    gateway = SandboxGateway(GATEWAY_TOKEN, FaultProfile.from_env(os.environ))
    gateway.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    print(f"SANDBOX {gateway.url}", flush=True)
    parent = os.getppid()
    # Ends with its parent too, even one killed without a chance to stop it.
    while not stopped.wait(_PARENT_CHECK_SECONDS) and os.getppid() == parent:
        pass
    gateway.stop()


if __name__ == "__main__":
    serve_sandbox()
