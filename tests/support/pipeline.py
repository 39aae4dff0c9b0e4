"""Drive the delivery pipeline in-process on moto's DynamoDB, the real sandbox gateway and a clock.

SQS is the one stand-in: `VirtualSqs` keeps messages in memory and honours `DelaySeconds` on the
test's clock, so an hour-long send-window deferral takes no real time. The Lambda-level SQS
behaviour (partial batch failures, redrive) is tested against moto's real SQS elsewhere.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from chalicelib.domain import MessageStatus
from chalicelib.services.queues import JobBatch

SEND_URL = "virtual://send"
DLQ_URL = "virtual://send-dlq"
FANOUT_URL = "virtual://fanout"


@dataclass
class VirtualMessage:
    id: str
    body: str
    available_at: datetime
    attributes: dict = field(default_factory=dict)
    receives: int = 0


class VirtualSqs:
    """The few SQS calls the service makes, with delays measured on the injected clock."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._ids = itertools.count(1)
        self.queues: dict[str, list[VirtualMessage]] = {SEND_URL: [], DLQ_URL: [], FANOUT_URL: []}
        self.calls: Counter = Counter()

    def send_message_batch(self, QueueUrl: str, Entries: list[dict]) -> dict:
        self.calls["SendMessageBatch"] += 1
        for entry in Entries:
            self._put(QueueUrl, entry["MessageBody"], entry.get("DelaySeconds", 0))
        return {"Successful": [{"Id": e["Id"]} for e in Entries], "Failed": []}

    def send_message(self, QueueUrl: str, MessageBody: str, **kwargs: Any) -> dict:
        self.calls["SendMessage"] += 1
        message = self._put(QueueUrl, MessageBody, kwargs.get("DelaySeconds", 0))
        message.attributes = kwargs.get("MessageAttributes", {})
        return {"MessageId": message.id}

    def _put(self, url: str, body: str, delay: int) -> VirtualMessage:
        assert 0 <= delay <= 900, "SQS refuses delays over 15 minutes"
        message = VirtualMessage(
            str(next(self._ids)), body, self._clock() + timedelta(seconds=delay)
        )
        self.queues[url].append(message)
        return message

    def take_ready(self, url: str, limit: int = 10) -> list[VirtualMessage]:
        """Receive and delete up to `limit` messages whose delay has passed."""
        now = self._clock()
        ready = [m for m in self.queues[url] if m.available_at <= now][:limit]
        for message in ready:
            self.queues[url].remove(message)
            message.receives += 1
        return ready

    def put_back(self, url: str, message: VirtualMessage, after_seconds: float) -> None:
        message.available_at = self._clock() + timedelta(seconds=after_seconds)
        self.queues[url].append(message)

    def get_queue_attributes(self, QueueUrl: str, AttributeNames: list[str]) -> dict:
        self.calls["GetQueueAttributes"] += 1
        now = self._clock()
        visible = sum(1 for m in self.queues[QueueUrl] if m.available_at <= now)
        delayed = len(self.queues[QueueUrl]) - visible
        values = {
            "ApproximateNumberOfMessages": visible,
            "ApproximateNumberOfMessagesDelayed": delayed,
            "ApproximateNumberOfMessagesNotVisible": 0,
        }
        return {"Attributes": {name: str(values[name]) for name in AttributeNames}}

    def depth(self, url: str) -> int:
        return len(self.queues[url])

    def next_ready_at(self) -> datetime | None:
        times = [m.available_at for q in (SEND_URL, FANOUT_URL) for m in self.queues[q]]
        return min(times) if times else None


def pipeline_settings(gateway_url: str, **overrides: Any) -> Any:
    """Settings for an in-process pipeline on the virtual queues and a loopback gateway:
    short timeouts and claims, so retries happen in seconds of the test's clock."""
    from chalicelib.settings import Settings
    from tests.conftest import API_TOKEN

    defaults = dict(
        table_prefix="sms-test",
        api_tokens=(API_TOKEN,),
        send_queue_url=SEND_URL,
        send_dlq_url=DLQ_URL,
        fanout_queue_url=FANOUT_URL,
        sender_api_url=gateway_url,
        gateway_connect_timeout=0.5,
        # Long enough that a loaded machine's slow thread never turns an accepted send into a
        # timeout (its retry would be a second send: the window of docs/delivery.md, "Exactly
        # once");
        # tests of slow answers set a shorter one.
        gateway_read_timeout=2.0,
        claim_seconds=10,  # room for a claim, a 1 s rate slot, a call and its outcome
        sender_concurrency=4,
    )
    return Settings(**{**defaults, **overrides})


class Pipeline:
    """Runs scheduler ticks, kicks and sender batches until nothing is left to do."""

    def __init__(self, services: Any, sqs: VirtualSqs, clock: Any) -> None:
        self.services = services
        self.sqs = sqs
        self.clock = clock

    def tick(self) -> None:
        self.services.scheduler.tick(lambda: 60.0)

    def kicks(self) -> None:
        for message in self.sqs.take_ready(FANOUT_URL, 100):
            mailing_id = json.loads(message.body)["mailing_id"]
            self.services.scheduler.advance(mailing_id, lambda: 60.0)

    def send_once(self) -> int:
        """Deliver every ready send job once; returns the number of SQS messages handled."""
        handled = 0
        while True:
            batch = self.sqs.take_ready(SEND_URL, 10)
            if not batch:
                return handled
            for message in batch:
                handled += 1
                try:
                    self.services.sender.deliver(JobBatch.model_validate_json(message.body))
                except Exception:
                    # Like Lambda with a batch item failure: back after the visibility timeout.
                    self.sqs.put_back(SEND_URL, message, 360)

    def run(self, until: datetime, step: timedelta = timedelta(seconds=30)) -> None:
        """Advance the clock to `until`, ticking every minute and sending whatever is due."""
        last_tick: datetime | None = None
        while True:
            if last_tick is None or self.clock() - last_tick >= timedelta(minutes=1):
                self.tick()
                last_tick = self.clock()
            self.kicks()
            self.send_once()
            if self.clock() >= until:
                return
            upcoming = self.sqs.next_ready_at()
            target = self.clock() + step
            if upcoming is not None and self.clock() < upcoming < target:
                target = upcoming
            self.clock.now = min(max(target, self.clock() + timedelta(seconds=1)), until)

    def settle(self, limit: timedelta = timedelta(hours=1)) -> None:
        """Run until no job is queued (or `limit` of virtual time passes)."""
        deadline = self.clock() + limit
        while self.clock() < deadline:
            self.run(min(deadline, self.clock() + timedelta(minutes=1)))
            if self.sqs.depth(SEND_URL) == 0 and self.sqs.depth(FANOUT_URL) == 0:
                self.tick()
                if self.sqs.depth(SEND_URL) == 0:
                    return

    # ------------------------------------------------------------ reading back

    def messages(self, mailing_id: str) -> list[Any]:
        return list(self.services.models.Message.query(mailing_id, consistent_read=True))

    def statuses(self, mailing_id: str) -> Counter:
        return Counter(m.status for m in self.messages(mailing_id))

    def counters(self, mailing_id: str) -> Counter:
        item = self.services.models.Mailing.get(mailing_id, consistent_read=True)
        return Counter(
            {
                status.value: int(getattr(item, f"count_{status.value}") or 0)
                for status in MessageStatus
                if int(getattr(item, f"count_{status.value}") or 0)
            }
        )

    def mailing_status(self, mailing_id: str) -> str:
        return self.services.models.Mailing.get(mailing_id, consistent_read=True).status
