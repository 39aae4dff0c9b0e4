"""A CSV import through the local stack (`make run`): the API, the import queue, its poller and the
import_clients Lambda, then a mailing that reaches the imported clients through the sandbox."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import requests

from tests.support.local_stack import Stack, running_stack

pytestmark = pytest.mark.e2e

ROWS = 2500  # three chunks


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(SCHEDULER_INTERVAL_SECONDS="1") as started:
        yield started


def wait_for(check, timeout: float = 90.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def test_an_imported_file_becomes_clients_a_mailing_reaches(stack: Stack) -> None:
    # Given a file of 2,500 clients (a third of them vip) and one bad row
    lines = ["phone,tag,timezone"]
    lines += [f"7955{n:07d},{'vip' if n % 3 == 0 else ''},Europe/Moscow" for n in range(ROWS)]
    lines.append("79550000000,vip,Mars/Olympus")
    csv = ("\n".join(lines) + "\n").encode()
    headers = {**stack.auth, "Content-Type": "text/csv"}
    # When it is posted to the running stack
    started = time.monotonic()
    response = requests.post(f"{stack.url}/clients/import", data=csv, headers=headers, timeout=30)
    answered = time.monotonic() - started
    # Then the answer comes at once, with the bad row
    assert response.status_code == 202, response.text
    assert answered < 10
    job = response.json()
    assert (job["rows"], job["valid"], job["invalid"]) == (ROWS + 1, ROWS, 1)
    assert job["errors"][0]["row"] == ROWS + 1

    # And the import workers write every valid row
    location = f"{stack.url}{response.headers['Location']}"

    def finished() -> dict | None:
        state = requests.get(location, headers=stack.auth, timeout=10).json()
        return state if state["status"] in ("done", "failed") else None

    done = wait_for(finished)
    assert done is not None, "the import did not finish"
    assert (done["status"], done["created"], done["failed"]) == ("done", ROWS, 0)

    # When a mailing to the vip clients starts
    now = datetime.now(UTC)
    mailing = requests.post(
        f"{stack.url}/mailings",
        json={
            "text": "Imported",
            "start_at": now.isoformat(),
            "end_at": (now + timedelta(hours=1)).isoformat(),
            "filter": {"tags": ["vip"]},
        },
        headers=stack.auth,
        timeout=10,
    ).json()

    # Then the gateway receives it for exactly those imported clients
    def stats() -> dict | None:
        answer = requests.get(
            f"{stack.url}/mailings/{mailing['id']}/stats", headers=stack.auth, timeout=10
        ).json()
        return answer if answer["status"] == "finished" else None

    finished_mailing = wait_for(stats, timeout=180)
    assert finished_mailing is not None, "the mailing did not finish"
    vip = len(range(0, ROWS, 3))
    assert finished_mailing["stats"]["sent"] == vip
    ledger = requests.get(f"{stack.sandbox_url}/_sandbox/ledger", timeout=10).json()
    phones = sorted(str(send["phone"]) for send in ledger["accepted"] if send["text"] == "Imported")
    assert phones == [f"7955{n:07d}" for n in range(0, ROWS, 3)]
