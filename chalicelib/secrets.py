"""The service's secrets in Secrets Manager: the gateway token and the static API tokens.

Each is read through Powertools' `SecretsProvider`, parsed and checked here. A value that cannot
be used is a SettingsError naming its setting and never holding a secret; every token read is
registered with the logs' redaction before any check, so no log line can carry it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import SecretStr

from chalicelib import aws, logs
from chalicelib.settings import Settings, SettingsError, check_api_tokens

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.parameters import SecretsProvider


class Secrets:
    """Reads the secrets the settings name, each time it is asked.

    The callers decide when a secret is read again: the authorizer every
    API_TOKENS_REFRESH_SECONDS on its own clock, the sender when the gateway refuses the token it
    holds. So every read is a fetch: Powertools' cache, on the wall clock, would only delay a
    rotation they asked for.
    """

    def __init__(self, settings: Settings, client: Any = None) -> None:
        self._settings = settings
        self._client = client

    @cached_property
    def _provider(self) -> SecretsProvider:
        # Made (and Powertools' parameters imported) on first read: most invocations never read
        # a secret, and an emulator started after the services are built is the one used. The
        # client honours AWS_ENDPOINT_URL, the region and the timeouts of the settings.
        from aws_lambda_powertools.utilities.parameters import SecretsProvider

        client = self._client or aws.client("secretsmanager", self._settings)
        return SecretsProvider(boto3_client=client)

    def _text(self, secret_id: str) -> str:
        """The secret's SecretString ("" for a binary secret); AWS's error as botocore raised it."""
        from aws_lambda_powertools.utilities.parameters.exceptions import GetParameterError

        try:
            value = self._provider.get(secret_id, force_fetch=True)
        except GetParameterError as exc:
            # Powertools wraps every failure; its callers here tell AWS's errors apart.
            if isinstance(exc.__context__, Exception):
                raise exc.__context__ from None
            raise
        return value if isinstance(value, str) else ""

    def gateway_token(self) -> SecretStr | None:
        """SENDER_API_TOKEN, else the secret SENDER_API_TOKEN_SECRET_ID names (a plain string, or
        JSON with a "token" key). An unreadable secret raises botocore's error. Never logged."""
        settings = self._settings
        token = settings.sender_api_token
        if token is None and settings.sender_api_token_secret_id:
            token = SecretStr(_token_from_secret(self._text(settings.sender_api_token_secret_id)))
        if token is not None:
            logs.add_secret(token.get_secret_value())
        return token

    def api_tokens(self) -> tuple[str, ...]:
        """The static API tokens in the secret API_TOKENS_SECRET_ID names: its SecretString is the
        tokens separated by commas, or JSON {"tokens": [...]}; each is held to API_TOKENS' rules.
        Every problem is a SettingsError that names the setting and never holds a token."""
        secret_id = self._settings.api_tokens_secret_id
        if not secret_id:
            raise SettingsError("API_TOKENS_SECRET_ID is not set")
        try:
            text = self._text(secret_id)
        except (ClientError, BotoCoreError) as exc:
            # botocore's text names the error code and the secret, never its value.
            problem = f"API_TOKENS_SECRET_ID: the secret cannot be read ({exc})"
            raise SettingsError(problem) from None
        return _api_tokens_from_secret(text)


def _json_secret_field(text: str, key: str, usable: Callable[[Any], bool], problem: str) -> Any:
    """The `key` of a JSON secret; SettingsError(`problem`) unless it is there and usable."""
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    value = parsed.get(key) if isinstance(parsed, dict) else None
    if value is None or not usable(value):
        raise SettingsError(problem)
    return value


def _token_from_secret(value: str) -> str:
    text = value.strip()
    if text.startswith("{"):
        problem = 'SENDER_API_TOKEN_SECRET_ID: a JSON secret needs a string "token" key'
        text = _json_secret_field(text, "token", lambda v: isinstance(v, str), problem).strip()
    if not text:
        raise SettingsError("SENDER_API_TOKEN_SECRET_ID: the secret is empty")
    return text


def _api_tokens_from_secret(value: str) -> tuple[str, ...]:
    text = value.strip()
    if text.startswith("{"):
        candidates = _json_secret_field(
            text,
            "tokens",
            lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v),
            'API_TOKENS_SECRET_ID: a JSON secret needs a "tokens" key holding a list of strings',
        )
    else:
        candidates = text.split(",")
    tokens = tuple(token.strip() for token in candidates if token.strip())
    # Before any check: whatever is read from the secret never reaches a log line.
    for token in tokens:
        logs.add_secret(token)
        logs.add_secret(token.partition(":")[2])
    if not tokens:
        raise SettingsError("API_TOKENS_SECRET_ID: the secret holds no token")
    try:
        return check_api_tokens(tokens)
    except ValueError as exc:
        raise SettingsError(f"API_TOKENS_SECRET_ID: {exc}") from None
