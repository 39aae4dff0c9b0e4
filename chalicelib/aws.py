"""Lazy AWS client factories: nothing is created at import, so an emulator can start first."""

from __future__ import annotations

from functools import cache
from typing import Any

import boto3
from botocore.config import Config

from chalicelib.settings import Settings

_CLIENT_CONFIG = Config(
    retries={"max_attempts": 5, "mode": "standard"},
    connect_timeout=3,
    read_timeout=10,
)


@cache
def _session(region: str) -> boto3.session.Session:
    return boto3.session.Session(region_name=region)


def client(service: str, settings: Settings) -> Any:
    """A boto3 client for `service`; AWS_ENDPOINT_URL (or the setting) redirects it."""
    kwargs: dict[str, Any] = {"config": _CLIENT_CONFIG}
    if settings.aws_endpoint_url:
        kwargs["endpoint_url"] = settings.aws_endpoint_url
    return _session(settings.aws_region).client(service, **kwargs)


def reset() -> None:
    """Forget cached sessions (tests start a fresh emulator per test)."""
    _session.cache_clear()
