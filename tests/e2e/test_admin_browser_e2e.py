"""The admin UI end to end: Debian's Chromium, headless, driven by Playwright against the local
stack as `make run` starts it. An operator signs in, adds clients, creates a mailing after
previewing its audience, and watches it finish; screenshots of each step are kept in
build/test-artifacts/admin/.

Chromium comes from the system (`make browser` installs Debian's `chromium`; CHROMIUM_PATH points
elsewhere). Without it this suite fails rather than skips: it is part of `make test`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.local_stack import REPO_ROOT, TOKEN, Stack, running_stack
from tests.support.oidc import AUDIENCE, ISSUER, KID, claims_at, public_jwk, sign

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
# Headless and quiet: on a closed network Chromium stalls on its background fetches otherwise.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO_ROOT / "build" / "test-artifacts" / "admin"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# The sandbox gateway refuses phones ending in these digits (400): their messages fail.
REJECTED_SUFFIX = "4044"
FINISH_TIMEOUT_MS = 60_000
VIEWER_TOKEN = "e2e-viewer-" + "v" * 24


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # A scheduler tick every second: a mailing starting now is sent within a few seconds.
    with running_stack(
        SCHEDULER_INTERVAL_SECONDS="1",
        SANDBOX_REJECT_SUFFIXES=REJECTED_SUFFIX,
        # The operators' token first (the stack's own), and a viewer's narrow token.
        API_TOKENS=f"{TOKEN},viewer:{VIEWER_TOKEN}",
    ) as started:
        yield started


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium) or set "
            "CHROMIUM_PATH to a Chromium or Chrome binary"
        )
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        # Playwright gives each launch a fresh temporary profile (user data dir).
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context (nothing signed in) at desktop size; the page's script errors
    fail the test. On failure a screenshot is kept for the post-mortem."""
    context = browser.new_context(viewport=DESKTOP, locale="en-GB", timezone_id="UTC")
    context.set_default_timeout(15_000)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    failures = request.session.testsfailed
    yield opened
    if request.session.testsfailed > failures:
        opened.screenshot(path=str(ARTIFACTS / f"failed-{request.node.name}.png"), full_page=True)
    context.close()
    # A refused API call logs a console error by design; script errors never happen.
    assert [e for e in errors if "Failed to load resource" not in e] == []


def shot(page: Any, name: str, *, full_page: bool = True) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page, animations="disabled")
    return path


def expect(target: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def sign_in(page: Any, stack: Stack, route: str = "") -> None:
    page.goto(f"{stack.url}/admin{route}")
    page.get_by_label("API token", exact=True).fill(TOKEN)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def open_new_client_form(page: Any) -> None:
    page.get_by_role("link", name="New client").click()
    # Views still loading (the list, the page signed in to) may render once more when their
    # requests return; fill the form only once nothing is in flight, so it is not re-rendered
    # half-filled.
    expect(page).to_have_url(re.compile(r"#/clients/new$"))
    page.wait_for_load_state("networkidle")


def add_client(page: Any, phone: str, tag: str, *, operator_code: str = "") -> None:
    page.get_by_role("link", name="Clients", exact=True).click()
    open_new_client_form(page)
    page.get_by_label("Phone", exact=True).fill(phone)
    if operator_code:
        page.get_by_label("Operator code", exact=True).fill(operator_code)
    page.get_by_label("Tag", exact=True).fill(tag)
    page.get_by_label("Timezone", exact=True).fill("Europe/Moscow")
    page.get_by_role("button", name="Create client").click()
    expect(page.get_by_text(f"Created client {phone}.")).to_be_visible()
    # The app then goes back to the list; wait until it shows, so the next click on "New
    # client" is not overtaken by that navigation (the form would render twice, half-filled).
    expect(page).to_have_url(re.compile(r"#/clients$"))
    expect(page.get_by_role("link", name="New client")).to_be_visible()


def search_clients(page: Any, **fields: str) -> None:
    page.get_by_role("link", name="Clients", exact=True).click()
    search = page.get_by_role("search")
    for label, value in fields.items():
        search.get_by_label(label.replace("_", " ").capitalize(), exact=True).fill(value)
    search.get_by_role("button", name="Search").click()


def client_rows(page: Any) -> Any:
    return page.locator("#clients-table tbody tr")


def local_input(moment: datetime) -> str:
    """A datetime-local value (the browser runs in UTC)."""
    return moment.strftime("%Y-%m-%dT%H:%M")


def fill_mailing(page: Any, text: str, *, tags: str, start: datetime | None = None) -> None:
    page.get_by_role("link", name="Mailings", exact=True).click()
    page.get_by_role("link", name="New mailing").click()
    page.get_by_label("Text", exact=True).fill(text)
    if start is not None:
        page.get_by_label("Start", exact=True).fill(local_input(start))
        page.get_by_label("End", exact=True).fill(local_input(start + timedelta(days=1)))
    page.get_by_label("Tags", exact=True).fill(tags)
    page.get_by_role("button", name="Preview audience").click()


def status_badge(page: Any) -> Any:
    return page.locator("#mailing-status [data-status]")


def count(page: Any, status: str) -> Any:
    return page.locator(f'#status-counts [data-count="{status}"]')


def sandbox_ledger(stack: Stack) -> dict[str, Any]:
    response = requests.get(f"{stack.sandbox_url}/_sandbox/ledger", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def gateway_calls(stack: Stack, message_id: int) -> int:
    """How many times the sandbox gateway was asked to send this message."""
    return sum(1 for r in sandbox_ledger(stack)["requests"] if r["msg_id"] == message_id)


def unique_phone(suffix: str = "") -> str:
    digits = f"{uuid.uuid4().int % 10**10:010d}"
    return "7" + (digits[: 10 - len(suffix)] + suffix)


# ---------------------------------------------------------------- the operator's path


def test_an_operator_signs_in_adds_clients_and_watches_a_mailing_finish(
    page: Any, stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    tag = f"ui-{uuid.uuid4().hex[:8]}"
    phones = [unique_phone() for _ in range(3)]

    # Given the admin page, opened by someone not signed in
    page.goto(f"{stack.url}/admin")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shot(page, "01-sign-in")
    # When a wrong token is tried, it is refused on the spot
    page.get_by_label("API token", exact=True).fill("not-the-token-at-all-0000")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_text("This token was refused.")).to_be_visible()
    # And with the right one the operator is in, on the mailings page
    page.get_by_label("API token", exact=True).fill(TOKEN)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("heading", name="Mailings", exact=True)).to_be_visible()

    # When three clients are added through the forms
    for phone in phones:
        add_client(page, phone, tag)
    # Then the client list, searched by their tag, shows exactly them
    search_clients(page, tag=tag)
    expect(client_rows(page)).to_have_count(3)
    for phone in phones:
        expect(page.locator("#clients-table")).to_contain_text(phone)
    shot(page, "02-clients")
    # And a search by phone number finds just that client
    search_clients(page, tag="", phone=phones[1])
    expect(client_rows(page)).to_have_count(1)
    expect(client_rows(page)).to_contain_text(phones[1])

    # When a mailing to that tag is written, its audience preview counts the three
    fill_mailing(page, "Hello from the admin UI, {tag}!", tags=tag)
    expect(page.locator("#audience-count")).to_have_text("3 clients match this filter")
    expect(page.locator("#audience-preview li")).to_have_count(3)
    shot(page, "03-new-mailing-preview")
    # And it is created, starting now
    page.get_by_role("button", name="Create mailing").click()
    expect(page.get_by_text("Mailing created.")).to_be_visible()

    # Then its statistics page shows it finish in the local stack, every message sent
    expect(page.locator("#mailing-text")).to_have_text("Hello from the admin UI, {tag}!")
    expect(status_badge(page)).to_have_text("finished", timeout=FINISH_TIMEOUT_MS)
    expect(count(page, "sent")).to_have_text("3")
    expect(count(page, "total")).to_have_text("3")
    expect(count(page, "pending")).to_have_text("0")
    expect(page.locator("#progress-label")).to_have_text("3 of 3 messages done (100%)")
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#failed-messages")).to_have_text("No failed messages.")
    expect(page.get_by_role("button", name="Retry failed")).to_be_hidden()
    # And the chart has drawn the sent line from its samples
    expect(page.locator("#chart svg polyline.s-sent")).to_have_count(1)
    expect(page.locator("#chart .legend")).to_contain_text("sent 3")
    # (the notes of the steps before are dismissed: this one is the README's picture)
    page.evaluate("document.querySelectorAll('#flash button').forEach((b) => b.click())")
    expect(page.locator("#flash .flash")).to_have_count(0)
    shot(page, "04-statistics-finished")
    elapsed = time.monotonic() - started

    # And the API agrees with what the page shows
    mailing_id = page.url.rsplit("/", 1)[1]
    stats = requests.get(f"{stack.url}/mailings/{mailing_id}", headers=stack.auth, timeout=5)
    assert stats.json()["status"] == "finished"
    assert stats.json()["stats"]["sent"] == 3

    # And each client got the text with its own tag in place of {tag}
    accepted = [s for s in sandbox_ledger(stack)["accepted"] if str(s["phone"]) in phones]
    assert sorted(str(s["phone"]) for s in accepted) == sorted(phones)
    assert {s["text"] for s in accepted} == {f"Hello from the admin UI, {tag}!"}

    # And the mailing list shows it finished
    page.get_by_role("link", name="Mailings", exact=True).click()
    row = page.locator(f'#mailings-table tr[data-mailing-id="{mailing_id}"]')
    expect(row).to_contain_text("finished")
    expect(row).to_contain_text("3 / 3")
    shot(page, "05-mailings")
    with capsys.disabled():
        print(f"\nadmin UI: sign-in to a finished mailing in {elapsed:.1f} s")


def test_failed_messages_are_listed_with_their_error_and_can_be_retried(
    page: Any, stack: Stack
) -> None:
    tag = f"ui-fail-{uuid.uuid4().hex[:6]}"
    refused, accepted = unique_phone(REJECTED_SUFFIX), unique_phone()
    # Given one client the gateway refuses and one it accepts, and a mailing to both
    sign_in(page, stack)
    add_client(page, refused, tag)
    add_client(page, accepted, tag)
    fill_mailing(page, "You may not get this", tags=tag)
    expect(page.locator("#audience-count")).to_have_text("2 clients match this filter")
    page.get_by_role("button", name="Create mailing").click()

    # When it has finished
    expect(status_badge(page)).to_have_text("finished with failures", timeout=FINISH_TIMEOUT_MS)
    # Then the statistics show one sent, one failed, and the failed one with its error
    expect(count(page, "sent")).to_have_text("1")
    expect(count(page, "failed")).to_have_text("1")
    failed = page.locator("#failed-table tbody tr")
    expect(failed).to_have_count(1)
    expect(failed).to_contain_text(refused)
    expect(failed.locator("td").nth(3)).not_to_have_text("—")
    shot(page, "06-statistics-failed")

    message_id = int(failed.locator("td").first.inner_text())
    assert gateway_calls(stack, message_id) == 1

    # When the operator retries the failed messages
    retry = page.get_by_role("button", name="Retry failed")
    expect(retry).to_be_enabled()
    retry.click()
    # Then the one failed message is requeued and sent to the gateway again, which refuses it
    # again, so it ends failed again
    expect(page.get_by_text("Requeued 1 failed message.")).to_be_visible()
    deadline = time.monotonic() + FINISH_TIMEOUT_MS / 1000
    while gateway_calls(stack, message_id) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert gateway_calls(stack, message_id) == 2
    expect(status_badge(page)).to_have_text("finished with failures", timeout=FINISH_TIMEOUT_MS)
    expect(count(page, "failed")).to_have_text("1", timeout=FINISH_TIMEOUT_MS)
    expect(count(page, "sent")).to_have_text("1")


def test_a_scheduled_mailing_is_paused_and_resumed_from_its_page(page: Any, stack: Stack) -> None:
    tag = f"ui-later-{uuid.uuid4().hex[:6]}"
    # Given a mailing that starts in an hour
    sign_in(page, stack)
    fill_mailing(page, "Later", tags=tag, start=datetime.now(UTC) + timedelta(hours=1))
    page.get_by_role("button", name="Create mailing").click()
    expect(status_badge(page)).to_have_text("scheduled")
    expect(page.locator("#progress-label")).to_have_text("Not started yet")
    # When its text is edited, the form comes back filled in and only the change is saved
    page.get_by_role("link", name="Edit").click()
    expect(page.get_by_label("Tags", exact=True)).to_have_value(tag)
    page.get_by_label("Text", exact=True).fill("Later, {phone}")
    page.get_by_role("button", name="Save mailing").click()
    expect(page.get_by_text("Mailing saved.")).to_be_visible()
    expect(page.locator("#mailing-text")).to_have_text("Later, {phone}")
    # When the operator pauses it
    page.get_by_role("button", name="Pause").click()
    # Then it is paused, and can only be resumed or cancelled
    expect(status_badge(page)).to_have_text("paused")
    expect(page.get_by_role("button", name="Pause")).to_have_count(0)
    shot(page, "07-statistics-paused")
    # When it is resumed, it is scheduled again
    page.get_by_role("button", name="Resume").click()
    expect(status_badge(page)).to_have_text("scheduled")
    # And when it is cancelled, it is over
    page.get_by_role("button", name="Cancel").click()
    expect(status_badge(page)).to_have_text("cancelled")
    expect(page.get_by_role("button", name="Resume")).to_have_count(0)


def test_a_viewer_sees_the_data_but_no_control_that_changes_it(page: Any, stack: Stack) -> None:
    tag = f"ui-viewer-{uuid.uuid4().hex[:6]}"
    phone = unique_phone()
    # Given a client and a scheduled mailing, created by an operator through the API
    api_client(stack, phone, tag)
    start = datetime.now(UTC) + timedelta(hours=1)
    created = requests.post(
        f"{stack.url}/mailings",
        json={
            "text": "For viewers",
            "start_at": start.isoformat(),
            "end_at": (start + timedelta(days=1)).isoformat(),
            "filter": {"tags": [tag]},
        },
        headers=stack.auth,
        timeout=10,
    )
    assert created.status_code == 201, created.text
    mailing_id = created.json()["id"]

    # When a viewer signs in with a viewer token
    page.goto(f"{stack.url}/admin")
    page.get_by_label("API token", exact=True).fill(VIEWER_TOKEN)
    page.get_by_role("button", name="Sign in", exact=True).click()

    # Then the mailings are listed, with no way to create one or act on one
    expect(page.get_by_role("heading", name="Mailings", exact=True)).to_be_visible()
    expect(page.locator("#mailings-table tr[data-mailing-id]").first).to_be_visible()
    expect(page.get_by_role("link", name="New mailing")).to_have_count(0)
    for action in ("Pause", "Cancel", "Resume"):
        expect(page.get_by_role("button", name=action, exact=True)).to_have_count(0)
    # And the mailing's page shows it, without edit, pause, cancel or retry
    page.goto(f"{stack.url}/admin#/mailings/{mailing_id}")
    expect(status_badge(page)).to_have_text("scheduled")
    expect(page.locator("#mailing-text")).to_have_text("For viewers")
    expect(page.get_by_role("link", name="Edit")).to_have_count(0)
    for action in ("Pause", "Cancel", "Retry failed"):
        expect(page.get_by_role("button", name=action, exact=True)).to_have_count(0)
    # And the client list shows the client, with no create, import, edit, opt-out or delete
    page.goto(f"{stack.url}/admin#/clients")
    search_clients(page, tag=tag)
    expect(client_rows(page)).to_have_count(1)
    expect(page.locator("#clients-table")).to_contain_text(phone)
    expect(page.get_by_role("link", name="New client")).to_have_count(0)
    expect(page.get_by_role("button", name="Import")).to_have_count(0)
    expect(page.get_by_role("link", name=re.compile("^Edit"))).to_have_count(0)
    expect(page.get_by_role("button", name=re.compile("^(Delete|Opt out)"))).to_have_count(0)
    shot(page, "viewer-clients")


def mailings_with_text(stack: Stack, text: str) -> list[dict[str, Any]]:
    listed = requests.get(f"{stack.url}/mailings?limit=500", headers=stack.auth, timeout=10)
    assert listed.status_code == 200, listed.text
    return [m for m in listed.json()["items"] if m["text"] == text]


def test_a_double_click_after_a_lost_answer_creates_one_mailing(page: Any, stack: Stack) -> None:
    text = f"Once only {uuid.uuid4().hex[:6]}"
    keys: list[str | None] = []
    lost = []

    def lose_the_first_answer(route: Any) -> None:
        # The first create reaches the service, but its answer never reaches the browser.
        keys.append(route.request.headers.get("idempotency-key"))
        if lost:
            route.continue_()
            return
        route.fetch()
        lost.append(True)
        route.abort("failed")

    # Given a new mailing whose first "Create mailing" got no answer (the mailing was created)
    sign_in(page, stack)
    fill_mailing(page, text, tags="ui-once", start=datetime.now(UTC) + timedelta(hours=1))
    page.route(re.compile(r"/mailings$"), lose_the_first_answer)
    page.get_by_role("button", name="Create mailing").click()
    expect(page.get_by_text("cannot be reached")).to_be_visible()
    # When the operator double-clicks "Create mailing" again
    page.get_by_role("button", name="Create mailing").dblclick()
    # Then the mailing's page opens, and the service holds that one mailing only
    expect(status_badge(page)).to_have_text("scheduled")
    created = mailings_with_text(stack, text)
    assert len(created) == 1, created
    assert page.url.endswith(f"#/mailings/{created[0]['id']}")
    # because every attempt carried the same Idempotency-Key
    assert len(keys) >= 2, keys
    assert keys[0], "the create carried no Idempotency-Key"
    assert set(keys) == {keys[0]}, keys


def test_a_mailings_page_shows_who_created_edited_paused_and_cancelled_it(
    page: Any, stack: Stack
) -> None:
    tag = f"ui-history-{uuid.uuid4().hex[:6]}"
    # Given a mailing created, edited, paused and cancelled from the admin UI
    sign_in(page, stack)
    fill_mailing(page, "Soon", tags=tag, start=datetime.now(UTC) + timedelta(hours=1))
    page.get_by_role("button", name="Create mailing").click()
    expect(status_badge(page)).to_have_text("scheduled")
    page.get_by_role("link", name="Edit").click()
    page.get_by_label("Text", exact=True).fill("Soon, {tag}")
    page.get_by_role("button", name="Save mailing").click()
    expect(page.locator("#mailing-text")).to_have_text("Soon, {tag}")
    page.get_by_role("button", name="Pause").click()
    expect(status_badge(page)).to_have_text("paused")
    page.get_by_role("button", name="Cancel").click()
    expect(status_badge(page)).to_have_text("cancelled")

    # When its statistics page is opened afresh
    page.reload()

    # Then its history lists the four changes, newest first, each by the signed-in token's id
    rows = page.locator("#history-table tbody tr")
    expect(rows).to_have_count(4)
    expect(rows.locator('td[data-label="What"]')).to_have_text(
        ["Cancelled", "Paused", "Edited", "Created"]
    )
    # (the stack's plain token: an admin)
    actor = f"static:{hashlib.sha256(TOKEN.encode()).hexdigest()[:8]} (admin)"
    expect(rows.locator('td[data-label="Who"]')).to_have_text([actor] * 4)
    expect(rows.nth(1).locator('td[data-label="Fields"]')).to_have_text("—")
    expect(rows.nth(2).locator('td[data-label="Fields"]')).to_contain_text("text")
    shot(page, "10-statistics-history")


def test_client_forms_show_the_apis_errors_next_to_their_fields(page: Any, stack: Stack) -> None:
    phone = unique_phone()
    sign_in(page, stack)
    add_client(page, phone, "dupe")
    # When a second client with the same phone is submitted
    open_new_client_form(page)
    page.get_by_label("Phone", exact=True).fill(phone)
    page.get_by_label("Timezone", exact=True).fill("Mars/Olympus")
    page.get_by_role("button", name="Create client").click()
    # Then the refusal is shown by the field it concerns, and nothing is created
    expect(page.locator('[data-field="timezone"] .field-error')).to_contain_text(
        "unknown IANA timezone"
    )
    # And the banner above the form says how many fields need attention
    expect(page.locator("form .form-error")).to_contain_text("1 field needs attention.")
    page.get_by_label("Timezone", exact=True).fill("UTC")
    page.get_by_role("button", name="Create client").click()
    expect(page.locator('[data-field="phone"] .field-error')).to_have_text("already in use")
    expect(page.get_by_label("Phone", exact=True)).to_have_attribute("aria-invalid", "true")


def test_a_mailing_with_an_unknown_placeholder_is_refused_beside_its_text(
    page: Any, stack: Stack
) -> None:
    """Given a signed-in operator, when a mailing with an unknown placeholder is submitted, then
    the error shows beside its text and the form stays open."""
    sign_in(page, stack)
    fill_mailing(page, "Hello {name}", tags="nobody")
    page.get_by_role("button", name="Create mailing").click()
    expect(page.locator('[data-field="text"] .field-error')).to_contain_text(
        "unknown placeholder {name}"
    )
    expect(page.get_by_role("heading", name="New mailing")).to_be_visible()


def test_a_client_is_opted_out_edited_and_deleted_from_the_list(page: Any, stack: Stack) -> None:
    tag = f"ui-edit-{uuid.uuid4().hex[:6]}"
    phone = unique_phone()
    sign_in(page, stack)
    add_client(page, phone, tag)
    search_clients(page, tag=tag)
    row = client_rows(page).filter(has_text=phone)
    # When the operator opts the client out
    row.get_by_role("button", name=f"Opt out {phone}").click()
    expect(page.get_by_text(f"{phone} opted out.")).to_be_visible()
    expect(client_rows(page).filter(has_text=phone)).to_contain_text("yes")
    # And moves it to another operator through the edit form
    client_rows(page).filter(has_text=phone).get_by_role("link", name=f"Edit {phone}").click()
    expect(page.get_by_label("Opted out (never sent to)", exact=True)).to_be_checked()
    page.get_by_label("Operator code", exact=True).fill("999")
    page.get_by_role("button", name="Save client").click()
    expect(page.get_by_text(f"Saved client {phone}.")).to_be_visible()
    # Then a search by operator code and tag finds it changed
    search_clients(page, operator_code="999", tag=tag)
    expect(client_rows(page)).to_have_count(1)
    expect(client_rows(page)).to_contain_text("999")
    # When it is deleted (the button asks once more)
    delete = client_rows(page).get_by_role("button", name=f"Delete {phone}")
    delete.click()
    expect(delete).to_have_text("Confirm delete")
    delete.click()
    # Then it is gone
    expect(page.get_by_text(f"Deleted {phone}.")).to_be_visible()
    expect(page.get_by_text("No clients match.")).to_be_visible()


def test_a_clients_replies_show_on_its_page_and_a_stop_reply_opts_it_out(
    page: Any, stack: Stack
) -> None:
    # Given a client that replied twice to a mailing, through the gateway's webhook
    phone = unique_phone()
    client_id = api_client(stack, phone, f"ui-replies-{uuid.uuid4().hex[:6]}")

    def reply(text: str) -> dict[str, Any]:
        answer = requests.post(
            f"{stack.url}/inbound-sms",
            json={"phone": f"+{phone}", "text": text},
            headers=stack.auth,
            timeout=10,
        )
        assert answer.status_code == 202, answer.text
        return answer.json()

    assert reply("Thanks!")["result"] == "stored"
    assert reply("When is the sale?")["result"] == "stored"
    # When the operator opens the client
    sign_in(page, stack, f"#/clients/{client_id}")
    # Then its replies are listed, newest first, and it is still subscribed
    replies = page.locator("#replies-table tbody tr")
    expect(replies).to_have_count(2)
    expect(replies.first).to_contain_text("When is the sale?")
    expect(page.get_by_label("Opted out (never sent to)", exact=True)).not_to_be_checked()
    shot(page, "client-replies")
    # When the client answers STOP, in its own spelling
    assert reply(" Стоп ")["result"] == "opted_out"
    page.reload()
    # Then its page shows it opted out, and the keyword is not kept as a reply
    expect(page.get_by_label("Opted out (never sent to)", exact=True)).to_be_checked()
    expect(page.locator("#replies-table tbody tr")).to_have_count(2)


def test_clients_are_imported_from_a_csv_file_with_a_report_of_bad_rows(
    page: Any, stack: Stack
) -> None:
    probe = requests.post(
        f"{stack.url}/clients/import",
        data=b"phone\n",
        headers={**stack.auth, "Content-Type": "text/csv"},
        timeout=10,
    )
    if probe.status_code in (404, 405):
        pytest.skip(f"POST /clients/import is not in this build (it answers {probe.status_code})")
    tag = f"ui-csv-{uuid.uuid4().hex[:6]}"
    good = [unique_phone(), unique_phone()]
    csv = f"phone,tag\n{good[0]},{tag}\nnot-a-phone,{tag}\n{good[1]},{tag}\n".encode()
    sign_in(page, stack)
    page.get_by_role("link", name="Clients", exact=True).click()
    # When a CSV with two good rows and a bad one is uploaded
    page.get_by_label("CSV file", exact=True).set_input_files(
        files=[{"name": "clients.csv", "mimeType": "text/csv", "buffer": csv}]
    )
    page.get_by_role("button", name="Import", exact=True).click()
    # Then the report counts them and names the bad row's problem
    report = page.locator("#import-report")
    expect(report.locator("[data-status]")).to_have_text("done", timeout=30_000)
    expect(report.locator('[data-count="rows"]')).to_have_text("3")
    expect(report.locator('[data-count="created"]')).to_have_text("2")
    expect(report.locator('[data-count="invalid"]')).to_have_text("1")
    expect(page.locator("#import-errors tbody tr")).to_have_count(1)
    expect(page.locator("#import-errors tbody tr")).to_contain_text("phone")
    shot(page, "08-csv-import")
    # And the imported clients are in the directory
    search_clients(page, tag=tag)
    expect(client_rows(page)).to_have_count(2)


def test_at_phone_width_every_page_fits_the_screen(page: Any, stack: Stack) -> None:
    tag = f"ui-narrow-{uuid.uuid4().hex[:6]}"
    page.set_viewport_size(PHONE)
    sign_in(page, stack)
    add_client(page, unique_phone(), tag)
    fill_mailing(page, "Small screens too", tags=tag)
    expect(page.locator("#audience-count")).to_have_text("1 client matches this filter")
    fits = "document.documentElement.scrollWidth <= window.innerWidth"
    assert page.evaluate(fits), "the mailing form scrolls sideways"
    page.get_by_role("button", name="Create mailing").click()
    expect(status_badge(page)).to_have_text("finished", timeout=FINISH_TIMEOUT_MS)
    expect(count(page, "sent")).to_have_text("1")
    # Then the statistics, the mailing list and the client list fit 390 px without sideways
    # scrolling, and the tables are cards whose cells carry their column's name
    assert page.evaluate(fits), "the statistics page scrolls sideways"
    shot(page, "09-statistics-narrow")
    page.get_by_role("link", name="Mailings", exact=True).click()
    expect(page.locator("#mailings-table tbody tr").first).to_be_visible()
    assert page.evaluate(fits), "the mailing list scrolls sideways"
    shot(page, "10-mailings-narrow", full_page=False)
    search_clients(page, tag=tag)
    expect(client_rows(page)).to_have_count(1)
    assert page.evaluate(fits), "the client list scrolls sideways"
    expect(page.locator("#clients-table thead")).not_to_be_in_viewport()
    shot(page, "11-clients-narrow")


# ---------------------------------------------------------------- the gateway panel
# Last of this stack's tests: the overloaded gateway's state outlives the test (the window is
# two minutes), so the healthy one comes first and nothing runs on this stack after it.


# ---------------------------------------------------------------- what the lists make plain

WIDTHS = pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280", "390"])


def api_client(stack: Stack, phone: str, tag: str) -> str:
    created = requests.post(
        f"{stack.url}/clients", json={"phone": phone, "tag": tag}, headers=stack.auth, timeout=10
    )
    assert created.status_code == 201, created.text
    return created.json()["id"]


def finished_mailing(stack: Stack, tag: str, text: str) -> str:
    """A mailing to `tag`, created through the API and left to finish in the local stack."""
    now = datetime.now(UTC)
    created = requests.post(
        f"{stack.url}/mailings",
        json={
            "text": text,
            "start_at": now.isoformat(),
            "end_at": (now + timedelta(days=1)).isoformat(),
            "filter": {"tags": [tag]},
        },
        headers=stack.auth,
        timeout=10,
    )
    assert created.status_code == 201, created.text
    mailing_id = created.json()["id"]
    deadline = time.monotonic() + FINISH_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        got = requests.get(f"{stack.url}/mailings/{mailing_id}", headers=stack.auth, timeout=10)
        if got.json()["status"] == "finished":
            return mailing_id
        time.sleep(0.5)
    pytest.fail(f"mailing {mailing_id} did not finish: {got.json()}")


@WIDTHS
def test_sign_out_is_not_offered_before_signing_in(
    page: Any, stack: Stack, viewport: dict[str, int]
) -> None:
    # Given the admin page, opened by someone not signed in
    page.set_viewport_size(viewport)
    page.goto(f"{stack.url}/admin")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    # Then there is nothing to sign out of: no "Sign out" button shows
    expect(page.get_by_role("button", name="Sign out")).to_be_hidden()
    shot(page, f"16-sign-in-{viewport['width']}", full_page=False)
    # And once signed in, it shows
    sign_in(page, stack)
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


@WIDTHS
def test_a_mailing_that_finished_with_failures_stands_out_in_the_list(
    page: Any, stack: Stack, viewport: dict[str, int]
) -> None:
    tag = f"ui-lost-{uuid.uuid4().hex[:6]}"
    # Given a finished mailing whose one client out of two the gateway refused, and a finished
    # mailing that reached everyone
    api_client(stack, unique_phone(REJECTED_SUFFIX), tag)
    api_client(stack, unique_phone(), tag)
    lossy = finished_mailing(stack, tag, "Half of you get this")
    clean_tag = f"{tag}-ok"
    api_client(stack, unique_phone(), clean_tag)
    clean = finished_mailing(stack, clean_tag, "All of you get this")

    # When the operator looks at the mailings list
    page.set_viewport_size(viewport)
    sign_in(page, stack)
    lossy_row = page.locator(f'#mailings-table tr[data-mailing-id="{lossy}"]')
    clean_row = page.locator(f'#mailings-table tr[data-mailing-id="{clean}"]')
    expect(lossy_row).to_be_visible()
    # Then the one with a failure says so in red, with its failed and expired counts
    expect(lossy_row.locator("[data-status]")).to_have_text("finished with failures")
    expect(lossy_row.locator('[data-count="failed"]')).to_have_text("1")
    expect(lossy_row.locator('[data-count="expired"]')).to_have_text("0")
    expect(lossy_row).to_have_class(re.compile(r"\bhas-failures\b"))
    red = "rgb(180, 35, 24)"
    expect(lossy_row.locator("[data-status]")).to_have_css("background-color", red)
    # And the clean one is a plain green "finished" with nothing failed
    expect(clean_row.locator("[data-status]")).to_have_text("finished")
    expect(clean_row.locator('[data-count="failed"]')).to_have_text("0")
    expect(clean_row).not_to_have_class(re.compile(r"\bhas-failures\b"))
    # And each time says which zone it is in (the browser runs in UTC)
    expect(lossy_row.locator('td[data-label="Start"]')).to_have_text(re.compile(r"\d\d:\d\d UTC$"))
    lossy_row.scroll_into_view_if_needed()
    shot(page, f"17-mailings-failures-{viewport['width']}", full_page=False)

    # When the operator opens each: "Retry failed" is offered only where something failed
    page.goto(f"{stack.url}/admin#/mailings/{lossy}")
    expect(status_badge(page)).to_have_text("finished with failures")
    expect(page.locator("#progress-label")).to_have_text("2 of 2 messages done (100%), 1 failed")
    expect(page.get_by_role("button", name="Retry failed")).to_be_visible()
    shot(page, f"18-statistics-failures-{viewport['width']}", full_page=False)
    page.goto(f"{stack.url}/admin#/mailings/{clean}")
    expect(status_badge(page)).to_have_text("finished")
    expect(count(page, "sent")).to_have_text("1")
    expect(page.get_by_role("button", name="Retry failed")).to_be_hidden()


@WIDTHS
def test_times_carry_their_timezone(browser: Any, stack: Stack, viewport: dict[str, int]) -> None:
    # Given an operator whose browser runs in Moscow time, and a mailing starting at 13:29 UTC
    context = browser.new_context(viewport=viewport, locale="en-GB", timezone_id="Europe/Moscow")
    context.set_default_timeout(15_000)
    try:
        page = context.new_page()
        start = (datetime.now(UTC) + timedelta(days=30)).replace(hour=13, minute=29)
        end = start + timedelta(days=1)
        created = requests.post(
            f"{stack.url}/mailings",
            json={
                "text": "Later, in Moscow",
                "start_at": start.isoformat(),
                "end_at": end.isoformat(),
                "filter": {"tags": [f"ui-tz-{uuid.uuid4().hex[:6]}"]},
            },
            headers=stack.auth,
            timeout=10,
        )
        assert created.status_code == 201, created.text
        # When the operator opens its page
        sign_in(page, stack, f"#/mailings/{created.json()['id']}")
        # Then its start reads as their local time with the offset said, not a bare 16:29
        meta = page.locator("dl.meta")
        expect(meta).to_contain_text(f"{start.day} {start:%b %Y}, 16:29 UTC+3")
        expect(meta).to_contain_text(f"{end.day} {end:%b %Y}, 16:29 UTC+3")
        shot(page, f"19-times-moscow-{viewport['width']}", full_page=False)
    finally:
        context.close()


@WIDTHS
def test_clients_are_listed_in_a_fixed_order_with_their_total(
    page: Any, stack: Stack, viewport: dict[str, int]
) -> None:
    tag = f"ui-count-{uuid.uuid4().hex[:6]}"
    # Given three clients with one tag
    for _ in range(3):
        api_client(stack, unique_phone(), tag)
    # When the operator searches for that tag
    page.set_viewport_size(viewport)
    sign_in(page, stack)
    search_clients(page, tag=tag)
    expect(client_rows(page)).to_have_count(3)
    # Then the list says how many match
    expect(page.locator("#clients-total")).to_have_text("3 clients match; listed in a fixed order.")
    first = client_rows(page).all_inner_texts()
    shot(page, f"20-clients-total-{viewport['width']}", full_page=False)
    # And the same search again lists them in the same order
    page.reload()
    expect(client_rows(page)).to_have_count(3)
    assert client_rows(page).all_inner_texts() == first
    # And with no filter the total is the whole directory, as the API counts it
    page.get_by_role("link", name="Clear").click()
    preview = requests.post(
        f"{stack.url}/mailings/preview",
        json={"filter": {}, "sample_size": 0},
        headers=stack.auth,
        timeout=10,
    )
    # (a directory larger than the preview's bounded read is estimated, and says "about")
    about = "about " if preview.json()["approximate"] else ""
    everyone = preview.json()["count"]
    expect(page.locator("#clients-total")).to_have_text(
        f"{about}{everyone:,} clients in total; listed in a fixed order."
    )


def stored_clients(stack: Stack, tag: str, count: int) -> None:
    """Given: `count` clients with `tag`, written straight to the stack's clients table in
    batches (the API would take a minute for the thousand a large audience needs)."""
    import boto3

    from chalicelib.domain.client import Client, ClientFields
    from chalicelib.settings import Settings
    from chalicelib.storage.clients import client_record
    from chalicelib.storage.models import build_models

    found = re.search(r"^\s+AWS\s+(http\S+) \(.*tables (\S+)-\*", stack.running.output, re.M)
    assert found, "the stack's banner names its AWS endpoint and table prefix"
    endpoint, prefix = found.groups()
    model = build_models(Settings(table_prefix=prefix, api_tokens=(TOKEN,))).Client
    dynamodb = boto3.client(
        "dynamodb",
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # the emulator's, not a secret
    )
    now = datetime.now(UTC)
    clients = [
        Client.new(str(uuid.uuid4()), ClientFields(unique_phone(), None, tag, "UTC"), now)
        for _ in range(count)
    ]
    items = [client_record(model, client).serialize() for client in clients]
    for start in range(0, count, 25):
        batch = [{"PutRequest": {"Item": item}} for item in items[start : start + 25]]
        answer = dynamodb.batch_write_item(RequestItems={model.Meta.table_name: batch})
        assert not answer.get("UnprocessedItems"), answer


def test_a_large_audience_is_previewed_as_about_n_and_counted_exactly_on_request(
    page: Any, stack: Stack
) -> None:
    # Given 1,100 clients with one tag: more than the preview reads of one segment (1,000)
    tag = f"ui-large-{uuid.uuid4().hex[:6]}"
    stored_clients(stack, tag, 1_100)
    sign_in(page, stack)
    # When a mailing to that tag is written
    fill_mailing(page, "Hello, {tag}!", tags=tag)
    # Then its audience is an estimate, and says so
    audience = page.locator("#audience-count")
    expect(audience).to_have_text(re.compile(r"^About [\d,]+ clients match this filter$"))
    expect(page.locator("#audience-preview")).to_contain_text("Estimated from part of the audience")
    shot(page, "21-large-audience-about", full_page=False)
    # And when the operator asks for the exact count, it is the 1,100, with no "about"
    page.get_by_role("button", name="Count exactly").click()
    expect(audience).to_have_text("1,100 clients match this filter")
    expect(page.get_by_role("button", name="Count exactly")).to_have_count(0)
    # And a text edit afterwards (the same filter) counts its parts over the exact audience,
    # never "about" again: 1,100 two-part UCS-2 messages
    page.get_by_label("Text", exact=True).fill("Ж" * 71)
    expect(page.locator("#audience-parts")).to_have_attribute("data-total", "2200")
    expect(audience).to_have_text("1,100 clients match this filter")
    # And the clients list says "about" for that tag too, until asked to count exactly
    search_clients(page, tag=tag)
    total = page.locator("#clients-total")
    estimated = re.compile(r"^about [\d,]+ clients match; listed in a fixed order\.$")
    expect(total).to_have_text(estimated)
    page.get_by_role("button", name="Count exactly").click()
    expect(total).to_have_text("1,100 clients match; listed in a fixed order.")
    expect(page.get_by_role("button", name="Count exactly")).to_be_hidden()


# ---------------------------------------------------------------- the API reference at /docs


@WIDTHS
def test_docs_page_shows_the_api_operations_offline(
    page: Any, stack: Stack, viewport: dict[str, int]
) -> None:
    # Given the API reference, opened in a browser with no network but the service
    # (the page fixture fails the test on any script error or CSP refusal in the console)
    page.set_viewport_size(viewport)
    page.goto(f"{stack.url}/docs")
    # Then it shows the API's operations, as Swagger UI renders them from /openapi.json
    operation = page.locator(".opblock-summary")
    expect(operation.filter(has_text="/mailings").first).to_be_visible()
    get_clients = operation.filter(has=page.locator('[data-path="/clients"]')).filter(
        has_text="GET"
    )
    expect(get_clients).to_be_visible()
    expect(page.get_by_role("button", name="Authorize")).to_be_visible()
    # And no error: Swagger UI 4 said "Unable to render this definition" for OpenAPI 3.1
    expect(page.get_by_text("Unable to render")).to_have_count(0)
    expect(page.locator(".errors-wrapper")).to_have_count(0)
    shot(page, f"15-docs-{viewport['width']}", full_page=False)


def test_docs_page_keeps_an_authorized_token_out_of_local_storage(page: Any, stack: Stack) -> None:
    # Given the API reference, and an operator who authorizes it with their token
    page.goto(f"{stack.url}/docs")
    page.get_by_role("button", name="Authorize").first.click()
    dialog = page.locator(".modal-ux")
    dialog.locator("input").first.fill(TOKEN)
    dialog.get_by_role("button", name="Apply credentials").click()
    expect(dialog.get_by_role("button", name="Remove authorization")).to_be_visible()
    dialog.get_by_role("button", name="Close", exact=True).click()
    # When "Try it out" calls a protected route with it, the call goes through
    page.locator('.opblock-summary:has([data-path="/stats"])').click()
    page.get_by_role("button", name="Try it out").click()
    page.get_by_role("button", name="Execute").click()
    expect(page.locator(".live-responses-table tbody .response-col_status")).to_have_text("200")
    # Then the token is nowhere in the browser's storage: it is gone with the tab
    storage = "JSON.stringify({...localStorage}) + JSON.stringify({...sessionStorage})"
    stored = page.evaluate(storage)
    assert TOKEN not in stored


def gateway_panel(page: Any) -> Any:
    return page.get_by_role("region", name="Gateway")


def gateway_answer(page: Any) -> Any:
    """Waits for the page's next GET /gateway: a panel absent after it is absent for good."""
    return page.expect_response(lambda r: urlsplit(r.url).path.endswith("/gateway") and r.ok)


def add_clients_by_api(stack: Stack, tag: str, count: int) -> None:
    for _ in range(count):
        created = requests.post(
            f"{stack.url}/clients",
            json={"phone": unique_phone(), "tag": tag},
            headers=stack.auth,
            timeout=10,
        )
        assert created.status_code == 201, created.text


def test_with_a_healthy_gateway_the_mailings_list_shows_no_gateway_panel(
    page: Any, stack: Stack
) -> None:
    # Given a gateway that accepts every call, and a mailing sent through it
    tag = f"ui-healthy-{uuid.uuid4().hex[:6]}"
    add_clients_by_api(stack, tag, 2)
    sign_in(page, stack)
    fill_mailing(page, "All is well", tags=tag)
    page.get_by_role("button", name="Create mailing").click()
    # Then its statistics page says the gateway is healthy, at its configured rate
    expect(gateway_panel(page)).to_contain_text("Gateway healthy: sending at up to")
    expect(status_badge(page)).to_have_text("finished", timeout=FINISH_TIMEOUT_MS)
    # When the operator opens the mailings list and the gateway's state has been read
    with gateway_answer(page):
        page.get_by_role("link", name="Mailings", exact=True).click()
    expect(page.locator("#mailings-table tbody tr").first).to_be_visible()
    # Then the list shows no gateway panel
    expect(gateway_panel(page)).to_have_count(0)
    expect(page.get_by_role("heading", name="Gateway")).to_have_count(0)


def test_while_the_gateway_answers_429_the_gateway_panel_says_it_is_overloaded(
    page: Any, stack: Stack
) -> None:
    tag = f"ui-busy-{uuid.uuid4().hex[:6]}"
    add_clients_by_api(stack, tag, 5)
    profile_url = f"{stack.sandbox_url}/_sandbox/profile"
    healthy = requests.get(profile_url, timeout=5).json()["profile"]
    # Given a sandbox gateway that answers every call 429 (Retry-After: 2)
    busy = requests.post(
        profile_url, json={**healthy, "rate_limit_rate": 1.0, "retry_after_seconds": 2}, timeout=5
    )
    assert busy.status_code == 200, busy.text
    try:
        # When a mailing to five clients starts sending
        sign_in(page, stack)
        fill_mailing(page, "Busy gateway", tags=tag)
        expect(page.locator("#audience-count")).to_have_text("5 clients match this filter")
        page.get_by_role("button", name="Create mailing").click()
        expect(page.get_by_text("Mailing created.")).to_be_visible()
        # Then its statistics page shows the gateway overloaded, asking to slow down, and
        # nothing sent
        panel = gateway_panel(page)
        expect(panel).to_contain_text("Gateway overloaded", timeout=30_000)
        expect(panel).to_contain_text("asked to slow down")
        expect(count(page, "sent")).to_have_text("0")
        page.evaluate("document.querySelectorAll('#flash button').forEach((b) => b.click())")
        shot(page, "13-gateway-overloaded")
        # And the mailings list shows the same panel above the list
        page.get_by_role("link", name="Mailings", exact=True).click()
        expect(gateway_panel(page)).to_contain_text("Gateway overloaded")
        expect(gateway_panel(page)).to_contain_text(re.compile(r"Accepted: \d+% of \d+ calls"))
        # above the mailings themselves, still listed
        expect(page.locator("#mailings-table")).to_contain_text("Busy gateway")
        shot(page, "14-mailings-gateway-overloaded", full_page=False)
    finally:
        requests.post(profile_url, json=healthy, timeout=5)


# ---------------------------------------------------------------- single sign-on

CLIENT_ID = "sms-admin-ui"


class IdentityProvider:
    """An OIDC provider on loopback for the authorization code flow with PKCE: /authorize
    approves at once and redirects back with a code; /token gives an ID token (for the client,
    with the nonce) and an access token (for the API's audience) for that code only to the
    client that proves the PKCE verifier (S256); /jwks.json publishes the key."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self.key = key
        self.authorizations: list[dict[str, str]] = []
        self.exchanges: list[dict[str, str]] = []
        self._codes: dict[str, dict[str, str]] = {}
        # A provider (or an attacker's injected answer) whose ID token carries no nonce.
        self.omit_nonce = False
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path == "/jwks.json":
                    self.reply(200, {"keys": [public_jwk(provider.key, KID)]})
                elif url.path == "/authorize":
                    self.redirect(provider.authorize(flat(parse_qs(url.query))))
                else:
                    self.reply(404, {"error": "not_found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = flat(parse_qs(self.rfile.read(length).decode()))
                status, body = provider.token(form)
                self.reply(status, body, cors=self.headers.get("Origin"))

            def reply(self, status: int, body: Any, cors: str | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                if cors:  # real providers allow browser apps to call the token endpoint
                    self.send_header("Access-Control-Allow-Origin", cors)
                self.end_headers()
                self.wfile.write(data)

            def redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def authorize(self, query: dict[str, str]) -> str:
        self.authorizations.append(query)
        code = secrets.token_urlsafe(16)
        self._codes[code] = query
        answer = {"code": code, "state": query.get("state", "")}
        return f"{query['redirect_uri']}?{urlencode(answer)}"

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        self.exchanges.append(form)
        asked = self._codes.pop(form.get("code", ""), None)  # a code works once
        if asked is None or form.get("grant_type") != "authorization_code":
            return 400, {"error": "invalid_grant"}
        if (
            form.get("client_id") != asked["client_id"]
            or form.get("redirect_uri") != asked["redirect_uri"]
        ):
            return 400, {"error": "invalid_grant", "error_description": "client or redirect"}
        digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
        challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        if asked.get("code_challenge_method") != "S256" or challenge != asked["code_challenge"]:
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        now = int(time.time())
        nonce = None if self.omit_nonce else asked.get("nonce")
        return 200, {
            "id_token": sign(self.key, claims_at(now, aud=CLIENT_ID, nonce=nonce)),
            "access_token": sign(self.key, claims_at(now, aud=AUDIENCE, scope=asked["scope"])),
            "token_type": "Bearer",
            "expires_in": 300,
        }

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def flat(query: dict[str, list[str]]) -> dict[str, str]:
    return {name: values[0] for name, values in query.items()}


@pytest.fixture(scope="module")
def provider(signing_key: rsa.RSAPrivateKey) -> Iterator[IdentityProvider]:
    started = IdentityProvider(signing_key)
    yield started
    started.close()


@pytest.fixture(scope="module")
def sso_stack(provider: IdentityProvider) -> Iterator[Stack]:
    """The local stack accepting only the provider's access tokens for the API (its audience, not
    the UI's client id), its admin UI offering SSO."""
    with running_stack(
        AUTH_MODE="oidc",
        OIDC_ISSUER=ISSUER,
        OIDC_AUDIENCE=AUDIENCE,
        OIDC_JWKS_URL=f"{provider.url}/jwks.json",
        OIDC_CLIENT_ID=CLIENT_ID,
        OIDC_AUTHORIZATION_URL=f"{provider.url}/authorize",
        OIDC_TOKEN_URL=f"{provider.url}/token",
        OIDC_SCOPE="openid email",
        NO_PROXY="127.0.0.1,localhost",
    ) as started:
        yield started


def test_single_sign_on_uses_the_authorization_code_with_pkce(
    page: Any, sso_stack: Stack, provider: IdentityProvider
) -> None:
    # Given the admin UI of a stack that trusts the identity provider, opened at the clients
    page.goto(f"{sso_stack.url}/admin#/clients")
    sso = page.get_by_role("button", name="Sign in with SSO")
    expect(sso).to_be_visible()
    shot(page, "12-sign-in-sso")
    # When the operator signs in with SSO
    sso.click()
    # Then they are back on the page they asked for, signed in, the code gone from the address
    expect(page.get_by_role("heading", name="Clients", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    assert "code=" not in page.url
    assert page.url.endswith("/admin#/clients")
    # And the provider was asked for a code with an S256 challenge, a state and a nonce
    asked = provider.authorizations[-1]
    assert asked["response_type"] == "code"
    assert asked["client_id"] == CLIENT_ID
    assert asked["redirect_uri"] == f"{sso_stack.url}/admin"
    assert asked["scope"] == "openid email"
    assert asked["code_challenge_method"] == "S256"
    assert len(asked["state"]) >= 20
    assert len(asked["nonce"]) >= 20
    # And the code was exchanged with the verifier (the provider refuses it otherwise)
    assert provider.exchanges[-1]["code_verifier"]
    # And the API is called with the access token for its own audience, not the ID token
    expect(page.locator("#clients-table")).to_contain_text("No clients match.")
    token = page.evaluate("sessionStorage.getItem('smsAdmin.token')")
    assert token.count(".") == 2
    assert json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==").decode())["aud"] == (
        AUDIENCE
    )
    assert requests.get(
        f"{sso_stack.url}/clients", headers={"Authorization": f"Bearer {token}"}, timeout=5
    ).ok
    # When the operator signs out, the token is forgotten
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('smsAdmin.token')") is None


def test_an_answer_to_a_sign_in_not_started_here_is_refused(
    page: Any, sso_stack: Stack, provider: IdentityProvider
) -> None:
    exchanges = len(provider.exchanges)
    # When the page is opened with a code and a state it did not ask for (a forged callback)
    page.goto(f"{sso_stack.url}/admin?code=stolen&state=forged#/mailings")
    # Then nobody is signed in, the code is never sent to the provider, and the URL is cleaned
    expect(page.get_by_text("does not belong to a sign-in started here")).to_be_visible()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert len(provider.exchanges) == exchanges
    assert "code=" not in page.url


def test_a_provider_error_with_a_forged_state_shows_none_of_its_text(
    page: Any, sso_stack: Stack
) -> None:
    # When the page is opened with an error whose state it did not ask for (a forged callback
    # that would put its own words on the page)
    query = urlencode(
        {"error": "access_denied", "error_description": "Call +1 555 0100 now", "state": "forged"}
    )
    page.goto(f"{sso_stack.url}/admin?{query}#/mailings")
    # Then the answer is refused as not ours, and the provider's text is shown nowhere
    expect(page.get_by_text("does not belong to a sign-in started here")).to_be_visible()
    expect(page.get_by_text("Call +1 555 0100 now")).to_have_count(0)
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_an_id_token_without_the_nonce_is_refused(
    page: Any, sso_stack: Stack, provider: IdentityProvider
) -> None:
    # Given a provider whose ID token does not carry the nonce of the sign-in
    provider.omit_nonce = True
    try:
        # When the operator signs in with SSO
        page.goto(f"{sso_stack.url}/admin#/clients")
        page.get_by_role("button", name="Sign in with SSO").click()
        # Then the sign-in is refused and no token is kept
        expect(page.get_by_text("the ID token was not issued for this sign-in")).to_be_visible()
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('smsAdmin.token')") is None
    finally:
        provider.omit_nonce = False


# ---------------------------------------------------------------- A/B variants and holdout


def test_an_ab_mailing_with_a_holdout_is_created_and_its_variants_shown_side_by_side(
    page: Any, stack: Stack
) -> None:
    tag = f"ab-{uuid.uuid4().hex[:8]}"
    phones = [unique_phone() for _ in range(12)]
    for phone in phones:
        api_client(stack, phone, tag)

    # Given a signed-in operator writing a mailing to twelve clients
    sign_in(page, stack)
    fill_mailing(page, "", tags=tag)
    expect(page.locator("#audience-count")).to_have_text("12 clients match this filter")
    # When the A/B test is switched on, two texts written, and a quarter held out
    page.get_by_label("A/B test: send 2 to 5 texts").check()
    expect(page.get_by_label("Text", exact=True)).to_be_hidden()
    page.get_by_label("Variant A text").fill("Spring sale: -20%, {tag}")
    # ...each text box counting its SMS parts live as the operator types: a Cyrillic draft of B
    # turns it to UCS-2, two parts; the final Latin text back to GSM-7, one part
    counter_b = page.locator('.variant-parts[data-variant="B"]')
    expect(page.locator('.variant-parts[data-variant="A"]')).to_contain_text("GSM-7, 1 part")
    page.get_by_label("Variant B text").fill("Ж" * 71)
    expect(counter_b).to_have_attribute("data-encoding", "UCS-2")
    expect(counter_b).to_contain_text("71 characters · UCS-2, 2 parts")
    page.get_by_label("Variant B text").fill("Spring sale: a gift for you, {tag}")
    expect(counter_b).to_have_attribute("data-encoding", "GSM-7")
    expect(counter_b).to_contain_text("GSM-7, 1 part")
    page.get_by_label("Holdout (% of the audience)").fill("25")
    shot(page, "20-ab-mailing-form")
    page.get_by_role("button", name="Create mailing").click()
    expect(page.get_by_text("Mailing created.")).to_be_visible()

    # Then the statistics show both variants side by side and the holdout, once finished
    expect(status_badge(page)).to_have_text("finished", timeout=FINISH_TIMEOUT_MS)
    panel = page.locator("#variants-panel")
    expect(panel.locator(".variant-card")).to_have_count(3)
    expect(panel.locator('[data-variant="A"]')).to_contain_text("Spring sale: -20%, {tag}")
    expect(panel.locator('[data-variant="B"]')).to_contain_text("Spring sale: a gift for you")
    expect(panel.locator('[data-variant="holdout"]')).to_contain_text("25% of the audience")
    shot(page, "21-ab-mailing-statistics")

    # And the counts on the cards are the gateway's: each variant's texts, and the rest held out
    mailing_id = page.url.rsplit("/", 1)[1]
    accepted = [s for s in sandbox_ledger(stack)["accepted"] if str(s["phone"]) in phones]
    by_text = {
        "A": sum(s["text"] == f"Spring sale: -20%, {tag}" for s in accepted),
        "B": sum(s["text"] == f"Spring sale: a gift for you, {tag}" for s in accepted),
    }
    assert by_text["A"] + by_text["B"] == len(accepted)
    for name, sent in by_text.items():
        expect(panel.locator(f'[data-count="variant-{name}"]')).to_have_text(str(sent))
    expect(panel.locator('[data-count="holdout"]')).to_have_text(str(12 - len(accepted)))
    held_out = 12 - len(accepted)
    if held_out:
        expect(page.locator("#skip-reasons")).to_have_text(f"Skipped: {held_out} holdout")
    mailing = requests.get(f"{stack.url}/mailings/{mailing_id}", headers=stack.auth, timeout=5)
    assert mailing.json()["holdout_percent"] == 25
    assert mailing.json()["skipped_by_reason"]["holdout"] == 12 - len(accepted)
