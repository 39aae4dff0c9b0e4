"""Builds the services once per process, lazily, from the settings; tests swap in their own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from pynamodb.connection import Connection

from chalicelib.auth import OidcVerifier, StaticTokenVerifier, build_verifier
from chalicelib.models import Models, build_models
from chalicelib.services.clients import ClientDirectory
from chalicelib.services.mailings import MailingService
from chalicelib.settings import Settings, get_settings


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Services:
    settings: Settings
    models: Models
    clients: ClientDirectory
    mailings: MailingService
    verifier: StaticTokenVerifier | OidcVerifier

    @classmethod
    def build(cls, settings: Settings, clock: Callable[[], datetime] = utc_now) -> Services:
        """Wire every service for `settings`; nothing touches AWS until a service is used."""
        models = build_models(settings)
        connection = Connection(region=settings.aws_region)
        return cls(
            settings=settings,
            models=models,
            clients=ClientDirectory(models, connection, clock),
            mailings=MailingService(models, clock),
            verifier=build_verifier(settings),
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
