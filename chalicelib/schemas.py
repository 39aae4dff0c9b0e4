"""Pydantic request and response models: the API shape only (storage lives in models.py)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from functools import cache
from typing import Annotated, Any, ClassVar, Literal
from zoneinfo import available_timezones

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from pydantic_core import PydanticCustomError

from chalicelib.domain import (
    ImportStatus,
    MailingStatus,
    MessageStatus,
    template_problems,
)
from chalicelib.domain.client import (
    OPERATOR_CODE_PATTERN,
    PHONE_PATTERN,
    is_operator_code,
    is_phone,
)
from chalicelib.domain.inbound import InboundResult
from chalicelib.domain.mailing import SkipReason
from chalicelib.domain.receipt import DeliveryStatus
from chalicelib.domain.sms_parts import MAX_PARTS_LIMIT
from chalicelib.domain.text import TEMPLATE_PATTERN

TEXT_MAX_LENGTH = 1000
FILTER_MAX_VALUES = 100

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


@cache
def _known_timezones() -> frozenset[str]:
    return frozenset(available_timezones())


def _known_timezone(value: str) -> str:
    if value not in _known_timezones():
        raise ValueError(f"unknown IANA timezone {value!r} (examples: 'UTC', 'Europe/Moscow')")
    return value


def _no_control_characters(value: str) -> str:
    if _CONTROL_CHARS.search(value):
        raise ValueError("must not contain control characters")
    return value


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _phone(value: str) -> str:
    if not is_phone(value):
        raise ValueError("phone must be 11 ASCII digits starting with 7, like 79001234567")
    return value


def _operator_code(value: str) -> str:
    if not is_operator_code(value):
        raise ValueError("operator code must be 3 ASCII digits, like 900")
    return value


Phone = Annotated[
    str,
    AfterValidator(_phone),
    Field(
        description="11 ASCII digits starting with 7: 7XXXXXXXXXX",
        examples=["79001234567"],
        json_schema_extra={"pattern": PHONE_PATTERN},
    ),
]
OperatorCode = Annotated[
    str,
    AfterValidator(_operator_code),
    Field(
        description="Mobile operator code: 3 ASCII digits",
        examples=["900"],
        json_schema_extra={"pattern": OPERATOR_CODE_PATTERN},
    ),
]
NO_CONTROL_CHARACTERS_PATTERN = r"^[^\x00-\x1f\x7f]*$"
Tag = Annotated[
    str,
    StringConstraints(max_length=64),
    AfterValidator(_no_control_characters),
    Field(
        description="Free-form label, up to 64 characters, may be empty, no control characters",
        examples=["vip"],
        json_schema_extra={"pattern": NO_CONTROL_CHARACTERS_PATTERN},
    ),
]
Timezone = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64),
    AfterValidator(_known_timezone),
    Field(
        description="IANA timezone name",
        examples=["Europe/Moscow"],
        # The document lists the names the API accepts, so a client can check before sending.
        json_schema_extra=lambda schema: schema.update(enum=sorted(_known_timezones())),
    ),
]
CLOCK_TIME_PATTERN = r"^([01]\d|2[0-3]):[0-5]\d$"
ASSET_HASH_PATTERN = r"^[0-9a-f]{1,64}$"
ClockTime = Annotated[
    str,
    StringConstraints(pattern=CLOCK_TIME_PATTERN),
    Field(description="Local time HH:MM (24-hour)", examples=["09:00"]),
]


def _template(value: str) -> str:
    problems = template_problems(value)
    if problems:
        _raise("; ".join(problems))
    return value


NOT_BLANK_PATTERN = r"\S"
MailingText = Annotated[
    str,
    StringConstraints(min_length=1, max_length=TEXT_MAX_LENGTH),
    AfterValidator(lambda v: v if v.strip() else _raise("must not be blank")),
    AfterValidator(_template),
    Field(
        # Placeholders as the document can say them: braces only doubled or around a known name;
        # and at least one character that is not white space.
        json_schema_extra={
            "pattern": TEMPLATE_PATTERN,
            "allOf": [{"pattern": NOT_BLANK_PATTERN}],
        },
        description=(
            f"Message text, 1 to {TEXT_MAX_LENGTH} characters. It may name the client's fields "
            "as placeholders: {phone}, {operator_code}, {tag}, {timezone} (write {{ and }} for "
            "literal braces); any other placeholder is refused."
        ),
    ),
]
Cursor = Annotated[
    str,
    # Checked (length included) where it is decoded, so every bad cursor gets the same answer.
    Field(
        description="The `next_cursor` of the previous page, unchanged",
        json_schema_extra={"maxLength": 4096},
    ),
]
Timestamp = Annotated[
    AwareDatetime,
    Field(
        description="ISO-8601 date-time with a UTC offset", examples=["2026-12-01T09:00:00+03:00"]
    ),
]


def _raise(message: str) -> Any:
    raise ValueError(message)


class _Request(BaseModel):
    # Strict: "5" is not a number and unknown fields are mistakes, not things to ignore.
    model_config = ConfigDict(extra="forbid", strict=True)


def without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A field's JSON schema without the `null` choice and `null` default of `X | None = None`."""
    schema = dict(schema)
    if schema.get("default", ...) is None:
        del schema["default"]
    choices = [choice for choice in schema.pop("anyOf", []) if choice != {"type": "null"}]
    if len(choices) == 1:
        schema.update(choices[0])
    elif choices:
        schema["anyOf"] = choices
    return schema


def _document_refused_nulls(schema: dict[str, Any], model: type[BaseModel]) -> None:
    # `X | None = None` is how PATCH spells "may be omitted"; the document must not offer the
    # null that `_no_nulls` refuses.
    nullable = getattr(model, "NULLABLE", frozenset())
    properties = schema.get("properties", {})
    for name, prop in properties.items():
        if name not in nullable:
            properties[name] = without_null(prop)


class _Patch(_Request):
    """PATCH: an absent field keeps its value; an explicit null is refused unless allowed."""

    model_config = ConfigDict(json_schema_extra=_document_refused_nulls)  # merged with _Request's

    NULLABLE: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _no_nulls(self) -> Any:
        # An "after" check: a "wrap" one would see Python values and lose strict JSON parsing.
        nulls = sorted(
            name
            for name in self.model_fields_set
            if getattr(self, name) is None and name not in self.NULLABLE
        )
        if nulls:
            raise ValueError(f"{', '.join(nulls)} may be omitted but not null")
        return self


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- clients


class ClientCreate(_Request):
    """A client to add to the directory (PUT takes the same full representation)."""

    phone: Phone
    operator_code: OperatorCode | None = Field(
        None, description="Defaults to digits 2-4 of the phone number"
    )
    tag: Tag = ""
    timezone: Timezone = "UTC"
    opted_out: bool = Field(False, description="Opted out clients are never sent to")


class ClientPatch(_Patch):
    """Fields to change; absent fields keep their value."""

    phone: Phone | None = None
    operator_code: OperatorCode | None = None
    tag: Tag | None = None
    timezone: Timezone | None = None
    opted_out: bool | None = None


class ClientOut(_Response):
    id: str
    phone: str
    operator_code: str
    tag: str
    timezone: str
    opted_out: bool
    created_at: datetime
    updated_at: datetime


class ClientPage(_Response):
    items: list[ClientOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end"
    )


class ClientListQuery(_Request):
    model_config = ConfigDict(extra="forbid", strict=False)

    limit: int | None = Field(None, ge=1, description="Page size (default 50, at most 500)")
    cursor: Cursor | None = None
    operator_code: OperatorCode | None = None
    tag: Tag | None = None
    phone: Phone | None = Field(
        None, description="Only the client with this phone number: a page of one, or none"
    )


# ---------------------------------------------------------------- client imports


class ImportRowError(_Response):
    row: int = Field(description="Data row of the file, from 1 (the header is row 0)")
    field: str | None = Field(description="The column at fault; null: the row as a whole")
    message: str


class ClientImportSummary(_Response):
    """A CSV import's status and counts."""

    id: str
    status: ImportStatus = Field(
        description="queued, running (the valid rows are being written), done (every valid "
        "row was written, left alone or failed), failed (the import could not be completed: "
        "see `failed` and `errors`)"
    )
    rows: int = Field(description="Data rows in the file (blank lines not counted)")
    valid: int = Field(description="Rows that pass the same validation as POST /clients")
    invalid: int = Field(description="Rows that do not, and duplicates of an earlier phone")
    created: int = Field(description="New clients (a phone no client had)")
    updated: int = Field(description="Clients whose fields the row changed (PATCH)")
    unchanged: int = Field(description="Clients that already had the row's fields")
    failed: int = Field(description="Valid rows that could not be written")
    created_at: datetime
    updated_at: datetime


class ClientImportOut(ClientImportSummary):
    """A CSV import: counts so far and the rows at fault."""

    errors: list[ImportRowError] = Field(
        description="Invalid rows (all known when the import is accepted) and rows that failed "
        "to be written (added as the import runs), in row order: the first 1,000"
    )
    errors_omitted: int = Field(description="Errors beyond those listed")


class ClientImportPage(_Response):
    items: list[ClientImportSummary] = Field(description="Imports, newest first, without errors")
    next_cursor: str | None


# ---------------------------------------------------------------- mailings


class AudienceFilter(_Request):
    """Any of the listed values within a list, all lists together; empty = no constraint."""

    operator_codes: Annotated[
        list[OperatorCode], Field(max_length=FILTER_MAX_VALUES), AfterValidator(_unique)
    ] = Field(default_factory=list)
    tags: Annotated[list[Tag], Field(max_length=FILTER_MAX_VALUES), AfterValidator(_unique)] = (
        Field(default_factory=list)
    )


class SendWindow(_Request):
    """Local time of day (the client's timezone) in which messages may be sent."""

    start: ClockTime
    end: ClockTime = Field(
        description="Exclusive; earlier than start means the window wraps midnight"
    )

    @model_validator(mode="after")
    def _not_empty(self) -> SendWindow:
        if self.start == self.end:
            # "range", as the service's own date rules: values compared, which no schema states.
            raise PydanticCustomError("range", "start and end must differ (use null for no window)")
        return self


# ---------------------------------------------------------------- parts and cost

MaxParts = Annotated[
    int,
    Field(
        ge=1,
        le=MAX_PARTS_LIMIT,
        description="The most SMS parts one message may take (default MAX_PARTS_DEFAULT, 4): "
        "a text whose longest message takes more is refused (422 on body.text)",
    ),
]


class PartsOut(_Response):
    """SMS parts of the text over the audience (carriers bill and throttle by part)."""

    encoding: Literal["GSM-7", "UCS-2"] = Field(
        description="UCS-2 if any message needs it (one character outside GSM-7 does)"
    )
    per_message_min: int = Field(description="Parts of the shortest message")
    per_message_max: int = Field(description="Parts of the longest message")
    total: int = Field(description="Parts of all messages (clients who opted out excluded)")
    approximate: bool = Field(
        description="The total was scaled from a bounded read of the audience (as the "
        "preview's count); a mailing's figures are those of when its text or filter was set"
    )


class CostEstimate(_Response):
    """The parts' cost at the configured prices (PRICE_PER_PART...)."""

    amount: float = Field(description="Total parts times their price, rounded to cents")
    currency: str = Field(description="PRICE_CURRENCY, e.g. RUB")


class VariantIn(_Request):
    """One A/B text and its share of the clients not held out."""

    text: MailingText
    weight: int = Field(1, ge=1, le=100, description="Relative share (1-100), default 1")


class VariantOut(_Response):
    text: str
    weight: int
    sent: int = Field(description="Messages sent with this text")


def _text_or_variants(schema: dict[str, Any], model: type[BaseModel]) -> None:
    # `text` or `variants` (or both, the text being the first variant's); neither may be null.
    properties = schema.get("properties", {})
    for name in ("text", "variants"):
        if name in properties:
            properties[name] = without_null(properties[name])
    schema["anyOf"] = [{"required": ["text"]}, {"required": ["variants"]}]


class MailingCreate(_Request):
    """A mailing to schedule (PUT takes the same full representation)."""

    model_config = ConfigDict(json_schema_extra=_text_or_variants)  # merged with _Request's

    text: MailingText | None = Field(
        None,  # filled in from `variants` when they are given
        description="The message text (required unless `variants` are given: then the first "
        "variant's text, and it may be omitted)",
    )
    start_at: Timestamp
    end_at: Timestamp
    filter: AudienceFilter = Field(default_factory=AudienceFilter)
    send_window: SendWindow | None = None
    max_parts: MaxParts | None = None
    frequency_cap_exempt: bool = Field(
        False,
        description="A service message: the FREQUENCY_CAP neither stops nor counts its messages",
    )
    variants: list[VariantIn] | None = Field(
        None,
        min_length=2,
        max_length=5,
        description="A/B texts (2-5), each client getting one by weight, the same every time",
    )
    holdout_percent: int = Field(
        0, ge=0, le=50, description="Share of the audience never sent to, counted apart (0-50)"
    )

    @model_validator(mode="after")
    def _text_or_variants(self) -> MailingCreate:
        nulls = sorted(
            n
            for n in ("text", "variants")
            if n in self.model_fields_set and getattr(self, n) is None
        )
        if nulls:
            raise ValueError(f"{', '.join(nulls)} may be omitted but not null")
        if self.variants:
            first = self.variants[0].text
            if self.text is not None and self.text != first:
                raise PydanticCustomError(
                    "variants_text", "with variants, text is the first variant's text: omit it"
                )
            self.text = first
        elif self.text is None:
            raise PydanticCustomError("text_or_variants", "text (or variants) is required")
        return self

    @model_validator(mode="after")
    def _end_after_start(self) -> MailingCreate:
        if self.end_at <= self.start_at:
            raise PydanticCustomError("range", "end_at must be after start_at")
        return self


class MailingPatch(_Patch):
    """Fields to change; absent fields keep their value, `send_window: null` removes the window."""

    text: MailingText | None = None
    start_at: Timestamp | None = None
    end_at: Timestamp | None = None
    filter: AudienceFilter | None = None
    send_window: SendWindow | None = None
    max_parts: MaxParts | None = None
    frequency_cap_exempt: bool | None = None
    variants: list[VariantIn] | None = Field(None, min_length=2, max_length=5)
    holdout_percent: int | None = Field(None, ge=0, le=50)

    NULLABLE: ClassVar[frozenset[str]] = frozenset({"send_window"})


class MessageStats(_Response):
    """Message counts by status."""

    total: int
    pending: int
    sent: int
    failed: int
    expired: int
    cancelled: int
    skipped: int = Field(description="Not sent: see `skipped_by_reason`")


class SkippedByReason(_Response):
    """The mailing's skipped messages by reason."""

    opted_out: int = Field(description="The client opted out")
    frequency_cap: int = Field(description="The client had its FREQUENCY_CAP of messages already")
    holdout: int = Field(description="The client is in the mailing's holdout group")


class MailingOut(_Response):
    id: str
    text: str
    start_at: datetime
    end_at: datetime
    filter: AudienceFilter
    send_window: SendWindow | None
    frequency_cap_exempt: bool = False
    variants: list[VariantOut] | None = Field(
        None, description="The A/B texts with their sent counts; null for a single text"
    )
    holdout_percent: int = 0
    status: MailingStatus
    stats: MessageStats
    skipped_by_reason: SkippedByReason
    created_at: datetime
    updated_at: datetime
    max_parts: int | None = Field(None, description="null: created before parts were counted")
    parts: PartsOut | None = Field(
        None, description="Estimated when the text or filter is set; null before parts existed"
    )
    cost_estimate: CostEstimate | None = Field(None, description="Only with prices configured")
    delivery: DeliveryStats | None = Field(None, description="Delivery receipts so far")


class MailingPage(_Response):
    items: list[MailingOut]
    next_cursor: str | None


class PageQuery(_Request):
    model_config = ConfigDict(extra="forbid", strict=False)

    limit: int | None = Field(None, ge=1, description="Page size (default 50, at most 500)")
    cursor: Cursor | None = None


# ---------------------------------------------------------------- statistics


class MessageOut(_Response):
    id: int = Field(description="int64 message id, unique and never reused; the gateway's msgId")
    client_id: str
    phone: str
    status: MessageStatus
    created_at: datetime
    sent_at: datetime | None
    attempts: int
    last_error: str | None
    delivery: DeliveryOut | None = Field(
        None, description="The gateway's delivery receipt; null until one comes (if ever)"
    )
    skip_reason: SkipReason | None = Field(
        None, description="Why a skipped message was not sent: opted_out, frequency_cap, holdout"
    )
    variant: int | None = Field(
        None, description="The A/B variant (index in the mailing's variants) a sent message had"
    )


class MessageListQuery(PageQuery):
    status: MessageStatus | None = None


class MailingStatsOut(_Response):
    mailing_id: str
    status: MailingStatus
    stats: MessageStats
    skipped_by_reason: SkippedByReason
    variants: list[VariantOut] | None = None
    messages: list[MessageOut]
    next_cursor: str | None
    delivery: DeliveryStats | None = Field(None, description="Delivery receipts so far")


class MailingSummary(_Response):
    mailing_id: str
    status: MailingStatus
    stats: MessageStats
    delivery: DeliveryStats | None = Field(None, description="Delivery receipts so far")


class OverallStats(_Response):
    mailings: int = Field(description="Number of mailings")
    messages: MessageStats = Field(description="Message counts by status over all mailings")
    per_mailing: list[MailingSummary] = Field(description="One page of per-mailing counts")
    next_cursor: str | None


# ---------------------------------------------------------------- service


class ErrorDetail(_Response):
    field: str | None = Field(None, description="Where the problem is, e.g. `body.filter.tags.0`")
    message: str
    type: str


class ErrorBody(_Response):
    error: str = Field(description="Machine-readable code, e.g. `validation_error`")
    message: str
    details: list[ErrorDetail] = Field(default_factory=list)


class Health(_Response):
    status: str
    stage: str


class ReportMailing(_Response):
    id: str
    status: str
    start_at: datetime
    end_at: datetime
    stats: MessageStats
    success_rate: float | None = Field(
        description="sent / (sent + failed + expired); null while none has an outcome"
    )
    delivery: DeliveryStats | None = Field(None, description="Delivery receipts so far")


class DailyReportOut(_Response):
    """The daily statistics report, as e-mailed."""

    since: datetime
    until: datetime
    recipients: list[str]
    ses_message_id: str | None = Field(description="SES's id of the e-mail")
    mailings: list[ReportMailing]
    totals: MessageStats
    success_rate: float | None


# ---------------------------------------------------------------- gateway


class GatewayAnswers(_Response):
    """The gateway's answers to every sender over the window."""

    calls: int
    accepted: int = Field(description="Sent, or refused for good (a bad number): it did its job")
    overload: int = Field(description="Asked to slow down: 429, or 503 with Retry-After")
    bad_luck: int = Field(description="Other 5xx, malformed answers, timeouts, network errors")
    retries: int = Field(description="Retries granted from the shared retry budget")


class GatewaySlowdown(_Response):
    reason: str = Field(description="Why sending last slowed down, paused or started probing")
    at: datetime


class GatewayOperator(_Response):
    code: str = Field(description="Mobile operator code")
    configured_rate: float = Field(description="Calls a second allowed to this operator")
    max_rate: float | None = Field(
        description="What its slots allow: a little under the configured rate, so that no "
        "second ever holds more than it"
    )
    reserved_ahead_seconds: float = Field(
        description="How far ahead this operator's send slots are taken: its backlog in seconds"
    )
    deferring: bool = Field(
        description="Its messages are waiting in the queue for a slot of this operator's rate"
    )


class GatewayStatusOut(_Response):
    """Why sending is as fast as it is: the shared back-pressure state of every sender."""

    state: Literal["normal", "slowed", "paused", "probing"] = Field(
        description="normal: the configured rate; slowed: below it after an overload, climbing "
        "back; paused: no call until the gateway's Retry-After; probing: the gateway seems "
        "down, one call a second until one succeeds"
    )
    degraded: bool = Field(
        description="Not normal, or fewer than 80% of the window's calls accepted (of 20 or more)"
    )
    configured_rate: float = Field(description="GATEWAY_RATE_PER_SECOND, all senders together")
    current_rate: float = Field(description="Calls a second allowed now (0 while paused)")
    speed: float = Field(description="Share of the configured rate allowed once not paused")
    pause_seconds: float = Field(description="Seconds until the pause ends (0: not paused)")
    accept_ratio: float | None = Field(
        description="Accepted calls / calls over the window; null without calls"
    )
    window_seconds: int = Field(description="How far back the answers are counted")
    answers: GatewayAnswers
    last_slowdown: GatewaySlowdown | None
    operators: list[GatewayOperator] = Field(
        description="Operators with a rate of their own (GATEWAY_RATE_PER_OPERATOR)"
    )


# ---------------------------------------------------------------- admin UI


class AdminSingleSignOn(_Response):
    """Where the admin UI signs in: OAuth 2.0 authorization code with PKCE, a public client."""

    authorization_endpoint: str
    token_endpoint: str
    client_id: str
    scope: str


class WhoAmI(_Response):
    """Who the bearer token belongs to, as the service sees it."""

    role: str = Field(description="viewer, operator, admin, optout or metrics")
    auth_mode: str = Field(description="`static` (API tokens) or `oidc` (JWTs)")


class AdminConfig(_Response):
    """What the admin UI needs to know before anyone signs in."""

    auth_mode: str = Field(description="`static` (API tokens) or `oidc` (JWTs)")
    oidc: AdminSingleSignOn | None = Field(
        description="Single sign-on through the OIDC provider; null: sign in with a token"
    )


class AdminAssetQuery(_Request):
    model_config = ConfigDict(extra="forbid", strict=False)

    v: str | None = Field(
        None,
        pattern=ASSET_HASH_PATTERN,
        description="The asset's content hash, as the admin page links it (cache busting)",
    )


class AudiencePreviewIn(_Request):
    """The audience a mailing with this filter would have, counted without creating anything."""

    filter: AudienceFilter = Field(default_factory=AudienceFilter)
    sample_size: int = Field(10, ge=0, le=50, description="How many matching clients to return")
    exact: bool = Field(
        False,
        description="Count every matching client (reads grow with the audience); by default a "
        "large audience is estimated from a bounded read",
    )
    text: MailingText | None = Field(
        None, description="A mailing text: the answer then carries its `parts` (and cost)"
    )


class AudiencePreviewOut(_Response):
    count: int = Field(description="Clients the filter selects (an estimate if `approximate`)")
    opted_out: int = Field(
        description="Of those, clients who opted out (they will be skipped); estimated likewise"
    )
    approximate: bool = Field(
        description="The counts are estimated from a bounded read of the audience (about 1,000 "
        "index entries; see the API guide); false: exact"
    )
    count_low: int = Field(description="The count's 95 % interval, low end (= count when exact)")
    count_high: int = Field(description="The count's 95 % interval, high end (= count when exact)")
    sample: list[ClientOut] = Field(description="The first `sample_size` of them")
    parts: PartsOut | None = Field(None, description="Only when a `text` was given")
    cost_estimate: CostEstimate | None = Field(
        None, description="Only when a `text` was given and prices are configured"
    )


class RetryFailedOut(_Response):
    requeued: int = Field(description="Failed messages queued again, with their message ids")
    more: bool = Field(description="Failed messages are left (the request ran out of time)")
    mailing: MailingOut


class OptOutIn(_Request):
    """An opt-out, e.g. from a STOP reply: the client with this phone is never sent to again."""

    phone: Phone


class TimelinePoint(_Response):
    at: datetime
    stats: MessageStats


class TimelineOut(_Response):
    mailing_id: str
    status: MailingStatus
    points: list[TimelinePoint] = Field(
        description="Counts by status as they stood at each moment, oldest first (≤ 120)"
    )
    truncated: bool = Field(
        description="A mailing created before timelines were kept is rebuilt from its first "
        "50,000 messages: true when it has more"
    )


# ---------------------------------------------------------------- errors in words

# What each pattern means, for people: a pattern never reaches an operator.
_PATTERN_WORDS = {
    PHONE_PATTERN: "must be 11 digits starting with 7, like 79001234567",
    OPERATOR_CODE_PATTERN: "must be 3 digits, like 900",
    CLOCK_TIME_PATTERN: "must be a time of day HH:MM from 00:00 to 23:59, like 09:00",
    ASSET_HASH_PATTERN: "must be 1 to 64 lowercase hexadecimal digits",
    NO_CONTROL_CHARACTERS_PATTERN: "must not contain control characters",
}
_DATETIME = "an ISO-8601 date-time with a UTC offset, like 2026-12-01T09:00:00+03:00"
# Pydantic's error type -> the rule in words, said of the field (`{ctx}` values filled in).
_RULE_WORDS = {
    "missing": "is required",
    "extra_forbidden": "is not a field this accepts",
    "string_type": "must be text (a JSON string)",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "list_type": "must be a list",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
    "string_too_long": "must be at most {max_length} characters",
    "too_long": "may list at most {max_length} values (got {actual_length})",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "greater_than": "must be more than {gt}",
    "less_than": "must be less than {lt}",
    "timezone_aware": f"must include a UTC offset: {_DATETIME}",
    "datetime_type": f"must be {_DATETIME}",
    "datetime_parsing": f"must be {_DATETIME}",
    "datetime_from_date_parsing": f"must be {_DATETIME}",
    "enum": "must be one of {expected}",
    "literal_error": "must be one of {expected}",
}


def error_in_words(error: Mapping[str, Any]) -> str:
    """One pydantic error as a sentence about the field, e.g. "send_window.start must be a time
    of day HH:MM ...": never a regex or pydantic's own wording."""
    names = [str(part) for part in error["loc"] if not isinstance(part, int)]
    subject = ".".join(names) if names else "the request"
    context = error.get("ctx") or {}
    kind = error["type"]
    if kind == "value_error":
        # Our own validators' messages; those that start with the rule get the field's name.
        message = str(context.get("error") or error["msg"]).removeprefix("Value error, ")
        return f"{subject} {message}" if message.startswith("must") else message
    if kind == "string_too_short":
        minimum = context.get("min_length", 1)
        rule = "must not be empty" if minimum == 1 else f"must be at least {minimum} characters"
    elif kind == "string_pattern_mismatch":
        rule = _PATTERN_WORDS.get(context.get("pattern", ""), "is not in the expected format")
    elif kind in _RULE_WORDS:
        try:
            rule = _RULE_WORDS[kind].format(**context)
        except (KeyError, IndexError):
            rule = _RULE_WORDS[kind].split(" {")[0]
    else:
        return str(error["msg"])
    return f"{subject} {rule}"


# ---------------------------------------------------------------- audit trail


class AuditQuery(PageQuery):
    target: str | None = Field(
        None, min_length=1, max_length=256, description="Only entries about this id"
    )
    actor: str | None = Field(
        None, min_length=1, max_length=256, description="Only entries by this actor"
    )


class AuditActorOut(_Response):
    id: str = Field(
        description="A static token's id (`static:` and a digest, never the token) "
        "or the OIDC `sub`"
    )
    role: str | None = None
    auth_mode: str | None = None


class AuditEntryOut(_Response):
    id: str
    at: datetime
    actor: AuditActorOut
    action: str = Field(description="The operation, e.g. create_mailing or pause_mailing")
    target_type: str
    target_id: str
    request_id: str | None
    http_status: int
    fields: list[str] = Field(description="The fields the request set (names only)")
    status: str | None = Field(description="The target's status after the write, if it has one")


class AuditPage(_Response):
    items: list[AuditEntryOut] = Field(description="Newest first")
    next_cursor: str | None


# ---------------------------------------------------------------- inbound SMS and delivery receipts


def _without_plus(value: object) -> object:
    # Gateways post E.164 numbers ("+79001234567"); clients are stored without the "+".
    return value[1:] if isinstance(value, str) and value.startswith("+") else value


InboundPhone = Annotated[
    str,
    BeforeValidator(_without_plus),
    AfterValidator(_phone),
    Field(
        description="The sender: 7XXXXXXXXXX, with or without a leading +",
        examples=["79001234567"],
        json_schema_extra={"pattern": r"^\+?7[0-9]{10}$"},
    ),
]


class InboundSmsIn(_Request):
    """An SMS a client sent back, as the gateway's reply webhook posts it."""

    phone: InboundPhone
    text: str = Field(
        min_length=1, max_length=1600, description="The reply's text", examples=["STOP"]
    )


class InboundSmsOut(_Response):
    result: InboundResult = Field(
        description="`opted_out`: an opt-out keyword, the client is opted out now; "
        "`already_opted_out`: a keyword from a client opted out before; `stored`: another "
        "reply, kept on the client's page; `unknown_phone`: no client has the number "
        "(counted, not kept)"
    )
    client_id: str | None


class InboundReplyOut(_Response):
    id: str
    phone: str
    text: str
    received_at: datetime


class InboundReplyPage(_Response):
    items: list[InboundReplyOut] = Field(description="Newest first")
    next_cursor: str | None


class DeliveryReceiptIn(_Request):
    """A gateway's delivery receipt for one message it accepted."""

    id: int = Field(ge=1, le=2**63 - 1, description="The message id (the gateway's msgId)")
    status: DeliveryStatus
    error: str | None = Field(
        None, max_length=500, description="The gateway's or the carrier's reason, if any"
    )
    at: Timestamp | None = Field(None, description="When it happened, as the gateway says")


class DeliveryOut(_Response):
    status: DeliveryStatus
    at: datetime | None = Field(description="When it happened, as the gateway said")
    received_at: datetime = Field(description="When the receipt came")
    error: str | None


class DeliveryReceiptOut(_Response):
    id: int
    mailing_id: str
    delivery: DeliveryOut = Field(description="The message's delivery: its first receipt")
    duplicate: bool = Field(
        description="True when the message had a receipt already: nothing changed"
    )


class DeliveryStats(_Response):
    """A mailing's messages with a delivery receipt (zero when the gateway sends none)."""

    delivered: int
    undelivered: int = Field(description="Receipts `undelivered` or `expired`")
    delivered_rate: float | None = Field(
        description="delivered / sent, at most 1; null while nothing was sent"
    )


# The models above that name these before they are defined.
for _model in (MailingOut, MessageOut, MailingStatsOut, MailingSummary, ReportMailing):
    _model.model_rebuild()
