"""The settings table (docs/settings.md) is the one list of settings: every variable the code
reads is in it, nothing else is, and a bad value of any setting is refused with its name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chalicelib.settings import Settings, SettingsError
from devstack.gateway import _ENV_NAMES as SANDBOX_VARIABLES

ROOT = Path(__file__).resolve().parents[2]
# Read outside chalicelib.settings: the local stack's own, the region pair, Powertools' and logs'.
OTHER_VARIABLES = {
    "PORT",
    "HOST",
    "MOTO_PORT",
    "SCHEDULER_INTERVAL_SECONDS",
    "REPORT_OUTBOX_DIR",
    "SENDER_POLLERS",
    "SEND_VISIBILITY_TIMEOUT_SECONDS",
    "SANDBOX_PORT",
    "AWS_FAULTS",
    "LAMBDA_TIMEOUTS",
    "LOCAL_IAM",
    "LOCAL_IAM_TEMPLATE",
    "LOCAL_STACK_FILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "POWERTOOLS_SERVICE_NAME",
    "POWERTOOLS_METRICS_DISABLED",
}
# Read by libraries or the platform, never a setting of ours.
# LOCAL_STACK_ATTACH is set by the `local` stage of .chalice/config.json, not by an operator.
NOT_SETTINGS = {
    "POWERTOOLS_LOG_LEVEL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "LOCAL_STACK_ATTACH",
}


def documented() -> set[str]:
    section = (ROOT / "docs" / "settings.md").read_text()
    names: set[str] = set()
    for row in re.findall(r"^\| (.+?) \| ", section, flags=re.MULTILINE):
        names |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", row))
    return names


def read_by_the_code() -> set[str]:
    """Every variable name the code reads from an environment mapping."""
    pattern = re.compile(
        r"""(?:environ|env)(?:\.get\(|\[)\s*"([A-Z][A-Z0-9_]+)"|"""
        r"""_(?:port|seconds|int|number|text)\(\s*environ,\s*"([A-Z][A-Z0-9_]+)\"""",
    )
    names: set[str] = set()
    for path in [
        *(ROOT / "chalicelib").rglob("*.py"),
        *(ROOT / "devstack").rglob("*.py"),
        ROOT / "app.py",
    ]:
        for match in pattern.finditer(path.read_text()):
            names.add(match.group(1) or match.group(2))
    return names - NOT_SETTINGS


def all_settings() -> set[str]:
    return (
        {name.upper() for name in Settings.model_fields}
        | set(SANDBOX_VARIABLES.values())
        | OTHER_VARIABLES
    )


def test_the_table_documents_every_setting_and_nothing_else():
    """Given the settings table in the docs, when it is compared with Settings, then each documents
    the same settings."""
    assert documented() == all_settings()


def test_every_variable_the_code_reads_is_a_documented_setting():
    """Given the environment variables the code reads, when they are compared with the settings,
    then each is a documented setting."""
    assert read_by_the_code(), "the scan found the code's variables"
    assert read_by_the_code() - all_settings() == set()


NUMERIC = [
    name
    for name, field in Settings.model_fields.items()
    if field.annotation in (int, float, "int", "float")
]


@pytest.mark.parametrize("name", NUMERIC)
def test_a_non_number_is_refused_naming_the_variable(name: str):
    """Given a numeric setting set to a word, when the settings are read, then they are refused
    naming the variable."""
    with pytest.raises(SettingsError, match=name.upper()):
        Settings.from_env({name.upper(): "lots"})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STAGE", "Prod Stage"),
        ("TABLE_PREFIX", "x"),
        ("AUTH_MODE", "magic"),
        ("API_TOKENS", "short"),
        ("API_TOKENS", "a-long-enough-token with-a-space"),
        ("API_TOKENS_SECRET_ID", "not a secret id"),
        ("SENDER_API_URL", "ftp://gateway"),
        ("SENDER_API_TOKEN_SECRET_ID", "not a secret id"),
        ("LOG_LEVEL", "chatty"),
        ("LOG_FORMAT", "yaml"),
        ("METRICS_NAMESPACE", "no spaces allowed"),
        ("REPORT_SENDER", "nobody"),
        ("REPORT_RECIPIENTS", "ops@example.com,not-an-address"),
        ("MAX_ATTEMPTS", "0"),
        ("GATEWAY_RATE_PER_SECOND", "-1"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(variable: str, value: str):
    """Given a setting with a value out of its rules, when the settings are read, then they are
    refused naming the variable."""
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: value})


def test_the_log_level_is_read_case_insensitively():
    """Given LOG_LEVEL=debug, when the settings are read, then the log level is DEBUG."""
    assert Settings.from_env({"LOG_LEVEL": "debug"}).log_level == "DEBUG"


def test_per_operator_rates_are_read_as_codes_and_rates():
    # Given operators 916 and 903 with their own limits
    settings = Settings.from_env({"GATEWAY_RATE_PER_OPERATOR": " 916=20, 903=2.5 "})
    # Then each code has its rate, and no other operator has one
    assert settings.operator_rates == {"916": 20.0, "903": 2.5}
    assert Settings.from_env({"GATEWAY_RATE_PER_OPERATOR": ""}).operator_rates == {}


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("91=20", "not an operator code"),
        ("\uff19\uff11\uff16=20", "not an operator code"),  # full-width digits
        ("916=0", "above 0"),
        ("916=-5", "above 0"),
        ("916=fast", "not operator=rate"),
        ("916", "not operator=rate"),
        ("916=nan", "not operator=rate"),
        ("916=20,903=10,916=5", "916 is given more than once"),
    ],
)
def test_a_bad_per_operator_rate_stops_the_start_naming_the_setting(value: str, why: str):
    """Given a malformed GATEWAY_RATE_PER_OPERATOR, when the settings are read, then they are
    refused naming the setting and why."""
    with pytest.raises(SettingsError, match=f"GATEWAY_RATE_PER_OPERATOR.*{why}"):
        Settings.from_env({"GATEWAY_RATE_PER_OPERATOR": value})
