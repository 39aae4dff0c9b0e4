"""Where a running local stack can be reached, for `chalice local --stage local`.

`make run` writes a file (LOCAL_STACK_FILE, default build/local-stack.json) once it serves:
its AWS endpoint, table prefix, queue URLs, API tokens and gateway, as the environment the
service reads. `chalice local --stage local` (whose stage sets LOCAL_STACK_ATTACH) reads it
into its own environment before the app loads, so both serve the same tables and queues and
the stack's workers deliver what either API starts. Variables already set win, so
AWS_ENDPOINT_URL and friends are honoured. The file holds tokens: it is written for its owner
only, into build/ (never committed), and removed when the stack stops.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from chalicelib.settings import Settings

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEFAULT_PATH = PROJECT_DIR / "build" / "local-stack.json"
# Set by the `local` stage in .chalice/config.json: this process serves beside `make run`.
ATTACH_VARIABLE = "LOCAL_STACK_ATTACH"
_AWS_VARIABLES = ("AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# The local stack's own variables that `chalice local` serves with too.
_LOCAL_VARIABLES = ("REPORT_OUTBOX_DIR",)
# Real credentials never go to the loopback emulator (the local stack drops them too).
_REAL_CREDENTIAL_VARIABLES = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE")


class NoLocalStack(RuntimeError):
    """No running local stack to attach to; the message says what is missing and what to do."""


def path(environ: Mapping[str, str]) -> Path:
    """The file a stack writes and `chalice local` reads (LOCAL_STACK_FILE, or the default)."""
    return Path(environ.get("LOCAL_STACK_FILE") or DEFAULT_PATH)


def service_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `environ` the service reads: its settings and the AWS connection."""
    names = [
        *(name.upper() for name in Settings.model_fields),
        *_AWS_VARIABLES,
        *_LOCAL_VARIABLES,
    ]
    return {name: environ[name] for name in names if environ.get(name)}


def write(environ: Mapping[str, str], *, pid: int, api_url: str, embedded_emulator: bool) -> Path:
    """Record where this stack serves (readable by its owner only); the file's path."""
    target = path(environ)
    target.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "pid": pid,
        "api_url": api_url,
        "embedded_emulator": embedded_emulator,
        "environment": service_environment(environ),
    }
    partial = target.with_name(f".{target.name}.{pid}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(document, out, indent=2)
    # Whole or not at all: a `chalice local` starting now never reads half a file.
    partial.replace(target)
    return target


def remove(environ: Mapping[str, str], *, pid: int) -> None:
    """Remove the file if this stack (`pid`) wrote it; another stack's stays."""
    target = path(environ)
    document = _read(target)
    if document is not None and document.get("pid") == pid:
        target.unlink(missing_ok=True)


def attach(environ: MutableMapping[str, str]) -> str:
    """Fill `environ` from the running stack's file (set variables win); the stack's API URL.

    Raises NoLocalStack, one line naming what is missing and how to fix it, when no stack runs.
    """
    target = path(environ)
    document = _read(target)
    if document is None:
        raise NoLocalStack(
            f"error: no local stack found ({target} is missing or unreadable): "
            "start `make run` first, then `chalice local --stage local --port 8001`"
        )
    if not _alive(document.get("pid")):
        raise NoLocalStack(
            f"error: no local stack found (the stack that wrote {target} has stopped): "
            "start `make run` first"
        )
    variables: dict[str, str] = document.get("environment") or {}
    emulator = variables.get("AWS_ENDPOINT_URL")
    for name, value in variables.items():
        if not environ.get(name):
            environ[name] = value
    if document.get("embedded_emulator") and environ.get("AWS_ENDPOINT_URL") == emulator:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            environ[name] = variables.get(name) or "local"
        for name in _REAL_CREDENTIAL_VARIABLES:
            environ.pop(name, None)
    return str(document.get("api_url") or "")


def attach_or_exit(environ: MutableMapping[str, str]) -> None:
    """`attach`, or stop this process with the one line saying why (exit code 1)."""
    # chalice local logs everything at INFO until the app configures logging: PynamoDB's
    # import-time notes would come first (and, failing, bury the one line that matters).
    logging.getLogger("pynamodb").setLevel(logging.WARNING)
    try:
        attach(environ)
        serve_as_the_stack_does()
        keep_reports_in_the_outbox(environ)
    except NoLocalStack as exc:
        # Not an exception: `chalice local` imports the app in its server thread, where one
        # would print a traceback and leave a process that serves nothing.
        sys.stderr.write(f"{exc}\n")
        sys.stderr.flush()
        os._exit(1)


def keep_reports_in_the_outbox(environ: Mapping[str, str]) -> None:
    """Daily reports that chalice local's API sends are copied into the stack's outbox too."""
    from devstack.outbox import ReportOutbox

    outbox = ReportOutbox.from_env(environ)
    if outbox is None:
        return
    from chalicelib.container import Services, use_services
    from chalicelib.settings import SettingsError, get_settings

    try:
        settings = get_settings()
    except SettingsError:
        return  # the first request says what is wrong, as it would without an outbox
    use_services(Services.build(settings, report_sinks=[outbox]))


def serve_as_the_stack_does() -> None:
    """chalice local's server answers as the local stack's does: the gateway's errors (401, 403,
    no route, a method the path lacks) in the service's error shape, and no access line beside
    the service's own request line."""
    from devstack.api import serve_chalice_local_as_the_stack_does

    serve_chalice_local_as_the_stack_does()


def _read(target: Path) -> dict | None:
    try:
        document = json.loads(target.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True
