"""The event-driven Lambdas: the scheduler tick, the fan-out worker, the sender and the import.

Handlers only parse their event and call into the services. Queue ARNs are placeholders here:
`infra/resources.yaml` replaces them with the stack's queues (Chalice cannot reference a queue
that the merge template defines, but the merge can replace a plain string).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from chalice import Blueprint, Cron, Rate
from pydantic import ValidationError

from chalicelib.container import services
from chalicelib.services.queues import ImportChunk, JobBatch

logger = logging.getLogger(__name__)

blueprint = Blueprint(__name__)

SEND_QUEUE_ARN = "arn:aws:sqs:us-east-1:000000000000:sms-campaigns-send-placeholder"
FANOUT_QUEUE_ARN = "arn:aws:sqs:us-east-1:000000000000:sms-campaigns-fanout-placeholder"
IMPORT_QUEUE_ARN = "arn:aws:sqs:us-east-1:000000000000:sms-campaigns-import-placeholder"
# Read when the app is loaded (chalice package applies the stage's environment first).
SENDER_BATCH_SIZE = int(os.environ.get("SENDER_BATCH_SIZE", "10"))


def _remaining(context: Any) -> Any:
    return lambda: context.get_remaining_time_in_millis() / 1000


@blueprint.schedule(Rate(1, unit=Rate.MINUTES), name="scheduler_tick")
def scheduler_tick(event: Any) -> dict:
    """Every minute: advance every mailing whose start has come and that has not finished."""
    progress = services().scheduler.tick(_remaining(event.context))
    summary = {
        "mailings": progress.mailings,
        "messages_created": progress.messages_created,
        "messages_requeued": progress.requeued,
        "continued": len(progress.continued),
    }
    logger.log(
        logging.INFO if progress.mailings else logging.DEBUG, "scheduler tick", extra=summary
    )
    return summary


# 06:00 UTC by default; the stack's DailyReportSchedule parameter replaces the expression.
@blueprint.schedule(Cron(0, 6, "*", "*", "?", "*"), name="daily_report")
def daily_report(event: Any) -> dict:
    """Once a day: e-mail the statistics of the mailings active in the last 24 hours."""
    report = services().reports.send_daily()
    return {"mailings": len(report.rows), "recipients": len(report.recipients)}


@blueprint.on_sqs_message(queue_arn=FANOUT_QUEUE_ARN, batch_size=1, name="advance_mailing")
def advance_mailing(event: Any) -> None:
    """A kick: start a mailing now (its start has come) or continue its fan-out."""
    for record in event:
        try:
            mailing_id = json.loads(record.body)["mailing_id"]
        except (ValueError, KeyError, TypeError):
            logger.error("malformed fan-out kick dropped")
            continue
        services().scheduler.advance(str(mailing_id), _remaining(event.context))


@blueprint.on_sqs_message(queue_arn=IMPORT_QUEUE_ARN, batch_size=1, name="import_clients")
def import_clients(event: Any) -> None:
    """A chunk of a CSV import of clients: write its rows and add them to the import's counts.

    Batch size 1: a chunk that fails comes back alone. On its last receive it is given up, so
    the import ends (`failed`) rather than running forever; SQS moves it to the dead-letter queue.
    """
    current = services()
    for record in event:
        raw = record.to_dict()
        try:
            chunk = ImportChunk.model_validate_json(record.body)
        except ValidationError:
            logger.error(
                "malformed import chunk dropped", extra={"sqs_message_id": raw.get("messageId")}
            )
            continue
        receives = int(raw.get("attributes", {}).get("ApproximateReceiveCount", 1))
        current.imports.process(chunk, last_attempt=receives >= current.settings.max_receive_count)


def _send_record(record: SQSRecord, lambda_context: Any = None) -> None:
    try:
        batch = JobBatch.model_validate_json(record.body)
    except ValidationError:
        # It can never succeed; retrying would only end in the DLQ after maxReceiveCount.
        logger.error("malformed send job dropped", extra={"sqs_message_id": record.message_id})
        return
    # Each record gets what is left of the invocation when its turn comes.
    remaining = _remaining(lambda_context) if lambda_context is not None else None
    services().sender.deliver(batch, remaining)


@blueprint.on_sqs_message(
    queue_arn=SEND_QUEUE_ARN,
    batch_size=SENDER_BATCH_SIZE,
    maximum_batching_window_in_seconds=1,
    name="send_messages",
)
def send_messages(event: Any) -> dict:
    """Send the jobs of each SQS message; report failed records so only they come back."""
    raw = event.to_dict()
    response = process_partial_response(
        event=raw,
        record_handler=_send_record,
        processor=BatchProcessor(event_type=EventType.SQS),
        context=event.context,
    )
    _count_dead_letters(raw, response)
    return response


def _count_dead_letters(raw: dict, response: dict) -> None:
    """Records that failed their last allowed receive: SQS moves them to the DLQ now."""
    failed = {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}
    if not failed:
        return
    limit = services().settings.max_receive_count
    last = [
        record
        for record in raw.get("Records", [])
        if record.get("messageId") in failed
        and int(record.get("attributes", {}).get("ApproximateReceiveCount", 0)) >= limit
    ]
    for record in last:
        logger.error(
            "send job failed its last receive; it moves to the dead-letter queue",
            extra={"sqs_message_id": record["messageId"], **_mailing_of(record)},
        )
    services().metrics.dead_letters(len(last))


def _mailing_of(record: dict) -> dict:
    try:
        return {"mailing_id": str(json.loads(record["body"])["mailing_id"])}
    except (ValueError, KeyError, TypeError):
        return {}
