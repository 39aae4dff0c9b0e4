"""Shared fixtures: a fresh in-process moto world and a Chalice test client per test."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.api import API_TOKEN, AUTH, JSON_HEADERS, Api  # noqa: F401 - re-exported

# Before anything can build a boto3/PynamoDB client: moto fakes credentials, not a region.
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
_FAKE_CREDENTIALS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SECURITY_TOKEN",
    "AWS_SESSION_TOKEN",
)
for _name in _FAKE_CREDENTIALS:
    os.environ[_name] = "testing"
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_PROFILE", None)

GATEWAY_TOKEN = "sandbox-token-for-tests"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)

    def wait_until(self, moment: datetime) -> None:
        """What a sleeping sender sees: time has moved on to `moment` (never back)."""
        self.now = max(self.now, moment)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 11, 22, 12, 0, tzinfo=UTC))


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Any:
    from chalicelib.settings import Settings

    monkeypatch.setenv("API_TOKENS", API_TOKEN)
    monkeypatch.delenv("AUTH_MODE", raising=False)
    return Settings(table_prefix="sms-test", api_tokens=(API_TOKEN,))


@pytest.fixture
def aws() -> Iterator[None]:
    from moto import mock_aws

    from devstack.emulator import patch_moto

    patch_moto()

    from chalicelib import aws as aws_factories
    from chalicelib.storage.models import build_models

    with mock_aws():
        build_models.cache_clear()
        aws_factories.reset()
        yield
    build_models.cache_clear()


@pytest.fixture
def services(aws: None, settings: Any, clock: FakeClock) -> Iterator[Any]:
    """The real services on a fresh moto world, with the test's clock."""
    from chalicelib.container import Services, use_services
    from chalicelib.storage.models import create_tables

    built = Services.build(settings, clock=clock, wait_until=clock.wait_until)
    create_tables(built.models)
    use_services(built)
    yield built
    use_services(None)


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The sandbox SMS gateway on loopback, fault-free until a test sets a profile."""
    from devstack.gateway import SandboxGateway

    # A proxy configured on the test machine must not intercept loopback calls.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    gateway = SandboxGateway(GATEWAY_TOKEN)
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture
def api(services: Any) -> Iterator[Api]:
    from chalice.test import Client

    from app import app

    with Client(app, stage_name="dev") as client:
        yield Api(client.http)


def body(response: Any) -> Any:
    return json.loads(response.body)


# OIDC: module-scoped RSA keys and a local JWKS server, defined beside their helpers.
from tests.support.oidc import jwks, jwks_server, other_key, signing_key  # noqa: E402, F401

# ---------------------------------------------------------------- invariant reports

INVARIANTS = "invariants"


@pytest.fixture
def invariants(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Record what a suite checked and measured; printed in the run's summary (with or without
    pytest-xdist, whose workers' output is not shown)."""

    def record(text: str) -> None:
        request.node.user_properties.append((INVARIANTS, text))

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    reports = [
        report
        for outcome in ("passed", "failed")
        for report in terminalreporter.getreports(outcome)
        if report.when == "call"
    ]
    lines = [
        f"{report.nodeid}:\n{text.strip()}"
        for report in sorted(reports, key=lambda r: r.nodeid)
        for name, text in report.user_properties
        if name == INVARIANTS
    ]
    if lines:
        terminalreporter.section("invariant checks")
        for line in lines:
            terminalreporter.write_line(line)


# The longest suites first: pytest-xdist (`make test`, --dist loadfile --no-loadscope-reorder)
# then starts them at once on different workers, and the short ones fill in around them.
SLOWEST_FIRST = ("test_chaos_e2e.py", "test_crash_e2e.py", "test_api_fuzz_e2e.py")


def pytest_collection_modifyitems(items: list[Any]) -> None:
    def rank(item: Any) -> int:
        name = item.path.name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its order
