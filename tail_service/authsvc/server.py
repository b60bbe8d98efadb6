"""auth-service: the gRPC ``tail.auth.v1.AuthService`` over a :class:`KeyStore`, with mutual TLS.

Authorization is by the client certificate's identity: ``client_identities`` and
``admin_identities`` may verify keys and watch key events; only ``admin_identities`` may
create, list, revoke and update keys. Every failed verification is the same
``UNAUTHENTICATED: invalid api key``, whether the key is malformed, unknown, revoked or
expired.

Key events: one poller thread per replica reads ``key_events`` every
``event_poll_interval`` seconds (and at once after a local change) and fans the rows
out to the open ``WatchKeyEvents`` streams, so a revocation made through any replica
sharing the database reaches every watcher. Each stream first gets a ``HELLO``. A
watcher that falls ``queue_size`` events behind is dropped with ``ABORTED``; on
shutdown streams end with ``UNAVAILABLE``. Either way the client should flush its
cache and reconnect.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TypeVar

import grpc
import sqlalchemy as sa

from tail_service.authsvc.keys import load_pepper
from tail_service.authsvc.store import (
    EventCursor,
    InvalidKeyArgument,
    KeyEvent,
    KeyInfo,
    KeyNotFound,
    KeyStore,
    VerifiedKey,
)
from tail_service.db import make_engine
from tail_service.proto import auth_pb2, auth_pb2_grpc
from tail_service.rpc.identity import require_identity
from tail_service.rpc.server import RunningServer, serve_until_signalled, start_server
from tail_service.settings import AuthServiceSettings, TLSFiles

SERVICE_NAME = "tail.auth.v1.AuthService"
INVALID_KEY = "invalid api key"

log = logging.getLogger("tail_service.authsvc")
Ctx = grpc.ServicerContext
_M = TypeVar("_M", auth_pb2.KeyInfo, auth_pb2.Principal)

_OPTIONAL_FIELDS = ("name", "rpm", "tpm", "max_concurrency", "expires_at", "response_cache")
_KINDS = {"revoked": auth_pb2.KeyEvent.REVOKED, "updated": auth_pb2.KeyEvent.UPDATED}


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Watcher:
    """One open ``WatchKeyEvents`` stream's bounded queue; ``reason`` is set once it must end."""

    def __init__(self, size: int, start_id: int) -> None:
        self.start_id = start_id
        self.reason: str | None = None  # "overflow" | "stopping"
        self._queue: queue.Queue[KeyEvent | None] = queue.Queue(maxsize=size)

    def offer(self, event: KeyEvent) -> bool:
        """Queue ``event``; ``False`` if the queue is full."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            return False
        return True

    def close(self, reason: str) -> None:
        """Mark the stream to end (first reason wins) and wake its reader."""
        if self.reason is None:
            self.reason = reason
        self.wake()

    def wake(self) -> None:
        """Unblock a reader waiting in :meth:`next` (also gRPC's on-termination callback)."""
        with suppress(queue.Full):  # full: the reader is not blocked, it has events to take
            self._queue.put_nowait(None)

    def next(self, timeout: float) -> KeyEvent | None:
        """The next event, or ``None`` after ``timeout`` seconds or a wake-up."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


class EventHub:
    """Polls ``key_events`` on a background thread and fans new rows out to the watchers.

    ``interval`` is in seconds. At most ``max_watchers`` streams at once (each holds a
    server thread); a watcher more than ``queue_size`` events behind is closed with
    reason ``"overflow"``. :meth:`stop` ends every stream and joins the thread.
    """

    def __init__(self, store: KeyStore, interval: float, *, queue_size: int = 1024, max_watchers: int = 32):
        self._store = store
        self._interval = interval
        self._queue_size = queue_size
        self._max_watchers = max_watchers
        self._lock = threading.Lock()
        self._watchers: set[Watcher] = set()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_id = 0

    def start(self) -> None:
        """Start polling after the newest existing event (raises if the database is unreachable)."""
        cursor = EventCursor.at_end(self._store)
        self._last_id = cursor.last_id
        self._thread = threading.Thread(target=self._run, args=(cursor,), name="auth-key-events", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Poll now instead of at the next interval (after a change made here)."""
        self._wake.set()

    def subscribe(self) -> Watcher:
        """A new watcher; raises ``_Refused`` when stopping or full."""
        with self._lock:
            if self._stopping.is_set() or self._thread is None:
                raise _Refused(grpc.StatusCode.UNAVAILABLE, "auth-service is shutting down")
            if len(self._watchers) >= self._max_watchers:
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many key-event watchers")
            watcher = Watcher(self._queue_size, self._last_id)
            self._watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        """Forget ``watcher`` (idempotent)."""
        with self._lock:
            self._watchers.discard(watcher)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling and end every stream; idempotent."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._lock:
            watchers, self._watchers = self._watchers, set()
        for w in watchers:
            w.close("stopping")

    def publish(self, events: list[KeyEvent]) -> None:
        """Hand ``events`` to every watcher; close those whose queue is full."""
        with self._lock:
            if events:
                self._last_id = max(self._last_id, max(e.id for e in events))
            overflowed = [w for w in self._watchers if not all(w.offer(e) for e in events)]
            for w in overflowed:
                self._watchers.discard(w)
        for w in overflowed:
            log.warning("dropping a key-event watcher that fell behind")
            w.close("overflow")

    def _run(self, cursor: EventCursor) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                events = cursor.poll()
            except Exception as exc:  # keep polling: the cursor resumes where it stopped
                log.warning("key-event poll failed: %s", type(exc).__name__)
                continue
            if events:
                self.publish(events)


def _pb(message: type[_M], record: KeyInfo | VerifiedKey) -> _M:
    """``record`` as a ``KeyInfo``/``Principal`` message (its three limits nested in ``Limits``)."""
    d = asdict(record)
    limits = auth_pb2.Limits(rpm=d.pop("rpm"), tpm=d.pop("tpm"), max_concurrency=d.pop("max_concurrency"))
    return message(**d, limits=limits)


@contextmanager
def _store_errors(context: grpc.ServicerContext, action: str) -> Iterator[None]:
    """Map the store's errors to status codes; database errors are logged by class name only."""
    try:
        yield
    except InvalidKeyArgument as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except KeyNotFound:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such key")
    except sa.exc.SQLAlchemyError as exc:
        log.error("%s failed: database error (%s)", action, type(exc).__name__)
        context.abort(grpc.StatusCode.UNAVAILABLE, "key store unavailable")


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):  # type: ignore[misc]
    """The RPC handlers; see the module docstring for who may call what."""

    def __init__(self, store: KeyStore, hub: EventHub, settings: AuthServiceSettings) -> None:
        self._store = store
        self._hub = hub
        self._admins = frozenset(settings.admin_identities)
        self._clients = frozenset(settings.client_identities) | self._admins

    def VerifyKey(self, request: auth_pb2.VerifyKeyRequest, context: Ctx) -> auth_pb2.VerifyKeyResponse:
        """The key's principal, or UNAUTHENTICATED "invalid api key" for any invalid key."""
        require_identity(context, self._clients, "verify keys")
        with _store_errors(context, "VerifyKey"):
            p = self._store.verify(request.api_key)
        if p is None:
            log.debug("key verification failed")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, INVALID_KEY)
        return auth_pb2.VerifyKeyResponse(principal=_pb(auth_pb2.Principal, p))

    def CreateKey(self, request: auth_pb2.CreateKeyRequest, context: Ctx) -> auth_pb2.CreateKeyResponse:
        """Create a key; the response carries the plaintext, the only time it exists."""
        who = require_identity(context, self._admins, "create keys")
        with _store_errors(context, "CreateKey"):
            info, api_key = self._store.create_key(
                tenant=request.tenant,
                name=request.name,
                allowed_models=list(request.allowed_models),
                rpm=request.limits.rpm,
                tpm=request.limits.tpm,
                max_concurrency=request.limits.max_concurrency,
                expires_at=request.expires_at,
                response_cache=request.response_cache,
            )
        log.info("key created", extra={"key_id": info.id, "tenant": info.tenant, "by": who})
        return auth_pb2.CreateKeyResponse(key=_pb(auth_pb2.KeyInfo, info), api_key=api_key)

    def ListKeys(self, request: auth_pb2.ListKeysRequest, context: Ctx) -> auth_pb2.ListKeysResponse:
        """Keys of one tenant or all, without revoked ones unless asked."""
        require_identity(context, self._admins, "list keys")
        with _store_errors(context, "ListKeys"):
            keys = self._store.list_keys(request.tenant, request.include_revoked)
        return auth_pb2.ListKeysResponse(keys=[_pb(auth_pb2.KeyInfo, k) for k in keys])

    def RevokeKey(self, request: auth_pb2.RevokeKeyRequest, context: Ctx) -> auth_pb2.RevokeKeyResponse:
        """Revoke by id or by the key itself; revoking twice is not an error."""
        who = require_identity(context, self._admins, "revoke keys")
        target = request.WhichOneof("target")
        with _store_errors(context, "RevokeKey"):
            if target == "id" and request.id:
                info = self._store.revoke(key_id=request.id)
            elif target == "api_key" and request.api_key:
                info = self._store.revoke(api_key=request.api_key)
            else:
                raise InvalidKeyArgument("give id or api_key")
        self._hub.poke()
        log.info("key revoked", extra={"key_id": info.id, "tenant": info.tenant, "by": who})
        return auth_pb2.RevokeKeyResponse(key=_pb(auth_pb2.KeyInfo, info))

    def UpdateKey(self, request: auth_pb2.UpdateKeyRequest, context: Ctx) -> auth_pb2.UpdateKeyResponse:
        """Change the fields that are set; unset ones stay."""
        who = require_identity(context, self._admins, "update keys")
        with _store_errors(context, "UpdateKey"):
            if not request.id:
                raise InvalidKeyArgument("id is required")
            fields_set = {f: getattr(request, f) for f in _OPTIONAL_FIELDS if request.HasField(f)}
            models = list(request.allowed_models) if request.set_allowed_models else None
            info = self._store.update(request.id, **fields_set, allowed_models=models)
        self._hub.poke()
        log.info("key updated", extra={"key_id": info.id, "tenant": info.tenant, "by": who})
        return auth_pb2.UpdateKeyResponse(key=_pb(auth_pb2.KeyInfo, info))

    def WatchKeyEvents(
        self, request: auth_pb2.WatchKeyEventsRequest, context: Ctx
    ) -> Iterator[auth_pb2.KeyEvent]:
        """``HELLO`` (event_id: the last event already seen), then each REVOKED/UPDATED as it happens."""
        require_identity(context, self._clients, "watch key events")
        try:
            watcher = self._hub.subscribe()
        except _Refused as exc:
            context.abort(exc.code, str(exc))
        context.add_callback(watcher.wake)
        try:
            yield auth_pb2.KeyEvent(event_id=watcher.start_id, kind=auth_pb2.KeyEvent.HELLO)
            while watcher.reason is None:
                event = watcher.next(timeout=1.0)
                if watcher.reason is not None:
                    break
                if event is None:
                    if not context.is_active():
                        return
                    continue
                yield auth_pb2.KeyEvent(event_id=event.id, key_id=event.key_id, kind=_KINDS[event.kind])
        finally:
            self._hub.unsubscribe(watcher)
        if watcher.reason == "overflow":
            context.abort(grpc.StatusCode.ABORTED, "key-event watcher fell behind; reconnect")
        context.abort(grpc.StatusCode.UNAVAILABLE, "auth-service is shutting down")


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
