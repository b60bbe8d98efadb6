"""The ``tail-service`` command line (Typer).

``up`` starts the whole stack on its embedded defaults; ``serve`` starts the HTTP
service alone, for deployments, optionally with several worker processes.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tail_service.cli_admin import register as register_admin
from tail_service.cli_batch import batch_cli
from tail_service.cli_usage import usage_command
from tail_service.settings import (
    ConfigError,
    Settings,
    check_http_settings,
    default_state_dir,
    load_settings,
    resolve_credentials,
)

if TYPE_CHECKING:
    from tail_service.stack import Supervisor

cli = typer.Typer(
    name="tail-service",
    help="Tail Service: an OpenAI-compatible API over a model proxy.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (default: $TAIL_CONFIG)", envvar="TAIL_CONFIG"),
]
HostOpt = Annotated[str | None, typer.Option(help="address to listen on [default: 127.0.0.1]")]
PortOpt = Annotated[int | None, typer.Option(help="port to listen on; 0 picks a free one [default: 8080]")]
StateOpt = Annotated[
    Path | None,
    typer.Option("--state-dir", help="where the embedded stack keeps its state", envvar="TAIL_STATE_DIR"),
]


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


LogLevelOpt = Annotated[
    LogLevel | None,
    typer.Option(
        "--log-level",
        case_sensitive=False,
        help="log level of every service of the stack (debug adds an access log line per request) "
        "[default: log_level from the config, info]",
    ),
]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        from tail_service import __version__

        try:
            installed = version("tail-service")
        except PackageNotFoundError:  # pragma: no cover - run from a source tree
            installed = __version__
        typer.echo(f"tail-service {installed}")
        raise typer.Exit()


@cli.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit"),
    ] = False,
) -> None:
    """Tail Service: an OpenAI-compatible API over a model proxy."""


def _load(
    config: Path | None,
    host: str | None,
    port: int | None,
    state_dir: Path | None,
    workers: int | None = None,
    *,
    http: bool = True,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    server: dict[str, Any] = {}
    if host is not None:
        server["host"] = host
    if port is not None:
        server["port"] = port
    if workers is not None:
        server["workers"] = workers
    try:
        settings = load_settings(config, server=server, state_dir=state_dir, **(overrides or {}))
        if http:
            check_http_settings(settings)
        return settings
    except ConfigError as exc:
        typer.echo(f"tail-service: {exc}", err=True)
        raise typer.Exit(2) from None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        typer.echo(f"tail-service: cannot listen on {host}:{port}: {exc.strerror}", err=True)
        raise typer.Exit(1) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _run(settings: Settings, *, banner: bool, on_listening: Callable[[str], None] | None = None) -> None:
    """Serve ``settings`` with uvicorn (uvloop + httptools) on a socket bound here;
    ``on_listening(url)`` is called once the socket is bound, before serving starts."""
    import uvicorn

    from tail_service.app import create_app
    from tail_service.http_server import server_config
    from tail_service.logging import configure_logging

    configure_logging(settings.log_level, json=settings.log_json)
    sock = _bind(settings.server.host, settings.server.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    workers = settings.server.workers
    common: dict[str, Any] = {
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "access_log": False,
        "log_config": None,
        "timeout_graceful_shutdown": settings.server.graceful_timeout,
        "server_header": False,
        "proxy_headers": False,
    }
    if banner:
        models = ", ".join(e.name for e in settings.model_entries())
        keys_hint = (
            f"  create an API key: {_self_command('keys', 'create', f'--state-dir={settings.state_dir}')}\n"
            if settings.auth.mode == "grpc"
            else ""
        )
        typer.echo(
            f"tail-service {url}\n"
            f"  OpenAI base URL: {url}/v1\n"
            f"  models: {models}\n"
            f"  docs: {url}/docs   health: {url}/health\n"
            f"{keys_hint}"
            f"  state: {settings.state_dir}",
            err=True,
        )
    typer.echo(f"tail-service listening on {url}", err=True)
    if on_listening is not None:
        on_listening(url)
    # uvicorn shuts down gracefully on SIGTERM, restores the previous handlers and then
    # raises the signal again; this handler turns that into a normal exit, so `finally`
    # blocks (stopping `up`'s child services) run and the exit status is 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    if workers == 1:
        config = server_config(create_app(settings), settings.server, **common)
        uvicorn.Server(config).run(sockets=[sock])
        return
    # Several workers: each process loads the same settings from the environment.
    _export_settings(settings)
    from uvicorn.supervisors import Multiprocess

    config = server_config(
        "tail_service.app:create_app_from_env", settings.server, factory=True, workers=workers, **common
    )
    Multiprocess(config, sockets=[sock]).run()


def _self_command(*args: str) -> str:
    """``tail-service ARGS`` run by this very installation, as a shell command that works
    as printed (the venv's ``bin`` need not be on PATH)."""
    exe = Path(sys.executable).absolute().with_name("tail-service")
    if exe.is_file() and os.access(exe, os.X_OK):
        argv = [str(exe), *args]
    else:
        argv = [str(Path(sys.executable).absolute()), "-m", "tail_service", *args]
    return shlex.join(argv)


def _exit_cleanly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _export_settings(settings: Settings) -> None:
    os.environ["TAIL_SETTINGS_JSON"] = settings.dump_for_child()
    for name, value in settings.credentials.items():
        os.environ.setdefault(name, value.get_secret_value())


@cli.command()
def up(
    config: ConfigOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    state_dir: StateOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Start the whole stack on its embedded defaults: auth-service and secret-service as
    child processes with mutual TLS, and the HTTP service (local models when none are configured)."""
    from tail_service.logging import configure_logging
    from tail_service.redis_embedded import EmbeddedRedisError
    from tail_service.stack import prepare_state, start_children, start_redis

    state = (state_dir or default_state_dir()).resolve()
    layout = prepare_state(state)
    overrides = layout.http_overrides()
    if log_level is not None:
        overrides["log_level"] = log_level.value
    settings = _load(config, host, port, state, overrides=overrides)
    configure_logging(settings.log_level, json=settings.log_json)
    try:
        redis_server = start_redis(layout)
    except EmbeddedRedisError as exc:
        typer.echo(f"tail-service: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        supervisor = start_children(layout, log_level=settings.log_level)
    except RuntimeError as exc:
        redis_server.stop()
        typer.echo(f"tail-service: {exc}", err=True)
        raise typer.Exit(1) from None
    worker = _DeferredWorker(settings) if settings.batch.embedded_worker else None
    try:
        _run(settings, banner=True, on_listening=worker.start_when_ready if worker else None)
    finally:
        if worker is not None:
            worker.stop()
        supervisor.stop()
        redis_server.stop()


@cli.command()
def serve(
    config: ConfigOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    state_dir: StateOpt = None,
    workers: Annotated[int | None, typer.Option(help="worker processes [default: 1]")] = None,
) -> None:
    """Start the HTTP service alone, for deployments."""
    settings = _load(config, host, port, state_dir, workers)
    _run(settings, banner=False)


class _DeferredWorker:
    """``up``'s batch worker, started once the HTTP service answers ``/readyz``, so the two
    start-ups do not compete for the CPU (the first request is served as soon as before)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: Supervisor | None = None

    def start_when_ready(self, url: str) -> None:
        threading.Thread(target=self._start, args=(url,), daemon=True, name="worker-start").start()

    def _start(self, url: str) -> None:
        deadline = time.monotonic() + 120
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        while not self._stopping.wait(0.1) and time.monotonic() < deadline:
            try:
                with direct.open(f"{url}/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                continue
        from tail_service.stack import start_worker

        with self._lock:
            if not self._stopping.is_set():
                settings = self._settings
                self._supervisor = start_worker(_worker_settings_json(settings), log_level=settings.log_level)
        # The child dies with the thread that started it (PR_SET_PDEATHSIG is per thread):
        # this one lives until `up` stops.
        self._stopping.wait()

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            if self._supervisor is not None:
                self._supervisor.stop()


def _worker_settings_json(settings: Settings) -> str:
    """The settings a child worker gets: the HTTP service's own (credentials come by name,
    through the environment, as :func:`_export_settings` passes them)."""
    for name, value in settings.credentials.items():
        os.environ.setdefault(name, value.get_secret_value())
    return settings.dump_for_child()


@cli.command()
def worker(
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
    executor_id: Annotated[
        str | None,
        typer.Option(help="this worker's durable identity (restart with the same one) [default: host name]"),
    ] = None,
) -> None:
    """Run a batch worker: it runs the batches stored in the store (``store.database_url``).
    Start any number, on any machines that reach the store, Redis and the model upstreams."""
    from tail_service.batch.worker import main as worker_main
    from tail_service.logging import configure_logging

    raw = os.environ.get("TAIL_SETTINGS_JSON")
    overrides: dict[str, Any] = {}
    if raw:
        settings = resolve_credentials(Settings.model_validate_json(raw))
    else:
        settings = _load(config, None, None, state_dir, http=False)
    if executor_id is not None:
        overrides["batch"] = settings.batch.model_copy(update={"executor_id": executor_id})
        settings = settings.model_copy(update=overrides)
    configure_logging(settings.log_level, json=settings.log_json)
    worker_main(settings)


@cli.command("check-config")
def check_config(config: ConfigOpt = None) -> None:
    """Validate the configuration and print the models it defines."""
    settings = _load(config, None, None, None, http=False)
    for e in settings.model_entries():
        typer.echo(f"{e.name}\t{e.provider}\t{e.base_url or '(embedded)'}\t{e.upstream_model or e.name}")


register_admin(cli)
cli.add_typer(batch_cli, name="batch")
cli.command("usage")(usage_command)


def main() -> None:
    """Console-script entry point."""
    try:
        cli()
    except KeyboardInterrupt:  # pragma: no cover - interactive
        sys.exit(130)
