"""auth-service over real gRPC with mutual TLS, on SQLite and PostgreSQL.

Servers listen on 127.0.0.1:0 with certificates from the test PKI; clients connect as
the identities ``admin``, ``tail`` and ``secrets``, and with bad certificates.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tail_service.authsvc import AuthService, PepperError, ensure_pepper_file, load_pepper
from tail_service.proto import auth_pb2, auth_pb2_grpc
from tail_service.rpc.tls import channel_credentials
from tail_service.settings import AuthServiceSettings, TLSFiles

StubFor = Callable[..., Any]


@pytest.fixture
def pepper_path(tmp_path: Path) -> Path:
    path = tmp_path / "pepper"
    ensure_pepper_file(path)
    return path


@pytest.fixture
def settings_for(
    tls_for: Callable[[str], TLSFiles], pepper_path: Path, tmp_path: Path
) -> Callable[..., AuthServiceSettings]:
    def make(database_url: str | None = None, **kw: Any) -> AuthServiceSettings:
        kw.setdefault("tls", tls_for("auth"))
        return AuthServiceSettings(
            listen="127.0.0.1:0",
            database_url=database_url or f"sqlite:///{tmp_path / 'auth.db'}",
            pepper_file=pepper_path,
            **kw,
        )

    return make


@pytest.fixture
def serve(
    settings_for: Callable[..., AuthServiceSettings], tmp_path: Path
) -> Iterator[Callable[..., tuple[AuthService, int]]]:
    """``serve(db_url)`` starts an auth-service; all are stopped at teardown."""
    started: list[AuthService] = []

    def start(database_url: str | None = None, **kw: Any) -> tuple[AuthService, int]:
        service = AuthService.build(settings_for(database_url, **kw), base_dir=tmp_path)
        started.append(service)
        return service, service.start().port

    yield start
    for service in started:
        service.stop(grace=0.5)


@pytest.fixture
def connect(tls_for: Callable[[str], TLSFiles]) -> Iterator[Callable[..., Any]]:
    """``connect(port, identity)`` (or ``creds=``) gives an AuthService stub; channels closed at teardown."""
    channels: list[grpc.Channel] = []

    def make(port: int, identity: str = "admin", *, creds: grpc.ChannelCredentials | None = None) -> Any:
        channel = grpc.secure_channel(f"127.0.0.1:{port}", creds or channel_credentials(tls_for(identity)))
        channels.append(channel)
        return auth_pb2_grpc.AuthServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()


def rpc_error(method: Callable[..., Any], request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        method(request, timeout=5)
    return info.value


def verify(stub: Any, key: str) -> Any:
    return stub.VerifyKey(auth_pb2.VerifyKeyRequest(api_key=key), timeout=5).principal


def create(stub: Any, tenant: str = "acme", **kw: Any) -> Any:
    return stub.CreateKey(auth_pb2.CreateKeyRequest(tenant=tenant, **kw), timeout=5)


def test_key_lifecycle(serve: Callable[..., tuple[AuthService, int]], connect: StubFor, db_url: str) -> None:
    _, port = serve(db_url)
    admin, tail = connect(port), connect(port, "tail")
    made = create(admin, name="ci", allowed_models=["gpt-test"], limits=auth_pb2.Limits(rpm=60, tpm=1000))
    key = made.api_key
    assert re.fullmatch(r"sk-tail-[A-Za-z0-9_-]{43,}", key)
    assert made.key.prefix == key[:12] and made.key.id.startswith("key_") and not made.key.revoked

    listed = admin.ListKeys(auth_pb2.ListKeysRequest(tenant="acme"), timeout=5)
    assert [k.id for k in listed.keys] == [made.key.id] and listed.keys[0].prefix == key[:12]
    assert key.encode() not in listed.SerializeToString()
    assert key[12:20].encode() not in listed.SerializeToString()

    p = verify(tail, key)
    assert (p.key_id, p.tenant, p.name, list(p.allowed_models)) == (made.key.id, "acme", "ci", ["gpt-test"])
    assert (p.limits.rpm, p.limits.tpm, p.limits.max_concurrency, p.expires_at) == (60, 1000, 0, 0)

    req = auth_pb2.UpdateKeyRequest(id=made.key.id, rpm=5, max_concurrency=2, set_allowed_models=True)
    updated = admin.UpdateKey(req, timeout=5).key
    assert (updated.limits.rpm, updated.limits.tpm, updated.limits.max_concurrency) == (5, 1000, 2)
    p = verify(tail, key)
    assert (p.limits.rpm, p.limits.tpm, p.limits.max_concurrency, list(p.allowed_models)) == (5, 1000, 2, [])

    unknown = rpc_error(tail.VerifyKey, auth_pb2.VerifyKeyRequest(api_key="sk-tail-" + "A" * 43))
    assert (unknown.code(), unknown.details()) == (grpc.StatusCode.UNAUTHENTICATED, "invalid api key")

    def same_as_unknown(k: str) -> None:
        err = rpc_error(tail.VerifyKey, auth_pb2.VerifyKeyRequest(api_key=k))
        assert (err.code(), err.details(), err.trailing_metadata()) == (
            unknown.code(),
            unknown.details(),
            unknown.trailing_metadata(),
        )

    for malformed in ("", "sk-test", key[:-1]):
        same_as_unknown(malformed)

    expiring = create(admin, name="soon")
    admin.UpdateKey(auth_pb2.UpdateKeyRequest(id=expiring.key.id, expires_at=int(time.time()) - 1), timeout=5)
    same_as_unknown(expiring.api_key)

    revoked = admin.RevokeKey(auth_pb2.RevokeKeyRequest(id=made.key.id), timeout=5).key
    assert revoked.revoked and revoked.id == made.key.id
    same_as_unknown(key)
    assert admin.RevokeKey(auth_pb2.RevokeKeyRequest(api_key=key), timeout=5).key.revoked  # idempotent

    other = create(admin, tenant="beta")
    assert admin.RevokeKey(auth_pb2.RevokeKeyRequest(api_key=other.api_key), timeout=5).key.id == other.key.id
    same_as_unknown(other.api_key)

    assert admin.ListKeys(auth_pb2.ListKeysRequest(), timeout=5).keys[0].id == expiring.key.id
    every = admin.ListKeys(auth_pb2.ListKeysRequest(include_revoked=True), timeout=5).keys
    assert {k.id for k in every} == {made.key.id, expiring.key.id, other.key.id}

    for method, request, code in [
        (admin.RevokeKey, auth_pb2.RevokeKeyRequest(id="key_nope"), grpc.StatusCode.NOT_FOUND),
        (admin.RevokeKey, auth_pb2.RevokeKeyRequest(api_key=key[:-2] + "xx"), grpc.StatusCode.NOT_FOUND),
        (admin.RevokeKey, auth_pb2.RevokeKeyRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (admin.UpdateKey, auth_pb2.UpdateKeyRequest(id="key_nope", rpm=1), grpc.StatusCode.NOT_FOUND),
        (admin.UpdateKey, auth_pb2.UpdateKeyRequest(rpm=1), grpc.StatusCode.INVALID_ARGUMENT),
        (
            admin.UpdateKey,
            auth_pb2.UpdateKeyRequest(id=made.key.id, tpm=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (admin.CreateKey, auth_pb2.CreateKeyRequest(tenant=""), grpc.StatusCode.INVALID_ARGUMENT),
        (
            admin.CreateKey,
            auth_pb2.CreateKeyRequest(tenant="t", expires_at=5),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]:
        assert rpc_error(method, request).code() == code


def test_watchers_see_revocations_made_through_another_replica(
    serve: Callable[..., tuple[AuthService, int]], connect: StubFor, db_url: str
) -> None:
    _, port_a = serve(db_url)
    _, port_b = serve(db_url)
    via_b = connect(port_b)
    first, second = create(via_b).key, create(via_b).key
    stream = connect(port_a, "tail").WatchKeyEvents(auth_pb2.WatchKeyEventsRequest(), timeout=20)
    hello = next(stream)
    assert hello.kind == auth_pb2.KeyEvent.HELLO

    started = time.monotonic()
    via_b.RevokeKey(auth_pb2.RevokeKeyRequest(id=first.id), timeout=5)
    event = next(stream)
    assert time.monotonic() - started < 1.0
    assert (event.kind, event.key_id) == (auth_pb2.KeyEvent.REVOKED, first.id)
    assert event.event_id > hello.event_id

    via_b.UpdateKey(auth_pb2.UpdateKeyRequest(id=second.id, tpm=7), timeout=5)
    event = next(stream)
    assert (event.kind, event.key_id) == (auth_pb2.KeyEvent.UPDATED, second.id)
    stream.cancel()


def test_graceful_stop_ends_an_open_watch_stream(
    serve: Callable[..., tuple[AuthService, int]], connect: StubFor
) -> None:
    service, port = serve()
    stream = connect(port, "tail").WatchKeyEvents(auth_pb2.WatchKeyEventsRequest(), timeout=20)
    assert next(stream).kind == auth_pb2.KeyEvent.HELLO
    started = time.monotonic()
    stopper = threading.Thread(target=service.stop, kwargs={"grace": 10})
    stopper.start()
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    stopper.join(10)
    assert not stopper.is_alive() and time.monotonic() - started < 3


def test_transport_security_rejects_bad_clients(
    serve: Callable[..., tuple[AuthService, int]],
    connect: StubFor,
    pki_dir: Path,
    rogue_tls: Callable[[str], TLSFiles],
    expired_tls: Callable[[str], TLSFiles],
) -> None:
    _, port = serve()
    ca = (pki_dir / "ca.pem").read_bytes()

    def with_cert(files: TLSFiles) -> grpc.ChannelCredentials:  # our CA trusted, their certificate shown
        return grpc.ssl_channel_credentials(ca, files.key_file.read_bytes(), files.cert_file.read_bytes())

    for creds in (
        grpc.ssl_channel_credentials(root_certificates=ca),
        with_cert(rogue_tls("admin")),
        with_cert(expired_tls("admin")),
    ):
        err = rpc_error(connect(port, creds=creds).ListKeys, auth_pb2.ListKeysRequest())
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert connect(port, "admin").ListKeys(auth_pb2.ListKeysRequest(), timeout=5).keys == []


def test_identities_are_authorized_per_rpc(
    serve: Callable[..., tuple[AuthService, int]], connect: StubFor
) -> None:
    _, port = serve()
    made = create(connect(port))
    tail, secrets = connect(port, "tail"), connect(port, "secrets")
    for method, request in [
        (tail.CreateKey, auth_pb2.CreateKeyRequest(tenant="t")),
        (tail.ListKeys, auth_pb2.ListKeysRequest()),
        (tail.RevokeKey, auth_pb2.RevokeKeyRequest(id=made.key.id)),
        (tail.UpdateKey, auth_pb2.UpdateKeyRequest(id=made.key.id, rpm=1)),
        (secrets.VerifyKey, auth_pb2.VerifyKeyRequest(api_key=made.api_key)),
        (secrets.GetPrincipals, auth_pb2.GetPrincipalsRequest(key_ids=[made.key.id])),
        (tail.SetTenantBudget, auth_pb2.SetTenantBudgetRequest(tenant="acme", budget=auth_pb2.Budget(usd=1))),
        (tail.GetTenant, auth_pb2.GetTenantRequest(tenant="acme")),
        (secrets.SetTenantBudget, auth_pb2.SetTenantBudgetRequest(tenant="acme")),
        (tail.SetTenantMcpServers, auth_pb2.SetTenantMcpServersRequest(tenant="acme", mcp_servers=["x"])),
        (secrets.SetTenantMcpServers, auth_pb2.SetTenantMcpServersRequest(tenant="acme")),
    ]:
        assert rpc_error(method, request).code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as info:
        next(secrets.WatchKeyEvents(auth_pb2.WatchKeyEventsRequest(), timeout=5))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert verify(tail, made.api_key).key_id == made.key.id
    assert not connect(port).ListKeys(auth_pb2.ListKeysRequest(), timeout=5).keys[0].revoked
    acme = connect(port).GetTenant(auth_pb2.GetTenantRequest(tenant="acme"), timeout=5).tenant
    assert (acme.updated_at, list(acme.mcp_servers), acme.budget.usd) == (0, [], 0)  # nothing was set


def budget(usd: float, period: str = "") -> Any:
    return auth_pb2.Budget(usd=usd, period=period)


def test_key_and_tenant_budgets(
    serve: Callable[..., tuple[AuthService, int]], connect: StubFor, db_url: str
) -> None:
    _, port = serve(db_url)
    admin, tail = connect(port), connect(port, "tail")
    made = create(admin, budget=budget(5, "day"))
    assert (made.key.budget.usd, made.key.budget.period) == (5, "day")
    other = create(admin)  # no budget, same tenant
    assert (other.key.budget.usd, other.key.budget.period) == (0, "none")
    monthly = create(admin, tenant="beta", budget=budget(2.5))  # no period: per month
    assert (monthly.key.budget.usd, monthly.key.budget.period) == (2.5, "month")
    stream = tail.WatchKeyEvents(auth_pb2.WatchKeyEventsRequest(), timeout=20)
    assert next(stream).kind == auth_pb2.KeyEvent.HELLO  # creating logs no event

    p = verify(tail, made.api_key)
    assert (p.budget.usd, p.budget.period, p.tenant_budget.usd, p.tenant_budget.period) == (
        5,
        "day",
        0,
        "none",
    )
    listed = {k.id: k.budget for k in admin.ListKeys(auth_pb2.ListKeysRequest(), timeout=5).keys}
    assert (listed[made.key.id].usd, listed[monthly.key.id].period) == (5, "month")

    updated = admin.UpdateKey(auth_pb2.UpdateKeyRequest(id=made.key.id, budget_usd=8), timeout=5).key
    assert (updated.budget.usd, updated.budget.period) == (8, "day")
    req = auth_pb2.UpdateKeyRequest(id=made.key.id, budget_period="month")
    assert admin.UpdateKey(req, timeout=5).key.budget.period == "month"
    req = auth_pb2.UpdateKeyRequest(id=other.key.id, budget_usd=0, budget_period="none")
    assert admin.UpdateKey(req, timeout=5).key.budget.usd == 0

    assert [next(stream).key_id for _ in range(3)] == [made.key.id, made.key.id, other.key.id]
    set_req = auth_pb2.SetTenantBudgetRequest(tenant="acme", budget=budget(100, "month"))
    info = admin.SetTenantBudget(set_req, timeout=5).tenant
    assert (info.tenant, info.budget.usd, info.budget.period) == ("acme", 100, "month")
    assert info.updated_at > 0
    events = [next(stream), next(stream)]
    assert {e.kind for e in events} == {auth_pb2.KeyEvent.UPDATED}
    assert sorted(e.key_id for e in events) == sorted([made.key.id, other.key.id])  # not beta's key
    admin.UpdateKey(auth_pb2.UpdateKeyRequest(id=monthly.key.id, budget_usd=3), timeout=5)
    event = next(stream)  # beta's key, updated: the tenant change logged nothing more
    assert (event.kind, event.key_id) == (auth_pb2.KeyEvent.UPDATED, monthly.key.id)
    stream.cancel()

    p = verify(tail, other.api_key)
    assert (p.budget.usd, p.tenant_budget.usd, p.tenant_budget.period) == (0, 100, "month")
    found = tail.GetPrincipals(
        auth_pb2.GetPrincipalsRequest(key_ids=[made.key.id, monthly.key.id]), timeout=5
    )
    by_id = {q.key_id: q for q in found.principals}
    assert (by_id[made.key.id].budget.usd, by_id[made.key.id].tenant_budget.usd) == (8, 100)
    assert (by_id[monthly.key.id].budget.usd, by_id[monthly.key.id].tenant_budget.usd) == (3, 0)
    got = admin.GetTenant(auth_pb2.GetTenantRequest(tenant="acme"), timeout=5).tenant
    assert (got.budget.usd, got.budget.period, got.updated_at) == (100, "month", info.updated_at)
    fresh = admin.GetTenant(auth_pb2.GetTenantRequest(tenant="nobody"), timeout=5).tenant
    assert (fresh.tenant, fresh.budget.usd, fresh.budget.period, fresh.updated_at) == ("nobody", 0, "none", 0)

    nan, inf = float("nan"), float("inf")
    for method, request, field in [
        (admin.CreateKey, auth_pb2.CreateKeyRequest(tenant="t", budget=budget(-1, "day")), "budget_usd"),
        (admin.CreateKey, auth_pb2.CreateKeyRequest(tenant="t", budget=budget(nan, "day")), "budget_usd"),
        (admin.CreateKey, auth_pb2.CreateKeyRequest(tenant="t", budget=budget(inf)), "budget_usd"),
        (admin.CreateKey, auth_pb2.CreateKeyRequest(tenant="t", budget=budget(1, "week")), "budget_period"),
        (admin.UpdateKey, auth_pb2.UpdateKeyRequest(id=made.key.id, budget_usd=-0.5), "budget_usd"),
        (admin.UpdateKey, auth_pb2.UpdateKeyRequest(id=made.key.id, budget_usd=nan), "budget_usd"),
        (admin.UpdateKey, auth_pb2.UpdateKeyRequest(id=made.key.id, budget_period="hourly"), "budget_period"),
        (admin.UpdateKey, auth_pb2.UpdateKeyRequest(id=other.key.id, budget_period="day"), "budget_period"),
        (
            admin.SetTenantBudget,
            auth_pb2.SetTenantBudgetRequest(tenant="acme", budget=budget(-inf)),
            "budget_usd",
        ),
        (
            admin.SetTenantBudget,
            auth_pb2.SetTenantBudgetRequest(tenant="acme", budget=budget(1e12)),
            "budget_usd",
        ),
        (
            admin.SetTenantBudget,
            auth_pb2.SetTenantBudgetRequest(tenant="acme", budget=budget(1, "y")),
            "budget_period",
        ),
        (admin.SetTenantBudget, auth_pb2.SetTenantBudgetRequest(tenant="", budget=budget(1)), "tenant"),
        (admin.GetTenant, auth_pb2.GetTenantRequest(tenant=""), "tenant"),
    ]:
        err = rpc_error(method, request)
        assert (err.code(), field in err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, True), err.details()
    assert verify(tail, made.api_key).budget.usd == 8  # refused changes changed nothing
    assert admin.GetTenant(auth_pb2.GetTenantRequest(tenant="acme"), timeout=5).tenant.budget.usd == 100
    not_found = rpc_error(admin.UpdateKey, auth_pb2.UpdateKeyRequest(id="key_nope", budget_usd=1))
    assert not_found.code() == grpc.StatusCode.NOT_FOUND


def test_tenant_mcp_servers_reach_principals_and_emit_key_events(
    serve: Callable[..., tuple[AuthService, int]], connect: StubFor, db_url: str
) -> None:
    _, port = serve(db_url)
    admin, tail = connect(port), connect(port, "tail")
    plain = create(admin)
    own = create(admin, mcp_servers=["facts", "other"])
    stranger = create(admin, tenant="beta")
    stream = tail.WatchKeyEvents(auth_pb2.WatchKeyEventsRequest(), timeout=20)
    assert next(stream).kind == auth_pb2.KeyEvent.HELLO

    def set_servers(tenant: str, servers: list[str]) -> Any:
        req = auth_pb2.SetTenantMcpServersRequest(tenant=tenant, mcp_servers=servers)
        return admin.SetTenantMcpServers(req, timeout=5).tenant

    info = set_servers("acme", ["other", "docs", "other"])
    assert (info.tenant, list(info.mcp_servers), info.budget.usd, info.budget.period) == (
        "acme",
        ["other", "docs"],
        0,
        "none",
    )
    assert info.updated_at > 0
    events = [next(stream), next(stream)]
    assert {e.kind for e in events} == {auth_pb2.KeyEvent.UPDATED}
    assert sorted(e.key_id for e in events) == sorted([plain.key.id, own.key.id])  # not beta's key
    admin.UpdateKey(auth_pb2.UpdateKeyRequest(id=stranger.key.id, rpm=1), timeout=5)
    event = next(stream)  # beta's key, updated: the tenant change logged nothing more
    assert (event.kind, event.key_id) == (auth_pb2.KeyEvent.UPDATED, stranger.key.id)

    p = verify(tail, plain.api_key)
    assert (list(p.mcp_servers), list(p.tenant_mcp_servers)) == ([], ["other", "docs"])
    found = tail.GetPrincipals(
        auth_pb2.GetPrincipalsRequest(key_ids=[own.key.id, stranger.key.id]), timeout=5
    ).principals
    by_id = {q.key_id: q for q in found}
    assert list(by_id[own.key.id].mcp_servers) == ["facts", "other"]
    assert list(by_id[own.key.id].tenant_mcp_servers) == ["other", "docs"]
    assert list(by_id[stranger.key.id].tenant_mcp_servers) == []
    got = admin.GetTenant(auth_pb2.GetTenantRequest(tenant="acme"), timeout=5).tenant
    assert (list(got.mcp_servers), got.updated_at) == (["other", "docs"], info.updated_at)

    # the budget and the servers are set apart, each keeping the other
    budget_req = auth_pb2.SetTenantBudgetRequest(tenant="acme", budget=auth_pb2.Budget(usd=9, period="day"))
    assert list(admin.SetTenantBudget(budget_req, timeout=5).tenant.mcp_servers) == ["other", "docs"]
    acme_keys = sorted([plain.key.id, own.key.id])
    assert sorted(next(stream).key_id for _ in range(2)) == acme_keys  # the budget change's events
    reset = set_servers("acme", [])
    assert (list(reset.mcp_servers), reset.budget.usd, reset.budget.period) == ([], 9, "day")
    assert sorted(next(stream).key_id for _ in range(2)) == acme_keys
    stream.cancel()
    assert list(verify(tail, plain.api_key).tenant_mcp_servers) == []

    for request, field in [
        (auth_pb2.SetTenantMcpServersRequest(tenant="", mcp_servers=["docs"]), "tenant"),
        (auth_pb2.SetTenantMcpServersRequest(tenant="acme", mcp_servers=["docs", " "]), "mcp_servers"),
        (auth_pb2.SetTenantMcpServersRequest(tenant="acme", mcp_servers=["x" * 201]), "mcp_servers"),
        (
            auth_pb2.SetTenantMcpServersRequest(tenant="acme", mcp_servers=[f"s{i}" for i in range(1001)]),
            "mcp_servers",
        ),
    ]:
        err = rpc_error(admin.SetTenantMcpServers, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in (err.details() or ""), (
            err.details()
        )
    assert list(admin.GetTenant(auth_pb2.GetTenantRequest(tenant="acme"), timeout=5).tenant.mcp_servers) == []


def test_get_principals_gives_only_valid_keys(
    serve: Callable[..., tuple[AuthService, int]], connect: StubFor
) -> None:
    _, port = serve()
    admin, tail = connect(port), connect(port, "tail")
    live, gone = create(admin), create(admin)
    expired = admin.CreateKey(
        auth_pb2.CreateKeyRequest(tenant="t", expires_at=int(time.time()) + 1), timeout=5
    )
    admin.RevokeKey(auth_pb2.RevokeKeyRequest(id=gone.key.id), timeout=5)
    time.sleep(2.1)  # the clock passes the expiry
    ids = [live.key.id, gone.key.id, expired.key.id, "key_unknown"]
    found = tail.GetPrincipals(auth_pb2.GetPrincipalsRequest(key_ids=ids), timeout=5).principals
    assert [p.key_id for p in found] == [live.key.id]
    assert found[0].tenant == live.key.tenant
    with pytest.raises(grpc.RpcError) as info:
        tail.GetPrincipals(auth_pb2.GetPrincipalsRequest(key_ids=[f"k{i}" for i in range(1001)]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_reports_serving(
    serve: Callable[..., tuple[AuthService, int]], tls_for: Callable[[str], TLSFiles]
) -> None:
    _, port = serve()
    with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(tls_for("tail"))) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tail.auth.v1.AuthService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_no_plaintext_key_is_stored_or_logged(
    serve: Callable[..., tuple[AuthService, int]],
    connect: StubFor,
    db_url: str,
    pepper_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    service, port = serve(db_url)
    admin = connect(port)
    keys = [create(admin, name=f"k{i}").api_key for i in range(3)]
    verify(admin, keys[0])
    rpc_error(admin.VerifyKey, auth_pb2.VerifyKeyRequest(api_key=keys[1][:-1] + "?"))
    admin.RevokeKey(auth_pb2.RevokeKeyRequest(api_key=keys[1]), timeout=5)
    rpc_error(admin.VerifyKey, auth_pb2.VerifyKeyRequest(api_key=keys[1]))
    pepper = pepper_path.read_text().strip()
    secrets = [k[len("sk-tail-") :] for k in keys] + [pepper]
    stored_hash = load_pepper(AuthServiceSettings(pepper_file=pepper_path), pepper_path.parent).hash_key(
        keys[0]
    )

    if db_url.startswith("sqlite"):
        db = Path(db_url.removeprefix("sqlite:///"))
        blob = b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())
        assert stored_hash.encode() in blob  # the file really holds the keys
        for s in secrets:
            assert s.encode() not in blob
    else:
        engine = sa.create_engine(db_url)
        try:
            with engine.connect() as conn:
                dump = ""
                for table in ("api_keys", "key_events", "schema_migrations"):
                    dump += repr(conn.execute(sa.text(f"SELECT * FROM {table}")).all())
        finally:
            engine.dispose()
        assert stored_hash in dump
        for s in secrets:
            assert s not in dump
    service.stop(grace=0.5)

    records = caplog.records
    assert any(r.name.startswith("tail_service.authsvc") for r in records)
    text = caplog.text + "".join(repr(vars(r)) for r in records)
    for s in secrets:
        assert s not in text


def test_refuses_to_start_without_pepper_or_tls(
    settings_for: Callable[..., AuthServiceSettings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TAIL_TEST_NO_PEPPER", raising=False)
    no_pepper = settings_for().model_copy(update={"pepper_file": None, "pepper_env": "TAIL_TEST_NO_PEPPER"})
    with pytest.raises(PepperError, match="TAIL_TEST_NO_PEPPER"):
        AuthService.build(no_pepper, base_dir=tmp_path)
    missing = settings_for().model_copy(update={"pepper_file": Path("nowhere/pepper")})
    with pytest.raises(PepperError, match="pepper file"):
        AuthService.build(missing, base_dir=tmp_path)
    with pytest.raises(ValueError, match="without TLS"):
        AuthService.build(settings_for(tls=None), base_dir=tmp_path)
    assert not (tmp_path / "auth.db").exists()


def test_run_logs_the_bound_port_and_stops_on_sigterm(
    settings_for: Callable[..., AuthServiceSettings], tmp_path: Path, tls_for: Callable[[str], TLSFiles]
) -> None:
    script = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from tail_service.authsvc import run\n"
        "from tail_service.settings import AuthServiceSettings\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "run(AuthServiceSettings.model_validate_json(sys.argv[1]), base_dir=Path(sys.argv[2]))\n"
    )
    config = settings_for().model_dump_json()
    proc = subprocess.Popen(
        [sys.executable, "-c", script, config, str(tmp_path)], stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "auth-service listening on" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(30), "".join(lines)
        found = re.search(r"auth-service listening on 127\.0\.0\.1:(\d+)", "".join(lines))
        assert found and int(found.group(1)) > 0, "".join(lines)
        with grpc.secure_channel(f"127.0.0.1:{found.group(1)}", channel_credentials(tls_for("admin"))) as ch:
            stub = auth_pb2_grpc.AuthServiceStub(ch)
            assert stub.ListKeys(auth_pb2.ListKeysRequest(), timeout=5).keys == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
        if proc.stderr is not None:
            proc.stderr.close()
