"""Running a gRPC service: mTLS, the standard health service, graceful shutdown, SIGHUP.

The services use the synchronous gRPC server on a thread pool: their handlers do
blocking SQLAlchemy work, which threads suit, and a server-streaming watcher holds one
thread while it is open.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tail_service.rpc.context import RequestContextInterceptor
from tail_service.rpc.tls import ReloadingServerCerts
from tail_service.settings import TLSFiles

log = logging.getLogger("tail_service.rpc.server")


@dataclass
class RunningServer:
    """A started server: its bound port, health servicer and certificate reloader."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    certs: ReloadingServerCerts | None
    service_name: str

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting calls, mark NOT_SERVING, and let in-flight calls finish."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1)


def start_server(
    listen: str,
    tls: TLSFiles | None,
    service_name: str,
    register: Callable[[grpc.Server], None],
    *,
    max_workers: int = 32,
    allow_insecure: bool = False,
) -> RunningServer:
    """Bind ``listen`` (port 0 picks one), register the service and health, and start.

    Without ``tls`` the server refuses to start unless ``allow_insecure`` (tests only).
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=service_name),
        # the caller's request id on the handlers' log lines
        interceptors=[RequestContextInterceptor()],
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
        ],
    )
    register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    certs = None
    if tls is not None:
        certs = ReloadingServerCerts(tls)
        port = server.add_secure_port(listen, certs.credentials())
    elif allow_insecure:
        port = server.add_insecure_port(listen)
    else:
        raise ValueError(
            f"{service_name}: refusing to listen without TLS (set tls: ca_file, cert_file, key_file)"
        )
    if port == 0:
        raise OSError(f"{service_name}: cannot listen on {listen}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, health_servicer, certs, service_name)


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def serve_until_signalled(
    start: Callable[[], RunningServer],
    announce: str,
    *,
    grace: float = 5.0,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Start a server and block the main thread until SIGTERM/SIGINT; SIGHUP reloads certs.

    The handlers are installed before the server starts, and gRPC's threads are started
    with the stop signals blocked (threads inherit the mask), so every signal reaches the
    main thread. ``announce`` (``"... listening on {port}"``) is logged once serving.
    """
    stop = threading.Event()
    box: list[RunningServer] = []

    def _stop(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    def _hup(_signum: int, _frame: object) -> None:
        if box and box[0].certs is not None:
            box[0].certs.request_reload()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _hup)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        running = start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    box.append(running)
    # Printed, not logged: `up` and scripts wait for this line whatever the log level.
    sys.stderr.write(announce.format(port=running.port) + "\n")
    sys.stderr.flush()
    # Poll rather than block forever, so the handler runs promptly whatever thread the
    # kernel chose for the signal.
    while not stop.wait(0.5):
        pass
    running.stop(grace)
    if on_stop is not None:
        on_stop()
    log.info("%s: stopped", running.service_name)
