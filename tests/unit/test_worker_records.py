"""How the SQS workers read a batch: each queue's record body is a model, a body that does not
parse is dropped (logged), and a failing record comes back as its event source allows."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import pytest
from chalice.app import SQSEvent

from chalicelib.services.queues import ImportChunk, JobBatch
from chalicelib.workers import MailingKick, process_batch


def sqs_event(*bodies: str) -> SQSEvent:
    """An SQS event as Lambda delivers it, each record with its own id."""
    records = [
        {
            "messageId": f"record-{n}",
            "receiptHandle": f"handle-{n}",
            "body": body,
            "attributes": {"ApproximateReceiveCount": "1"},
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:queue",
        }
        for n, body in enumerate(bodies)
    ]
    return SQSEvent({"Records": records}, None)


JOBS = JobBatch.model_validate(
    {
        "mailing_id": "m-1",
        "jobs": [{"client_id": "c-1", "message_id": 1}],
        "enqueued_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
).model_dump_json()


@pytest.mark.parametrize(
    "body",
    ["not json", "[1]", "null", "{}", '{"id": "m-1"}', '{"mailing_id": null}'],
    ids=["not-json", "a-list", "null", "empty", "no-mailing-id", "null-id"],
)
def test_a_malformed_kick_is_dropped_and_logged(body: str, caplog: pytest.LogCaptureFixture):
    # Given a fan-out kick whose body names no mailing
    advanced: list[str] = []

    # When the fan-out worker reads it
    result = process_batch(
        sqs_event(body),
        MailingKick,
        lambda kick, record: advanced.append(kick.mailing_id),
        what="fan-out kick",
        report_failures=False,
    )

    # Then nothing is advanced, the invocation succeeds (SQS deletes the record) and it is logged
    assert advanced == []
    assert result is None
    assert "malformed fan-out kick dropped" in caplog.text


def test_a_kick_names_its_mailing_as_queued_and_ignores_other_keys():
    # Given kicks as Queues.kick writes them, one with an extra key, one with a numeric id
    bodies = [
        json.dumps({"mailing_id": "m-1"}),
        '{"mailing_id": "m-2", "x": 1}',
        '{"mailing_id": 7}',
    ]
    advanced: list[str] = []

    # When the fan-out worker reads them
    process_batch(
        sqs_event(*bodies),
        MailingKick,
        lambda kick, record: advanced.append(kick.mailing_id),
        what="fan-out kick",
        report_failures=False,
    )

    # Then each mailing is advanced by its id, as a string
    assert advanced == ["m-1", "m-2", "7"]


@pytest.mark.parametrize(
    "body",
    [json.dumps({"rows": "x"}), '{"import_id": "i", "chunk": 0, "rows": []}', "{"],
    ids=["rows-not-a-list", "no-rows", "truncated"],
)
def test_a_malformed_import_chunk_is_dropped_and_logged(
    body: str, caplog: pytest.LogCaptureFixture
):
    # Given an import chunk that is not one
    written: list[ImportChunk] = []

    # When the import worker reads it
    process_batch(
        sqs_event(body),
        ImportChunk,
        lambda chunk, record: written.append(chunk),
        what="import chunk",
        report_failures=False,
    )

    # Then no row is written and the record's id is logged with the drop
    assert written == []
    [line] = [r for r in caplog.records if r.getMessage() == "malformed import chunk dropped"]
    assert line.levelno == logging.ERROR
    assert line.sqs_message_id == "record-0"  # type: ignore[attr-defined]


def test_without_reported_failures_a_failing_record_fails_the_invocation():
    # Given a queue whose event source deletes whatever a successful invocation returns
    def fail(chunk: MailingKick, record: object) -> None:
        raise RuntimeError("DynamoDB hiccup")

    # When its record fails, then the invocation fails, so SQS delivers the record again
    with pytest.raises(RuntimeError, match="DynamoDB hiccup"):
        process_batch(
            sqs_event('{"mailing_id": "m-1"}'),
            MailingKick,
            fail,
            what="fan-out kick",
            report_failures=False,
        )


def test_with_reported_failures_a_malformed_record_is_dropped_and_a_failing_one_comes_back(
    caplog: pytest.LogCaptureFixture,
):
    # Given a send batch of a malformed job, a job that fails and a job that is sent
    sent: list[str] = []

    def deliver(batch: JobBatch, record: object) -> None:
        if len(sent) == 0:
            sent.append("failed")
            raise RuntimeError("DynamoDB hiccup")
        sent.append(batch.mailing_id)

    # When the sender reads it
    response = process_batch(
        sqs_event('{"jobs": "garbage"}', JOBS, JOBS),
        JobBatch,
        deliver,
        what="send job",
        report_failures=True,
    )

    # Then only the failing record is reported (SQS deletes the rest), the malformed one logged
    assert response == {"batchItemFailures": [{"itemIdentifier": "record-1"}]}
    assert sent == ["failed", "m-1"]
    assert "malformed send job dropped" in caplog.text
