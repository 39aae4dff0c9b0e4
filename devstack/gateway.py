"""A sandbox SMS gateway on loopback: the real gateway's API, its faults on demand, and a ledger.

It speaks `POST /v1/send/{msgId}` exactly as the real gateway does (see
/work/shared/gateway-openapi.yaml) and validates requests at least as strictly, so a client
that passes here does not fail there on form. A `FaultProfile` makes it behave like the real
one on a bad day: latency, 5xx, answers slower than the client's read timeout, 200s that are
not a success, 429s, rejected subscribers and outages.

What it accepted (HTTP 200 with code 0) goes into a ledger that tests read in process
(`accepted()`, `duplicates()`, ...) or over HTTP (`GET /_sandbox/ledger`); faults change at
runtime through `set_profile()` or `POST /_sandbox/profile`, and `POST /_sandbox/reset` clears
the ledger. The `/_sandbox/*` endpoints take no token and answer loopback clients only.

Environment for the local stack (see `FaultProfile.from_env`): SANDBOX_LATENCY_MS,
SANDBOX_LATENCY_JITTER_MS, SANDBOX_ERROR_RATE, SANDBOX_SLOW_RATE, SANDBOX_SLOW_MS,
SANDBOX_MALFORMED_RATE, SANDBOX_RATE_LIMIT_RATE, SANDBOX_RETRY_AFTER_SECONDS,
SANDBOX_REJECT_SUFFIXES, SANDBOX_OUTAGE_SECONDS, SANDBOX_OUTAGE_MODE, SANDBOX_SEED.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any, Literal
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

OutageMode = Literal["503", "refuse"]
OUTAGE_MODES: tuple[str, ...] = ("503", "refuse")
# Every request to the gateway API falls in one of these classes (the /_sandbox/* ones do not).
OUTCOMES: tuple[str, ...] = (
    "ok",
    "5xx",
    "slow",
    "malformed",
    "429",
    "400",
    "401",
    "outage",
    "404",
    "405",
)

SEND_PREFIX = "/v1/send/"
CONTROL_PREFIX = "/_sandbox/"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
PHONE_MIN, PHONE_MAX = 70_000_000_000, 79_999_999_999
MAX_BODY_BYTES = 64 * 1024
# The service's default read timeout is 10 s; a default "slow" answer must outlast it.
DEFAULT_SLOW_SECONDS = 15.0
_ERROR_STATUSES = (500, 502, 503, 504)
_MALFORMED_KINDS = ("not_json", "empty", "no_code", "nonzero_code")
_SEND_FIELDS = frozenset({"id", "phone", "text"})
_POLL_SECONDS = 0.02
_JOIN_SECONDS = 1.0
# An idle keep-alive connection is dropped after this; clients reconnect transparently.
_IDLE_TIMEOUT_SECONDS = 60.0
_SUFFIX = re.compile(r"[0-9]{1,10}")
_MSG_ID = re.compile(r"-?[0-9]{1,19}")

# Response codes in the JSON body; only 0 is a success.
CODE_OK = 0
CODE_SUBSCRIBER_REJECTED = 1
CODE_BAD_REQUEST = 2
CODE_UNAUTHORIZED = 3
CODE_RATE_LIMITED = 4
CODE_INTERNAL = 5
CODE_NOT_FOUND = 6
CODE_METHOD_NOT_ALLOWED = 7
CODE_FORBIDDEN = 8

_RATE_FIELDS = ("error_rate", "slow_rate", "malformed_rate", "rate_limit_rate")
_SECONDS_FIELDS = ("latency_seconds", "latency_jitter_seconds", "slow_seconds", "outage_seconds")
_ENV_NAMES = {
    "latency_seconds": "SANDBOX_LATENCY_MS",
    "latency_jitter_seconds": "SANDBOX_LATENCY_JITTER_MS",
    "error_rate": "SANDBOX_ERROR_RATE",
    "slow_rate": "SANDBOX_SLOW_RATE",
    "slow_seconds": "SANDBOX_SLOW_MS",
    "malformed_rate": "SANDBOX_MALFORMED_RATE",
    "rate_limit_rate": "SANDBOX_RATE_LIMIT_RATE",
    "retry_after_seconds": "SANDBOX_RETRY_AFTER_SECONDS",
    "reject_phone_suffixes": "SANDBOX_REJECT_SUFFIXES",
    "outage_seconds": "SANDBOX_OUTAGE_SECONDS",
    "outage_mode": "SANDBOX_OUTAGE_MODE",
    "seed": "SANDBOX_SEED",
}


@dataclass(frozen=True)
class FaultProfile:
    """How badly the sandbox behaves; the default is a perfect gateway.

    The four rates are shares of valid requests and add up to at most 1; the rest is answered
    OK. The outage lasts `outage_seconds` from `start()` or from `set_profile()` on a running
    gateway; during it every request gets 503 ("503") or a closed connection ("refuse").
    """

    latency_seconds: float = 0.0
    latency_jitter_seconds: float = 0.0
    error_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = DEFAULT_SLOW_SECONDS
    malformed_rate: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after_seconds: int = 1
    reject_phone_suffixes: tuple[str, ...] = ()
    outage_seconds: float = 0.0
    outage_mode: OutageMode = "503"
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.reject_phone_suffixes, list):
            object.__setattr__(self, "reject_phone_suffixes", tuple(self.reject_phone_suffixes))
        _validate(dataclasses.asdict(self), {})

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FaultProfile:
        """Read the SANDBOX_* variables (unset or empty: no fault); a bad one raises ValueError."""
        values: dict[str, Any] = {}
        for name in ("latency_seconds", "latency_jitter_seconds", "slow_seconds"):
            millis = _env_number(environ, _ENV_NAMES[name])
            if millis is not None:
                values[name] = millis / 1000
        for name in _RATE_FIELDS:
            rate = _env_number(environ, _ENV_NAMES[name], maximum=1.0)
            if rate is not None:
                values[name] = rate
        outage = _env_number(environ, _ENV_NAMES["outage_seconds"])
        if outage is not None:
            values["outage_seconds"] = outage
        retry_after = _env_int(environ, _ENV_NAMES["retry_after_seconds"])
        if retry_after is not None:
            values["retry_after_seconds"] = retry_after
        seed = _env_int(environ, _ENV_NAMES["seed"], minimum=None)
        if seed is not None:
            values["seed"] = seed
        suffixes = _env_text(environ, "reject_phone_suffixes")
        if suffixes is not None:
            values["reject_phone_suffixes"] = tuple(
                part.strip() for part in suffixes.split(",") if part.strip()
            )
        mode = _env_text(environ, "outage_mode")
        if mode is not None:
            values["outage_mode"] = mode.lower()
        _validate({**_defaults(), **values}, _ENV_NAMES)
        return cls(**values)

    @classmethod
    def from_dict(cls, data: Any) -> FaultProfile:
        """A profile from JSON field values; fields left out take their defaults."""
        if not isinstance(data, dict):
            raise ValueError("a fault profile must be a JSON object")
        unknown = sorted(set(data) - set(_defaults()))
        if unknown:
            raise ValueError(f"unknown fault profile field(s): {', '.join(unknown)}")
        values = dict(data)
        if isinstance(values.get("reject_phone_suffixes"), list):
            values["reject_phone_suffixes"] = tuple(values["reject_phone_suffixes"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The profile as JSON-ready field values (the shape `from_dict` reads)."""
        values = dataclasses.asdict(self)
        values["reject_phone_suffixes"] = list(self.reject_phone_suffixes)
        return values

    def rejects(self, phone: int) -> bool:
        """True when this subscriber is to be rejected with 400."""
        digits = str(phone)
        return any(digits.endswith(suffix) for suffix in self.reject_phone_suffixes)


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(FaultProfile)}


def _validate(values: Mapping[str, Any], names: Mapping[str, str]) -> None:
    """Check field values; errors call a field by its name in `names` (an env var) if there."""

    def label(name: str) -> str:
        return names.get(name, name)

    for name in (*_RATE_FIELDS, *_SECONDS_FIELDS):
        value = values[name]
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{label(name)} must be a number of at least 0, got {value!r}")
    for name in _RATE_FIELDS:
        if values[name] > 1:
            raise ValueError(f"{label(name)} must be between 0 and 1, got {values[name]!r}")
    total = sum(values[name] for name in _RATE_FIELDS)
    if total > 1 + 1e-9:
        joined = " + ".join(label(name) for name in _RATE_FIELDS)
        raise ValueError(f"{joined} must add up to at most 1, got {total:g}")
    if values["slow_rate"] > 0 and values["slow_seconds"] <= 0:
        raise ValueError(
            f"{label('slow_seconds')} must be above 0 when {label('slow_rate')} is set"
        )
    retry_after = values["retry_after_seconds"]
    if not _is_int(retry_after) or retry_after < 0:
        raise ValueError(
            f"{label('retry_after_seconds')} must be a whole number of at least 0, "
            f"got {retry_after!r}"
        )
    suffixes = values["reject_phone_suffixes"]
    if not isinstance(suffixes, tuple) or not all(
        isinstance(suffix, str) and _SUFFIX.fullmatch(suffix) for suffix in suffixes
    ):
        raise ValueError(
            f"{label('reject_phone_suffixes')} must be digit strings of 1 to 10 digits, "
            f"got {suffixes!r}"
        )
    if values["outage_mode"] not in OUTAGE_MODES:
        raise ValueError(
            f"{label('outage_mode')} must be one of {', '.join(OUTAGE_MODES)}, "
            f"got {values['outage_mode']!r}"
        )
    seed = values["seed"]
    if seed is not None and not _is_int(seed):
        raise ValueError(f"{label('seed')} must be a whole number, got {seed!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _env_text(environ: Mapping[str, str], field_name: str) -> str | None:
    raw = (environ.get(_ENV_NAMES[field_name]) or "").strip()
    return raw or None


def _env_number(
    environ: Mapping[str, str], name: str, maximum: float | None = None
) -> float | None:
    raw = (environ.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a number of at least 0, got {raw!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be between 0 and {maximum:g}, got {raw!r}")
    return value


def _env_int(environ: Mapping[str, str], name: str, minimum: int | None = 0) -> int | None:
    raw = (environ.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


@dataclass(frozen=True)
class AcceptedSend:
    """One send the sandbox answered with 200 and code 0; `accepted_at` is wall-clock time."""

    msg_id: int
    phone: int
    text: str
    accepted_at: float


@dataclass(frozen=True)
class ReceivedRequest:
    """One request to the gateway API: when it arrived (wall clock) and how it was answered."""

    received_at: float
    outcome: str
    msg_id: int | None


@dataclass(frozen=True)
class _Send:
    msg_id: int
    phone: int
    text: str


@dataclass(frozen=True)
class _Reply:
    """What to do with one request once its outcome is decided."""

    outcome: str
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delay_seconds: float = 0.0
    accept: _Send | None = None
    refuse: bool = False
    close: bool = False


class _BadRequest(ValueError):
    pass


def _json(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def _error(outcome: str, status: int, code: int, message: str, **kwargs: Any) -> _Reply:
    return _Reply(outcome, status, _json({"code": code, "message": message}), **kwargs)


_OK_BODY = _json({"code": CODE_OK, "message": "OK"})


def _parse_msg_id(raw: str) -> int | None:
    if not _MSG_ID.fullmatch(raw):
        return None
    value = int(raw)
    return value if INT64_MIN <= value <= INT64_MAX else None


def _strict_json(body: bytes) -> Any:
    """Parse JSON rejecting what lenient parsers let through: NaN, duplicate keys, non-UTF-8."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise _BadRequest("the body has a duplicate key")
        return dict(pairs)

    def no_constant(name: str) -> Any:
        raise _BadRequest(f"the body has {name}, which is not JSON")

    try:
        return json.loads(
            body.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constant
        )
    except UnicodeDecodeError:
        raise _BadRequest("the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise _BadRequest(f"the body is not valid JSON: {exc.msg}") from None


def _parse_send(msg_id: int | None, content_type: str | None, body: bytes | None) -> _Send:
    """The send a request asks for, checked like a strict real gateway; _BadRequest if not."""
    if msg_id is None:
        raise _BadRequest("msgId in the path must be an int64")
    if body is None:
        raise _BadRequest("the body needs a Content-Length of at most 64 KiB")
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise _BadRequest("Content-Type must be application/json")
    payload = _strict_json(body)
    if not isinstance(payload, dict):
        raise _BadRequest("the body must be a JSON object")
    missing = sorted(_SEND_FIELDS - set(payload))
    if missing:
        raise _BadRequest(f"the body lacks {', '.join(missing)}")
    unknown = sorted(set(payload) - _SEND_FIELDS)
    if unknown:
        raise _BadRequest(f"the body has unknown field(s) {', '.join(unknown)}")
    body_id, phone, text = payload["id"], payload["phone"], payload["text"]
    if not _is_int(body_id) or not INT64_MIN <= body_id <= INT64_MAX:
        raise _BadRequest("id must be an int64")
    if body_id != msg_id:
        raise _BadRequest("id must equal msgId in the path")
    if not _is_int(phone) or not PHONE_MIN <= phone <= PHONE_MAX:
        raise _BadRequest("phone must be an integer 7XXXXXXXXXX")
    if not isinstance(text, str) or not text.strip():
        raise _BadRequest("text must be a non-empty string")
    return _Send(msg_id, phone, text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class SandboxGateway:
    """The SMS gateway's API on loopback, with injectable faults and a ledger of what it accepted.

    A local stack component (`start`, `stop`, `is_alive`, `name`). All methods are thread-safe.
    """

    name = "sandbox-gateway"

    def __init__(
        self,
        token: str,
        profile: FaultProfile | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        allow_remote: bool = False,
    ) -> None:
        if not token:
            raise ValueError("the sandbox gateway needs a non-empty bearer token")
        # Faults and a ledger open to anyone on the network are a hazard, not a feature.
        if not allow_remote and not _is_loopback(host):
            raise ValueError(
                f"the sandbox gateway binds loopback only, got host {host!r}; "
                "pass allow_remote=True to bind another address"
            )
        self._token = token.encode()
        self._host = host
        self._port = port
        self._clock = clock
        self._wall_clock = wall_clock
        self._state = threading.Condition(threading.Lock())
        self._profile = profile or FaultProfile()
        self._random = random.Random(self._profile.seed)
        self._outage_until = -math.inf
        self._outage_mode: str = self._profile.outage_mode
        self._accepted: list[AcceptedSend] = []
        self._requests: list[ReceivedRequest] = []
        self._counts: Counter[str] = Counter()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound port (the configured one before `start()`)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL without /v1, e.g. http://127.0.0.1:54321; the service's SENDER_API_URL base."""
        if not self._port:
            raise RuntimeError("the sandbox gateway has no port until it is started")
        host = self._host
        if host in ("", "0.0.0.0", "::"):  # noqa: S104 - only turns a bind address into a URL
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._port}"

    def start(self) -> None:
        """Bind and serve in a daemon thread; the profile's outage (if any) starts now."""
        if self._server is not None:
            raise RuntimeError("the sandbox gateway is already running")
        server_class = _Server6 if ":" in self._host else _Server
        try:
            server = server_class((self._host, self._port), self)
        except OSError as exc:
            raise OSError(
                f"the sandbox gateway cannot listen on {self._host}:{self._port}: "
                f"{exc.strerror or exc}"
            ) from None
        self._stopping = threading.Event()
        self._port = server.server_address[1]
        with self._state:
            self._begin_outage(self._profile.outage_seconds, self._profile.outage_mode)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _POLL_SECONDS},
            name=self.name,
            daemon=True,
        )
        self._thread.start()
        logger.info("sandbox gateway listening on %s", self.url)

    def stop(self) -> None:
        """Stop serving within about a second; requests in flight are dropped unanswered."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        # Wakes every latency and slow sleep: none of them answers after this.
        self._stopping.set()
        if server is not None:
            server.shutdown()
            server.server_close()
            server.drop_connections()
        if thread is not None:
            thread.join(_JOIN_SECONDS)

    def is_alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping.is_set()

    # ------------------------------------------------------------------ faults

    @property
    def profile(self) -> FaultProfile:
        with self._state:
            return self._profile

    def set_profile(self, profile: FaultProfile) -> None:
        """Replace the faults: the random stream restarts from its seed, the outage from now."""
        if not isinstance(profile, FaultProfile):
            raise TypeError(f"expected a FaultProfile, got {type(profile).__name__}")
        with self._state:
            self._profile = profile
            self._random = random.Random(profile.seed)
            if self._server is not None:
                self._begin_outage(profile.outage_seconds, profile.outage_mode)

    def start_outage(self, seconds: float, mode: OutageMode | None = None) -> None:
        """Answer every request with 503 (or close it: mode "refuse") for `seconds` from now."""
        if not _is_number(seconds) or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds must be a number of at least 0, got {seconds!r}")
        if mode is not None and mode not in OUTAGE_MODES:
            raise ValueError(f"mode must be one of {', '.join(OUTAGE_MODES)}, got {mode!r}")
        with self._state:
            self._begin_outage(seconds, mode or self._profile.outage_mode)

    def end_outage(self) -> None:
        """End any outage now."""
        with self._state:
            self._outage_until = -math.inf

    def _begin_outage(self, seconds: float, mode: str) -> None:
        self._outage_until = self._clock() + seconds if seconds > 0 else -math.inf
        self._outage_mode = mode

    # ------------------------------------------------------------------ ledger

    def accepted(self) -> list[AcceptedSend]:
        """Every accepted send, in the order accepted (an id accepted twice appears twice)."""
        with self._state:
            return list(self._accepted)

    def accepted_ids(self) -> Counter[int]:
        """How many times each message id was accepted."""
        with self._state:
            return Counter(send.msg_id for send in self._accepted)

    def duplicates(self) -> list[int]:
        """Message ids accepted more than once, ascending."""
        return sorted(msg_id for msg_id, times in self.accepted_ids().items() if times > 1)

    def requests(self) -> list[ReceivedRequest]:
        """Every request to the gateway API, in the order their outcome was decided."""
        with self._state:
            return list(self._requests)

    def counts(self) -> Counter[str]:
        """Requests received per outcome class (see OUTCOMES); a "slow" one may be accepted too."""
        with self._state:
            return Counter(self._counts)

    def reset(self) -> None:
        """Forget every request and accepted send; the profile stays."""
        with self._state:
            self._accepted.clear()
            self._requests.clear()
            self._counts.clear()

    def wait_for_accepted(self, count: int, timeout: float) -> list[AcceptedSend]:
        """Block until at least `count` sends were accepted; TimeoutError after `timeout` s."""
        with self._state:
            if not self._state.wait_for(lambda: len(self._accepted) >= count, timeout):
                raise TimeoutError(
                    f"{len(self._accepted)} send(s) accepted in {timeout:g} s, expected {count}"
                )
            return list(self._accepted)

    def ledger(self) -> dict[str, Any]:
        """The ledger as JSON-ready data, the body of `GET /_sandbox/ledger`."""
        with self._state:
            accepted = list(self._accepted)
            received = list(self._requests)
            counts = Counter(self._counts)
            profile = self._profile
        times = Counter(send.msg_id for send in accepted)
        return {
            "accepted": [dataclasses.asdict(send) for send in accepted],
            "counts": {outcome: counts[outcome] for outcome in OUTCOMES},
            "duplicates": sorted(msg_id for msg_id, n in times.items() if n > 1),
            "requests": [dataclasses.asdict(request) for request in received],
            "profile": profile.to_dict(),
        }

    # ------------------------------------------------------------------ serving

    def _serve(self, handler: _Handler) -> None:
        received_at = self._wall_clock()
        stopping = self._stopping
        path = urlsplit(handler.path).path
        body = handler.read_body()
        if path.startswith(CONTROL_PREFIX):
            reply = self._control(handler, path, body)
        else:
            reply = self._gateway_reply(handler, path, body, received_at)
        if body is None:
            reply = dataclasses.replace(reply, close=True)
        handler.carry_out(reply, stopping, self._accept)

    def _gateway_reply(
        self, handler: _Handler, path: str, body: bytes | None, received_at: float
    ) -> _Reply:
        raw_id = path[len(SEND_PREFIX) :] if path.startswith(SEND_PREFIX) else ""
        if not raw_id or "/" in raw_id:
            reply = _error("404", 404, CODE_NOT_FOUND, "not found")
            return self._record(reply, received_at, None)
        msg_id = _parse_msg_id(raw_id)
        if handler.command != "POST":
            reply = _error(
                "405",
                405,
                CODE_METHOD_NOT_ALLOWED,
                "method not allowed",
                headers=(("Allow", "POST"),),
            )
            return self._record(reply, received_at, msg_id)
        with self._state:
            profile = self._profile
            # Three draws per request whatever its fate, so a seed replays the same story.
            pick, jitter, variant = (self._random.random() for _ in range(3))
            in_outage = self._clock() < self._outage_until
            outage_mode = self._outage_mode
        if in_outage:
            if outage_mode == "refuse":
                reply = _Reply("outage", refuse=True)
            else:
                reply = _error(
                    "outage", 503, CODE_INTERNAL, "service unavailable", headers=_RETRY_AFTER_1
                )
            return self._record(reply, received_at, msg_id)
        reply = self._decide(handler, profile, msg_id, body, pick, variant)
        latency = profile.latency_seconds + jitter * profile.latency_jitter_seconds
        if latency:
            reply = dataclasses.replace(reply, delay_seconds=reply.delay_seconds + latency)
        return self._record(reply, received_at, msg_id)

    def _decide(
        self,
        handler: _Handler,
        profile: FaultProfile,
        msg_id: int | None,
        body: bytes | None,
        pick: float,
        variant: float,
    ) -> _Reply:
        if not self._authorized(handler.headers.get("Authorization")):
            return _error(
                "401",
                401,
                CODE_UNAUTHORIZED,
                "token missing or invalid",
                headers=(("WWW-Authenticate", "Bearer"),),
            )
        try:
            send = _parse_send(msg_id, handler.headers.get("Content-Type"), body)
        except _BadRequest as exc:
            return _error("400", 400, CODE_BAD_REQUEST, str(exc))
        if profile.rejects(send.phone):
            return _error("400", 400, CODE_SUBSCRIBER_REJECTED, "subscriber rejected")
        threshold = profile.error_rate
        if pick < threshold:
            status = _ERROR_STATUSES[int(variant * len(_ERROR_STATUSES))]
            return _server_error(status)
        threshold += profile.slow_rate
        if pick < threshold:
            return _Reply("slow", body=_OK_BODY, delay_seconds=profile.slow_seconds, accept=send)
        threshold += profile.malformed_rate
        if pick < threshold:
            return _malformed(_MALFORMED_KINDS[int(variant * len(_MALFORMED_KINDS))])
        threshold += profile.rate_limit_rate
        if pick < threshold:
            return _error(
                "429",
                429,
                CODE_RATE_LIMITED,
                "too many requests",
                headers=(("Retry-After", str(profile.retry_after_seconds)),),
            )
        return _Reply("ok", body=_OK_BODY, accept=send)

    def _authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self._token
        )

    def _record(self, reply: _Reply, received_at: float, msg_id: int | None) -> _Reply:
        with self._state:
            self._requests.append(ReceivedRequest(received_at, reply.outcome, msg_id))
            self._counts[reply.outcome] += 1
        return reply

    def _accept(self, send: _Send) -> None:
        with self._state:
            self._accepted.append(
                AcceptedSend(send.msg_id, send.phone, send.text, self._wall_clock())
            )
            self._state.notify_all()

    def _control(self, handler: _Handler, path: str, body: bytes | None) -> _Reply:
        if not _is_loopback(handler.client_address[0]):
            return _error("control", 403, CODE_FORBIDDEN, "sandbox controls answer loopback only")
        method = handler.command
        if path == "/_sandbox/ledger":
            if method != "GET":
                return _not_allowed("GET")
            return _Reply("control", body=_json(self.ledger()))
        if path == "/_sandbox/profile":
            if method == "GET":
                return _Reply("control", body=_json({"profile": self.profile.to_dict()}))
            if method != "POST":
                return _not_allowed("GET, POST")
            try:
                profile = FaultProfile.from_dict(_strict_json(body or b"{}"))
            except (ValueError, TypeError) as exc:
                return _error("control", 400, CODE_BAD_REQUEST, str(exc))
            self.set_profile(profile)
            return _Reply("control", body=_json({"profile": profile.to_dict()}))
        if path == "/_sandbox/reset":
            if method != "POST":
                return _not_allowed("POST")
            self.reset()
            return _Reply("control", body=_json({"code": CODE_OK, "message": "ledger cleared"}))
        return _error("control", 404, CODE_NOT_FOUND, "not found")


_RETRY_AFTER_1 = (("Retry-After", "1"),)


def _not_allowed(allow: str) -> _Reply:
    return _error(
        "control", 405, CODE_METHOD_NOT_ALLOWED, "method not allowed", headers=(("Allow", allow),)
    )


def _server_error(status: int) -> _Reply:
    # Proxies in front of the real gateway answer 502/504 with HTML, the app itself with JSON.
    if status in (502, 504):
        page = f"<html><body><h1>{status}</h1></body></html>".encode()
        return _Reply("5xx", status, page, content_type="text/html")
    return _error("5xx", status, CODE_INTERNAL, "internal error")


def _malformed(kind: str) -> _Reply:
    """A 200 that is not a success: the body is not JSON, lacks a code, or has a code != 0."""
    if kind == "not_json":
        return _Reply("malformed", body=b"<html><body>OK</body></html>", content_type="text/html")
    if kind == "empty":
        return _Reply("malformed", body=b"")
    if kind == "no_code":
        return _Reply("malformed", body=_json({"message": "OK"}))
    return _Reply("malformed", body=_json({"code": CODE_INTERNAL, "message": "not sent"}))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # The default of 5 drops connections when a benchmark opens dozens at once.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], gateway: SandboxGateway) -> None:
        self.gateway = gateway
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can take seconds; not needed.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def drop_connections(self) -> None:
        """Shut every open connection so keep-alive handler threads end now."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (read timeout) before a slow answer is normal here.
        logger.debug("sandbox gateway connection from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Without it keep-alive clients wait ~40 ms per request on delayed ACKs.
    disable_nagle_algorithm = True
    timeout = _IDLE_TIMEOUT_SECONDS
    server: _Server
    server_version = "sandbox-gateway"

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def dispatch(self) -> None:
        self.server.gateway._serve(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = dispatch

    def read_body(self) -> bytes | None:
        """The request body; None when its framing is unusable (the connection then closes)."""
        if self.headers.get("Transfer-Encoding"):
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
        except ValueError:
            return None
        if not 0 <= length <= MAX_BODY_BYTES:
            return None
        return self.rfile.read(length)

    def carry_out(
        self, reply: _Reply, stopping: threading.Event, accept: Callable[[_Send], None]
    ) -> None:
        if reply.close:
            self.close_connection = True
        if reply.delay_seconds > 0 and stopping.wait(reply.delay_seconds):
            self.close_connection = True
            return
        if reply.refuse:
            self.close_connection = True
            return
        if reply.accept is not None:
            # Accepted when answered, whether or not the client is still there to read it.
            accept(reply.accept)
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers:
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("sandbox gateway: " + format, *args)
