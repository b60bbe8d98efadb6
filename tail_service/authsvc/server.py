"""auth-service: one replica of ``tail.auth.v1.AuthService`` over a :class:`KeyStore`, with mutual TLS.

:class:`AuthService` builds a replica from its settings (pepper, database, migrations),
then starts the key-event poller (:mod:`.events`) and a gRPC server with the handlers of
:mod:`.servicer`; stopping ends the ``WatchKeyEvents`` streams before the server stops.
:func:`run` is the ``tail-service auth-service`` process: serve until SIGTERM/SIGINT.
Who may call what is in :mod:`.servicer`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from tail_service.authsvc.events import EventHub
from tail_service.authsvc.keys import load_pepper
from tail_service.authsvc.servicer import AuthServicer
from tail_service.authsvc.store import KeyStore
from tail_service.db import make_engine
from tail_service.proto import auth_pb2_grpc
from tail_service.rpc.server import RunningServer, serve_until_signalled, start_server
from tail_service.settings import AuthServiceSettings, TLSFiles

SERVICE_NAME = "tail.auth.v1.AuthService"


@dataclass
class AuthRunningServer(RunningServer):
    """A :class:`RunningServer` whose ``stop`` first ends the key-event streams."""

    before_stop: Callable[[], None] = field(default=lambda: None)

    def stop(self, grace: float = 5.0) -> None:
        """Mark NOT_SERVING, end the watch streams, then stop the server with ``grace`` seconds."""
        self.health.enter_graceful_shutdown()
        self.before_stop()
        super().stop(grace)


def _resolve_tls(tls: TLSFiles | None, base_dir: Path) -> TLSFiles | None:
    if tls is None:
        return None
    return TLSFiles(**{k: p if p.is_absolute() else base_dir / p for k, p in tls.model_dump().items()})


class AuthService:
    """One auth-service replica: the store, the event poller and (once started) the gRPC server.

    The server has ``MAX_WORKERS`` threads; at most ``MAX_WATCHERS`` of them may hold
    ``WatchKeyEvents`` streams, so key verification always has threads left.
    """

    MAX_WORKERS = 64
    MAX_WATCHERS = 32
    WATCHER_QUEUE = 1024

    def __init__(
        self,
        settings: AuthServiceSettings,
        store: KeyStore,
        *,
        tls: TLSFiles | None,
        allow_insecure: bool = False,
    ) -> None:
        self.settings = settings
        self.store = store
        self._tls = tls
        self._allow_insecure = allow_insecure
        interval = settings.event_poll_interval
        self.hub = EventHub(store, interval, queue_size=self.WATCHER_QUEUE, max_watchers=self.MAX_WATCHERS)
        self._running: AuthRunningServer | None = None

    @classmethod
    def build(
        cls, settings: AuthServiceSettings, *, base_dir: Path, allow_insecure: bool = False
    ) -> AuthService:
        """Load the pepper, open the database and migrate it; nothing listens yet.

        Relative paths (SQLite file, pepper file, TLS files) are taken from ``base_dir``.
        Raises :class:`~tail_service.authsvc.keys.PepperError` without a usable pepper and
        ``ValueError`` without TLS unless ``allow_insecure`` (tests of non-security paths).
        """
        tls = _resolve_tls(settings.tls, base_dir)
        if tls is None and not allow_insecure:
            raise ValueError(
                f"{SERVICE_NAME}: refusing to start without TLS (set tls: ca_file, cert_file, key_file)"
            )
        pepper = load_pepper(settings, base_dir)
        engine = make_engine(settings.database_url, base_dir)
        store = KeyStore(engine, pepper)
        try:
            store.migrate()
        except BaseException:
            engine.dispose()
            raise
        return cls(settings, store, tls=tls, allow_insecure=allow_insecure)

    def start(self) -> RunningServer:
        """Start the poller and the server on ``settings.listen`` (port 0: any); ``.port`` is bound."""
        if self._running is not None:
            raise RuntimeError("auth-service already started")
        self.hub.start()
        servicer = AuthServicer(self.store, self.hub, self.settings)
        try:
            running = start_server(
                self.settings.listen,
                self._tls,
                SERVICE_NAME,
                lambda server: auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server),  # type: ignore[no-untyped-call]
                max_workers=self.MAX_WORKERS,
                allow_insecure=self._allow_insecure,
            )
        except BaseException:
            self.hub.stop()
            raise
        base = {f.name: getattr(running, f.name) for f in fields(RunningServer)}
        self._running = AuthRunningServer(**base, before_stop=self.hub.stop)
        return self._running

    def stop(self, grace: float = 5.0) -> None:
        """End the watch streams, stop the server (``grace`` seconds for calls in flight), close the pool."""
        if self._running is not None:
            self._running.stop(grace)
        self.close()

    def close(self) -> None:
        """Stop the poller and release database connections; idempotent."""
        self.hub.stop()
        self.store.engine.dispose()


def run(settings: AuthServiceSettings, *, base_dir: Path) -> None:
    """Serve until SIGTERM/SIGINT: ``tail-service auth-service``. SIGHUP reloads the certificates."""
    service = AuthService.build(settings, base_dir=base_dir)

    def start() -> RunningServer:
        try:
            return service.start()
        except BaseException:
            service.close()
            raise

    host = settings.listen.rsplit(":", 1)[0]
    serve_until_signalled(start, f"auth-service listening on {host}:{{port}}", on_stop=service.close)
