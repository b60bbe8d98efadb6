"""secret-service over gRPC: ``tail.secrets.v1.SecretService`` with mTLS and per-identity authorization.

Callers are identified by their client certificate (see :mod:`tail_service.rpc.identity`).
``GetSecret`` is open to ``reader_identities`` and ``admin_identities``; ``PutSecret``,
``ListSecrets``, ``DeleteSecret`` and ``RotateSecret`` to ``admin_identities`` only;
anyone else gets PERMISSION_DENIED. Every call, allowed or not, leaves a row in the audit
table, which never holds the value. The log shows changes (INFO) and refusals (WARNING);
reads, which the HTTP service makes every ``secrets.refresh_interval`` seconds per
secret, are logged at DEBUG only.

Status codes: INVALID_ARGUMENT (bad name, value or version), NOT_FOUND (no such secret or
version; ``DeleteSecret`` instead answers ``deleted=false``), FAILED_PRECONDITION (the row
was sealed under another master key), DATA_LOSS (a stored row fails authentication),
UNAVAILABLE / INTERNAL (database trouble; details only in the server log).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

import grpc
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from tail_service.db import make_engine
from tail_service.proto import secrets_pb2, secrets_pb2_grpc
from tail_service.rpc.identity import peer_identities
from tail_service.rpc.server import RunningServer, serve_until_signalled, start_server
from tail_service.secretsvc.crypto import MasterKeyMismatch, SecretCryptoError, load_master_key
from tail_service.secretsvc.store import (
    Action,
    InvalidSecret,
    SecretMeta,
    SecretNotFound,
    SecretStore,
)
from tail_service.settings import SecretServiceSettings, TLSFiles

log = logging.getLogger("tail_service.secretsvc")

#: the gRPC service name, also the name reported by the health service
SERVICE_NAME = "tail.secrets.v1.SecretService"

T = TypeVar("T")


def _meta(meta: SecretMeta) -> secrets_pb2.SecretMeta:
    return secrets_pb2.SecretMeta(name=meta.name, version=meta.version, created_at=meta.created_at)


def _caller(context: grpc.ServicerContext, ids: frozenset[str]) -> str:
    """Who a refused caller is, for the audit: the certificate's common name if any."""
    for value in context.auth_context().get("x509_common_name", ()):
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return ",".join(sorted(ids)) or "-"


class SecretServicer(secrets_pb2_grpc.SecretServiceServicer):
    """The RPC handlers: authorize by certificate identity, delegate to the store, map errors to codes."""

    def __init__(
        self, store: SecretStore, *, reader_identities: Collection[str], admin_identities: Collection[str]
    ) -> None:
        self._store = store
        self._admins = frozenset(admin_identities)
        self._readers = frozenset(reader_identities) | self._admins

    def PutSecret(
        self, request: secrets_pb2.PutSecretRequest, context: grpc.ServicerContext
    ) -> secrets_pb2.PutSecretResponse:
        """Store a new version (creating the secret if needed); admins only."""
        meta = self._handle(
            context, "put", request.name, None, self._admins,
            lambda who: self._store.put(request.name, request.value, actor=who),
        )  # fmt: skip
        return secrets_pb2.PutSecretResponse(meta=_meta(meta))

    def GetSecret(
        self, request: secrets_pb2.GetSecretRequest, context: grpc.ServicerContext
    ) -> secrets_pb2.GetSecretResponse:
        """A version's value (``version`` 0: the latest); readers and admins."""
        meta, value = self._handle(
            context, "get", request.name, request.version or None, self._readers,
            lambda who: self._store.get(request.name, request.version, actor=who),
        )  # fmt: skip
        return secrets_pb2.GetSecretResponse(meta=_meta(meta), value=value)

    def ListSecrets(
        self, request: secrets_pb2.ListSecretsRequest, context: grpc.ServicerContext
    ) -> secrets_pb2.ListSecretsResponse:
        """The sorted names of all live secrets; admins only."""
        names = self._handle(
            context, "list", None, None, self._admins, lambda who: self._store.list_names(actor=who)
        )
        return secrets_pb2.ListSecretsResponse(names=names)

    def DeleteSecret(
        self, request: secrets_pb2.DeleteSecretRequest, context: grpc.ServicerContext
    ) -> secrets_pb2.DeleteSecretResponse:
        """Remove all versions; ``deleted`` is false if there was no such secret. Admins only."""
        deleted = self._handle(
            context, "delete", request.name, None, self._admins,
            lambda who: self._store.delete(request.name, actor=who),
        )  # fmt: skip
        return secrets_pb2.DeleteSecretResponse(deleted=deleted)

    def RotateSecret(
        self, request: secrets_pb2.RotateSecretRequest, context: grpc.ServicerContext
    ) -> secrets_pb2.RotateSecretResponse:
        """A new version of an existing secret (NOT_FOUND if none); admins only."""
        meta = self._handle(
            context, "rotate", request.name, None, self._admins,
            lambda who: self._store.rotate(request.name, request.value, actor=who),
        )  # fmt: skip
        return secrets_pb2.RotateSecretResponse(meta=_meta(meta))

    def _handle(
        self,
        context: grpc.ServicerContext,
        action: Action,
        name: str | None,
        version: int | None,
        allowed: frozenset[str],
        op: Callable[[str], T],
    ) -> T:
        """Run ``op(identity)`` if the caller is allowed; otherwise audit the refusal. Abort on errors."""
        try:
            ids = peer_identities(context)
            matching = sorted(ids & allowed)
            if matching:
                return op(matching[0])
            self._store.audit(_caller(context, ids), action, name, version, "denied")
            code, message = grpc.StatusCode.PERMISSION_DENIED, f"identity not allowed to {action} secrets"
        except InvalidSecret as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except SecretNotFound as exc:
            code, message = grpc.StatusCode.NOT_FOUND, str(exc)
        except MasterKeyMismatch as exc:
            log.error("%s", exc)
            code, message = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        except SecretCryptoError as exc:
            log.error("%s", exc)
            code, message = grpc.StatusCode.DATA_LOSS, str(exc)
        except sa_exc.OperationalError as exc:
            log.error("secret-service: database unavailable during %s: %s", action, type(exc.orig).__name__)
            code, message = grpc.StatusCode.UNAVAILABLE, "the secrets database is unavailable"
        except sa_exc.SQLAlchemyError as exc:
            log.error("secret-service: database error during %s: %s", action, type(exc).__name__)
            code, message = grpc.StatusCode.INTERNAL, "database error"
        context.abort(code, message)
        raise AssertionError("unreachable")  # abort raises


def _resolve(base_dir: Path, tls: TLSFiles | None) -> TLSFiles | None:
    if tls is None:
        return None
    return TLSFiles(
        ca_file=base_dir / tls.ca_file, cert_file=base_dir / tls.cert_file, key_file=base_dir / tls.key_file
    )


class SecretService:
    """A configured secret-service: store migrated and master key checked, ready to :meth:`start`."""

    def __init__(
        self,
        settings: SecretServiceSettings,
        store: SecretStore,
        engine: Engine,
        *,
        tls: TLSFiles | None,
        allow_insecure: bool = False,
    ) -> None:
        self.settings = settings
        self.store = store
        self._engine = engine
        self._tls = tls
        self._allow_insecure = allow_insecure
        self._running: RunningServer | None = None

    @classmethod
    def build(
        cls, settings: SecretServiceSettings, *, base_dir: Path, allow_insecure: bool = False
    ) -> SecretService:
        """Load the master key, open and migrate the database, and check the key against it.

        Relative paths (SQLite file, master key file, TLS files) are under ``base_dir``.
        Raises ``ValueError`` without TLS unless ``allow_insecure`` (tests only),
        :class:`~tail_service.secretsvc.crypto.MasterKeyError` without a usable master key
        (outside embedded mode) and :class:`~tail_service.secretsvc.crypto.MasterKeyMismatch`
        if the database holds secrets sealed under a different one.
        """
        if settings.tls is None and not allow_insecure:
            raise ValueError(
                "secret-service: refusing to start without TLS (set secret_service.tls: "
                "ca_file, cert_file, key_file)"
            )
        master_key = load_master_key(settings, base_dir=base_dir)
        engine = make_engine(settings.database_url, base_dir)
        try:
            store = SecretStore(engine, master_key)
            store.verify_master_key()
        except BaseException:
            engine.dispose()
            raise
        log.info("secret-service: master key id %s", master_key.key_id)
        tls = _resolve(base_dir, settings.tls)
        return cls(settings, store, engine, tls=tls, allow_insecure=allow_insecure)

    def start(self) -> RunningServer:
        """Bind ``settings.listen`` (port 0 picks a free one) and serve; the result has the bound port."""
        if self._running is not None:
            raise RuntimeError("secret-service is already running")
        servicer = SecretServicer(
            self.store,
            reader_identities=self.settings.reader_identities,
            admin_identities=self.settings.admin_identities,
        )
        self._running = start_server(
            self.settings.listen,
            self._tls,
            SERVICE_NAME,
            lambda server: secrets_pb2_grpc.add_SecretServiceServicer_to_server(servicer, server),
            allow_insecure=self._allow_insecure,
        )
        return self._running

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds) and close the database. Final."""
        running, self._running = self._running, None
        if running is not None:
            running.stop(grace)
        self.close()

    def close(self) -> None:
        """Release the database connections (after the server has stopped)."""
        self._engine.dispose()


def run(settings: SecretServiceSettings, *, base_dir: Path, allow_insecure: bool = False) -> None:
    """``tail-service secret-service``: serve until SIGTERM/SIGINT (SIGHUP reloads TLS certificates).

    Logs ``secret-service listening on <host>:<port>`` with the bound port once serving.
    """
    service = SecretService.build(settings, base_dir=base_dir, allow_insecure=allow_insecure)
    host = settings.listen.rsplit(":", 1)[0]
    serve_until_signalled(
        service.start, f"secret-service listening on {host}:{{port}}", on_stop=service.close
    )
