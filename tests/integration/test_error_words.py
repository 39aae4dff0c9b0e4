"""Validation errors read as rules in words: never a regex or pydantic's own jargon."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ValidationError

from chalicelib.api.http import validation_details
from chalicelib.schemas import (
    AdminAssetQuery,
    AudiencePreviewIn,
    ClientCreate,
    MailingCreate,
    MessageListQuery,
)

MAILING = {"text": "Hi", "start_at": "2027-01-01T09:00:00Z", "end_at": "2027-01-02T09:00:00Z"}


def _messages(model: type[BaseModel], data: dict) -> dict[str | None, str]:
    try:
        model.model_validate_json(json.dumps(data))
    except ValidationError as exc:
        return {d["field"]: d["message"] for d in validation_details(exc, "body")}
    raise AssertionError("the data was valid")


@pytest.mark.parametrize(
    ("model", "data", "field", "message"),
    [
        (ClientCreate, {"phone": "123"}, "body.phone", "must be 11 ASCII digits starting with 7"),
        (ClientCreate, {}, "body.phone", "phone is required"),
        (ClientCreate, {"phone": 79001234567}, "body.phone", "phone must be text"),
        (
            ClientCreate,
            {"phone": "79001234567", "operator_code": "12"},
            "body.operator_code",
            "operator code must be 3 ASCII digits",
        ),
        (
            ClientCreate,
            {"phone": "79001234567", "tag": "x" * 65},
            "body.tag",
            "tag must be at most 64 characters",
        ),
        (
            ClientCreate,
            {"phone": "79001234567", "timezone": ""},
            "body.timezone",
            "timezone must not be empty",
        ),
        (
            ClientCreate,
            {"phone": "79001234567", "timezone": "Mars/Base"},
            "body.timezone",
            "unknown IANA timezone 'Mars/Base'",
        ),
        (
            ClientCreate,
            {"phone": "79001234567", "opted_out": "yes"},
            "body.opted_out",
            "opted_out must be true or false",
        ),
        (
            ClientCreate,
            {"phone": "79001234567", "name": "Ann"},
            "body.name",
            "name is not a field this accepts",
        ),
        (
            MailingCreate,
            {**MAILING, "send_window": {"start": "9:00", "end": "21:00"}},
            "body.send_window.start",
            "send_window.start must be a time of day HH:MM from 00:00 to 23:59, like 09:00",
        ),
        (
            MailingCreate,
            {**MAILING, "send_window": {"start": "09:00", "end": "09:00"}},
            "body.send_window",
            "start and end must differ",
        ),
        (
            MailingCreate,
            {**MAILING, "start_at": "2027-01-01T09:00:00"},
            "body.start_at",
            "start_at must include a UTC offset",
        ),
        (
            MailingCreate,
            {**MAILING, "end_at": "tomorrow"},
            "body.end_at",
            "end_at must be an ISO-8601 date-time with a UTC offset",
        ),
        (MailingCreate, {**MAILING, "text": ""}, "body.text", "text must not be empty"),
        (MailingCreate, {**MAILING, "text": "   "}, "body.text", "text must not be blank"),
        (
            MailingCreate,
            {**MAILING, "filter": {"tags": ["vip"] * 101}},
            "body.filter.tags",
            "filter.tags may list at most 100 values (got 101)",
        ),
        (
            AudiencePreviewIn,
            {"sample_size": 51},
            "body.sample_size",
            "sample_size must be at most 50",
        ),
    ],
)
def test_each_field_rule_is_said_in_words(model, data, field, message) -> None:
    # Given a body that breaks one rule
    # When it is validated
    messages = _messages(model, data)
    # Then the offending field's message states the rule in words
    assert message in messages[field], messages
    # And it shows no pattern or pydantic wording
    for jargon in ("pattern", "^", "$", "Input should", "String should", "Field required"):
        assert jargon not in messages[field], messages


@pytest.mark.parametrize(
    ("model", "params", "field", "message"),
    [
        (MessageListQuery, {"status": "done"}, "query.status", "status must be one of 'pending'"),
        (MessageListQuery, {"limit": "ten"}, "query.limit", "limit must be a whole number"),
        (AdminAssetQuery, {"v": "XYZ"}, "query.v", "v must be 1 to 64 lowercase hexadecimal"),
    ],
)
def test_query_rules_are_said_in_words(model, params, field, message) -> None:
    # Given a query parameter that breaks its rule
    with pytest.raises(ValidationError) as caught:
        model.model_validate(params)
    # When the error is reported
    messages = {d["field"]: d["message"] for d in validation_details(caught.value, "query")}
    # Then it says the rule, not a regex
    assert message in messages[field], messages
    assert "pattern" not in messages[field]
