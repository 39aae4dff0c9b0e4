"""SMS parts in the admin UI, in Chromium against the local stack: the live counter under a
mailing's text follows the same reference table as the Python rules, changes from GSM-7 to UCS-2
as the operator types, and the preview gives the parts and cost over the audience."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e import test_admin_browser_e2e as admin
from tests.support.local_stack import Stack, running_stack
from tests.support.sms_reference import REFERENCE_TEXTS

pytestmark = pytest.mark.e2e

# The admin browser suite's Chromium and page fixtures, and its helpers.
browser, page = admin.browser, admin.page
expect, shot, sign_in, unique_phone = admin.expect, admin.shot, admin.sign_in, admin.unique_phone


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # Parts priced, so the preview shows a cost.
    with running_stack(PRICE_PER_PART="0.5", PRICE_CURRENCY="RUB") as started:
        yield started


def test_the_live_counter_counts_the_reference_texts_as_the_service_does(
    page: Any, stack: Stack
) -> None:
    # Given the admin page's script, loaded in Chromium
    page.goto(f"{stack.url}/admin")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    # When the reference texts go through the counter's rules
    counted = page.evaluate(
        "texts => texts.map((t) => window.SmsParts.count(t))", [r.text for r in REFERENCE_TEXTS]
    )
    # Then each has the encoding, characters, units and parts of the reference table
    for reference, got in zip(REFERENCE_TEXTS, counted, strict=True):
        assert (got["encoding"], got["characters"], got["units"], got["parts"]) == (
            reference.encoding,
            reference.characters,
            reference.units,
            reference.parts,
        ), reference.name


def test_typing_cyrillic_turns_the_counter_to_two_ucs2_parts_and_max_parts_is_enforced(
    page: Any, stack: Stack
) -> None:
    # Given two clients of a tag, and the new mailing form for that tag
    tag = f"parts-{uuid.uuid4().hex[:8]}"
    admin.add_clients_by_api(stack, tag, 2)
    sign_in(page, stack)
    page.get_by_role("link", name="Mailings", exact=True).click()
    page.get_by_role("link", name="New mailing").click()
    page.get_by_label("Tags", exact=True).fill(tag)
    counter = page.locator("#text-parts")
    text = page.get_by_label("Text", exact=True)

    # When the operator writes 65 Latin characters
    text.fill("a" * 65)
    # Then the counter says GSM-7, one part
    expect(counter).to_have_attribute("data-encoding", "GSM-7")
    expect(counter).to_have_attribute("data-parts", "1")
    expect(counter).to_contain_text("65 characters · GSM-7, 1 part")

    # When they type a Russian word after it (71 characters, one of them Cyrillic)
    text.press_sequentially("Привет")
    # Then the whole text is UCS-2, two parts of 67
    expect(counter).to_have_attribute("data-encoding", "UCS-2")
    expect(counter).to_have_attribute("data-parts", "2")
    expect(counter).to_contain_text("71 characters · UCS-2, 2 parts")

    # And the audience preview gives the parts of both messages and their cost
    page.get_by_role("button", name="Preview audience").click()
    parts = page.locator("#audience-parts")
    expect(parts).to_have_text(
        "Messages: UCS-2, 2 parts each; 4 parts in all, costing 2.00 RUB.", timeout=10_000
    )
    shot(page, "parts-live-counter")

    # When the operator allows one part a message and creates the mailing
    page.get_by_label("Max SMS parts", exact=True).fill("1")
    page.get_by_role("button", name="Create mailing").click()
    # Then it is refused beside the text, saying why, and the form stays open
    expect(page.locator('[data-field="text"] .field-error')).to_contain_text(
        "the text alone takes 2 parts in UCS-2"
    )
    expect(page.get_by_role("heading", name="New mailing")).to_be_visible()
    # When they allow two
    page.get_by_label("Max SMS parts", exact=True).fill("2")
    page.get_by_role("button", name="Create mailing").click()
    # Then the mailing is created, and its page shows its parts and cost
    expect(page.get_by_text("Mailing created.")).to_be_visible()
    expect(page.locator("#mailing-parts")).to_have_text(
        "UCS-2, 2 parts a message (at most 2); 4 in all, 2.00 RUB"
    )
