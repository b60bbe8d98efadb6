"""Mutual-TLS credentials for the gRPC servers and clients, with rotation without downtime.

Servers use ``grpc.dynamic_ssl_server_credentials``: before each new TLS handshake gRPC
asks :class:`ReloadingServerCerts` for a configuration, and it returns a fresh one when
any of the PEM files changed on disk (or a reload was requested, e.g. on SIGHUP).
Connections already open keep their session; new ones get the new certificate. Client
certificates are always required and must chain to the configured CA.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc

from tail_service.settings import TLSFiles

log = logging.getLogger("tail_service.rpc.tls")


def _stamp(files: TLSFiles) -> tuple[float, ...]:
    return tuple(p.stat().st_mtime_ns for p in (files.ca_file, files.cert_file, files.key_file))


def read_files(files: TLSFiles) -> tuple[bytes, bytes, bytes]:
    """``(ca, cert chain, private key)`` as bytes."""
    return files.ca_file.read_bytes(), files.cert_file.read_bytes(), files.key_file.read_bytes()


class ReloadingServerCerts:
    """Hands gRPC the current certificate configuration; thread-safe."""

    def __init__(self, files: TLSFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._stamp = _stamp(files)
        self._forced = False

    def _config(self) -> grpc.ServerCertificateConfiguration:
        ca, cert, key = read_files(self._files)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        return self._config()

    def request_reload(self) -> None:
        """Serve the files' current contents from the next handshake on (SIGHUP)."""
        with self._lock:
            self._forced = True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's per-handshake callback: a new configuration, or ``None`` for "unchanged"."""
        with self._lock:
            try:
                stamp = _stamp(self._files)
            except OSError:
                return None  # mid-rotation (a file is being replaced): keep the old one
            if stamp == self._stamp and not self._forced:
                return None
            try:
                config = self._config()
            except OSError as exc:
                log.warning("could not reload certificates: %s", exc)
                return None
            self._stamp, self._forced = stamp, False
        log.info("TLS certificates reloaded")
        return config

    def credentials(self) -> grpc.ServerCredentials:
        # typeshed says the fetcher must return a configuration; gRPC documents None
        # as "keep the current one", which is what we mean.
        return grpc.dynamic_ssl_server_credentials(
            self.initial(),
            self.fetch,  # type: ignore[arg-type]
            require_client_authentication=True,
        )


def channel_credentials(files: TLSFiles) -> grpc.ChannelCredentials:
    """Client credentials: our certificate and key, and the CA that must sign the server."""
    ca, cert, key = read_files(files)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def files_changed_since(files: TLSFiles, stamp: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """The files' new stamp if they changed since ``stamp``, else ``None``."""
    try:
        now = _stamp(files)
    except OSError:
        return None
    return now if now != stamp else None


def tls_from_dir(directory: Path, identity: str) -> TLSFiles:
    """The :func:`~tail_service.certs.init_dev_pki` layout as ``TLSFiles``."""
    return TLSFiles(
        ca_file=directory / "ca.pem",
        cert_file=directory / f"{identity}.pem",
        key_file=directory / f"{identity}.key",
    )
