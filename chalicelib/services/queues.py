"""What travels over SQS, and the one place that puts it there.

A send job names one message: (mailing, client, message id). Several jobs of one mailing travel in
one SQS message (`JobBatch`), which divides SQS requests and Lambda invocations per delivered
message by the batch size. A fan-out kick asks the scheduler worker to advance one mailing now.
An import chunk carries up to 1,000 validated rows of a CSV import of clients to the worker that
writes them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NotRequired, Protocol, TypedDict

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

SQS_MAX_DELAY_SECONDS = 900
# SendMessageBatch takes at most 10 messages and 256 KiB (all bodies together).
_SQS_BATCH = 10
SQS_MAX_BATCH_BYTES = 256 * 1024
IMPORT_CHUNK_MAX_ROWS = 1000


class _Entry(TypedDict):
    """One message of a SendMessageBatch request."""

    Id: str
    MessageBody: str
    DelaySeconds: NotRequired[int]


class _Failure(TypedDict):
    Id: str


class _BatchAnswer(TypedDict, total=False):
    Failed: list[_Failure]


class _AttributesAnswer(TypedDict, total=False):
    Attributes: dict[str, str]


class SqsClient(Protocol):
    """The SQS requests the queues make (boto3's client, created lazily by the caller)."""

    def send_message(
        self,
        *,
        QueueUrl: str,
        MessageBody: str,
        MessageAttributes: dict[str, dict[str, str]],
    ) -> object: ...

    def send_message_batch(self, *, QueueUrl: str, Entries: list[_Entry]) -> _BatchAnswer: ...

    def get_queue_attributes(
        self, *, QueueUrl: str, AttributeNames: list[str]
    ) -> _AttributesAnswer: ...


class SendJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: str = Field(min_length=1, max_length=64)
    message_id: int = Field(ge=1, le=2**63 - 1)
    # Gateway attempts that failed in a retryable way so far (drives backoff and the DLQ).
    retries: int = Field(0, ge=0)
    last_error: str | None = Field(None, max_length=500)


class JobBatch(BaseModel):
    """The body of one send-queue message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = 1
    mailing_id: str = Field(min_length=1, max_length=64)
    jobs: list[SendJob] = Field(min_length=1, max_length=50)
    # When the first of these jobs was enqueued: lets a sender tell "not committed yet" from
    # "never will be" when a job arrives for a message it cannot find.
    enqueued_at: datetime


# (row number in the file, phone, operator code, tag, timezone); None: the file left it out.
ImportRow = tuple[int, str, str | None, str | None, str | None]


class ImportChunk(BaseModel):
    """The body of one import-queue message: valid rows of one import, in file order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = 1
    import_id: str = Field(min_length=1, max_length=64)
    chunk: int = Field(ge=0, le=99_999)
    rows: list[ImportRow] = Field(min_length=1, max_length=IMPORT_CHUNK_MAX_ROWS)


@dataclass(frozen=True)
class Delayed:
    """A batch to enqueue after `delay_seconds` (capped at SQS's 15 minutes)."""

    batch: JobBatch
    delay_seconds: int = 0


def job_batches(
    mailing_id: str,
    messages: Sequence[tuple[str, int]],
    now: datetime,
    size: int,
    delay_seconds: int = 0,
) -> list[Delayed]:
    """Send jobs for (client id, message id) pairs, `size` to an SQS message."""
    return [
        Delayed(
            JobBatch(
                mailing_id=mailing_id,
                jobs=[
                    SendJob(client_id=client, message_id=message)
                    for client, message in messages[start : start + size]
                ],
                enqueued_at=now,
            ),
            delay_seconds,
        )
        for start in range(0, len(messages), size)
    ]


def coalesce(items: Sequence[Delayed], max_jobs: int) -> list[Delayed]:
    """Merge the jobs of one mailing that come back after the same delay into shared batches:
    retries and deferrals then cost as few SQS messages (and sender invocations) as fan-out."""
    groups: dict[tuple[str, int, datetime], list[SendJob]] = {}
    for item in items:
        key = (item.batch.mailing_id, int(item.delay_seconds), item.batch.enqueued_at)
        groups.setdefault(key, []).extend(item.batch.jobs)
    merged = []
    for (mailing_id, delay, enqueued_at), jobs in groups.items():
        for start in range(0, len(jobs), max_jobs):
            batch = JobBatch(
                mailing_id=mailing_id, jobs=jobs[start : start + max_jobs], enqueued_at=enqueued_at
            )
            merged.append(Delayed(batch, delay))
    return merged


class QueueNotConfigured(RuntimeError):
    """A queue URL setting is missing."""


_STATES = {
    "visible": "ApproximateNumberOfMessages",
    "in_flight": "ApproximateNumberOfMessagesNotVisible",
    "delayed": "ApproximateNumberOfMessagesDelayed",
}
_DEPTHS = list(_STATES.values())


class Queues:
    """Sends job batches, dead letters and fan-out kicks to SQS."""

    def __init__(
        self,
        sqs: SqsClient,
        *,
        send_url: str | None,
        dlq_url: str | None,
        fanout_url: str | None,
        import_url: str | None = None,
    ) -> None:
        self._sqs = sqs
        self._send_url = send_url
        self._dlq_url = dlq_url
        self._fanout_url = fanout_url
        self._import_url = import_url

    def enqueue(self, items: Sequence[Delayed]) -> None:
        """Send job batches, ten SQS messages per request; raises if any is not accepted."""
        url = self._require(self._send_url, "SEND_QUEUE_URL")
        entries: list[_Entry] = [
            {
                "Id": str(n),
                "MessageBody": item.batch.model_dump_json(),
                "DelaySeconds": max(0, min(SQS_MAX_DELAY_SECONDS, int(item.delay_seconds))),
            }
            for n, item in enumerate(items)
        ]
        self._send_batches(url, entries)

    def dead_letter(self, batch: JobBatch, reason: str) -> None:
        """Park jobs that will never be sent on the dead-letter queue, with the reason."""
        url = self._require(self._dlq_url, "SEND_DLQ_URL")
        self._sqs.send_message(
            QueueUrl=url,
            MessageBody=batch.model_dump_json(),
            MessageAttributes={"reason": {"DataType": "String", "StringValue": reason[:256]}},
        )

    def kick(self, mailing_ids: Sequence[str], delay_seconds: int = 0) -> None:
        """Ask the scheduler worker to advance these mailings (after `delay_seconds`)."""
        if not mailing_ids:
            return
        url = self._require(self._fanout_url, "FANOUT_QUEUE_URL")
        delay = max(0, min(SQS_MAX_DELAY_SECONDS, int(delay_seconds)))
        entries: list[_Entry] = [
            {
                "Id": str(n),
                "MessageBody": json.dumps({"mailing_id": mailing_id}),
                "DelaySeconds": delay,
            }
            for n, mailing_id in enumerate(mailing_ids)
        ]
        self._send_batches(url, entries)

    def enqueue_import(self, chunks: Sequence[ImportChunk]) -> None:
        """Send import chunks in as few requests as SQS's limits allow; raises if any is not
        accepted."""
        url = self._require(self._import_url, "IMPORT_QUEUE_URL")
        batch: list[_Entry] = []
        size = 0
        for n, chunk in enumerate(chunks):
            body = chunk.model_dump_json()
            length = len(body.encode())
            if batch and (len(batch) == _SQS_BATCH or size + length > SQS_MAX_BATCH_BYTES):
                self._send_batches(url, batch)
                batch, size = [], 0
            batch.append({"Id": str(n), "MessageBody": body})
            size += length
        if batch:
            self._send_batches(url, batch)

    def depths(self) -> dict[str, dict[str, int]]:
        """Approximate messages per queue ("send", "dead_letter", "fanout") by state
        ("visible", "in_flight", "delayed"); a queue that cannot be read is left out."""
        named = {"send": self._send_url, "dead_letter": self._dlq_url, "fanout": self._fanout_url}
        depths = {}
        for name, url in named.items():
            if not url:
                continue
            try:
                answer = self._sqs.get_queue_attributes(QueueUrl=url, AttributeNames=_DEPTHS)
            except Exception:  # /metrics still answers with what it could read
                logger.warning("could not read the depth of the %s queue", name, exc_info=True)
                continue
            attributes = answer.get("Attributes", {})
            depths[name] = {
                state: int(attributes.get(attribute, 0)) for state, attribute in _STATES.items()
            }
        return depths

    def send_backlog(self) -> int | None:
        """Approximate visible (waiting, not delayed) send-queue messages; None if unknown."""
        if not self._send_url:
            return None
        try:
            answer = self._sqs.get_queue_attributes(
                QueueUrl=self._send_url, AttributeNames=["ApproximateNumberOfMessages"]
            )
            return int(answer["Attributes"]["ApproximateNumberOfMessages"])
        except Exception:  # the caller decides without it
            logger.warning("could not read the send queue's depth", exc_info=True)
            return None

    @property
    def can_kick(self) -> bool:
        return self._fanout_url is not None

    def _send_batches(self, url: str, entries: list[_Entry]) -> None:
        for start in range(0, len(entries), _SQS_BATCH):
            chunk = entries[start : start + _SQS_BATCH]
            pending = chunk
            # SQS may accept part of a batch; resend only what it refused, a few times.
            for _ in range(3):
                response = self._sqs.send_message_batch(QueueUrl=url, Entries=pending)
                failed = {f["Id"] for f in response.get("Failed", [])}
                pending = [entry for entry in pending if entry["Id"] in failed]
                if not pending:
                    break
            if pending:
                raise RuntimeError(f"SQS refused {len(pending)} messages for {url}")

    @staticmethod
    def _require(url: str | None, setting: str) -> str:
        if not url:
            raise QueueNotConfigured(f"{setting} is not set")
        return url
