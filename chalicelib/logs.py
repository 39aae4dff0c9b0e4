"""Structured logs: every line about a mailing, message or client carrying its ids, and no
secret in any of them.

Every module logs through the standard `logging.getLogger(__name__)`. `configure()` puts one
handler on the root logger that writes Powertools' JSON (so CloudWatch Logs Insights can filter
on `mailing_id`, `message_id`, `client_id`, `correlation_id`), or with LOG_FORMAT=text one
readable line per event for people at a console (the local stack's default), adds the ids
bound with `bind()` to each line, and scrubs secrets from each line before it is written.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME") or "sms-campaigns"
# The ids a line may carry; bound ones are added to every line logged in their scope.
ID_FIELDS = ("correlation_id", "mailing_id", "message_id", "client_id")
REDACTED = "[redacted]"
# Any bearer credential, in a header dump, an exception text or a URL: never worth keeping.
_BEARER = re.compile(r"(?i)\b(bearer)(\s+|%20)[A-Za-z0-9._~+/=-]+")
_AUTH_HEADER = re.compile(r"(?i)(['\"]?authorization['\"]?\s*[:=]\s*['\"]?)[^'\",}\s]+")
# Libraries that would log request/response bodies (botocore's include Secrets Manager's answer)
# stay at WARNING whatever LOG_LEVEL asks for.
_QUIET = ("botocore", "boto3", "urllib3", "s3transfer", "werkzeug")

_bound: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "log_ids", default=None
)
_secrets: set[str] = set()
_handler: logging.Handler | None = None


def add_secret(value: str | None) -> None:
    """Never write `value` to any log line from now on (tokens, keys)."""
    if value and len(value) >= 4:
        _secrets.add(value)


def redact(text: str) -> str:
    """`text` with every known secret and any bearer credential replaced."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = _BEARER.sub(rf"\1 {REDACTED}", text)
    return _AUTH_HEADER.sub(rf"\1{REDACTED}", text)


@contextmanager
def bind(**ids: Any) -> Iterator[None]:
    """Add these ids (None ones are skipped) to every line logged in this scope and thread."""
    values = {key: value for key, value in ids.items() if value is not None}
    token = _bound.set({**(_bound.get() or {}), **values})
    try:
        yield
    finally:
        _bound.reset(token)


def bound() -> dict[str, Any]:
    """The ids bound in this scope."""
    return dict(_bound.get() or {})


class _ContextFilter(logging.Filter):
    """Adds the bound ids to a record (ids passed with `extra=` win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_bound.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class _RedactingFormatter(LambdaPowertoolsFormatter):
    """Powertools' JSON, with secrets scrubbed from the finished line (message, extras and
    exception text alike)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class TextFormatter(logging.Formatter):
    """One line per event for people: `16:29:25 WARNING message failed  mailing=… message=12`.

    The same fields as the JSON (the ids first, then any other `extra=`), secrets scrubbed;
    the time is the console's local time, to the second.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", self.converter(record.created))
        line = f"{stamp} {record.levelname:<7} {record.getMessage()}"
        fields = " ".join(f"{name}={_text_value(value)}" for name, value in _fields(record))
        if fields:
            line += "  " + fields
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return redact(line)


# What every LogRecord has; anything else on a record came from `extra=` or `bind()`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}
# The ids under the short names people read: mailing=…, not mailing_id=….
_SHORT_NAMES = {"mailing_id": "mailing", "message_id": "message", "client_id": "client"}


def _fields(record: logging.LogRecord) -> list[tuple[str, Any]]:
    """The record's ids (in ID_FIELDS' order, correlation id last) and other extras."""
    extras = {
        key: value
        for key, value in vars(record).items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_") and value is not None
    }
    order = [*ID_FIELDS[1:], ID_FIELDS[0]]
    named = [(_SHORT_NAMES.get(key, key), extras.pop(key)) for key in order if key in extras]
    return named + sorted(extras.items())


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if not text or any(char in text for char in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("json", "text")


def level_from(level: str | None = None) -> str:
    """The level asked for (argument, LOG_LEVEL, POWERTOOLS_LOG_LEVEL), INFO by default."""
    name = level or os.environ.get("LOG_LEVEL") or os.environ.get("POWERTOOLS_LOG_LEVEL")
    name = (name or "INFO").strip().upper()
    if name not in LEVELS:
        raise ValueError(f"invalid settings: LOG_LEVEL: must be one of {', '.join(LEVELS)}")
    return name


def format_from(log_format: str | None = None) -> str:
    """The format asked for (argument, LOG_FORMAT): json (Lambda's default) or text."""
    name = (log_format or os.environ.get("LOG_FORMAT") or "json").strip().lower()
    if name not in FORMATS:
        raise ValueError(f"invalid settings: LOG_FORMAT: must be one of {', '.join(FORMATS)}")
    return name


def ensure_configured() -> None:
    """Configure logging unless something (the local stack, a test) already has."""
    if _handler is None:
        configure()


def formatter(log_format: str = "json") -> logging.Formatter:
    """Powertools' JSON, or with "text" the one-line form for people."""
    if log_format == "text":
        return TextFormatter()
    return _RedactingFormatter(service=SERVICE, utc=True, json_default=str)


def _replaced(handler: logging.Handler) -> bool:
    """A root handler someone else installed that would write each line a second time."""
    if type(handler).__name__ == "LambdaLoggerHandler":
        return True
    # `chalice local` calls logging.basicConfig: a plain StreamHandler on stdout, "%(message)s".
    return type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr)


def configure(
    level: str | None = None, stream: TextIO | None = None, log_format: str | None = None
) -> logging.Handler:
    """Send every log line through one handler on the root logger (idempotent).

    The level of this service's own lines is `level`, else LOG_LEVEL or
    POWERTOOLS_LOG_LEVEL, else INFO; the format `log_format`, else LOG_FORMAT, else json.
    Lambda's root handler and `chalice local`'s are replaced, so no line is written twice.
    """
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    for existing in list(root.handlers):
        if _replaced(existing):
            root.removeHandler(existing)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter(format_from(log_format)))
    handler.addFilter(_ContextFilter())
    root.addHandler(handler)
    _handler = handler
    root.setLevel(logging.WARNING)
    logging.getLogger("chalicelib").setLevel(level_from(level))
    for quiet in _QUIET:
        logging.getLogger(quiet).setLevel(logging.WARNING)
    return handler


def reset() -> None:
    """Remove the handler `configure()` installed (tests that capture the output)."""
    global _handler
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
    _handler = None
