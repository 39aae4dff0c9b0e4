"""Builds the services once per process, lazily, from the settings; tests swap in their own."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import SecretStr
from pynamodb.connection import Connection

from chalicelib import aws, logs
from chalicelib.auth import Verifier, build_verifier
from chalicelib.gateway import GatewayClient
from chalicelib.metrics import MetricsWriter
from chalicelib.services.audit import AuditLog
from chalicelib.services.clients import ClientDirectory
from chalicelib.services.delivery import Sender
from chalicelib.services.idempotency import IdempotencyStore
from chalicelib.services.imports import ClientImports
from chalicelib.services.mailings import MailingService
from chalicelib.services.messages import MessageStore
from chalicelib.services.queues import Queues
from chalicelib.services.reports import ReportService
from chalicelib.services.scheduler import Scheduler
from chalicelib.services.throttle import GatewayThrottle
from chalicelib.settings import Settings, SettingsError, check_api_tokens, get_settings
from chalicelib.storage.clients import DynamoClientRepository
from chalicelib.storage.errors import PATIENT
from chalicelib.storage.gateway_limits import DynamoGatewayLimits
from chalicelib.storage.imports import DynamoImportRepository
from chalicelib.storage.messages import DynamoMessageRepository
from chalicelib.storage.models import Models, build_models


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


def sleep_until(moment: datetime) -> None:
    """Block the calling thread until `moment` (wall clock)."""
    delay = (moment - utc_now()).total_seconds()
    if delay > 0:
        time.sleep(delay)


def gateway_token(settings: Settings, secrets: Any = None) -> SecretStr | None:
    """SENDER_API_TOKEN, else the secret SENDER_API_TOKEN_SECRET_ID names (read from Secrets
    Manager: a plain string, or JSON with a "token" key). Never logged."""
    token = settings.sender_api_token
    if token is None and settings.sender_api_token_secret_id:
        client = secrets or aws.client("secretsmanager", settings)
        answer = client.get_secret_value(SecretId=settings.sender_api_token_secret_id)
        token = SecretStr(_token_from_secret(answer.get("SecretString") or ""))
    if token is not None:
        logs.add_secret(token.get_secret_value())
    return token


def _json_secret_field(text: str, key: str, usable: Callable[[Any], bool], problem: str) -> Any:
    """The `key` of a JSON secret; SettingsError(`problem`) unless it is there and usable."""
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    value = parsed.get(key) if isinstance(parsed, dict) else None
    if value is None or not usable(value):
        raise SettingsError(problem)
    return value


def _token_from_secret(value: str) -> str:
    text = value.strip()
    if text.startswith("{"):
        problem = 'SENDER_API_TOKEN_SECRET_ID: a JSON secret needs a string "token" key'
        text = _json_secret_field(text, "token", lambda v: isinstance(v, str), problem).strip()
    if not text:
        raise SettingsError("SENDER_API_TOKEN_SECRET_ID: the secret is empty")
    return text


def api_tokens_from_secret(settings: Settings, secrets: Any = None) -> tuple[str, ...]:
    """The static API tokens in the secret API_TOKENS_SECRET_ID names: its SecretString is the
    tokens separated by commas, or JSON {"tokens": [...]}; each is held to API_TOKENS' rules.
    Every problem is a SettingsError that names the setting and never holds a token."""
    client = secrets or aws.client("secretsmanager", settings)
    try:
        answer = client.get_secret_value(SecretId=settings.api_tokens_secret_id)
    except (ClientError, BotoCoreError) as exc:
        # botocore's text names the error code and the secret, never its value.
        raise SettingsError(f"API_TOKENS_SECRET_ID: the secret cannot be read ({exc})") from None
    return _api_tokens_from_secret(answer.get("SecretString") or "")


def _api_tokens_from_secret(value: str) -> tuple[str, ...]:
    text = value.strip()
    if text.startswith("{"):
        candidates = _json_secret_field(
            text,
            "tokens",
            lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v),
            'API_TOKENS_SECRET_ID: a JSON secret needs a "tokens" key holding a list of strings',
        )
    else:
        candidates = text.split(",")
    tokens = tuple(token.strip() for token in candidates if token.strip())
    # Before any check: whatever is read from the secret never reaches a log line.
    for token in tokens:
        logs.add_secret(token)
        logs.add_secret(token.partition(":")[2])
    if not tokens:
        raise SettingsError("API_TOKENS_SECRET_ID: the secret holds no token")
    try:
        return check_api_tokens(tokens)
    except ValueError as exc:
        raise SettingsError(f"API_TOKENS_SECRET_ID: {exc}") from None


def gateway_factory(settings: Settings) -> Callable[[], GatewayClient | None]:
    """The gateway client, made on first use; None while the gateway is not configured."""

    @cache
    def make() -> GatewayClient | None:
        token = gateway_token(settings)
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
    ) -> Services:
        """Wire every service for `settings`; nothing touches AWS until a service is used."""
        models = build_models(settings)
        connection = Connection(region=settings.aws_region)
        queues = Queues(
            sqs if sqs is not None else _LazyClient("sqs", settings),
            send_url=settings.send_queue_url,
            dlq_url=settings.send_dlq_url,
            fanout_url=settings.fanout_queue_url,
            import_url=settings.import_queue_url,
        )
        client_store = DynamoClientRepository(models, connection)
        clients = ClientDirectory(client_store, clock)
        messages = MessageStore(DynamoMessageRepository(models, connection))
        # The scheduler's and retry-failed's writes pause on `clock`: a test's never sleeps.
        writes = replace(
            PATIENT,
            sleep=lambda seconds: wait_until(clock() + timedelta(seconds=seconds)),
            rng=rng or random.Random(),
        )
        mailings = MailingService(
            models, clock, queues, messages, settings.jobs_per_message, retry=writes
        )
        metrics = MetricsWriter(settings, write_metrics)
        # The senders' shared limits; the API reads their state for operators (GET /gateway).
        limits = DynamoGatewayLimits(
            _LazyClient("dynamodb", settings), settings.table_name("sequences")
        )
        throttle = GatewayThrottle(limits, settings, clock)
        for token in settings.api_tokens:
            logs.add_secret(token)
            # ROLE:TOKEN: the bearer token is the part after the role.
            logs.add_secret(token.partition(":")[2])
        return cls(
            settings=settings,
            models=models,
            clients=clients,
            imports=ClientImports(
                DynamoImportRepository(models, connection),
                client_store,
                queues,
                clock,
                retention_days=settings.import_retention_days,
            ),
            mailings=mailings,
            messages=messages,
            queues=queues,
            scheduler=Scheduler(
                models,
                connection,
                clients,
                messages,
                queues,
                settings,
                clock,
                metrics,
                retry=writes,
            ),
            sender=Sender(
                models,
                messages,
                clients,
                queues,
                gateway or gateway_factory(settings),
                settings,
                clock,
                rng,
                throttle=throttle,
                wait_until=wait_until,
                metrics=metrics,
            ),
            throttle=throttle,
            metrics=metrics,
            reports=ReportService(mailings, settings, clock, ses or _LazyClient("ses", settings)),
            # The authorizer reads the tokens' secret (if any) at its first request, not here.
            verifier=build_verifier(settings, load_tokens=lambda: api_tokens_from_secret(settings)),
            idempotency=IdempotencyStore(
                models, clock, timedelta(hours=settings.idempotency_ttl_hours)
            ),
            audit=AuditLog(models, clock, settings.audit_retention_days, metrics),
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
