"""For tests that drive the app's functions directly rather than through the local stack's
process: the real services in-process on moto, wired to the queues the stack's template declares,
and the SQS events Lambda would hand the functions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import API_TOKEN

# Each queue's logical id in infra/resources.yaml -> its name after the stack's prefix.
QUEUE_NAMES = {
    "SendQueue": "send",
    "SendDeadLetterQueue": "send-dlq",
    "FanoutQueue": "fanout",
    "FanoutDeadLetterQueue": "fanout-dlq",
    "ImportQueue": "import",
    "ImportDeadLetterQueue": "import-dlq",
}
REPORT_SENDER = "reports@example.com"


@dataclass(frozen=True)
class InProcessStack:
    settings: Any  # chalicelib.settings.Settings
    services: Any  # chalicelib.container.Services, in use until the block ends
    queues: dict[str, str]  # logical id -> URL


@contextmanager
def in_process_stack(
    prefix: str, clock: Any, monkeypatch: pytest.MonkeyPatch, **settings: Any
) -> Iterator[InProcessStack]:
    """Inside the `aws` fixture: every queue of the stack named after `prefix`, REPORT_SENDER
    verified in SES, the test's API token, and the real services built on them and in use;
    `settings` adds to (or overrides) the Settings this builds."""
    import boto3

    from chalicelib.container import Services, use_services
    from chalicelib.settings import Settings
    from chalicelib.storage.models import create_tables

    sqs = boto3.client("sqs")
    queues = {
        logical_id: sqs.create_queue(QueueName=f"{prefix}-{name}")["QueueUrl"]
        for logical_id, name in QUEUE_NAMES.items()
    }
    boto3.client("ses").verify_email_identity(EmailAddress=REPORT_SENDER)
    monkeypatch.setenv("API_TOKENS", API_TOKEN)
    monkeypatch.delenv("AUTH_MODE", raising=False)
    built_settings = Settings(
        **{
            "table_prefix": prefix,
            "api_tokens": (API_TOKEN,),
            "send_queue_url": queues["SendQueue"],
            "send_dlq_url": queues["SendDeadLetterQueue"],
            "fanout_queue_url": queues["FanoutQueue"],
            "import_queue_url": queues["ImportQueue"],
            "report_sender": REPORT_SENDER,
            **settings,
        }
    )
    services = Services.build(built_settings, clock=clock, wait_until=clock.wait_until)
    create_tables(services.models)
    use_services(services)
    try:
        yield InProcessStack(built_settings, services, queues)
    finally:
        use_services(None)


def sqs_event(bodies: list[str], queue_arn: str) -> dict[str, Any]:
    """A Lambda SQS event whose records have ids of their own (Chalice's generator repeats one)."""
    return {
        "Records": [
            {
                "messageId": f"record-{n}",
                "receiptHandle": f"handle-{n}",
                "body": text,
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": queue_arn.split(":")[3],
            }
            for n, text in enumerate(bodies)
        ]
    }
