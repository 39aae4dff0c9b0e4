"""The gateway client: every kind of answer is classified as the sender needs it."""

from __future__ import annotations

import logging
import socket

import pytest
from pydantic import SecretStr

from chalicelib.domain.gateway_answer import AnswerKind, Outcome
from chalicelib.gateway import GatewayClient, classify
from devstack.gateway import FaultProfile
from tests.conftest import GATEWAY_TOKEN as TOKEN


def client_for(url: str, token: str = TOKEN, read_timeout: float = 0.5) -> GatewayClient:
    return GatewayClient(url, SecretStr(token), connect_timeout=0.5, read_timeout=read_timeout)


@pytest.mark.parametrize(
    ("status", "body", "outcome", "kind"),
    [
        (200, '{"code": 0, "message": "OK"}', Outcome.SENT, AnswerKind.SENT),
        (200, '{"code": 1, "message": "busy"}', Outcome.RETRY, AnswerKind.BAD_ANSWER),
        (200, '{"code": false}', Outcome.RETRY, AnswerKind.BAD_ANSWER),
        (200, '{"message": "OK"}', Outcome.RETRY, AnswerKind.BAD_ANSWER),
        (200, "[0]", Outcome.RETRY, AnswerKind.BAD_ANSWER),
        (200, "<html>OK</html>", Outcome.RETRY, AnswerKind.BAD_ANSWER),
        (200, "", Outcome.RETRY, AnswerKind.BAD_ANSWER),
        (400, '{"code": 1, "message": "bad phone"}', Outcome.REJECTED, AnswerKind.REJECTED),
        (404, "not found", Outcome.REJECTED, AnswerKind.REJECTED),
        (422, "", Outcome.REJECTED, AnswerKind.REJECTED),
        (401, "", Outcome.UNAUTHORIZED, AnswerKind.UNAUTHORIZED),
        (403, "", Outcome.UNAUTHORIZED, AnswerKind.UNAUTHORIZED),
        (408, "", Outcome.RETRY, AnswerKind.REQUEST_TIMEOUT),
        (429, "", Outcome.RETRY, AnswerKind.TOO_MANY_REQUESTS),
        (500, "", Outcome.RETRY, AnswerKind.SERVER_ERROR),
        (502, "<html>bad gateway</html>", Outcome.RETRY, AnswerKind.SERVER_ERROR),
        (503, "", Outcome.RETRY, AnswerKind.UNAVAILABLE),
        (302, "", Outcome.RETRY, AnswerKind.BAD_ANSWER),
    ],
)
def test_answers_are_classified_once_into_a_kind_that_says_the_outcome(status, body, outcome, kind):
    # Given an HTTP answer from the gateway, when it is classified
    result = classify(status, body)
    # Then it is one kind of answer, which says what becomes of the message
    assert (result.kind, result.outcome) == (kind, outcome)


def test_a_send_reaches_the_gateway_in_its_exact_format(sandbox):
    """Given the sandbox gateway, when a message is sent, then it is accepted with its id, phone
    and text exactly."""
    result = client_for(sandbox.url).send(4242, "79001234567", "Hi there")
    assert result.outcome is Outcome.SENT
    [accepted] = sandbox.accepted()
    assert (accepted.msg_id, accepted.phone, accepted.text) == (4242, 79001234567, "Hi there")


def test_rejected_subscriber_is_permanent_with_the_reason(sandbox):
    """Given a gateway that rejects the phone, when a message is sent to it, then the result is
    rejected and names the 400."""
    sandbox.set_profile(FaultProfile(reject_phone_suffixes=("67",)))
    result = client_for(sandbox.url).send(1, "79001234567", "Hi")
    assert result.outcome is Outcome.REJECTED
    assert "400" in result.detail


def test_wrong_token_is_a_configuration_error(sandbox):
    """Given a wrong bearer token, when a message is sent, then the result is unauthorized (a
    setting to fix), not a retry."""
    result = client_for(sandbox.url, token="wrong-token").send(1, "79001234567", "Hi")
    assert result.outcome is Outcome.UNAUTHORIZED


def test_slow_gateway_times_out_as_retry(sandbox):
    """Given a gateway slower than the read timeout, when a message is sent, then the call gives up
    in time and the result is a retry naming the timeout."""
    sandbox.set_profile(FaultProfile(slow_rate=1.0, slow_seconds=2.0))
    result = client_for(sandbox.url, read_timeout=0.2).send(1, "79001234567", "Hi")
    assert result.outcome is Outcome.RETRY
    assert result.kind is AnswerKind.TIMEOUT
    assert "timeout" in result.detail
    assert result.latency_seconds < 1.5


def test_unreachable_gateway_is_retry_not_an_exception():
    """Given no server on the gateway's port, when a message is sent, then the result is a retry
    naming the network error, not an exception."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = client_for(f"http://127.0.0.1:{port}").send(1, "79001234567", "Hi")
    assert result.outcome is Outcome.RETRY
    assert result.kind is AnswerKind.NETWORK
    assert "network error" in result.detail


def test_token_never_appears_in_results_or_logs(sandbox, caplog):
    """Given failing calls with the right and a wrong token, when their results and debug logs are
    read, then neither holds the token."""
    caplog.set_level(logging.DEBUG)
    sandbox.set_profile(FaultProfile(error_rate=1.0))
    results = [client_for(sandbox.url).send(n, "79001234567", "Hi") for n in range(3)]
    results.append(client_for(sandbox.url, token=TOKEN + "x").send(9, "79001234567", "Hi"))
    assert all(TOKEN not in repr(r) for r in results)
    assert TOKEN not in caplog.text
