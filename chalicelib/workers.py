"""The event-driven Lambdas: the scheduler tick, the fan-out worker, the sender and the import.

Handlers only parse their event and call into the services. The three SQS handlers share one
way to read a batch (`process_batch`): each queue's record body is a pydantic model, a body that
does not parse is dropped, and a failure comes back as its queue's event source allows.

Queue ARNs are placeholders here: `infra/resources.yaml` replaces them with the stack's queues
(Chalice cannot reference a queue that the merge template defines, but the merge can replace a
plain string).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from chalice import Blueprint, Cron, Rate
from chalice.app import CloudWatchEvent, SQSEvent
from pydantic import BaseModel, ConfigDict, ValidationError

from chalicelib.container import services
from chalicelib.services.queues import ImportChunk, JobBatch
from chalicelib.settings import package_settings

logger = logging.getLogger(__name__)

blueprint = Blueprint(__name__)

SEND_QUEUE_ARN = "arn:aws:sqs:us-east-1:000000000000:sms-campaigns-send-placeholder"
FANOUT_QUEUE_ARN = "arn:aws:sqs:us-east-1:000000000000:sms-campaigns-fanout-placeholder"
IMPORT_QUEUE_ARN = "arn:aws:sqs:us-east-1:000000000000:sms-campaigns-import-placeholder"

Body = TypeVar("Body", bound=BaseModel)
Remaining = Callable[[], float]


class MailingKick(BaseModel):
    """The body of one fan-out message (`Queues.kick`): advance this mailing now."""

    # As the kick was read before it had a model: other keys are ignored, a number is an id.
    model_config = ConfigDict(extra="ignore", frozen=True, coerce_numbers_to_str=True)

    mailing_id: str


def process_batch(
    event: SQSEvent,
    body: type[Body],
    handle: Callable[[Body, SQSRecord], None],
    *,
    what: str,
    report_failures: bool,
) -> PartialItemFailureResponse | None:
    """Parse each record's body as `body` and hand it to `handle`.

    A body that does not parse is dropped (logged as "malformed `what` dropped"): it can never
    succeed, and retrying it would only end in the dead-letter queue after maxReceiveCount.
    With `report_failures` (the event source declares ReportBatchItemFailures) a record that
    fails is reported alone, so only it comes back. Without, Lambda would delete a reported
    record, so a failure fails the invocation and SQS delivers the batch again.
    """

    def record_handler(record: SQSRecord) -> None:
        try:
            parsed = body.model_validate_json(record.body)
        except ValidationError:
            logger.error("malformed %s dropped", what, extra={"sqs_message_id": record.message_id})
            return
        handle(parsed, record)

    raw = event.to_dict()
    if not report_failures:
        for record in raw.get("Records", []):
            record_handler(SQSRecord(record))
        return None
    return process_partial_response(
        event=raw,
        record_handler=record_handler,
        processor=BatchProcessor(event_type=EventType.SQS),
        context=event.context,
    )


def _receives(record: SQSRecord, default: int) -> int:
    """How many times SQS has delivered the record (its ApproximateReceiveCount)."""
    return int(record.get("attributes", {}).get("ApproximateReceiveCount", default))


def _remaining(context: Any) -> Remaining:
    return lambda: context.get_remaining_time_in_millis() / 1000


@blueprint.schedule(Rate(1, unit=Rate.MINUTES), name="scheduler_tick")
def scheduler_tick(event: CloudWatchEvent) -> dict[str, int]:
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
def daily_report(event: CloudWatchEvent) -> dict[str, int]:
    """Once a day: e-mail the statistics of the mailings active in the last 24 hours."""
    report = services().reports.send_daily()
    return {"mailings": len(report.rows), "recipients": len(report.recipients)}


@blueprint.on_sqs_message(queue_arn=FANOUT_QUEUE_ARN, batch_size=1, name="advance_mailing")
def advance_mailing(event: SQSEvent) -> None:
    """A kick: start a mailing now (its start has come) or continue its fan-out."""
    remaining = _remaining(event.context)

    def advance(kick: MailingKick, record: SQSRecord) -> None:
        services().scheduler.advance(kick.mailing_id, remaining)

    process_batch(event, MailingKick, advance, what="fan-out kick", report_failures=False)


@blueprint.on_sqs_message(queue_arn=IMPORT_QUEUE_ARN, batch_size=1, name="import_clients")
def import_clients(event: SQSEvent) -> None:
    """A chunk of a CSV import of clients: write its rows and add them to the import's counts.

    Batch size 1: a chunk that fails comes back alone. On its last receive it is given up, so
    the import ends (`failed`) rather than running forever; SQS moves it to the dead-letter queue.
    """
    current = services()

    def write(chunk: ImportChunk, record: SQSRecord) -> None:
        last = _receives(record, default=1) >= current.settings.max_receive_count
        current.imports.process(chunk, last_attempt=last)

    process_batch(event, ImportChunk, write, what="import chunk", report_failures=False)


@blueprint.on_sqs_message(
    queue_arn=SEND_QUEUE_ARN,
    # Read when the app is loaded (chalice package applies the stage's environment first).
    batch_size=package_settings().sender_batch_size,
    maximum_batching_window_in_seconds=1,
    name="send_messages",
)
def send_messages(event: SQSEvent) -> PartialItemFailureResponse | None:
    """Send the jobs of each SQS message; report failed records so only they come back."""
    # Each record gets what is left of the invocation when its turn comes.
    remaining = _remaining(event.context)

    def deliver(batch: JobBatch, record: SQSRecord) -> None:
        services().sender.deliver(batch, remaining)

    response = process_batch(event, JobBatch, deliver, what="send job", report_failures=True)
    if response is not None:
        _count_dead_letters(event.to_dict(), response)
    return response


def _count_dead_letters(raw: dict, response: PartialItemFailureResponse) -> None:
    """Records that failed their last allowed receive: SQS moves them to the DLQ now."""
    failed = {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}
    if not failed:
        return
    limit = services().settings.max_receive_count
    last = [
        record
        for record in (SQSRecord(raw_record) for raw_record in raw.get("Records", []))
        if record.message_id in failed and _receives(record, default=0) >= limit
    ]
    for record in last:
        logger.error(
            "send job failed its last receive; it moves to the dead-letter queue",
            extra={"sqs_message_id": record.message_id, **_mailing_of(record)},
        )
    services().metrics.dead_letters(len(last))


def _mailing_of(record: SQSRecord) -> dict[str, str]:
    try:
        return {"mailing_id": JobBatch.model_validate_json(record.body).mailing_id}
    except ValidationError:
        return {}
