"""`python -m devstack --demo` (`make demo`): sample clients and a mailing to watch.

Everything goes through the public HTTP API with the bearer token, as a developer's own script
would. Running it again against the same tables is fine: a client whose phone exists (409) is
left as it is, and each run adds one new mailing.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import requests

SAMPLE_CLIENTS = 60
OPERATOR_CODES = ("900", "901", "916", "926")
TAGS = ("vip", "new", "regular", "")
TIMEZONES = (
    "Europe/Moscow",
    "Asia/Vladivostok",
    "Europe/Kaliningrad",
    "Asia/Yekaterinburg",
    "UTC",
)
AUDIENCE = {"operator_codes": ["900", "916"], "tags": ["vip", "new"]}
MAILING_HOURS = 2
MAILING_TEXT = "Demo: your personal offer is waiting. Reply STOP to opt out."
_TIMEOUT_SECONDS = 10


class DemoError(RuntimeError):
    """The demo could not load its data; the message says which request failed."""


@dataclass(frozen=True)
class DemoResult:
    mailing_id: str
    clients_created: int
    clients_existing: int
    audience: int
    stats_url: str


def sample_clients(count: int = SAMPLE_CLIENTS) -> list[dict[str, str]]:
    """Clients spread over every operator code, tag and timezone; the same on every run."""
    clients = []
    for n in range(count):
        code = OPERATOR_CODES[n % len(OPERATOR_CODES)]
        clients.append(
            {
                "phone": f"7{code}555{n:04d}",
                "operator_code": code,
                # Stepped, not cycled with the codes: every code meets every tag.
                "tag": TAGS[(n // len(OPERATOR_CODES)) % len(TAGS)],
                "timezone": TIMEZONES[n % len(TIMEZONES)],
            }
        )
    return clients


def in_audience(client: dict[str, str], audience: dict[str, list[str]] = AUDIENCE) -> bool:
    """Whether the mailing's filter selects this client (any value per list, all lists)."""
    codes, tags = audience.get("operator_codes") or [], audience.get("tags") or []
    return (not codes or client["operator_code"] in codes) and (not tags or client["tag"] in tags)


def run_demo(
    api_url: str,
    token: str,
    *,
    out: TextIO,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    session: requests.Session | None = None,
) -> DemoResult:
    """Load the sample clients, create a mailing that starts now and print how to watch it."""
    http = session or requests.Session()
    http.headers["Authorization"] = f"Bearer {token}"
    clients = sample_clients()
    created = existing = 0
    for client in clients:
        response = _call(http, "POST", f"{api_url}/clients", client, expect=(201, 409))
        if response.status_code == 201:
            created += 1
        else:
            existing += 1
    print(
        f"demo: {created} sample clients created, {existing} already there",
        file=out,
        flush=True,
    )

    start = now()
    mailing = {
        "text": MAILING_TEXT,
        "start_at": start.isoformat(),
        "end_at": (start + timedelta(hours=MAILING_HOURS)).isoformat(),
        "filter": AUDIENCE,
    }
    response = _call(http, "POST", f"{api_url}/mailings", mailing, expect=(201,))
    mailing_id = response.json()["id"]
    audience = sum(in_audience(client) for client in clients)
    stats_url = f"{api_url}/mailings/{mailing_id}/stats"
    header = shlex.quote(f"Authorization: Bearer {token}")
    codes, tags = "/".join(AUDIENCE["operator_codes"]), "/".join(AUDIENCE["tags"])
    print(
        f"demo: mailing {mailing_id} started: operator codes {codes} and tags {tags} "
        f"select {audience} of the {len(clients)} sample clients",
        file=out,
        flush=True,
    )
    print(f"demo: watch it with  curl -H {header} {stats_url}", file=out, flush=True)
    return DemoResult(mailing_id, created, existing, audience, stats_url)


def _call(
    http: requests.Session, method: str, url: str, body: Any, *, expect: tuple[int, ...]
) -> requests.Response:
    try:
        response = http.request(method, url, json=body, timeout=_TIMEOUT_SECONDS)
    except requests.RequestException as exc:
        raise DemoError(f"{method} {url} failed: {exc}") from None
    if response.status_code not in expect:
        raise DemoError(f"{method} {url} answered {response.status_code}: {response.text[:300]}")
    return response
