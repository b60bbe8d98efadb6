"""The RPC handlers of ``tail.auth.v1.AuthService`` and the conversions between records and protos.

Authorization is by the client certificate's identity: ``client_identities`` and
``admin_identities`` may verify keys and watch key events; only ``admin_identities`` may
create, list, revoke and update keys, and read and set tenant policy (budgets, MCP
servers). Every failed verification is the same ``UNAUTHENTICATED: invalid api key``,
whether the key is malformed, unknown, revoked or expired. Store errors become status
codes in one place (:func:`_store_errors`); :mod:`.events` feeds the ``WatchKeyEvents``
streams, :mod:`.server` runs the servicer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import TypeVar

import grpc
import sqlalchemy as sa

from tail_service.authsvc.events import EventHub, WatchRefused
from tail_service.authsvc.records import InvalidKeyArgument, KeyInfo, KeyNotFound, TenantInfo, VerifiedKey
from tail_service.authsvc.store import KeyStore
from tail_service.proto import auth_pb2, auth_pb2_grpc
from tail_service.rpc.identity import require_identity
from tail_service.settings import AuthServiceSettings

INVALID_KEY = "invalid api key"

log = logging.getLogger("tail_service.authsvc")
Ctx = grpc.ServicerContext
_M = TypeVar("_M", auth_pb2.KeyInfo, auth_pb2.Principal)

_OPTIONAL_FIELDS = (
    "name",
    "rpm",
    "tpm",
    "max_concurrency",
    "expires_at",
    "response_cache",
    "budget_usd",
    "budget_period",
)
_KINDS = {"revoked": auth_pb2.KeyEvent.REVOKED, "updated": auth_pb2.KeyEvent.UPDATED}


def _pb(message: type[_M], record: KeyInfo | VerifiedKey) -> _M:
    """``record`` as a ``KeyInfo``/``Principal`` message (its three limits nested in ``Limits``,
    its budgets in ``Budget``)."""
    d = asdict(record)
    limits = auth_pb2.Limits(rpm=d.pop("rpm"), tpm=d.pop("tpm"), max_concurrency=d.pop("max_concurrency"))
    d["budget"] = auth_pb2.Budget(usd=d.pop("budget_usd"), period=d.pop("budget_period"))
    if "tenant_budget_usd" in d:
        usd, period = d.pop("tenant_budget_usd"), d.pop("tenant_budget_period")
        d["tenant_budget"] = auth_pb2.Budget(usd=usd, period=period)
    return message(**d, limits=limits)


def _tenant_pb(info: TenantInfo) -> auth_pb2.TenantInfo:
    budget = auth_pb2.Budget(usd=info.budget_usd, period=info.budget_period)
    return auth_pb2.TenantInfo(
        tenant=info.tenant, budget=budget, updated_at=info.updated_at, mcp_servers=info.mcp_servers
    )


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


#: key ids one GetPrincipals call may name
MAX_PRINCIPALS = 1000


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

    def GetPrincipals(
        self, request: auth_pb2.GetPrincipalsRequest, context: Ctx
    ) -> auth_pb2.GetPrincipalsResponse:
        """The principals of the keys named by id that are still valid (batch workers)."""
        require_identity(context, self._clients, "read principals")
        if len(request.key_ids) > MAX_PRINCIPALS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_PRINCIPALS} key ids")
        with _store_errors(context, "GetPrincipals"):
            found = self._store.principals(request.key_ids)
        return auth_pb2.GetPrincipalsResponse(principals=[_pb(auth_pb2.Principal, p) for p in found])

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
                mcp_servers=list(request.mcp_servers),
                budget_usd=request.budget.usd,
                budget_period=request.budget.period,
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
            servers = list(request.mcp_servers) if request.set_mcp_servers else None
            info = self._store.update(request.id, **fields_set, allowed_models=models, mcp_servers=servers)
        self._hub.poke()
        log.info("key updated", extra={"key_id": info.id, "tenant": info.tenant, "by": who})
        return auth_pb2.UpdateKeyResponse(key=_pb(auth_pb2.KeyInfo, info))

    def SetTenantBudget(
        self, request: auth_pb2.SetTenantBudgetRequest, context: Ctx
    ) -> auth_pb2.SetTenantBudgetResponse:
        """Set or remove a tenant's budget; each of its keys gets an UPDATED event."""
        who = require_identity(context, self._admins, "set tenant budgets")
        with _store_errors(context, "SetTenantBudget"):
            info = self._store.set_tenant_budget(request.tenant, request.budget.usd, request.budget.period)
        self._hub.poke()
        budget = {"budget_usd": info.budget_usd, "budget_period": info.budget_period}
        log.info("tenant budget set", extra={"tenant": info.tenant, **budget, "by": who})
        return auth_pb2.SetTenantBudgetResponse(tenant=_tenant_pb(info))

    def SetTenantMcpServers(
        self, request: auth_pb2.SetTenantMcpServersRequest, context: Ctx
    ) -> auth_pb2.SetTenantMcpServersResponse:
        """Replace the MCP servers a tenant's keys may use (empty: every configured one); each
        of its keys gets an UPDATED event."""
        who = require_identity(context, self._admins, "set tenant MCP servers")
        with _store_errors(context, "SetTenantMcpServers"):
            info = self._store.set_tenant_mcp_servers(request.tenant, list(request.mcp_servers))
        self._hub.poke()
        servers = ",".join(info.mcp_servers) or "*"
        log.info("tenant mcp servers set", extra={"tenant": info.tenant, "mcp_servers": servers, "by": who})
        return auth_pb2.SetTenantMcpServersResponse(tenant=_tenant_pb(info))

    def GetTenant(self, request: auth_pb2.GetTenantRequest, context: Ctx) -> auth_pb2.GetTenantResponse:
        """A tenant's policy (no budget and every MCP server if it never had one)."""
        require_identity(context, self._admins, "read tenants")
        with _store_errors(context, "GetTenant"):
            info = self._store.get_tenant(request.tenant)
        return auth_pb2.GetTenantResponse(tenant=_tenant_pb(info))

    def WatchKeyEvents(
        self, request: auth_pb2.WatchKeyEventsRequest, context: Ctx
    ) -> Iterator[auth_pb2.KeyEvent]:
        """``HELLO`` (event_id: the last event already seen), then each REVOKED/UPDATED as it happens."""
        require_identity(context, self._clients, "watch key events")
        try:
            watcher = self._hub.subscribe()
        except WatchRefused as exc:
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
