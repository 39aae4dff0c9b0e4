"""Personalisation: a mailing's placeholders filled with each client's fields."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from chalicelib.domain.client import Client, ClientFields
from chalicelib.domain.text import TEMPLATE_PATTERN, personalise, template_problems

CLIENT = Client.new(
    "c1",
    ClientFields("79161234567", None, "vip", "Europe/Moscow"),
    datetime(2026, 1, 1, tzinfo=UTC),
)


def test_each_placeholder_takes_the_clients_field():
    text = "{phone} {operator_code} {tag} {timezone} {{literal}}"
    assert personalise(text, CLIENT) == "79161234567 916 vip Europe/Moscow {literal}"


def test_a_text_stored_before_templates_existed_is_sent_as_it_is():
    assert personalise("Hi {name}", CLIENT) == "Hi {name}"
    assert personalise("50% off {", CLIENT) == "50% off {"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Hi {name}", "unknown placeholder {name}"),
        ("Hi {tag!r}", "placeholder {tag} takes no format or conversion"),
        ("Hi {", "malformed placeholder"),
    ],
)
def test_an_unusable_template_says_what_is_wrong(text, problem):
    [found] = template_problems(text)
    assert found.startswith(problem)
    assert not re.match(TEMPLATE_PATTERN, text)


def test_the_api_documents_the_same_templates_it_accepts():
    for text in ("Hi {tag}", "{{x}} {phone}", "plain"):
        assert template_problems(text) == []
        assert re.match(TEMPLATE_PATTERN, text)
