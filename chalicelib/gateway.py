"""The external SMS gateway's client: one call per message, every answer classified.

Only HTTP 200 with a JSON body whose `code` is 0 is a success. The rest is sorted, here and only
here, into an `AnswerKind` (chalicelib/domain/gateway_answer.py), from which the sender knows to
give up on the message (rejected), stop and fix the configuration (unauthorized), or try again
later, and the throttle knows overload from bad luck.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import requests
from pydantic import SecretStr
from requests.adapters import HTTPAdapter

from chalicelib.domain.gateway_answer import AnswerKind, GatewayResult, Outcome

logger = logging.getLogger(__name__)

_DETAIL_LIMIT = 200


class GatewayClient:
    """Sends one SMS per call through `POST {base_url}/v1/send/{id}`."""

    def __init__(
        self,
        base_url: str,
        token: SecretStr,
        *,
        connect_timeout: float,
        read_timeout: float,
        pool_size: int = 10,
        session: requests.Session | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = (connect_timeout, read_timeout)
        self._session = session or requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def send(self, message_id: int, phone: str, text: str) -> GatewayResult:
        """Send one message; never raises for anything the network or the gateway does."""
        started = time.monotonic()
        url = f"{self._base_url}/v1/send/{message_id}"
        # The ids of the mailing and client come from the caller's bound log context.
        logger.info(
            "gateway request",
            extra={"message_id": message_id, "url": url, "text_length": len(text)},
        )
        result = self._post(url, message_id, phone, text, started)
        logger.log(
            logging.INFO if result.outcome is Outcome.SENT else logging.WARNING,
            "gateway response: %s",
            result.detail,
            extra={
                "message_id": message_id,
                "outcome": result.outcome.value,
                "http_status": result.status_code,
                "latency_ms": round(result.latency_seconds * 1000, 1),
            },
        )
        return result

    def _post(
        self, url: str, message_id: int, phone: str, text: str, started: float
    ) -> GatewayResult:
        try:
            response = self._session.post(
                url,
                json={"id": message_id, "phone": int(phone), "text": text},
                headers={"Authorization": f"Bearer {self._token.get_secret_value()}"},
                timeout=self._timeout,
                allow_redirects=False,
            )
        except requests.Timeout as exc:
            return self._result(AnswerKind.TIMEOUT, f"timeout: {type(exc).__name__}", started)
        except requests.RequestException as exc:
            return self._result(AnswerKind.NETWORK, f"network error: {type(exc).__name__}", started)
        result = classify(response.status_code, response.text, started)
        retry_after = response.headers.get("Retry-After")
        return replace(result, retry_after=retry_after) if retry_after else result

    @staticmethod
    def _result(kind: AnswerKind, detail: str, started: float) -> GatewayResult:
        """An answer that never came (no status)."""
        return GatewayResult(kind, detail[:_DETAIL_LIMIT], None, time.monotonic() - started)


def classify(status: int, body: str, started: float | None = None) -> GatewayResult:
    """What an HTTP answer from the gateway is: the one place that reads its status."""
    latency = 0.0 if started is None else time.monotonic() - started
    snippet = " ".join(body.split())[:80]
    if status == 200:
        try:
            payload = json.loads(body)
        except ValueError:
            return GatewayResult(
                AnswerKind.BAD_ANSWER,
                f"HTTP 200 with a body that is not JSON: {snippet}",
                200,
                latency,
            )
        code = payload.get("code") if isinstance(payload, dict) else None
        if code == 0 and not isinstance(code, bool):
            return GatewayResult(AnswerKind.SENT, "OK", 200, latency)
        return GatewayResult(
            AnswerKind.BAD_ANSWER, f"HTTP 200 without success code: {snippet}", 200, latency
        )
    if status in (401, 403):
        return GatewayResult(
            AnswerKind.UNAUTHORIZED, f"HTTP {status}: credentials refused", status, latency
        )
    detail = f"HTTP {status}: {snippet}"[:_DETAIL_LIMIT]
    return GatewayResult(_kind_of(status), detail, status, latency)


def _kind_of(status: int) -> AnswerKind:
    """The kind of an answer other than 200, 401 and 403."""
    if status == 429:
        return AnswerKind.TOO_MANY_REQUESTS
    if status == 408:
        return AnswerKind.REQUEST_TIMEOUT
    if 400 <= status < 500:
        return AnswerKind.REJECTED
    if status == 503:
        return AnswerKind.UNAVAILABLE
    if status >= 500:
        return AnswerKind.SERVER_ERROR
    return AnswerKind.BAD_ANSWER  # a redirect or another status the gateway never sends
