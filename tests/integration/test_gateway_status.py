"""What an operator is told about the gateway's back-pressure: `GET /gateway` and the gateway
gauges of `GET /metrics`, read from the item every sender shares (moto, the test's clock)."""

from __future__ import annotations

import boto3
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chalicelib.domain.gateway_answer import AnswerKind, GatewayResult
from chalicelib.domain.rate_limit import AnswerMix, GatewayState, GatewayStatus, OperatorStatus
from chalicelib.services.prometheus import exposition
from chalicelib.services.throttle import GatewayThrottle
from chalicelib.storage.gateway_limits import DynamoGatewayLimits
from tests.conftest import body

OK = GatewayResult(AnswerKind.SENT, "OK", 200, 0.01)
TOO_MANY = GatewayResult(AnswerKind.TOO_MANY_REQUESTS, "HTTP 429", 429, 0.01, "4")


@pytest.fixture
def sender(services, clock) -> GatewayThrottle:
    """Another Lambda's view of the shared limits: a sender reporting its batches."""
    client = boto3.client("dynamodb", region_name="us-east-1")
    limits = DynamoGatewayLimits(client, services.settings.table_name("sequences"))
    return GatewayThrottle(limits, services.settings, clock)


def gauges(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_before_any_send_the_gateway_is_normal_at_the_configured_rate(api, services):
    # When an operator asks before any sender has run
    response = api.get("/gateway")
    # Then sending is normal at the configured rate, and no call has been counted
    assert response.status_code == 200
    status = body(response)
    rate = services.settings.gateway_rate_per_second
    assert status["state"] == "normal"
    assert status["degraded"] is False
    assert status["configured_rate"] == status["current_rate"] == rate
    assert status["accept_ratio"] is None
    assert status["answers"] == {
        "calls": 0,
        "accepted": 0,
        "overload": 0,
        "bad_luck": 0,
        "retries": 0,
    }
    assert status["last_slowdown"] is None


def test_a_429_is_shown_as_a_pause_with_its_reason_and_the_answer_mix(api, services, sender, clock):
    rate = services.settings.gateway_rate_per_second
    # Given a sender whose batch met a 429 with Retry-After: 4 after ten good answers
    sender.release(sender.admit(10), [OK] * 10)
    sender.release(sender.admit(2), [OK, TOO_MANY])
    # When an operator asks the API
    status = body(api.get("/gateway"))
    # Then they read that every sender is paused for 4 s, then sends at half the rate, and why
    assert status["state"] == "paused"
    assert status["degraded"] is True
    assert status["pause_seconds"] == pytest.approx(4.0, abs=0.1)
    assert status["current_rate"] == 0
    assert status["speed"] * status["configured_rate"] == pytest.approx(rate / 2)
    assert status["last_slowdown"] == {
        "reason": "the gateway asked to slow down",
        "at": clock().isoformat().replace("+00:00", "Z"),
    }
    assert status["answers"] == {
        "calls": 12,
        "accepted": 11,
        "overload": 1,
        "bad_luck": 0,
        "retries": 0,
    }
    assert status["accept_ratio"] == pytest.approx(11 / 12, abs=1e-4)


def test_the_gateway_status_needs_a_token(api):
    """Given no token, when the gateway status is asked for, then the answer is a 401."""
    assert api.get("/gateway", headers={}).status_code == 401


def test_the_gateway_status_is_in_the_openapi_document(api):
    """Given the OpenAPI document, when GET /gateway is looked up, then its answer's schema is
    GatewayStatusOut."""
    spec = body(api.get("/openapi.json"))
    operation = spec["paths"]["/gateway"]["get"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/GatewayStatusOut")


def test_metrics_carry_the_gateways_state_and_answers(api, services, sender):
    rate = services.settings.gateway_rate_per_second
    # Given a sender whose batch met a 429 after ten good answers and one server error
    sender.release(
        sender.admit(11),
        [OK] * 10 + [GatewayResult(AnswerKind.SERVER_ERROR, "HTTP 500", 500, 0.01)],
    )
    sender.release(sender.admit(1), [TOO_MANY])
    # When Prometheus scrapes the service
    scraped = gauges(api.get("/metrics").body.decode())
    # Then it reads the configured and current rate, the pause, and the answers by kind
    assert scraped[("sms_gateway_configured_rate", ())] == rate
    assert scraped[("sms_gateway_current_rate", ())] == 0
    assert scraped[("sms_gateway_paused", ())] == 1
    assert scraped[("sms_gateway_probing", ())] == 0
    assert scraped[("sms_gateway_degraded", ())] == 1
    assert scraped[("sms_gateway_accept_ratio", ())] == pytest.approx(10 / 12, abs=1e-4)
    assert scraped[("sms_gateway_answers", (("kind", "accepted"),))] == 10
    assert scraped[("sms_gateway_answers", (("kind", "overload"),))] == 1
    assert scraped[("sms_gateway_answers", (("kind", "bad_luck"),))] == 1
    assert scraped[("sms_gateway_retries", ())] == 0


def test_metrics_list_operators_with_a_rate_of_their_own_by_label():
    # Given a status with two operators limited on their own
    status = GatewayStatus(
        configured_rate=50.0,
        current_rate=50.0,
        speed=1.0,
        state=GatewayState.NORMAL,
        pause_left=0.0,
        accept_ratio=None,
        answers=AnswerMix(),
        degraded=False,
        operators=(OperatorStatus("916", 20.0), OperatorStatus("903", 10.0)),
    )
    # Then each has its configured rate under its operator label; no ratio without calls
    scraped = gauges(exposition([], {}, status))
    assert scraped[("sms_gateway_operator_configured_rate", (("operator", "916"),))] == 20
    assert scraped[("sms_gateway_operator_configured_rate", (("operator", "903"),))] == 10
    assert ("sms_gateway_accept_ratio", ()) not in scraped


class TestOperatorsWithARateOfTheirOwn:
    @pytest.fixture
    def settings(self, monkeypatch: pytest.MonkeyPatch):
        from chalicelib.settings import Settings
        from tests.conftest import API_TOKEN

        monkeypatch.setenv("API_TOKENS", API_TOKEN)
        # Given operators 903 (2 calls a second) and 916 (20) limited on their own
        return Settings(
            table_prefix="sms-test",
            api_tokens=(API_TOKEN,),
            gateway_rate_per_second=50,
            gateway_rate_per_operator="903=2,916=20",
        )

    def test_the_status_names_the_operator_whose_messages_wait_for_its_rate(
        self, api, sender, clock
    ):
        # And a sender that took 903's slots for the next 2 s and had to send the rest back
        start = clock().timestamp()
        assert sender.admit_operator("903", 10, start, start + 2.0, 1 / 50).count == 4
        # When an operator asks the API and scrapes the metrics
        operators = {o["code"]: o for o in body(api.get("/gateway"))["operators"]}
        scraped = gauges(api.get("/metrics").body.decode())
        # Then 903 is shown waiting for its rate with its backlog, 916 is not
        assert operators["903"]["configured_rate"] == 2
        assert operators["903"]["deferring"] is True
        assert operators["903"]["reserved_ahead_seconds"] >= 1.5
        assert operators["903"]["max_rate"] <= 2
        assert operators["916"]["deferring"] is False
        assert scraped[("sms_gateway_operator_deferring", (("operator", "903"),))] == 1
        assert scraped[("sms_gateway_operator_deferring", (("operator", "916"),))] == 0
        assert scraped[("sms_gateway_operator_backlog_seconds", (("operator", "903"),))] >= 1.5
