"""One typed settings object, read from the environment and validated once."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from enum import StrEnum
from functools import lru_cache
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from chalicelib.domain.frequency_cap import FrequencyCap, FrequencyCapInvalid
from chalicelib.roles import Role, parse_role_map, split_token_entry

# Inbound SMS made only of one of these opt their sender out (INBOUND_OPT_OUT_KEYWORDS).
DEFAULT_OPT_OUT_KEYWORDS = ("STOP", "СТОП", "ОТПИСКА", "UNSUBSCRIBE", "ОТПИСАТЬСЯ")
_EMAIL = r"^[^@\s,<>]+@[^@\s,<>]+\.[^@\s,<>]+$"
_URL = r"^https?://[^\s\"'<>]+$"


class AuthMode(StrEnum):
    STATIC = "static"
    OIDC = "oidc"


# What the admin UI needs for single sign-on; required together.
_SIGN_IN_SETTINGS = ("oidc_client_id", "oidc_authorization_url", "oidc_token_url")
# A static API token: long enough not to be guessed, and only characters a bearer header carries
# (auth.parse_bearer), so a token with a space or a newline is refused, not silently unusable.
MIN_API_TOKEN_CHARS = 16
_API_TOKEN = re.compile(r"[\x21-\x7e]+")


def check_api_tokens(tokens: tuple[str, ...]) -> tuple[str, ...]:
    """`tokens` (each `TOKEN`, an admin, or `ROLE:TOKEN`) if each can protect the API, else
    ValueError; the message never holds a token."""
    for entry in tokens:
        # A token never holds ":", so an old token with one fails here, not as a wrong role.
        _, token = split_token_entry(entry)
        if ":" in token:
            raise ValueError(
                "an API token is TOKEN or ROLE:TOKEN, and the token itself may not hold ':'"
            )
        if len(token) < MIN_API_TOKEN_CHARS:
            raise ValueError(
                f"every API token must be at least {MIN_API_TOKEN_CHARS} characters long"
            )
        if not _API_TOKEN.fullmatch(token):
            raise ValueError(
                "an API token may hold only visible ASCII characters (no spaces or line breaks)"
            )
    return tokens


# Time the sender keeps, after a gateway call's connect + read timeouts, to write the call's
# outcome (retrying through conflicts and throttles) and send unstarted jobs back to SQS. A call
# starts only when this much is left of both the invocation and the message's claim.
OUTCOME_WRITE_SECONDS = 2.0


MAX_GATEWAY_RATE = 10_000.0
_OPERATOR_CODE = re.compile(r"[0-9]{3}", re.ASCII)  # as schemas.OPERATOR_CODE_PATTERN


def parse_operator_rates(text: str) -> tuple[tuple[str, float], ...]:
    """`916=20,903=10` as ((code, rate), ...); ValueError naming the part that is not
    `code=rate` (codes and rates are checked by the settings)."""
    pairs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        code, equals, rate = part.partition("=")
        try:
            number = float(rate)
        except ValueError:
            number = math.nan
        if not equals or not math.isfinite(number):
            raise ValueError(f"{part!r} is not operator=rate, like 916=20")
        pairs.append((code.strip(), number))
    return tuple(pairs)


def parse_operator_prices(text: str) -> tuple[tuple[str, float], ...]:
    """`916=0.8,903=0.9` as ((code, price), ...); ValueError naming the part that is not
    `code=price`."""
    try:
        return parse_operator_rates(text)
    except ValueError:
        raise ValueError(f"{text!r} is not operator=price pairs, like 916=0.8,903=0.9") from None


class SettingsError(ValueError):
    """A setting has a value the service cannot run with."""


class Settings(BaseModel):
    """Everything the service reads from its environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: str = Field("dev", pattern=r"^[a-z0-9-]{1,32}$")
    aws_region: str = "us-east-1"
    aws_endpoint_url: str | None = None
    table_prefix: str = Field("sms-dev", pattern=r"^[A-Za-z0-9_.-]{3,200}$")

    auth_mode: AuthMode = AuthMode.STATIC
    api_tokens: tuple[str, ...] = Field((), repr=False)
    # In AWS the static tokens live in Secrets Manager: the authorizer reads them when API_TOKENS
    # is unset, again at most every API_TOKENS_REFRESH_SECONDS, so a removed token stops working
    # (auth.LoadedTokenVerifier, secrets.Secrets.api_tokens).
    api_tokens_secret_id: str | None = Field(None, pattern=r"^[A-Za-z0-9/_+=.@:-]{1,2048}$")
    api_tokens_refresh_seconds: int = Field(300, ge=30, le=3600)
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None
    # The claim holding a user's groups or scopes, and which of its values give which role; a
    # user with no mapped value is refused. Unset: every valid token is an admin.
    oidc_roles_claim: str | None = Field(None, pattern=r"^[\x21-\x7e]{1,256}$")
    oidc_role_map: tuple[tuple[str, Role], ...] = ()
    # The admin UI's single sign-on (authorization code + PKCE, a public client): all three or none.
    oidc_client_id: str | None = Field(None, pattern=r"^[\x21-\x7e]{1,256}$")
    oidc_authorization_url: str | None = Field(None, pattern=_URL)
    oidc_token_url: str | None = Field(None, pattern=_URL)
    oidc_scope: str = Field("openid", pattern=r"^[\x21-\x7e]+( [\x21-\x7e]+)*$", max_length=1024)

    # Delivery pipeline: queues (URLs, as SQS addresses them) and the SMS gateway.
    send_queue_url: str | None = None
    send_dlq_url: str | None = None
    fanout_queue_url: str | None = None
    # CSV imports of clients: the API queues the valid rows in chunks, a worker writes them.
    import_queue_url: str | None = None
    sender_api_url: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    sender_api_token: SecretStr | None = None
    # In AWS the token lives in Secrets Manager: the sender reads it once per cold start.
    sender_api_token_secret_id: str | None = Field(None, pattern=r"^[A-Za-z0-9/_+=.@:-]{1,2048}$")
    gateway_connect_timeout: float = Field(3.05, gt=0, le=30)
    gateway_read_timeout: float = Field(10.0, gt=0, le=60)
    max_attempts: int = Field(8, ge=1, le=50)
    retry_base_seconds: float = Field(5.0, ge=0, le=900)
    retry_max_seconds: int = Field(900, ge=1, le=900)
    auth_retry_seconds: int = Field(300, ge=1, le=900)
    sender_concurrency: int = Field(25, ge=1, le=64)
    # Limits towards the gateway, shared by every sender (see services/throttle.py).
    gateway_rate_per_second: float = Field(100.0, gt=0, le=MAX_GATEWAY_RATE)
    gateway_concurrency: int = Field(40, ge=1, le=1000)
    gateway_pause_seconds: float = Field(2.0, gt=0, le=300)
    gateway_max_pause_seconds: float = Field(30.0, gt=0, le=900)
    # Most calls a second per mobile operator code, e.g. `916=20,903=10` (each operator's own
    # limit at the aggregator); operators not listed have only the global limits.
    gateway_rate_per_operator: tuple[tuple[str, float], ...] = ()
    # At most N messages per client within a rolling window across all mailings, e.g. `1/24h`
    # (domain/frequency_cap.py); None (unset): no cap.
    frequency_cap: FrequencyCap | None = None
    # The send queue's redrive maxReceiveCount (infra/resources.yaml): a job failing its last
    # receive is counted as a DLQ arrival.
    max_receive_count: int = Field(5, ge=1, le=1000)
    # A send batch's reads, limit updates and outcome transaction are per SQS message: 25 jobs a
    # message (with as many calls at once) cost about 1.35 DynamoDB requests per message, 10 1.7.
    jobs_per_message: int = Field(25, ge=1, le=50)
    # SQS messages per send invocation (the event source's BatchSize, so read when `chalice
    # package` loads the app); at most what one ReceiveMessage returns, as the local stack polls.
    sender_batch_size: int = Field(10, ge=1, le=10)
    # A fan-out transaction: this many messages, the mailing and its timeline's part (DynamoDB
    # allows 100 items).
    fanout_page_size: int = Field(98, ge=1, le=98)
    lease_seconds: int = Field(180, ge=10, le=3600)
    claim_seconds: int = Field(60, ge=5, le=900)
    message_retention_days: int = Field(90, ge=1, le=3650)

    # Delivery receipts (POST /delivery-receipts): on, the fan-out also writes a message-id
    # lookup (one small item per page) so that a receipt finds its message. Off, nothing changes.
    delivery_receipts: bool = False
    # Inbound SMS (POST /inbound-sms): a reply made only of one of these opts its sender out.
    inbound_opt_out_keywords: tuple[str, ...] = DEFAULT_OPT_OUT_KEYWORDS

    # Daily statistics e-mail (SES) and operations.
    report_sender: str | None = Field(None, pattern=_EMAIL)
    report_recipients: tuple[str, ...] = ()
    report_window_hours: int = Field(24, ge=1, le=24 * 31)
    # Read by chalicelib.logs when the app loads; here so a bad value is refused with the rest.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # json: Powertools' JSON lines (Lambda); text: one readable line per event (local default).
    log_format: Literal["json", "text"] = "json"
    metrics_namespace: str = Field("SmsCampaigns", pattern=r"^[A-Za-z0-9/_.#:-]{1,255}$")

    max_body_bytes: int = Field(64 * 1024, ge=1024, le=6 * 1024 * 1024)
    # POST /clients/import: the CSV file's size and rows. Lambda takes at most 6 MB of request
    # payload, the event's envelope included, so the body limit stays below that.
    import_max_bytes: int = Field(5 * 1024 * 1024, ge=1024, le=6_000_000)
    import_max_rows: int = Field(100_000, ge=1, le=1_000_000)
    # An import job's record (its status and per-row report) is deleted this long after it.
    import_retention_days: int = Field(30, ge=1, le=3650)
    # A create's Idempotency-Key (and its response, replayed) is kept this long (DynamoDB TTL).
    idempotency_ttl_hours: int = Field(24, ge=1, le=24 * 30)
    # An audit entry (who changed what, GET /audit) is deleted this long after it was written.
    audit_retention_days: int = Field(365, ge=1, le=3650)
    default_page_size: int = Field(50, ge=1, le=1000)
    max_page_size: int = Field(500, ge=1, le=1000)

    # Parts and cost (domain/sms_parts.py): a mailing's max_parts when it sets none, and what a
    # part costs (unset: no cost estimate), optionally per operator code, like `916=0.8,903=0.9`.
    max_parts_default: int = Field(4, ge=1, le=10)
    price_per_part: float | None = Field(None, ge=0, le=1_000_000)
    price_per_part_by_operator: tuple[tuple[str, float], ...] = ()
    price_currency: str = Field("RUB", pattern=r"^[A-Z]{3}$")

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _format_lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(token.strip() for token in value.split(",") if token.strip())
        return value

    @field_validator("oidc_role_map", mode="before")
    @classmethod
    def _parse_role_map(cls, value: object) -> object:
        return parse_role_map(value) if isinstance(value, str) else value

    @field_validator("inbound_opt_out_keywords", mode="before")
    @classmethod
    def _split_keywords(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(word.strip() for word in value.split(",") if word.strip())
        return value

    @field_validator("inbound_opt_out_keywords")
    @classmethod
    def _keywords_are_words(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("give at least one opt-out keyword (comma-separated)")
        if any(len(word) > 64 for word in value):
            raise ValueError("an opt-out keyword is at most 64 characters")
        return value

    @field_validator("report_recipients", mode="before")
    @classmethod
    def _split_recipients(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(address.strip() for address in value.split(",") if address.strip())
        return value

    @field_validator("frequency_cap", mode="before")
    @classmethod
    def _parse_frequency_cap(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return FrequencyCap.parse(value)
            except FrequencyCapInvalid as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("gateway_rate_per_operator", mode="before")
    @classmethod
    def _parse_operator_rates(cls, value: object) -> object:
        return parse_operator_rates(value) if isinstance(value, str) else value

    @field_validator("gateway_rate_per_operator")
    @classmethod
    def _operator_rates_are_usable(
        cls, value: tuple[tuple[str, float], ...]
    ) -> tuple[tuple[str, float], ...]:
        codes = [code for code, _ in value]
        for code, rate in value:
            if not _OPERATOR_CODE.fullmatch(code):
                raise ValueError(f"{code!r} is not an operator code (3 ASCII digits, like 916)")
            if not 0 < rate <= MAX_GATEWAY_RATE:
                raise ValueError(
                    f"the rate of operator {code} must be above 0 and at most {MAX_GATEWAY_RATE:g}"
                )
        duplicates = sorted({code for code in codes if codes.count(code) > 1})
        if duplicates:
            raise ValueError(f"operator {', '.join(duplicates)} is given more than once")
        return value

    @field_validator("price_per_part_by_operator", mode="before")
    @classmethod
    def _parse_operator_prices(cls, value: object) -> object:
        return parse_operator_prices(value) if isinstance(value, str) else value

    @field_validator("price_per_part_by_operator")
    @classmethod
    def _operator_prices_are_usable(
        cls, value: tuple[tuple[str, float], ...]
    ) -> tuple[tuple[str, float], ...]:
        codes = [code for code, _ in value]
        for code, price in value:
            if not _OPERATOR_CODE.fullmatch(code):
                raise ValueError(f"{code!r} is not an operator code (3 ASCII digits, like 916)")
            if not 0 <= price <= 1_000_000:
                raise ValueError(f"the price of operator {code} must be from 0 to 1000000")
        duplicates = sorted({code for code in codes if codes.count(code) > 1})
        if duplicates:
            raise ValueError(f"operator {', '.join(duplicates)} is given more than once")
        return value

    @field_validator("report_recipients")
    @classmethod
    def _recipients_are_addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            if not re.match(_EMAIL, address):
                raise ValueError(f"not an e-mail address: {address!r}")
        if len(value) > 50:
            raise ValueError("at most 50 recipients (SES's limit for one message)")
        return value

    @field_validator("api_tokens")
    @classmethod
    def _tokens_are_usable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # A short static token can be guessed; refuse it before it protects anything.
        return check_api_tokens(value)

    @model_validator(mode="after")
    def _oidc_is_complete(self) -> Settings:
        if self.auth_mode is AuthMode.OIDC:
            missing = [
                name
                for name in ("oidc_issuer", "oidc_audience", "oidc_jwks_url")
                if not getattr(self, name)
            ]
            if missing:
                names = ", ".join(name.upper() for name in missing)
                raise ValueError(f"AUTH_MODE=oidc needs {names}")
        if bool(self.oidc_roles_claim) != bool(self.oidc_role_map):
            # Either alone would make every user an admin, or refuse everyone.
            raise ValueError("OIDC_ROLES_CLAIM and OIDC_ROLE_MAP are set together")
        self._sign_in_is_complete()
        if self.claim_seconds <= self.gateway_call_seconds + OUTCOME_WRITE_SECONDS:
            # A claim must outlast any call the sender starts under it, and the outcome's write.
            raise ValueError(
                "CLAIM_SECONDS must exceed the gateway's connect + read timeouts by "
                f"{OUTCOME_WRITE_SECONDS:g} s (the time to record a call's outcome)"
            )
        if self.gateway_max_pause_seconds < self.gateway_pause_seconds:
            raise ValueError("GATEWAY_MAX_PAUSE_SECONDS must not be below GATEWAY_PAUSE_SECONDS")
        if self.report_recipients and not self.report_sender:
            raise ValueError("REPORT_RECIPIENTS needs REPORT_SENDER (an SES-verified address)")
        if self.default_page_size > self.max_page_size:
            raise ValueError("DEFAULT_PAGE_SIZE must not exceed MAX_PAGE_SIZE")
        if self.price_per_part_by_operator and self.price_per_part is None:
            # Operators not listed would have no price, and a cost over them would be wrong.
            raise ValueError("PRICE_PER_PART_BY_OPERATOR needs PRICE_PER_PART (the others' price)")
        return self

    def _sign_in_is_complete(self) -> None:
        given = [name for name in _SIGN_IN_SETTINGS if getattr(self, name)]
        if not given:
            return
        missing = [name.upper() for name in _SIGN_IN_SETTINGS if name not in given]
        if missing:
            raise ValueError(f"{', '.join(missing)} must be set with {given[0].upper()}")
        if self.auth_mode is not AuthMode.OIDC:
            # The API would refuse every token the sign-in brings back.
            raise ValueError("OIDC_CLIENT_ID and the sign-in URLs need AUTH_MODE=oidc")

    @property
    def gateway_call_seconds(self) -> float:
        """The longest one gateway call can take: its connect and read timeouts."""
        return self.gateway_connect_timeout + self.gateway_read_timeout

    @property
    def operator_rates(self) -> dict[str, float]:
        """Calls a second allowed per limited operator code (GATEWAY_RATE_PER_OPERATOR)."""
        return dict(self.gateway_rate_per_operator)

    @property
    def single_sign_on(self) -> bool:
        """Whether the admin UI offers sign-in through the OIDC provider."""
        return self.oidc_client_id is not None

    def table_name(self, kind: str) -> str:
        """The DynamoDB table name of one kind of record in this stage."""
        return f"{self.table_prefix}-{kind}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate settings; a bad value raises SettingsError naming it."""
        env = os.environ if environ is None else environ
        raw: dict[str, object] = {}
        for name in cls.model_fields:
            key = name.upper()
            if key in env and env[key] != "":
                raw[name] = env[key]
        if "aws_region" not in raw:
            region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
            if region:
                raw["aws_region"] = region
        try:
            return cls(**raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']).upper() or 'settings'}: {err['msg']}"
                for err in exc.errors()
            )
            raise SettingsError(f"invalid settings: {problems}") from None


# The settings the app's declarations use when it is loaded: `chalice package` (with the stage's
# environment applied) writes them into the template.
_PACKAGE_TIME = ("SENDER_BATCH_SIZE",)


def package_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings read when the app is loaded; only the package-time ones are read, so a bad
    run-time setting still fails at run time, with the rest, not at import."""
    env = os.environ if environ is None else environ
    return Settings.from_env({name: env[name] for name in _PACKAGE_TIME if name in env})


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read on first use (never at import)."""
    return Settings.from_env()
