"""The console's log lines: one readable line per event for people (LOG_FORMAT=text, the local
default), Powertools' JSON for CloudWatch (LOG_FORMAT=json, Lambda's default), each line once."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator

import pytest

from chalicelib import logs

logger = logging.getLogger("chalicelib.tests.log_format")
# `16:29:25 WARNING message failed  mailing=m-1 ...`: time, level, message, fields.
TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR)\s+\S")


@pytest.fixture
def console() -> Iterator[io.StringIO]:
    """What the service's one handler writes, in the text format."""
    stream = io.StringIO()
    logs.configure(level="INFO", stream=stream, log_format="text")
    yield stream
    logs.reset()


def written(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_text_line_shows_time_level_message_and_the_ids(console: io.StringIO) -> None:
    # When a message about a mailing fails
    logger.warning(
        "message failed", extra={"mailing_id": "m-1", "message_id": 12, "error": "HTTP 400"}
    )
    # Then one line reads as a sentence with its ids after it, short-named, spaces quoted
    [line] = written(console)
    assert TEXT_LINE.match(line), line
    assert line[9:].startswith("WARNING message failed  mailing=m-1 message=12 ")
    assert line.endswith('error="HTTP 400"')


def test_ids_bound_to_a_scope_appear_on_its_text_lines(console: io.StringIO) -> None:
    # Given a client's id bound for a piece of work
    with logs.bind(client_id="c-7", correlation_id="req-1"):
        # When something in it logs
        logger.info("client created")
    # Then its line carries the client, and the correlation id after the domain ids
    [line] = written(console)
    assert line.endswith("client created  client=c-7 correlation_id=req-1")


def test_text_lines_never_show_a_secret(console: io.StringIO) -> None:
    # Given a token the service knows to be secret
    logs.add_secret("tok-very-secret-123")
    # When a line (and its fields) would quote it
    logger.info("calling with tok-very-secret-123", extra={"header": "Bearer abcdefghijkl"})
    # Then neither shows
    text = console.getvalue()
    assert "tok-very-secret-123" not in text
    assert "abcdefghijkl" not in text
    assert logs.REDACTED in text


def test_a_failure_shows_its_traceback_under_its_line(console: io.StringIO) -> None:
    # When a handled exception is logged
    try:
        raise RuntimeError("gateway exploded")
    except RuntimeError:
        logger.exception("send failed", extra={"mailing_id": "m-2"})
    # Then the line comes first, the traceback after it
    lines = written(console)
    assert TEXT_LINE.match(lines[0])
    assert "send failed  mailing=m-2" in lines[0]
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: gateway exploded"


def test_log_format_json_gives_powertools_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given LOG_FORMAT=json
    monkeypatch.setenv("LOG_FORMAT", "json")
    stream = io.StringIO()
    logs.configure(level="INFO", stream=stream)
    try:
        # When a line about a message is logged
        logger.info("message sent", extra={"mailing_id": "m-3", "message_id": 4})
    finally:
        logs.reset()
    # Then it is one JSON object with Powertools' fields and the ids
    [line] = written(stream)
    record = json.loads(line)
    assert record["level"] == "INFO"
    assert record["message"] == "message sent"
    assert record["service"] == logs.SERVICE
    assert (record["mailing_id"], record["message_id"]) == ("m-3", 4)


def test_json_is_the_default_as_in_lambda(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given no LOG_FORMAT (a Lambda's environment)
    monkeypatch.delenv("LOG_FORMAT", raising=False)
    stream = io.StringIO()
    logs.configure(level="INFO", stream=stream)
    try:
        logger.info("tick")
    finally:
        logs.reset()
    # Then the line is JSON
    assert json.loads(stream.getvalue())["message"] == "tick"


def test_an_unknown_log_format_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given LOG_FORMAT=yaml, when logging is configured, then it is refused with an error naming
    LOG_FORMAT."""
    monkeypatch.setenv("LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        logs.configure(stream=io.StringIO())


def test_a_line_is_written_once_under_chalice_local(capsys: pytest.CaptureFixture[str]) -> None:
    # Given the root handler `chalice local` installs (logging.basicConfig on stdout)
    root = logging.getLogger()
    plain = logging.StreamHandler(sys.stdout)
    plain.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(plain)
    stream = io.StringIO()
    try:
        # When the app configures its logging and logs a line
        logs.configure(level="INFO", stream=stream, log_format="text")
        logger.info("client created")
    finally:
        root.removeHandler(plain)
        logs.reset()
    # Then it is written once, formatted, and not again plain
    assert len(written(stream)) == 1
    assert "client created" not in capsys.readouterr().out
