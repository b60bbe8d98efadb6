"""API-key verification through auth-service, behind an in-memory verdict cache.

Hot path: a cache hit costs one SHA-256 of the presented key and a dict lookup; no
gRPC call. A miss makes one ``VerifyKey`` call, shared by every concurrent request
presenting the same key (single flight), with a per-attempt deadline and bounded
retries. Rejections are cached briefly (``negative_ttl``) so a bad key cannot hammer
auth-service.

Revocation does not wait for the TTL: a background task keeps a ``WatchKeyEvents``
stream open and evicts a key's verdicts the moment auth-service reports it revoked or
updated (about a second end to end, across replicas). Whenever the stream (re)opens,
the whole cache is flushed, because events may have been missed while it was down.

Failure policy: when auth-service cannot be reached, cached verdicts keep serving until
they expire; anything else is a 503 ``auth_unavailable``. Never a 500, never fail-open.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from tail_service.clients.grpc_channel import ReloadingChannel, check_health
from tail_service.clients.grpc_metadata import outgoing_metadata
from tail_service.core.types import ANONYMOUS, Principal
from tail_service.errors import AuthenticationError, ServiceUnavailableError
from tail_service.proto import auth_pb2, auth_pb2_grpc
from tail_service.settings import AuthSettings

log = logging.getLogger("tail_service.clients.auth")

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
#: seconds before the first retry of a broken revocation watch, and the most it waits
_WATCH_BACKOFF_FIRST = 0.2
_WATCH_BACKOFF_CAP = 5.0


@dataclass(slots=True)
class _Verdict:
    principal: Principal | None  # None: the key was rejected
    expires: float  # monotonic seconds


def _missing_key() -> AuthenticationError:
    return AuthenticationError(
        "You didn't provide an API key. You need to provide your API key in an Authorization header "
        "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
    )


def _invalid_key() -> AuthenticationError:
    return AuthenticationError("Incorrect API key provided.", code="invalid_api_key")


def _unavailable() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "The authentication service is unavailable; please retry shortly.",
        code="auth_unavailable",
        retry_after=1.0,
    )


def principal_from_proto(p: auth_pb2.Principal) -> Principal:
    """The core :class:`Principal` of a ``VerifyKey``/``GetPrincipals`` answer.

    A missing ``Budget`` (an older auth-service) reads as 0 USD, period ``none``: no budget;
    missing ``tenant_mcp_servers``, as every MCP server.
    """
    return Principal(
        key_id=p.key_id,
        tenant=p.tenant,
        name=p.name,
        allowed_models=frozenset(p.allowed_models),
        rpm=p.limits.rpm,
        tpm=p.limits.tpm,
        max_concurrency=p.limits.max_concurrency,
        expires_at=p.expires_at,
        response_cache=p.response_cache,
        mcp_servers=frozenset(p.mcp_servers),
        budget_usd=p.budget.usd,
        budget_period=p.budget.period or "none",
        tenant_budget_usd=p.tenant_budget.usd,
        tenant_budget_period=p.tenant_budget.period or "none",
        tenant_mcp_servers=frozenset(p.tenant_mcp_servers),
    )


class AuthClient:
    """:class:`~tail_service.core.auth.Authenticator` backed by auth-service."""

    def __init__(
        self,
        channel: ReloadingChannel,
        settings: AuthSettings,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._channel = channel
        self._settings = settings
        self._monotonic = monotonic
        self._wall = wall
        self._cache: dict[bytes, _Verdict] = {}
        self._by_key_id: dict[str, set[bytes]] = {}
        self._inflight: dict[bytes, asyncio.Task[Principal | None]] = {}
        #: bumped on every invalidation, so a verification that raced one is not cached
        self._epoch = 0
        self._watch: asyncio.Task[None] | None = None
        self.watch_connected = False
        #: verdict-cache lookups answered from memory / that needed auth-service (the
        #: metrics read these at scrape time: no per-request metric cost)
        self.cache_hits = 0
        self.cache_misses = 0

    async def authenticate(self, api_key: str | None) -> Principal:
        if not api_key:
            raise _missing_key()
        digest = hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).digest()
        verdict = self._cache.get(digest)
        if verdict is not None and verdict.expires > self._monotonic():
            self.cache_hits += 1
            principal = verdict.principal
        else:
            self.cache_misses += 1
            task = self._inflight.get(digest)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._verify(api_key, digest))
                self._inflight[digest] = task
                task.add_done_callback(lambda _t: self._inflight.pop(digest, None))
            # Shielded: a caller that goes away does not cancel the others' verification.
            principal = await asyncio.shield(task)
        if principal is None:
            raise _invalid_key()
        if principal.expires_at and self._wall() >= principal.expires_at:
            self._evict(principal.key_id)
            raise _invalid_key()
        return principal

    async def _call(self, method: str, request: Any) -> Any:
        """One unary RPC, tried again on UNAVAILABLE / DEADLINE_EXCEEDED (with backoff); any
        other failure, or the last one, is raised as the ``AioRpcError``. It carries the
        request id and trace context of the request that caused it."""
        stub = auth_pb2_grpc.AuthServiceStub(self._channel.get())
        attempts = 1 + self._settings.retries
        metadata = outgoing_metadata()
        for attempt in range(attempts):
            try:
                return await getattr(stub, method)(request, timeout=self._settings.timeout, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _RETRYABLE and attempt < attempts - 1:
                    await asyncio.sleep(0.05 * 2**attempt)
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _verify(self, api_key: str, digest: bytes) -> Principal | None:
        epoch = self._epoch
        try:
            resp = await self._call("VerifyKey", auth_pb2.VerifyKeyRequest(api_key=api_key))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                if self._settings.negative_ttl > 0 and epoch == self._epoch:
                    self._store(digest, None, self._settings.negative_ttl)
                return None
            log.warning("auth-service call failed", extra={"grpc_code": exc.code().name})
            raise _unavailable() from None
        principal = principal_from_proto(resp.principal)
        if epoch == self._epoch:
            self._store(digest, principal, self._settings.cache_ttl)
        return principal

    async def principals(self, key_ids: Iterable[str]) -> dict[str, Principal]:
        """The current principals of the keys ``key_ids`` that are still valid (revoked and
        expired ones are absent). Raises the 503 ``auth_unavailable`` when it cannot tell."""
        try:
            resp = await self._call("GetPrincipals", auth_pb2.GetPrincipalsRequest(key_ids=sorted(key_ids)))
        except grpc.aio.AioRpcError as exc:
            log.warning("auth-service call failed", extra={"grpc_code": exc.code().name})
            raise _unavailable() from None
        found = (principal_from_proto(p) for p in resp.principals)
        return {p.key_id: p for p in found}

    def _store(self, digest: bytes, principal: Principal | None, ttl: float) -> None:
        if len(self._cache) >= self._settings.cache_size:
            for old in list(self._cache)[: max(1, self._settings.cache_size // 10)]:
                self._drop(old)
        self._cache[digest] = _Verdict(principal, self._monotonic() + ttl)
        if principal is not None:
            self._by_key_id.setdefault(principal.key_id, set()).add(digest)

    def _drop(self, digest: bytes) -> None:
        verdict = self._cache.pop(digest, None)
        if verdict is not None and verdict.principal is not None:
            ids = self._by_key_id.get(verdict.principal.key_id)
            if ids is not None:
                ids.discard(digest)
                if not ids:
                    del self._by_key_id[verdict.principal.key_id]

    def _evict(self, key_id: str) -> None:
        self._epoch += 1
        for digest in self._by_key_id.pop(key_id, set()):
            self._cache.pop(digest, None)

    def flush(self) -> None:
        """Forget every cached verdict."""
        self._epoch += 1
        self._cache.clear()
        self._by_key_id.clear()

    def start(self) -> None:
        """Open the revocation watch in the background (reconnects until :meth:`close`)."""
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        """Keep the revocation stream open until cancelled, whatever goes wrong.

        Any error other than cancellation (a gRPC status, a closed channel, a bug in
        handling one event) is logged and followed by a retry after a capped, jittered
        exponential backoff: losing the stream silently would leave revoked keys
        working until their verdicts expire.
        """
        backoff = _WATCH_BACKOFF_FIRST
        while True:
            try:
                stub = auth_pb2_grpc.AuthServiceStub(self._channel.get())
                async for event in stub.WatchKeyEvents(auth_pb2.WatchKeyEventsRequest()):
                    if event.kind == auth_pb2.KeyEvent.HELLO:
                        self.flush()
                        self.watch_connected = True
                        backoff = _WATCH_BACKOFF_FIRST
                    elif event.key_id:
                        self._evict(event.key_id)
                        log.info("key invalidated", extra={"key_id": event.key_id})
            except grpc.aio.AioRpcError as exc:
                log.warning("key-event watch interrupted: %s", exc.code().name)
            except Exception as exc:  # the watch must outlive any error but cancellation
                log.warning("key-event watch failed: %s: %s", type(exc).__name__, exc)
            # events may be missed until the stream is back; HELLO flushes the cache then
            self.watch_connected = False
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, _WATCH_BACKOFF_CAP)

    async def health(self) -> dict[str, Any]:
        out: dict[str, Any] = await check_health(self._channel.get(), "tail.auth.v1.AuthService")
        out["revocation_watch"] = "connected" if self.watch_connected else "disconnected"
        out["cached_verdicts"] = len(self._cache)
        return out

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._channel.close()


class NoAuth:
    """Authentication disabled: every caller is :data:`ANONYMOUS` (development only)."""

    async def authenticate(self, api_key: str | None) -> Principal:
        return ANONYMOUS
