"""What operators see: structured log lines carrying ids, no secret in any log, EMF metrics.

The pipeline runs in-process (moto DynamoDB, the sandbox gateway over HTTP, the test's clock);
the log lines are the JSON the service writes in Lambda, captured from its one handler.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from chalicelib import logs
from chalicelib.metrics import ERROR_CLASSES, METRICS
from devstack.gateway import FaultProfile, SandboxGateway
from tests.conftest import API_TOKEN, body
from tests.support.pipeline import Pipeline, VirtualSqs, pipeline_settings

GATEWAY_SECRET = "gw-secret-token-4f9c2e7d"
OPERATIONS_DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


class LogCapture:
    """Every line the service's log handler writes, parsed."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def where(self, **fields: Any) -> list[dict[str, Any]]:
        return [
            line
            for line in self.lines
            if all(str(line.get(key)) == str(value) for key, value in fields.items())
        ]


@pytest.fixture
def captured_logs() -> Any:
    capture = LogCapture()
    logs.configure(level="INFO", stream=capture.stream, log_format="json")
    yield capture
    logs.reset()


@pytest.fixture
def everything_at_debug(captured_logs: LogCapture) -> Any:
    names = ("chalicelib", "botocore", "urllib3", "requests")
    before = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)
    yield
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def gateway(clock, monkeypatch: pytest.MonkeyPatch):
    """The sandbox gateway, its outages timed on the test's clock."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    sandbox = SandboxGateway(GATEWAY_SECRET, clock=lambda: clock().timestamp())
    sandbox.start()
    yield sandbox
    sandbox.stop()


@pytest.fixture
def secret_arn(aws) -> str:
    """Given: the gateway token stored in Secrets Manager, as the stack expects it."""
    import boto3

    client = boto3.client("secretsmanager", region_name="us-east-1")
    created = client.create_secret(
        Name="sms-test/gateway-token", SecretString=json.dumps({"token": GATEWAY_SECRET})
    )
    return created["ARN"]


@pytest.fixture
def settings(gateway, secret_arn, monkeypatch: pytest.MonkeyPatch, request):
    monkeypatch.setenv("API_TOKENS", API_TOKEN)
    overrides = {  # indirect parametrisation wins
        "sender_api_token_secret_id": secret_arn,
        "sender_concurrency": 2,
        **getattr(request, "param", {}),
    }
    return pipeline_settings(gateway.url, **overrides)


@pytest.fixture
def emf() -> list[str]:
    return []


@pytest.fixture
def services(aws, settings, clock, emf):
    from chalicelib.container import Services, use_services
    from chalicelib.storage.models import create_tables

    sqs = VirtualSqs(clock)
    built = Services.build(
        settings,
        clock=clock,
        sqs=sqs,
        rng=random.Random(3),
        wait_until=clock.wait_until,
        write_metrics=emf.append,
    )
    built.sqs = sqs
    create_tables(built.models)
    use_services(built)
    yield built
    use_services(None)


@pytest.fixture
def pipeline(services, clock):
    return Pipeline(services, services.sqs, clock)


def run_one_message_through_a_failure(api, pipeline, clock, gateway) -> dict[str, Any]:
    """Given a client and a mailing for it, when the gateway fails the first call (a 503
    without Retry-After: bad luck, not overload) and accepts the retry, the message is sent on
    its second attempt. Returns the ids."""
    client = body(api.post("/clients", {"phone": "79161234567", "tag": "vip"}))
    # Seed 13: the first call draws a 503, the second an OK.
    gateway.set_profile(FaultProfile(error_rate=0.5, seed=13))
    mailing = body(
        api.post(
            "/mailings",
            {
                "text": "Hello",
                "start_at": clock().isoformat(),
                "end_at": (clock() + timedelta(hours=1)).isoformat(),
                "filter": {"tags": ["vip"]},
            },
        )
    )
    pipeline.settle(limit=timedelta(minutes=10))
    message = pipeline.messages(mailing["id"])[0]
    assert message.status == "sent"
    assert int(message.attempts) == 2
    return {
        "mailing_id": mailing["id"],
        "client_id": client["id"],
        "message_id": int(message.message_id),
    }


# ---------------------------------------------------------------- logs


def test_every_stage_of_a_messages_life_is_logged_with_its_three_ids(
    api, pipeline, clock, gateway, captured_logs
):
    # Given / When: one message that fails once at the gateway and is then sent
    ids = run_one_message_through_a_failure(api, pipeline, clock, gateway)

    # Then one filter on the message id finds its whole life, each line with all three ids
    lines = captured_logs.where(message_id=ids["message_id"])
    for line in lines:
        assert str(line["mailing_id"]) == ids["mailing_id"], line
        assert str(line["client_id"]) == ids["client_id"], line
    stages = [line["message"] for line in lines]
    expected = [
        "message created, pending",
        "message claimed for a gateway call",
        "gateway request",
        "gateway response: HTTP 503",
        "attempt 1 of 8 failed",
        "message released, still pending",
        "message claimed for a gateway call",
        "gateway request",
        "gateway response: OK",
        "message sent",
    ]
    position = 0
    for stage in expected:
        found = next((i for i in range(position, len(stages)) if stages[i].startswith(stage)), None)
        assert found is not None, f"no {stage!r} after line {position}: {stages}"
        position = found + 1
    # ...each gateway call and claim says which attempt it is
    calls = [line for line in lines if line["message"] == "gateway request"]
    assert [line["attempt"] for line in calls] == [1, 2]
    # ...and the gateway lines say what was asked and answered
    responses = [line for line in lines if line["message"].startswith("gateway response")]
    assert [r["http_status"] for r in responses] == [503, 200]
    assert all(r["latency_ms"] >= 0 for r in responses)
    assert [r["outcome"] for r in responses] == ["retry", "sent"]


def test_one_filter_finds_a_mailings_api_requests_and_gateway_calls(
    api, pipeline, clock, gateway, captured_logs
):
    """Given a message sent after one failure, when the logs are filtered by its mailing id, then
    they show the API requests, both gateway calls and the mailing's creation."""
    ids = run_one_message_through_a_failure(api, pipeline, clock, gateway)
    api.get(f"/mailings/{ids['mailing_id']}/stats")

    lines = captured_logs.where(mailing_id=ids["mailing_id"])
    requests = [line for line in lines if "http_method" in line]
    # The creating POST (its id read from the response) and the statistics GET
    assert [(r["http_method"], r["route"], r["http_status"]) for r in requests] == [
        ("POST", "/mailings", 201),
        ("GET", "/mailings/{mailing_id}/stats", 200),
    ]
    assert sum(line["message"] == "gateway request" for line in lines) == 2
    assert any(line["message"] == "mailing created" for line in lines)


def test_one_filter_finds_every_operation_on_a_client(api, pipeline, clock, gateway, captured_logs):
    """Given a client sent to, then edited and deleted, when the logs are filtered by its client
    id, then they show each operation and request."""
    ids = run_one_message_through_a_failure(api, pipeline, clock, gateway)
    client_id = ids["client_id"]
    assert api.patch(f"/clients/{client_id}", {"tag": "gold"}).status_code == 200
    assert api.delete(f"/clients/{client_id}").status_code == 204

    messages = [line["message"] for line in captured_logs.where(client_id=client_id)]
    for operation in ("client created", "client updated: tag", "client deleted", "message sent"):
        assert operation in messages, messages
    requests = [line for line in captured_logs.where(client_id=client_id) if "route" in line]
    assert [(r["http_method"], r["http_status"]) for r in requests] == [
        ("POST", 201),
        ("PATCH", 200),
        ("DELETE", 204),
    ]


def test_api_requests_are_logged_with_a_correlation_id_returned_as_a_header(api, captured_logs):
    # When a caller sends its own correlation id, and another sends none
    given = api.get("/mailings", headers={**api.headers, "X-Correlation-Id": "trace-42"})
    generated = api.get("/clients/not-a-client")

    # Then each response carries the id its log line has
    assert given.headers["X-Correlation-Id"] == "trace-42"
    line = captured_logs.where(correlation_id="trace-42")[-1]
    assert line["http_method"] == "GET"
    assert line["route"] == "/mailings"
    assert line["http_status"] == 200
    assert isinstance(line["latency_ms"], float)
    assert line["level"] == "INFO"
    other = generated.headers["X-Correlation-Id"]
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", other)
    assert captured_logs.where(correlation_id=other)[-1]["http_status"] == 404


def test_an_unusable_correlation_id_is_replaced_not_echoed(api, captured_logs):
    """Given a correlation id with a space and a line break, when a request carries it, then the
    answer and the logs use a new id instead."""
    response = api.get("/mailings", headers={**api.headers, "X-Correlation-Id": "a b\nforged"})
    returned = response.headers["X-Correlation-Id"]
    assert returned != "a b\nforged"
    assert captured_logs.where(correlation_id=returned)


def test_no_token_ever_reaches_the_logs(
    api, pipeline, clock, gateway, captured_logs, everything_at_debug
):
    # Given every logger at DEBUG, the chattiest libraries included (fixture)
    # When the token is read from Secrets Manager and used for calls, and the API is called
    # with a bearer token, and a line quotes an Authorization header by mistake
    run_one_message_through_a_failure(api, pipeline, clock, gateway)
    api.get("/mailings", headers={**api.headers, "X-Correlation-Id": "t-1"})
    logging.getLogger("chalicelib.test").warning(
        "upstream said %s", f"Authorization: Bearer {GATEWAY_SECRET}"
    )

    # Then the gateway got the token, yet no line carries it or any bearer credential
    assert gateway.requests(), "the gateway was called"
    text = captured_logs.text
    assert len(captured_logs.lines) > 20
    assert GATEWAY_SECRET not in text
    assert API_TOKEN not in text
    assert not re.search(r"(?i)bearer\s+(?!\[redacted\])\S", text)
    assert "[redacted]" in text  # the mistaken line was scrubbed, not dropped


def test_a_rotated_gateway_token_is_read_again_after_the_gateway_refuses_the_old_one(
    api, pipeline, clock, gateway, services, secret_arn
):
    import boto3

    # Given the token was read (and cached) for a first message
    body(api.post("/clients", {"phone": "79161234567", "tag": "a"}))
    first = body(api.post("/mailings", _mailing(clock, "a")))
    pipeline.settle(limit=timedelta(minutes=5))
    assert pipeline.statuses(first["id"]) == {"sent": 1}
    # When the operator rotates it: the secret and the gateway change together
    rotated = "gw-rotated-token-0a1b2c3d"
    boto3.client("secretsmanager", region_name="us-east-1").put_secret_value(
        SecretId=secret_arn, SecretString=rotated
    )
    gateway._token = rotated.encode()
    body(api.post("/clients", {"phone": "79161234568", "tag": "b"}))
    second = body(api.post("/mailings", _mailing(clock, "b")))
    pipeline.settle(limit=timedelta(minutes=30))

    # Then the old token's 401 made the sender read the secret again, and the message was sent
    assert pipeline.statuses(second["id"]) == {"sent": 1}
    assert [r.outcome for r in gateway.requests()][-2:] == ["401", "ok"]


def _mailing(clock, tag: str) -> dict:
    return {
        "text": "Hi",
        "start_at": clock().isoformat(),
        "end_at": (clock() + timedelta(hours=1)).isoformat(),
        "filter": {"tags": [tag]},
    }


def test_a_bad_log_level_is_refused_with_its_name():
    """Given a log level that does not exist, when it is read, then it is refused naming
    LOG_LEVEL."""
    with pytest.raises(ValueError, match="LOG_LEVEL"):
        logs.level_from("chatty")


# ---------------------------------------------------------------- metrics


def documented_metrics() -> set[str]:
    """Metric names in the operations runbook's metrics table."""
    section = OPERATIONS_DOC.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE))


def parse_emf(lines: list[str]) -> list[dict[str, Any]]:
    """Each EMF blob as {metric: [values]}, its dimensions and properties; checked against
    the EMF specification's required shape."""
    blobs = []
    for line in lines:
        blob = json.loads(line)
        directive = blob["_aws"]["CloudWatchMetrics"]
        assert isinstance(blob["_aws"]["Timestamp"], int)
        assert len(directive) == 1
        definition = directive[0]
        names = [metric["Name"] for metric in definition["Metrics"]]
        for metric in definition["Metrics"]:
            assert metric["Unit"] == METRICS[metric["Name"]][0].value
        for dimension_set in definition["Dimensions"]:
            for dimension in dimension_set:
                assert isinstance(blob[dimension], str)
        values = {
            name: blob[name] if isinstance(blob[name], list) else [blob[name]] for name in names
        }
        blobs.append(
            {
                "namespace": definition["Namespace"],
                "dimensions": definition["Dimensions"],
                "values": values,
                "blob": blob,
            }
        )
    return blobs


def test_emf_output_parses_and_names_only_documented_metrics(api, pipeline, clock, gateway, emf):
    # Given / When: one message that fails once at the gateway (503) and is then sent
    ids = run_one_message_through_a_failure(api, pipeline, clock, gateway)

    blobs = parse_emf(emf)
    assert blobs, "metrics were written"
    assert {b["namespace"] for b in blobs} == {"SmsCampaigns"}
    names = {name for b in blobs for name in b["values"]}
    assert names <= documented_metrics(), names - documented_metrics()
    assert set(METRICS) <= documented_metrics()

    totals: Counter = Counter()
    latencies = []
    by_class: Counter = Counter()
    for b in blobs:
        dimensions = b["dimensions"][0]
        # The mailing id is a property, never a dimension
        assert "mailing_id" not in dimensions
        assert b["blob"]["service"] == "sms-campaigns"
        assert b["blob"]["stack"] == "sms-test"
        if "error_class" in dimensions:
            by_class[b["blob"]["error_class"]] += sum(b["values"]["GatewayErrors"])
            continue
        assert sorted(dimensions) == ["service", "stack"]
        assert b["blob"]["mailing_id"] == ids["mailing_id"]
        for name, values in b["values"].items():
            if name == "GatewayLatency":
                latencies += values
            else:
                totals[name] += sum(values)
    # Then the figures are those of what happened
    assert totals["MessagesQueued"] == 1
    assert totals["MessagesSent"] == 1
    assert totals["MessagesRetried"] == 1
    assert totals["GatewayCalls"] == 2
    assert totals["GatewayErrors"] == 1
    assert totals["MessagesFailed"] == 0
    assert by_class == {"http_5xx": 1}
    assert len(latencies) == 2
    assert all(value > 0 for value in latencies)
    assert set(by_class) <= set(ERROR_CLASSES)


def gateway_gauges(emf: list[str]) -> list[dict[str, float]]:
    """The gateway's state as each send batch left it, in the order written."""
    return [
        {name: values[0] for name, values in b["values"].items()}
        for b in parse_emf(emf)
        if "GatewayPaused" in b["values"]
    ]


def test_after_each_batch_the_sender_writes_the_gateways_state_zeros_included(
    api, pipeline, clock, gateway, emf
):
    # Given / When: one message through a 503 (bad luck) and then sent
    run_one_message_through_a_failure(api, pipeline, clock, gateway)
    # Then every batch wrote the gateway's state: full rate, neither paused nor probing
    states = gateway_gauges(emf)
    assert len(states) == 2
    for state in states:
        assert state["GatewayPaused"] == state["GatewayProbing"] == 0
        assert state["GatewaySpeed"] == 100
        assert state["GatewayRate"] > 0
    # And the accept ratio of the window: the first batch's call failed, the second's succeeded
    assert [s["GatewayAcceptRatio"] for s in states] == [0, 50]


def test_a_429_batch_writes_a_paused_gateway_at_half_speed(api, pipeline, clock, gateway, emf):
    # Given a client, and a gateway answering every call 429 with Retry-After: 5
    body(api.post("/clients", {"phone": "79161234567"}))
    gateway.set_profile(FaultProfile(rate_limit_rate=1.0, retry_after_seconds=5))
    api.post(
        "/mailings",
        {
            "text": "Hi",
            "start_at": clock().isoformat(),
            "end_at": (clock() + timedelta(hours=1)).isoformat(),
        },
    )
    # When the mailing's first batch is sent
    pipeline.tick()
    pipeline.kicks()
    pipeline.send_once()
    # Then the sender wrote what it left: paused, no call allowed, half speed, none accepted
    [state] = gateway_gauges(emf)
    assert state["GatewayPaused"] == 1
    assert state["GatewayRate"] == 0
    assert state["GatewaySpeed"] == 50
    assert state["GatewayAcceptRatio"] == 0
    assert state["GatewayProbing"] == 0


@pytest.mark.parametrize("settings", [{"max_attempts": 2}], indirect=True)
def test_a_job_given_up_counts_as_failed_and_as_a_dead_letter_queue_arrival(
    api, pipeline, clock, gateway, emf
):
    # Given a gateway that fails every call, and two attempts
    body(api.post("/clients", {"phone": "79161234567"}))
    gateway.set_profile(FaultProfile(error_rate=1.0))
    api.post(
        "/mailings",
        {
            "text": "Hi",
            "start_at": clock().isoformat(),
            "end_at": (clock() + timedelta(hours=1)).isoformat(),
        },
    )
    # When the pipeline gives up
    pipeline.settle(limit=timedelta(minutes=10))

    # Then the metrics say so
    totals: Counter = Counter()
    for b in parse_emf(emf):
        if sorted(b["dimensions"][0]) == ["service", "stack"]:
            for name, values in b["values"].items():
                totals[name] += sum(values) if name != "GatewayLatency" else 0
    assert totals["MessagesFailed"] == 1
    assert totals["DlqArrivals"] == 1
    assert totals["GatewayErrors"] == totals["GatewayCalls"] == 2


def test_metrics_can_be_switched_off(monkeypatch: pytest.MonkeyPatch):
    """Given POWERTOOLS_METRICS_DISABLED=true, when a metric is emitted, then nothing is written."""
    from chalicelib.metrics import MetricsWriter
    from chalicelib.settings import Settings

    written: list[str] = []
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    MetricsWriter(Settings(), written.append).emit({"MessagesSent": 3})
    assert written == []


@pytest.mark.parametrize("count", [None, 7])
def test_local_queues_redrive_after_the_receive_count_the_sender_counts_dead_letters_by(aws, count):
    """Given the local stack's queues made with or without a receive count, when the send queue's
    redrive policy is read, then it is that count, or the settings' default."""
    import boto3

    from chalicelib.settings import Settings
    from devstack.stack import ensure_queues

    sqs = boto3.client("sqs", region_name="us-east-1")
    extra = {} if count is None else {"max_receive_count": count}
    urls = ensure_queues(
        sqs, "sms-rc", send_visibility_timeout=60, fanout_visibility_timeout=120, **extra
    )
    attributes = sqs.get_queue_attributes(QueueUrl=urls.send, AttributeNames=["RedrivePolicy"])
    policy = json.loads(attributes["Attributes"]["RedrivePolicy"])
    assert int(policy["maxReceiveCount"]) == (count or Settings().max_receive_count)


@pytest.mark.parametrize(
    ("stored", "problem"),
    [
        (json.dumps({"value": "x"}), 'needs a string "token" key'),
        ("{not json", 'needs a string "token" key'),
        ("   ", "the secret is empty"),
    ],
)
def test_an_unusable_secret_is_a_settings_error_naming_the_variable(aws, stored, problem):
    """Given a gateway token secret that is empty or malformed, when the token is read, then it is
    a settings error naming SENDER_API_TOKEN_SECRET_ID and the problem."""
    import boto3

    from chalicelib.secrets import Secrets
    from chalicelib.settings import Settings, SettingsError

    client = boto3.client("secretsmanager", region_name="us-east-1")
    arn = client.create_secret(Name="sms-test/bad", SecretString=stored)["ARN"]
    settings = Settings(sender_api_token_secret_id=arn)
    with pytest.raises(SettingsError, match=f"SENDER_API_TOKEN_SECRET_ID: .*{re.escape(problem)}"):
        Secrets(settings).gateway_token()


def test_a_plain_secret_is_the_token(aws):
    """Given a secret holding a plain string, when the gateway token is read, then it is that
    string, trimmed."""
    import boto3

    from chalicelib.secrets import Secrets
    from chalicelib.settings import Settings

    client = boto3.client("secretsmanager", region_name="us-east-1")
    arn = client.create_secret(Name="sms-test/plain", SecretString=" plain-token-1234 \n")["ARN"]
    token = Secrets(Settings(sender_api_token_secret_id=arn)).gateway_token()
    assert token is not None
    assert token.get_secret_value() == "plain-token-1234"


@pytest.mark.parametrize(
    "settings", [{"sender_api_token_secret_id": "sms-test/created-later"}], indirect=True
)
def test_an_unreadable_token_keeps_messages_pending_until_the_secret_exists(
    api, pipeline, clock, gateway, captured_logs
):
    import boto3

    # Given the secret the sender is told to read does not exist yet
    body(api.post("/clients", {"phone": "79161234567", "tag": "a"}))
    mailing = body(api.post("/mailings", _mailing(clock, "a")))
    pipeline.settle(limit=timedelta(minutes=2))

    # Then nothing was sent or spent, and the log says why
    [message] = pipeline.messages(mailing["id"])
    assert message.status == "pending"
    assert int(message.attempts) == 0
    assert gateway.requests() == []
    assert any(
        line["message"].startswith("the gateway token cannot be read (")
        for line in captured_logs.where(mailing_id=mailing["id"])
    )

    # When an operator creates it, the next retry reads it and sends
    boto3.client("secretsmanager", region_name="us-east-1").create_secret(
        Name="sms-test/created-later", SecretString=GATEWAY_SECRET
    )
    pipeline.settle(limit=timedelta(minutes=30))
    assert pipeline.statuses(mailing["id"]) == {"sent": 1}
