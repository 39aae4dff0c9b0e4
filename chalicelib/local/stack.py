"""The local stack: an embedded AWS emulator, the service's tables and the Chalice app over HTTP.

Everything is configured from the environment (see `LocalConfig`). The stack is a list of
components started in order and stopped in reverse; the scheduler tick and the SQS poller
join it as more components.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from chalicelib.settings import AuthMode, Settings, SettingsError

logger = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[2]
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


class StackError(RuntimeError):
    """The local stack cannot start; the message says why and what to change."""


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

    @property
    def embeds_emulator(self) -> bool:
        return self.aws_endpoint_url is None

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str]) -> LocalConfig:
        """Read PORT, HOST, MOTO_PORT and AWS_ENDPOINT_URL; a bad value raises StackError."""
        return cls(
            host=environ.get("HOST") or DEFAULT_HOST,
            port=_port(environ, "PORT", DEFAULT_PORT),
            moto_port=_port(environ, "MOTO_PORT", 0),
            aws_endpoint_url=environ.get("AWS_ENDPOINT_URL") or None,
        )


def _port(environ: MutableMapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name) or ""
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise StackError(f"{name} must be a port number, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise StackError(f"{name} must be between 0 and 65535, got {port}")
    return port


def prepare_environment(config: LocalConfig, environ: MutableMapping[str, str]) -> bool:
    """Fill in local defaults in `environ`; True when an API token was generated for this run."""
    # `or`, not setdefault: an empty variable (FOO= in a .env file) means unset here too.
    environ["AWS_DEFAULT_REGION"] = environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    environ["TABLE_PREFIX"] = environ.get("TABLE_PREFIX") or DEFAULT_TABLE_PREFIX
    if config.embeds_emulator:
        environ.update(_DUMMY_CREDENTIALS)
        for name in _REAL_CREDENTIAL_VARIABLES:
            environ.pop(name, None)
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


class MotoEmulator:
    """moto in server mode on loopback, in this process."""

    name = "aws-emulator"

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._server: Any = None
        self.endpoint_url = ""

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        if self._port:
            _ensure_port_free(EMULATOR_HOST, self._port, "MOTO_PORT")
        server = ThreadedMotoServer(ip_address=EMULATOR_HOST, port=self._port, verbose=False)
        # ThreadedMotoServer.start() waits forever if its server thread fails to bind.
        _run_with_timeout(server.start, _START_TIMEOUT_SECONDS, "the AWS emulator")
        self._server = server
        host, port = server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def is_alive(self) -> bool:
        return self._server is not None


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


@dataclass
class LocalStack:
    """The emulator, the tables and the API, started in order and stopped in reverse."""

    config: LocalConfig
    project_dir: Path = PROJECT_DIR
    # os.environ in a real run: boto3 and PynamoDB read AWS_ENDPOINT_URL etc. from there.
    environ: MutableMapping[str, str] = field(default_factory=lambda: os.environ)
    components: list[Component] = field(default_factory=list)
    settings: Settings | None = None
    aws_endpoint_url: str = ""
    token_generated: bool = False
    api: ApiServer | None = None

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
        self.settings = settings.model_copy(update={"aws_endpoint_url": self.aws_endpoint_url})

        self._install_services(self.settings)
        self.api = ApiServer(chalice_config, self.config.host, self.config.port)
        self._add(self.api)

    def _install_services(self, settings: Settings) -> None:
        from chalicelib.container import Services, use_services
        from chalicelib.models import create_tables

        services = Services.build(settings)
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
        from chalicelib.container import use_services

        use_services(None)

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
        f"  Health   {url}/health",
        f"  AWS      {stack.aws_endpoint_url} ({emulator}; tables {settings.table_prefix}-*)",
    ]
    if settings.auth_mode is AuthMode.STATIC and settings.api_tokens:
        token = settings.api_tokens[0]
        origin = (
            "generated for this run; set API_TOKENS to choose one"
            if stack.token_generated
            else "from API_TOKENS"
        )
        if len(settings.api_tokens) > 1:
            origin += f", first of {len(settings.api_tokens)}"
        header = shlex.quote(f"Authorization: Bearer {token}")
        lines += [
            f"  Token    {token}  ({origin})",
            f"  Try      curl -H {header} {url}/clients",
        ]
    else:
        lines.append(f"  Auth     {settings.auth_mode.value} (issuer {settings.oidc_issuer})")
    lines.append("Press Ctrl+C to stop.")
    return "\n".join(lines)


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # werkzeug logs every emulator request (and halves its throughput doing so).
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run(out: TextIO | None = None) -> int:
    """Run the local stack from os.environ until SIGINT or SIGTERM; the process exit code."""
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
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1

    print(banner(stack), file=out, flush=True)
    print(f"READY {stack.api_url}", file=out, flush=True)

    exit_code = 0
    while not stop_requested.wait(_HEALTH_CHECK_SECONDS):
        dead = stack.dead_components()
        if dead:
            logger.error("stopping: %s stopped unexpectedly", ", ".join(dead))
            exit_code = 1
            break
    logger.info("stopping the local stack")
    stack.stop()
    logger.info("stopped")
    return exit_code


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
