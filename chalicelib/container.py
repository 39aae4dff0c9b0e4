"""Builds the services once per process, lazily, from the settings; tests swap in their own."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from chalicelib import aws, logs
from chalicelib.auth import Verifier, build_verifier
from chalicelib.gateway import GatewayClient
from chalicelib.metrics import MetricsWriter
from chalicelib.secrets import Secrets
from chalicelib.services.audit import AuditLog
from chalicelib.services.clients import ClientDirectory
from chalicelib.services.delivery import Sender
from chalicelib.services.frequency_cap import FrequencyCapGuard
from chalicelib.services.idempotency import IdempotencyStore
from chalicelib.services.imports import ClientImports
from chalicelib.services.inbound import InboundSms
from chalicelib.services.mailings import MailingService
from chalicelib.services.messages import MessageStore
from chalicelib.services.parts import PartsCounter, prices_of
from chalicelib.services.queues import Queues
from chalicelib.services.receipts import DeliveryReceipts
from chalicelib.services.reports import ReportService, ReportSink, SesReportSink
from chalicelib.services.scheduler import Scheduler
from chalicelib.services.throttle import GatewayThrottle
from chalicelib.settings import Settings, get_settings
from chalicelib.storage.audit import DynamoAuditTrail
from chalicelib.storage.clients import DynamoClientRepository
from chalicelib.storage.errors import PATIENT
from chalicelib.storage.frequency_caps import DynamoFrequencyCaps
from chalicelib.storage.gateway_limits import DynamoGatewayLimits
from chalicelib.storage.idempotency import DynamoIdempotencyKeys
from chalicelib.storage.imports import DynamoImportRepository
from chalicelib.storage.inbound import DynamoInboundRepository
from chalicelib.storage.mailings import DynamoMailingRepository
from chalicelib.storage.messages import DynamoMessageRepository
from chalicelib.storage.models import Models, build_models, connection_for
from chalicelib.storage.receipts import DynamoReceiptRepository


def utc_now() -> datetime:
    return datetime.now(UTC)


class _LazyClient:
    """A boto3 client made on first use, so the API's cold start does not pay for it."""

    def __init__(self, service: str, settings: Settings) -> None:
        self._service = service
        self._settings = settings

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client(), name)

    @cache  # noqa: B019 - one client per instance, for the life of the process
    def _client(self) -> Any:
        return aws.client(self._service, self._settings)


def frequency_cap_guard(settings: Settings) -> FrequencyCapGuard | None:
    """The senders' frequency cap (FREQUENCY_CAP), or None when it is off."""
    if settings.frequency_cap is None:
        return None
    store = DynamoFrequencyCaps(_LazyClient("dynamodb", settings), settings.table_name("sequences"))
    return FrequencyCapGuard(settings.frequency_cap, store)


def sleep_until(moment: datetime) -> None:
    """Block the calling thread until `moment` (wall clock)."""
    delay = (moment - utc_now()).total_seconds()
    if delay > 0:
        time.sleep(delay)


def gateway_factory(
    settings: Settings, secrets: Secrets | None = None
) -> Callable[[], GatewayClient | None]:
    """The gateway client, made on first use; None while the gateway is not configured.
    Its `cache_clear` makes the next use read the token again (the sender's answer to a 401)."""
    reader = secrets or Secrets(settings)

    @cache
    def make() -> GatewayClient | None:
        token = reader.gateway_token()
        if not settings.sender_api_url or token is None:
            return None
        return GatewayClient(
            settings.sender_api_url,
            token,
            connect_timeout=settings.gateway_connect_timeout,
            read_timeout=settings.gateway_read_timeout,
            pool_size=settings.sender_concurrency,
        )

    return make


@dataclass
class Services:
    settings: Settings
    models: Models
    clients: ClientDirectory
    imports: ClientImports
    mailings: MailingService
    messages: MessageStore
    queues: Queues
    scheduler: Scheduler
    sender: Sender
    throttle: GatewayThrottle
    metrics: MetricsWriter
    reports: ReportService
    verifier: Verifier
    idempotency: IdempotencyStore
    audit: AuditLog
    receipts: DeliveryReceipts
    inbound: InboundSms

    @classmethod
    def build(
        cls,
        settings: Settings,
        clock: Callable[[], datetime] = utc_now,
        *,
        sqs: Any = None,
        gateway: Callable[[], GatewayClient | None] | None = None,
        rng: random.Random | None = None,
        wait_until: Callable[[datetime], None] = sleep_until,
        write_metrics: Callable[[str], None] | None = None,
        ses: Any = None,
        report_sinks: Sequence[ReportSink] = (),
    ) -> Services:
        """Wire every service for `settings`; nothing touches AWS until a service is used.
        `report_sinks` get the daily report after SES (the local stack's outbox)."""
        models = build_models(settings)
        secrets = Secrets(settings)
        connection = connection_for(settings)
        queues = Queues(
            sqs=sqs if sqs is not None else _LazyClient("sqs", settings),
            send_url=settings.send_queue_url,
            dlq_url=settings.send_dlq_url,
            fanout_url=settings.fanout_queue_url,
            import_url=settings.import_queue_url,
        )
        client_store = DynamoClientRepository(models, connection)
        clients = ClientDirectory(clients=client_store, clock=clock, prices=prices_of(settings))
        messages = MessageStore(repository=DynamoMessageRepository(models, connection))
        # The scheduler's and retry-failed's writes pause on `clock`: a test's never sleeps.
        writes = replace(
            PATIENT,
            sleep=lambda seconds: wait_until(clock() + timedelta(seconds=seconds)),
            rng=rng or random.Random(),
        )
        mailing_records = DynamoMailingRepository(models, connection)
        mailings = MailingService(
            clock=clock,
            queues=queues,
            messages=messages,
            jobs_per_message=settings.jobs_per_message,
            mailings=mailing_records,
            retry=writes,
            parts=PartsCounter(client_store, prices_of(settings), settings.max_parts_default),
        )
        metrics = MetricsWriter(settings=settings, write=write_metrics)
        receipts = DeliveryReceipts(
            DynamoReceiptRepository(models, connection),
            clock,
            enabled=settings.delivery_receipts,
        )
        # The senders' shared limits; the API reads their state for operators (GET /gateway).
        limits = DynamoGatewayLimits(
            _LazyClient("dynamodb", settings), settings.table_name("sequences")
        )
        throttle = GatewayThrottle(limits=limits, settings=settings, clock=clock)
        for token in settings.api_tokens:
            logs.add_secret(token)
            # ROLE:TOKEN: the bearer token is the part after the role.
            logs.add_secret(token.partition(":")[2])
        return cls(
            settings=settings,
            models=models,
            clients=clients,
            imports=ClientImports(
                imports=DynamoImportRepository(models, connection),
                clients=client_store,
                queues=queues,
                clock=clock,
                retention_days=settings.import_retention_days,
            ),
            mailings=mailings,
            messages=messages,
            queues=queues,
            scheduler=Scheduler(
                clients=clients,
                messages=messages,
                queues=queues,
                settings=settings,
                clock=clock,
                metrics=metrics,
                mailings=mailing_records,
                retry=writes,
                receipts=receipts,
            ),
            sender=Sender(
                mailings=mailing_records,
                messages=messages,
                clients=clients,
                queues=queues,
                gateway=gateway or gateway_factory(settings, secrets),
                settings=settings,
                clock=clock,
                rng=rng,
                throttle=throttle,
                wait_until=wait_until,
                metrics=metrics,
                caps=frequency_cap_guard(settings),
            ),
            throttle=throttle,
            metrics=metrics,
            reports=ReportService(
                mailings=mailings,
                settings=settings,
                clock=clock,
                sinks=[
                    SesReportSink(
                        ses=ses or _LazyClient("ses", settings),
                        # Reports are sent only when it is set.
                        sender=settings.report_sender or "",
                    ),
                    *report_sinks,
                ],
            ),
            # The authorizer reads the tokens' secret (if any) at its first request, not here.
            verifier=build_verifier(settings, load_tokens=secrets.api_tokens),
            idempotency=IdempotencyStore(
                keys=DynamoIdempotencyKeys(models.IdempotencyRecord),
                clock=clock,
                ttl=timedelta(hours=settings.idempotency_ttl_hours),
            ),
            audit=AuditLog(
                trail=DynamoAuditTrail(models.AuditEntry),
                clock=clock,
                retention_days=settings.audit_retention_days,
                metrics=metrics,
            ),
            receipts=receipts,
            inbound=InboundSms(
                clients,
                DynamoInboundRepository(models, connection),
                clock,
                keywords=settings.inbound_opt_out_keywords,
                retention_days=settings.message_retention_days,
            ),
        )


_services: Services | None = None


def services() -> Services:
    """The process-wide services, built on first use."""
    global _services
    if _services is None:
        _services = Services.build(get_settings())
    return _services


def use_services(replacement: Services | None) -> None:
    """Install (or with None, forget) the process-wide services: tests and the local stack."""
    global _services
    _services = replacement
