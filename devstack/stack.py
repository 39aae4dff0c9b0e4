"""The local stack: the whole service on one machine, with no AWS account.

An embedded AWS emulator (or the endpoint in AWS_ENDPOINT_URL) holds the tables and queues; a
sandbox SMS gateway stands in for the real one (unless SENDER_API_URL names a gateway); the
Chalice app is served over HTTP, and its Lambdas run as they would in AWS: the scheduler tick
on a timer, the fan-out worker, the sender and the CSV import worker behind SQS pollers.

Everything is configured from the environment (see `LocalConfig`). The stack is a list of
components started in order and stopped in reverse.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

from chalicelib import logs
from chalicelib.roles import WRITING_ROLES, split_token_entry
from chalicelib.settings import AuthMode, Settings, SettingsError
from devstack import faults, stack_file
from devstack.api import tag_requests
from devstack.faults import AwsFaults
from devstack.gateway import FaultProfile, SandboxGateway
from devstack.outbox import ReportOutbox
from devstack.poller import InvocationTimedOut, LambdaContext, SqsPoller, invoke

logger = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[1]
CHALICE_STAGE = "dev"
DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"
DEFAULT_REGION = "us-east-1"
DEFAULT_TABLE_PREFIX = "sms-local"
# Loopback only: the emulator accepts any credentials, so nobody else may reach it.
EMULATOR_HOST = "127.0.0.1"
_START_TIMEOUT_SECONDS = 15.0
_STOP_TIMEOUT_SECONDS = 10.0
_HEALTH_CHECK_SECONDS = 1.0
# Credentials the emulator sees; real ones must never leak into a local run.
_DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}
_REAL_CREDENTIAL_VARIABLES = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE")
_NOISY_LOGGERS = ("werkzeug", "botocore", "boto3", "urllib3", "moto", "pynamodb")

# The Lambdas of app.py the stack runs, by their Chalice names. Each runs with its timeout from
# .chalice/config.json, as in AWS, so a handler too slow there fails here too.
SCHEDULE_FUNCTION = "scheduler_tick"
FANOUT_FUNCTION = "advance_mailing"
SEND_FUNCTION = "send_messages"
IMPORT_FUNCTION = "import_clients"
# Chunks of a CSV import written at once (in AWS the event source's MaximumConcurrency is 4).
IMPORT_POLLERS = 2
_CHALICE_DEFAULT_TIMEOUT_SECONDS = 60  # when config.json sets none
DEFAULT_SCHEDULER_INTERVAL_SECONDS = 10.0
DEFAULT_SENDER_POLLERS = 2
# Six times the function timeout in AWS; locally a job whose sender crashed comes back after a
# minute. Never below the function's timeout, which Lambda requires of a queue.
DEFAULT_SEND_VISIBILITY_SECONDS = 60
FANOUT_VISIBILITY_SECONDS = 120
# The sender counts a job failing its last receive as a DLQ arrival, so it must know the count.
MAX_RECEIVE_COUNT = Settings.model_fields["max_receive_count"].default
_MAX_VISIBILITY_SECONDS = 43200
_MAX_SENDER_POLLERS = 32
# Lambda allows a function at most 15 minutes.
_MAX_LAMBDA_TIMEOUT_SECONDS = 900
SANDBOX_LEDGER_PATH = "/_sandbox/ledger"
LOCAL_REPORT_SENDER = "reports@sms-campaigns.local"
LOCAL_REPORT_RECIPIENT = "operator@sms-campaigns.local"
LOCAL_OUTBOX = PROJECT_DIR / "build" / "outbox"


class StackError(RuntimeError):
    """The local stack cannot start; the message says why and what to change."""


class ConfigError(StackError):
    """A local-stack variable has a value the stack cannot run with (exit code 2, as settings)."""


class Component(Protocol):
    """One long-running part of the local stack."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def is_alive(self) -> bool: ...


@dataclass(frozen=True)
class LocalConfig:
    """How the local stack runs, read from its environment (names are a public interface)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    moto_port: int = 0
    # Set: use that AWS endpoint (a shared emulator, LocalStack, ...) and embed none.
    aws_endpoint_url: str | None = None
    scheduler_interval: float = DEFAULT_SCHEDULER_INTERVAL_SECONDS
    sender_pollers: int = DEFAULT_SENDER_POLLERS
    # None: DEFAULT_SEND_VISIBILITY_SECONDS, or the sender's timeout if that is longer.
    send_visibility_timeout: int | None = None
    sandbox_port: int = 0
    # None: SENDER_API_URL names the gateway to talk to, and no sandbox runs.
    sandbox_profile: FaultProfile | None = field(default_factory=FaultProfile)
    # Faults injected into the service's own AWS calls (AWS_FAULTS); none by default.
    aws_faults: AwsFaults = field(default_factory=AwsFaults)
    # Functions whose timeout differs from .chalice/config.json here (LAMBDA_TIMEOUTS).
    lambda_timeouts: Mapping[str, float] = field(default_factory=dict)
    # LOCAL_IAM: each function's AWS calls checked against its role (see devstack/iam.py).
    iam_enforced: bool = True
    iam_template: Path | None = None  # LOCAL_IAM_TEMPLATE; None: infra/resources.yaml

    @property
    def embeds_emulator(self) -> bool:
        return self.aws_endpoint_url is None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> LocalConfig:
        """Read the local stack's variables (see __main__'s help); a bad one raises ConfigError."""
        external_gateway = bool(environ.get("SENDER_API_URL"))
        if external_gateway and not environ.get("SENDER_API_TOKEN"):
            raise ConfigError(
                "SENDER_API_URL is set but SENDER_API_TOKEN is not: set both to use that "
                "gateway, or neither to use the sandbox gateway"
            )
        profile = None
        if not external_gateway:
            try:
                profile = FaultProfile.from_env(environ)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        try:
            aws_faults = AwsFaults.from_env(environ)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls(
            host=environ.get("HOST") or DEFAULT_HOST,
            port=_port(environ, "PORT", DEFAULT_PORT),
            moto_port=_port(environ, "MOTO_PORT", 0),
            aws_endpoint_url=environ.get("AWS_ENDPOINT_URL") or None,
            scheduler_interval=_positive_seconds(
                environ, "SCHEDULER_INTERVAL_SECONDS", DEFAULT_SCHEDULER_INTERVAL_SECONDS
            ),
            sender_pollers=_whole_number(
                environ, "SENDER_POLLERS", DEFAULT_SENDER_POLLERS, 1, _MAX_SENDER_POLLERS
            ),
            send_visibility_timeout=_whole_number(
                environ, "SEND_VISIBILITY_TIMEOUT_SECONDS", None, 1, _MAX_VISIBILITY_SECONDS
            ),
            sandbox_port=_port(environ, "SANDBOX_PORT", 0),
            sandbox_profile=profile,
            aws_faults=aws_faults,
            lambda_timeouts=_lambda_timeouts(environ.get("LAMBDA_TIMEOUTS") or ""),
            iam_enforced=_iam_enforced(environ),
            iam_template=_existing_file(environ, "LOCAL_IAM_TEMPLATE"),
        )


def _lambda_timeouts(text: str) -> dict[str, float]:
    """`function=seconds,...`: timeouts that replace the deployed ones in this local run."""
    timeouts: dict[str, float] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, sep, raw = (piece.strip() for piece in entry.partition("="))
        try:
            seconds = float(raw) if sep else math.nan
        except ValueError:
            seconds = math.nan
        if not name or not (1 <= seconds <= _MAX_LAMBDA_TIMEOUT_SECONDS):
            raise ConfigError(
                f"LAMBDA_TIMEOUTS: {entry!r} is not function=seconds with seconds from 1 to "
                f"{_MAX_LAMBDA_TIMEOUT_SECONDS} (e.g. send_messages=5)"
            )
        timeouts[name] = seconds
    return timeouts


def _iam_enforced(environ: Mapping[str, str]) -> bool:
    raw = (environ.get("LOCAL_IAM") or "enforce").strip().lower()
    if raw not in ("enforce", "off"):
        raise ConfigError(f"LOCAL_IAM must be enforce or off, got {raw!r}")
    return raw == "enforce"


def _existing_file(environ: Mapping[str, str], name: str) -> Path | None:
    raw = (environ.get(name) or "").strip()
    if not raw:
        return None
    path = Path(raw)
    if not path.is_file():
        raise ConfigError(f"{name} must name an existing file, got {raw!r}")
    return path


def _port(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name) or ""
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a port number, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} must be between 0 and 65535, got {port}")
    return port


def _whole_number(
    environ: Mapping[str, str], name: str, default: Any, minimum: int, maximum: int
) -> Any:
    raw = (environ.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def _positive_seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = (environ.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def prepare_environment(config: LocalConfig, environ: MutableMapping[str, str]) -> bool:
    """Fill in local defaults in `environ`; True when an API token was generated for this run."""
    # `or`, not setdefault: an empty variable (FOO= in a .env file) means unset here too.
    environ["AWS_DEFAULT_REGION"] = environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    environ["TABLE_PREFIX"] = environ.get("TABLE_PREFIX") or DEFAULT_TABLE_PREFIX
    if config.embeds_emulator:
        environ.update(_DUMMY_CREDENTIALS)
        for name in _REAL_CREDENTIAL_VARIABLES:
            environ.pop(name, None)
    # Daily reports go to a local address and, readable, into the outbox folder.
    environ["REPORT_SENDER"] = environ.get("REPORT_SENDER") or LOCAL_REPORT_SENDER
    environ["REPORT_RECIPIENTS"] = environ.get("REPORT_RECIPIENTS") or LOCAL_REPORT_RECIPIENT
    environ["REPORT_OUTBOX_DIR"] = environ.get("REPORT_OUTBOX_DIR") or str(LOCAL_OUTBOX)
    static_auth = (environ.get("AUTH_MODE") or AuthMode.STATIC) == AuthMode.STATIC
    if static_auth and not (environ.get("API_TOKENS") or "").strip():
        environ["API_TOKENS"] = secrets.token_urlsafe(24)
        return True
    return False


def apply_stage_environment(
    stage_variables: dict[str, str], environ: MutableMapping[str, str]
) -> None:
    """Give the process the stage's config.json variables, as Lambda would; the shell's win.

    Our own CLIFactory keeps them in a private copy of the environment (unlike `chalice local`,
    which writes them over os.environ), so without this STAGE etc. would never be seen.
    """
    for name, value in stage_variables.items():
        environ.setdefault(name, value)


# Connections an AWS client may keep open here: every poller thread and sender thread of every
# local "Lambda" shares one client per service.
LOCAL_POOL_CONNECTIONS = 64


def share_connection_pools_like_lambdas() -> None:
    """Give every AWS client of this process LOCAL_POOL_CONNECTIONS reusable connections.

    On AWS each Lambda instance has its own clients, each with botocore's 10 connections. Here
    all the pollers' invocations (2 senders x 10 threads, the fan-out, the API...) share one
    process and so one client per service: past 10 threads botocore opened a connection per
    request and dropped it after, and the emulator started a thread per connection (about 5% of
    both processes' time in the delivery benchmark). Idempotent; clients made earlier keep theirs.
    """
    from botocore.endpoint import EndpointCreator

    create = EndpointCreator.create_endpoint
    if getattr(create, "_local_pool", False):
        return

    @functools.wraps(create)
    def create_endpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
        wanted = kwargs.get("max_pool_connections") or 0
        kwargs["max_pool_connections"] = max(wanted, LOCAL_POOL_CONNECTIONS)
        return create(self, *args, **kwargs)

    create_endpoint._local_pool = True  # type: ignore[attr-defined]
    EndpointCreator.create_endpoint = create_endpoint  # type: ignore[method-assign]


class MotoEmulator:
    """moto in server mode on loopback, in a process of its own.

    Its own process gives the emulator a CPU core of its own: under load it, not the service,
    is the bottleneck (DynamoDB requests are serialised there to stay atomic; see emulator.py).
    """

    name = "aws-emulator"

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._process: subprocess.Popen[str] | None = None
        self.endpoint_url = ""

    def start(self) -> None:
        if self._port:
            _ensure_port_free(EMULATOR_HOST, self._port, "MOTO_PORT")
        process = subprocess.Popen(
            [sys.executable, "-m", "devstack.emulator", EMULATOR_HOST, str(self._port)],
            cwd=str(PROJECT_DIR),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._process = process
        line: list[str] = []

        def read_banner() -> None:
            assert process.stdout is not None
            line.append(process.stdout.readline())

        try:
            _run_with_timeout(read_banner, _START_TIMEOUT_SECONDS, "the AWS emulator")
        except StackError:
            self.stop()
            raise
        if not line or not line[0].startswith("EMULATOR "):
            self.stop()
            raise StackError("the AWS emulator did not start (is MOTO_PORT free?)")
        self.endpoint_url = line[0].split()[1]

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The emulator's process id while it runs (benchmarks read its memory)."""
        return self._process.pid if self._process is not None else None


class ApiServer:
    """The Chalice app served over HTTP in this process, as `chalice local` would serve it."""

    name = "api"

    def __init__(self, chalice_config: Any, host: str, port: int) -> None:
        self._config = chalice_config
        self._host = host
        self._port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server.server_address[1] if self._server else self._port

    def start(self) -> None:
        import chalice.local

        # Without it keep-alive clients wait ~40 ms per request on delayed ACKs.
        chalice.local.ChaliceRequestHandler.disable_nagle_algorithm = True
        app = self._config.chalice_app
        try:
            self._server = chalice.local.create_local_server(
                app, self._config, self._host, self._port
            )
        except OSError as exc:
            raise StackError(
                f"cannot listen on {self._host}:{self._port}: {exc.strerror or exc}; "
                "set PORT to a free port (or HOST to another address)"
            ) from None
        # Each request's route runs as the API handler's invocation, its authorizer as its own.
        tag_requests(self._server, app, self._config)
        self._thread = threading.Thread(
            target=self._server.server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="api-server",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(_STOP_TIMEOUT_SECONDS)
            self._thread = None

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


@dataclass(frozen=True)
class QueueUrls:
    """The service's queues on the AWS endpoint."""

    send: str
    send_dlq: str
    fanout: str
    fanout_dlq: str
    import_: str
    import_dlq: str
    account: str
    # As the send queue has it, which may not be what this run asked for if it existed.
    send_visibility_timeout: int


def ensure_queues(
    sqs: Any,
    prefix: str,
    *,
    send_visibility_timeout: int,
    fanout_visibility_timeout: int,
    import_visibility_timeout: int = FANOUT_VISIBILITY_SECONDS,
    max_receive_count: int = MAX_RECEIVE_COUNT,
) -> QueueUrls:
    """Create the send, fan-out and import queues and their dead-letter queues where missing.

    A queue that exists is used as it is: on a shared endpoint someone may have tuned it, and
    SQS refuses to "create" an existing queue with other attributes.
    """
    created: list[str] = []
    send_dlq, send_dlq_attributes = _ensure_queue(sqs, f"{prefix}-send-dlq", {}, created)
    send_dlq_arn = send_dlq_attributes["QueueArn"]
    send, send_attributes = _ensure_queue(
        sqs,
        f"{prefix}-send",
        {
            "VisibilityTimeout": str(send_visibility_timeout),
            "RedrivePolicy": _redrive_to(send_dlq_arn, max_receive_count),
        },
        created,
    )
    fanout_dlq, fanout_dlq_attributes = _ensure_queue(sqs, f"{prefix}-fanout-dlq", {}, created)
    fanout_dlq_arn = fanout_dlq_attributes["QueueArn"]
    fanout, _ = _ensure_queue(
        sqs,
        f"{prefix}-fanout",
        {
            "VisibilityTimeout": str(fanout_visibility_timeout),
            "RedrivePolicy": _redrive_to(fanout_dlq_arn, max_receive_count),
        },
        created,
    )
    import_dlq, import_dlq_attributes = _ensure_queue(sqs, f"{prefix}-import-dlq", {}, created)
    import_, _ = _ensure_queue(
        sqs,
        f"{prefix}-import",
        {
            "VisibilityTimeout": str(import_visibility_timeout),
            "RedrivePolicy": _redrive_to(import_dlq_attributes["QueueArn"], max_receive_count),
        },
        created,
    )
    if created:
        logger.info("created queues: %s", ", ".join(created))
    else:
        logger.info("queues %s-* already exist", prefix)
    return QueueUrls(
        send,
        send_dlq,
        fanout,
        fanout_dlq,
        import_,
        import_dlq,
        account=send_dlq_arn.split(":")[4],
        send_visibility_timeout=int(send_attributes["VisibilityTimeout"]),
    )


def _redrive_to(dlq_arn: str, max_receive_count: int) -> str:
    return json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)})


def _ensure_queue(
    sqs: Any, name: str, attributes: dict[str, str], created: list[str]
) -> tuple[str, dict[str, str]]:
    """The queue's URL, ARN and visibility timeout, creating it first if it does not exist."""
    try:
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except sqs.exceptions.QueueDoesNotExist:
        url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        created.append(name)
    found = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["QueueArn", "VisibilityTimeout"]
    )["Attributes"]
    return url, found


def queue_name(url: str | None) -> str:
    return (url or "").rstrip("/").rsplit("/", 1)[-1]


class ScheduleTrigger:
    """EventBridge's rate schedule for one Lambda: invokes it every `interval` seconds.

    The handler gets the scheduled event and a context exactly as Lambda would pass them. A
    failing invocation is logged and the schedule goes on, as EventBridge's would.
    """

    name = "scheduler"

    def __init__(
        self,
        handler: Callable[[dict[str, Any], Any], Any],
        function_name: str,
        interval: float,
        *,
        rule_name: str,
        region: str,
        account: str,
        function_timeout: float,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self._handler = handler
        self._function_name = function_name
        self._interval = interval
        self._region = region
        self._account = account
        self._rule_arn = f"arn:aws:events:{region}:{account}:rule/{rule_name}"
        self._function_arn = f"arn:aws:lambda:{region}:{account}:function:{function_name}"
        self._function_timeout = function_timeout
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.invocations = 0
        self.errors = 0
        self.timeouts = 0

    def start(self) -> None:
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stopping,), name=self.name, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(_STOP_TIMEOUT_SECONDS)
            if self._thread.is_alive():
                # A daemon thread: it cannot keep the process alive, only finish late.
                logger.warning("%s: a tick is still running; left behind", self.name)
            self._thread = None

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def scheduled_event(self) -> dict[str, Any]:
        """The event EventBridge sends a scheduled Lambda, for this moment."""
        return {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "account": self._account,
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": self._region,
            "resources": [self._rule_arn],
            "detail": {},
        }

    def _run(self, stopping: threading.Event) -> None:
        log_stream_name = f"{datetime.now(UTC):%Y/%m/%d}/[$LATEST]{uuid.uuid4().hex}"
        next_tick = time.monotonic()  # the first tick at once: work may be due already
        while not stopping.wait(max(0.0, next_tick - time.monotonic())):
            self.invoke(log_stream_name)
            # A tick that overran its interval is followed by one tick, not a catch-up burst.
            next_tick = max(next_tick + self._interval, time.monotonic())

    def invoke(self, log_stream_name: str = "local") -> None:
        """One scheduled invocation; an exception is logged, never raised."""
        context = LambdaContext(
            function_name=self._function_name,
            invoked_function_arn=self._function_arn,
            log_stream_name=log_stream_name,
            timeout_seconds=self._function_timeout,
        )
        self.invocations += 1
        event = self.scheduled_event()
        try:
            invoke(
                self._function_name, self._function_timeout, lambda: self._handler(event, context)
            )
        except InvocationTimedOut as exc:
            self.errors += 1
            self.timeouts += 1
            # One line, no traceback: the tick did nothing wrong but run long.
            logger.error(
                "%s: the scheduled invocation %s; Lambda would have stopped it",
                self._function_name,
                exc,
            )
        except Exception:
            self.errors += 1
            logger.exception("%s: the scheduled invocation failed", self._function_name)


@dataclass
class LocalStack:
    """The emulator, the queues, the gateway, the API and the Lambdas; stopped in reverse."""

    config: LocalConfig
    project_dir: Path = PROJECT_DIR
    # os.environ in a real run: boto3 and PynamoDB read AWS_ENDPOINT_URL etc. from there.
    environ: MutableMapping[str, str] = field(default_factory=lambda: os.environ)
    components: list[Component] = field(default_factory=list)
    settings: Settings | None = None
    aws_endpoint_url: str = ""
    token_generated: bool = False
    api: ApiServer | None = None
    queues: QueueUrls | None = None
    sandbox: SandboxGateway | None = None
    # Each Lambda's timeout in seconds, from .chalice/config.json.
    timeouts: dict[str, float] = field(default_factory=dict)
    # The AWS faults injected by kind, once the stack has stopped (see faults.py).
    aws_faults_injected: dict[str, int] = field(default_factory=dict)
    # The template whose roles the functions run under; None: IAM is not enforced.
    iam_template: Path | None = None

    def start(self) -> None:
        """Start everything; on failure stop what was started and raise StackError."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        from chalice.cli.factory import CLIFactory

        self.token_generated = prepare_environment(self.config, self.environ)
        try:
            chalice_config = CLIFactory(str(self.project_dir)).create_config_obj(
                chalice_stage_name=CHALICE_STAGE
            )
        except RuntimeError as exc:  # chalice's way of saying .chalice/config.json is unusable
            raise StackError(str(exc)) from None
        apply_stage_environment(chalice_config.environment_variables, self.environ)
        # Validated before anything starts, so a bad setting fails in a fraction of a second.
        settings = Settings.from_env(self.environ)
        app = chalice_config.chalice_app
        functions = (SCHEDULE_FUNCTION, FANOUT_FUNCTION, SEND_FUNCTION, IMPORT_FUNCTION)
        handlers = {name: _lambda_handler(app, name) for name in functions}
        unknown = sorted(set(self.config.lambda_timeouts) - set(functions))
        if unknown:
            raise ConfigError(
                f"LAMBDA_TIMEOUTS names {', '.join(unknown)}; the local stack's functions are "
                + ", ".join(functions)
            )
        self.timeouts = {
            name: self.config.lambda_timeouts.get(name) or _function_timeout(chalice_config, name)
            for name in functions
        }
        send_visibility_timeout = self._send_visibility_timeout()
        if self.config.port:
            # Checked again by the real bind; this only spares starting the emulator in vain.
            _ensure_port_free(self.config.host, self.config.port, "PORT")

        if self.config.embeds_emulator:
            emulator = MotoEmulator(self.config.moto_port)
            self._add(emulator)
            self.aws_endpoint_url = emulator.endpoint_url
        else:
            self.aws_endpoint_url = self.config.aws_endpoint_url or ""
        # One variable redirects boto3, PynamoDB and Powertools alike (no Meta.host needed).
        self.environ["AWS_ENDPOINT_URL"] = self.aws_endpoint_url
        settings = settings.model_copy(update={"aws_endpoint_url": self.aws_endpoint_url})

        share_connection_pools_like_lambdas()
        from chalicelib import aws

        sqs = aws.client("sqs", settings)
        if self.config.embeds_emulator and settings.report_sender:
            # SES sends only from a verified address; the embedded emulator starts empty.
            ses = aws.client("ses", settings)
            ses.verify_email_identity(EmailAddress=settings.report_sender)
        self.queues = self._install_queues(
            sqs, settings.table_prefix, send_visibility_timeout, settings.max_receive_count
        )
        if self.config.sandbox_profile is not None:
            self._start_sandbox(self.config.sandbox_profile)
        # Read again: the queue and gateway addresses exist only now.
        self.settings = Settings.from_env(self.environ)
        if self.config.iam_enforced:
            self._enforce_iam(app, self.settings)

        self._install_services(self.settings)
        # From here on the service's own calls (inside invocations) may fail as AWS's do.
        faults.inject_aws_faults(self.config.aws_faults)
        self.api = ApiServer(chalice_config, self.config.host, self.config.port)
        self._add(self.api)
        self._start_workers(sqs, handlers, app.app_name)

    def _send_visibility_timeout(self) -> int:
        send_timeout = math.ceil(self.timeouts[SEND_FUNCTION])
        chosen = self.config.send_visibility_timeout
        if chosen is None:
            return max(DEFAULT_SEND_VISIBILITY_SECONDS, send_timeout)
        if chosen < send_timeout:
            # Lambda refuses a queue whose visibility timeout is shorter than the function's.
            raise ConfigError(
                f"SEND_VISIBILITY_TIMEOUT_SECONDS must be at least the timeout of {SEND_FUNCTION} "
                f"({send_timeout} s in .chalice/config.json), got {chosen}"
            )
        return chosen

    def _install_queues(
        self, sqs: Any, prefix: str, send_visibility_timeout: int, max_receive_count: int
    ) -> QueueUrls:
        try:
            queues = ensure_queues(
                sqs,
                prefix,
                max_receive_count=max_receive_count,
                send_visibility_timeout=send_visibility_timeout,
                fanout_visibility_timeout=max(
                    FANOUT_VISIBILITY_SECONDS, math.ceil(self.timeouts[FANOUT_FUNCTION])
                ),
                import_visibility_timeout=math.ceil(self.timeouts[IMPORT_FUNCTION]),
            )
        except Exception as exc:
            raise StackError(
                f"cannot create the queues at {self.aws_endpoint_url}: {exc}"
            ) from None
        for name, url in (
            ("SEND_QUEUE_URL", queues.send),
            ("SEND_DLQ_URL", queues.send_dlq),
            ("FANOUT_QUEUE_URL", queues.fanout),
            ("IMPORT_QUEUE_URL", queues.import_),
        ):
            # `or`: an empty variable means unset, as everywhere in the local stack.
            self.environ[name] = self.environ.get(name) or url
        return queues

    def _enforce_iam(self, app: Any, settings: Settings) -> None:
        """From here on, each function's AWS calls run under its role in the template."""
        from chalicelib import aws
        from devstack import iam

        if self.queues is None:
            raise RuntimeError("IAM needs the queues")
        template = self.config.iam_template or iam.DEFAULT_TEMPLATE
        queues = self.queues
        by_logical_id = {
            "SendQueue": settings.send_queue_url or queues.send,
            "SendDeadLetterQueue": settings.send_dlq_url or queues.send_dlq,
            "FanoutQueue": settings.fanout_queue_url or queues.fanout,
            "FanoutDeadLetterQueue": queues.fanout_dlq,
            "ImportQueue": settings.import_queue_url or queues.import_,
            "ImportDeadLetterQueue": queues.import_dlq,
        }
        needs_secrets = settings.api_tokens_secret_id or settings.sender_api_token_secret_id
        try:
            enforcer = iam.for_local_stack(
                app,
                settings,
                account=queues.account,
                queue_urls=by_logical_id,
                template_path=template,
                secrets_client=aws.client("secretsmanager", settings) if needs_secrets else None,
            )
        except iam.IamConfigError as exc:
            message = f"LOCAL_IAM: {template}: {exc} (LOCAL_IAM=off runs without)"
            raise ConfigError(message) from None
        iam.enforce(enforcer)
        self.iam_template = template
        logger.info("IAM enforced: each function runs under its role in %s", template)

    def _start_sandbox(self, profile: FaultProfile) -> None:
        if self.environ.get("SENDER_API_TOKEN"):
            logger.warning(
                "SENDER_API_TOKEN is ignored without SENDER_API_URL: the sandbox "
                "gateway uses a token of its own"
            )
        token = secrets.token_urlsafe(24)
        sandbox = SandboxGateway(token, profile, host=EMULATOR_HOST, port=self.config.sandbox_port)
        try:
            self._add(sandbox)
        except OSError as exc:
            raise StackError(f"{exc}; set SANDBOX_PORT to a free port (0 picks one)") from None
        self.sandbox = sandbox
        self.environ["SENDER_API_URL"] = sandbox.url
        self.environ["SENDER_API_TOKEN"] = token

    def _start_workers(
        self, sqs: Any, handlers: dict[str, Callable[..., Any]], app_name: str
    ) -> None:
        """The Lambdas, each invoked as its trigger in AWS would invoke it; the tick starts last."""
        settings = self.settings
        if settings is None or self.queues is None:
            raise RuntimeError("the workers need the queues and the settings")
        region, account = settings.aws_region, self.queues.account
        self._add(
            SqsPoller(
                SEND_FUNCTION,
                sqs,
                settings.send_queue_url or self.queues.send,
                handlers[SEND_FUNCTION],
                # As the deployed event source: the service's setting.
                batch_size=settings.sender_batch_size,
                concurrency=self.config.sender_pollers,
                report_batch_item_failures=True,
                function_timeout=self.timeouts[SEND_FUNCTION],
                region=region,
                account=account,
            )
        )
        self._add(
            SqsPoller(
                FANOUT_FUNCTION,
                sqs,
                settings.fanout_queue_url or self.queues.fanout,
                handlers[FANOUT_FUNCTION],
                batch_size=1,
                concurrency=1,
                # Chalice declares no partial batch failures for it; with batch 1 none are needed.
                report_batch_item_failures=False,
                function_timeout=self.timeouts[FANOUT_FUNCTION],
                region=region,
                account=account,
            )
        )
        self._add(
            SqsPoller(
                IMPORT_FUNCTION,
                sqs,
                settings.import_queue_url or self.queues.import_,
                handlers[IMPORT_FUNCTION],
                batch_size=1,
                concurrency=IMPORT_POLLERS,
                report_batch_item_failures=False,
                function_timeout=self.timeouts[IMPORT_FUNCTION],
                region=region,
                account=account,
            )
        )
        self._add(
            ScheduleTrigger(
                handlers[SCHEDULE_FUNCTION],
                SCHEDULE_FUNCTION,
                self.config.scheduler_interval,
                rule_name=f"{app_name}-{CHALICE_STAGE}-{SCHEDULE_FUNCTION}",
                region=region,
                account=account,
                function_timeout=self.timeouts[SCHEDULE_FUNCTION],
            )
        )

    def _install_services(self, settings: Settings) -> None:
        from chalicelib.container import Services, use_services
        from chalicelib.storage.models import create_tables

        outbox = ReportOutbox.from_env(self.environ)
        # EMF blobs go with the log lines (stderr): stdout carries the lines programs read.
        services = Services.build(
            settings, write_metrics=_to_stderr, report_sinks=[outbox] if outbox else []
        )
        try:
            created = create_tables(services.models)
        except Exception as exc:
            raise StackError(
                f"cannot create the tables at {self.aws_endpoint_url}: {exc}"
            ) from None
        if created:
            logger.info("created tables: %s", ", ".join(created))
        else:
            logger.info("tables %s-* already exist", settings.table_prefix)
        use_services(services)

    def _add(self, component: Component) -> None:
        started = time.monotonic()
        component.start()
        self.components.append(component)
        logger.info("%s started in %.2f s", component.name, time.monotonic() - started)

    def stop(self) -> None:
        """Stop the started components in reverse order; a failing one does not block the rest."""
        while self.components:
            component = self.components.pop()
            try:
                component.stop()
            except Exception:
                logger.exception("%s did not stop cleanly", component.name)
        if self.config.aws_faults.active:
            self.aws_faults_injected = faults.injected_aws_faults()
            logger.info(
                "AWS faults injected: %s",
                ", ".join(f"{kind}={n}" for kind, n in self.aws_faults_injected.items()) or "none",
                extra={"aws_faults_injected": self.aws_faults_injected},
            )
        faults.inject_aws_faults(None)
        if self.iam_template is not None:
            from devstack import iam

            iam.enforce(None)
            self.iam_template = None
        from chalicelib.container import use_services

        use_services(None)

    @property
    def sandbox_url(self) -> str | None:
        return self.sandbox.url if self.sandbox is not None else None

    def dead_components(self) -> list[str]:
        return [c.name for c in self.components if not c.is_alive()]

    @property
    def api_url(self) -> str:
        host = self.config.host
        if host in ("", "0.0.0.0", "::"):  # noqa: S104 - only turns a bind address into a URL
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        port = self.api.port if self.api else self.config.port
        return f"http://{host}:{port}"


def _function_timeout(chalice_config: Any, name: str) -> float:
    """The Lambda's timeout in seconds as `chalice package` would deploy it."""
    timeout = chalice_config.scope(CHALICE_STAGE, name).lambda_timeout
    return float(timeout or _CHALICE_DEFAULT_TIMEOUT_SECONDS)


def _lambda_handler(app: Any, name: str) -> Callable[..., Any]:
    """The `handler(event, context)` Lambda would call for one of app.py's functions."""
    handler = app.handler_map.get(name)
    if handler is None:
        raise StackError(f"app.py registers no Lambda named {name!r}; the local stack runs it")
    return handler


# The banner's last line, the last line of the start-up output.
BANNER_END = "Press Ctrl+C to stop."


def banner(stack: LocalStack) -> str:
    """What a developer needs to start using the local API; the only place the token shows."""
    settings = stack.settings
    if settings is None:
        raise RuntimeError("the banner needs a started stack")
    url = stack.api_url
    emulator = "embedded moto" if stack.config.embeds_emulator else "from AWS_ENDPOINT_URL"
    lines = [
        f"SMS campaign service - local stack (stage {settings.stage})",
        f"  API      {url}",
        f"  Docs     {url}/docs",
        f"  Admin    {url}/admin",
        f"  Health   {url}/health",
        f"  AWS      {stack.aws_endpoint_url} ({emulator}; tables {settings.table_prefix}-*; "
        f"faults: {stack.config.aws_faults.summary()})",
        f"  Queues   {_queue_summary(stack, settings)}",
        f"  Gateway  {_gateway_summary(stack, settings)}",
    ]
    if stack.sandbox_url:
        lines.append(f"  Ledger   {stack.sandbox_url}{SANDBOX_LEDGER_PATH}")
    outbox = ReportOutbox.from_env(stack.environ)
    if outbox is not None:
        lines.append(
            f"  Reports  POST {url}/reports/daily e-mails "
            f"{', '.join(settings.report_recipients)}; copies in {outbox.folder}"
        )
    iam = (
        f"enforced: each function under its role in {stack.iam_template} (LOCAL_IAM=off disables)"
        if stack.iam_template is not None
        else "off (LOCAL_IAM=off): every AWS call is allowed"
    )
    lines.append(f"  IAM      {iam}")
    config = stack.config
    lines.append(
        f"  Workers  scheduler tick every {config.scheduler_interval:g} s; "
        f"{config.sender_pollers} sender(s) x batch {settings.sender_batch_size}; "
        f"1 fan-out worker; {IMPORT_POLLERS} import workers"
    )
    if settings.auth_mode is AuthMode.STATIC and settings.api_tokens:
        role, token = split_token_entry(settings.api_tokens[0])
        origin = (
            "generated for this run; set API_TOKENS to choose one"
            if stack.token_generated
            else "from API_TOKENS"
        )
        if len(settings.api_tokens) > 1:
            origin += f", first of {len(settings.api_tokens)}"
        origin += f", role {role}"
        header = shlex.quote(f"Authorization: Bearer {token}")
        lines += [
            f"  Token    {token}  ({origin})",
            f"  Try      curl -H {header} {url}/clients",
        ]
    else:
        lines.append(f"  Auth     {settings.auth_mode.value} (issuer {settings.oidc_issuer})")
    lines.append(
        f"  Chalice  chalice local --stage local --port 8001 serves this stack's data too "
        f"(finds it in {stack_file.path(stack.environ)})"
    )
    lines.append(BANNER_END)
    return "\n".join(lines)


def _queue_summary(stack: LocalStack, settings: Settings) -> str:
    send = queue_name(settings.send_queue_url)
    if stack.queues is not None and settings.send_queue_url == stack.queues.send:
        send += f" (visibility {stack.queues.send_visibility_timeout} s)"
    names = [
        send,
        queue_name(settings.send_dlq_url),
        queue_name(settings.fanout_queue_url),
        queue_name(settings.import_queue_url),
    ]
    if stack.queues is not None:
        names += [queue_name(stack.queues.fanout_dlq), queue_name(stack.queues.import_dlq)]
    return ", ".join(names)


def _gateway_summary(stack: LocalStack, settings: Settings) -> str:
    if stack.sandbox is None:
        # The token stays out: unlike the API token, it is a real credential.
        return f"external gateway at {settings.sender_api_url} (token from SENDER_API_TOKEN)"
    return f"sandbox {stack.sandbox.url} (faults: {fault_summary(stack.sandbox.profile)})"


def fault_summary(profile: FaultProfile) -> str:
    """The profile's settings that differ from a perfect gateway, or "none"."""
    defaults = FaultProfile().to_dict()
    changed = [
        f"{name}={value}" for name, value in profile.to_dict().items() if value != defaults[name]
    ]
    return ", ".join(changed) or "none"


def _to_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")


def configure_logging(environ: MutableMapping[str, str] | None = None) -> None:
    # The same lines as in Lambda (ids, correlation ids, secrets scrubbed), on stderr: stdout
    # carries the READY lines that programs read. Read by people here: text unless LOG_FORMAT
    # says json (set in the environment, so `chalice local --stage local` follows it).
    environ = os.environ if environ is None else environ
    environ["LOG_FORMAT"] = environ.get("LOG_FORMAT") or "text"
    try:
        logs.configure(stream=sys.stderr)
    except ValueError:
        # A bad LOG_LEVEL or LOG_FORMAT: the settings check refuses it by name (exit code 2)
        # right after.
        logs.configure(level="INFO", stream=sys.stderr, log_format="text")
    # The stack's own lines (start, stop, pollers) at the service's level: devstack is not
    # under chalicelib, whose logger level logs.configure sets.
    logging.getLogger("devstack").setLevel(logging.getLogger("chalicelib").level)
    # werkzeug logs every emulator request (and halves its throughput doing so).
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run(out: TextIO | None = None, *, demo: bool = False) -> int:
    """Run the local stack from os.environ until SIGINT or SIGTERM; the process exit code.

    With `demo`, sample clients and a mailing are loaded over the API once it serves.
    """
    environ = os.environ
    out = sys.stdout if out is None else out
    configure_logging()
    stop_requested = threading.Event()
    _on_stop_signals(stop_requested.set)

    # The pid lets a wrapper (make, a test) signal this process rather than itself.
    logger.info("starting the local stack (pid %d)", os.getpid())
    try:
        stack = LocalStack(LocalConfig.from_env(environ), environ=environ)
        stack.start()
    except (SettingsError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1

    # Where `chalice local --stage local` finds this stack.
    _write_stack_file(stack)
    # Lines for programs (tests, scripts); READY says everything serves. The banner comes
    # last, so the URL and the token are what a developer sees once start-up is over.
    if stack.sandbox_url:
        print(f"SANDBOX {stack.sandbox_url}", file=out, flush=True)
    print(f"READY {stack.api_url}", file=out, flush=True)
    print(banner(stack), file=out, flush=True)
    if demo:
        _run_demo(stack, out)

    exit_code = 0
    while not stop_requested.wait(_HEALTH_CHECK_SECONDS):
        dead = stack.dead_components()
        if dead:
            logger.error("stopping: %s stopped unexpectedly", ", ".join(dead))
            exit_code = 1
            break
    logger.info("stopping the local stack")
    stack_file.remove(environ, pid=os.getpid())
    stack.stop()
    if stack.config.aws_faults.active:
        # For programs (tests): the faults injected into the service's AWS calls, by kind.
        print(f"AWS_FAULTS_INJECTED {json.dumps(stack.aws_faults_injected)}", file=out, flush=True)
    logger.info("stopped")
    return exit_code


def _write_stack_file(stack: LocalStack) -> None:
    try:
        written = stack_file.write(
            stack.environ,
            pid=os.getpid(),
            api_url=stack.api_url,
            embedded_emulator=stack.config.embeds_emulator,
        )
    except OSError as exc:
        # The stack serves all the same; only `chalice local` cannot find it.
        logger.warning("cannot write the local stack file: %s", exc)
        return
    logger.info("chalice local --stage local finds this stack in %s", written)


def _writing_token(settings: Settings) -> str:
    """The first token whose role may create clients and mailings (as the demo does)."""
    entries = [split_token_entry(entry) for entry in settings.api_tokens]
    writing = [token for role, token in entries if role in WRITING_ROLES]
    return (writing or [entries[0][1]])[0]


def _run_demo(stack: LocalStack, out: TextIO) -> None:
    from devstack.demo import DemoError, run_demo

    settings = stack.settings
    if settings is None or settings.auth_mode is not AuthMode.STATIC or not settings.api_tokens:
        print("demo: skipped; it needs AUTH_MODE=static and an API token", file=out, flush=True)
        return
    try:
        run_demo(stack.api_url, _writing_token(settings), out=out)
    except DemoError as exc:
        # The stack itself is fine: keep serving, so the developer can look around.
        logger.error("demo: %s", exc)


def _on_stop_signals(callback: Callable[[], None]) -> None:
    def handle(signum: int, _frame: Any) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        callback()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def _ensure_port_free(host: str, port: int, setting: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the server will: a port in TIME_WAIT is free, one with a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StackError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                f"set {setting} to a free port (0 picks one)"
            ) from None


def _run_with_timeout(start: Callable[[], None], timeout: float, what: str) -> None:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            start()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"start-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if errors:
        raise StackError(f"{what} failed to start: {errors[0]}")
    if thread.is_alive():
        raise StackError(f"{what} did not start within {timeout:.0f} s")
