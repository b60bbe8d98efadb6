"""A tenant's MCP servers: in the key store (SQLite), through the schema upgrade that adds
them, in the principals the store and the gateway's auth client give, in the principal's
JSON form that agent runs keep, and in ``Principal.allows_mcp_server``."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa

from tail_service.authsvc import store as store_mod
from tail_service.authsvc.keys import Pepper
from tail_service.authsvc.records import (
    MAX_MODELS,
    MAX_TEXT,
    InvalidKeyArgument,
    TenantInfo,
    clean_mcp_servers,
)
from tail_service.authsvc.store import KeyStore
from tail_service.clients.auth import principal_from_proto
from tail_service.core.auth import principal_from_json, principal_to_json
from tail_service.core.types import Principal
from tail_service.db import make_engine, migrate
from tail_service.proto import auth_pb2

PEPPER = Pepper(b"p" * 32)
NOW = 1_700_000_000


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    s = KeyStore(engine, PEPPER, clock=lambda: NOW)
    s.migrate()
    yield s
    engine.dispose()


# --- the store ----------------------------------------------------------------------------


def test_tenant_mcp_servers_are_set_read_and_reach_principals(store: KeyStore) -> None:
    a, key_a = store.create_key(tenant="acme")
    b, key_b = store.create_key(tenant="acme", mcp_servers=["facts"])
    gone, _ = store.create_key(tenant="acme")
    store.revoke(key_id=gone.id)
    other, key_other = store.create_key(tenant="beta")
    assert store.get_tenant("acme") == TenantInfo("acme")  # no row: every server
    assert store.get_tenant("acme").mcp_servers == ()

    before = store.max_event_id()
    info = store.set_tenant_mcp_servers("acme", ["docs", " search ", "docs"])
    assert info == TenantInfo("acme", 0.0, "none", NOW, ("docs", "search"))  # no budget made
    assert store.get_tenant(" acme ") == info
    events = store.events_after(before)
    assert sorted(e.key_id for e in events) == sorted([a.id, b.id])  # not the revoked key's
    assert {e.kind for e in events} == {"updated"}

    p = store.verify(key_a)
    assert p is not None and (p.mcp_servers, p.tenant_mcp_servers) == ((), ("docs", "search"))
    q = store.verify(key_b)
    assert q is not None and (q.mcp_servers, q.tenant_mcp_servers) == (("facts",), ("docs", "search"))
    r = store.verify(key_other)
    assert r is not None and r.tenant_mcp_servers == ()
    by_id = {v.key_id: v for v in store.principals([a.id, b.id, other.id, gone.id])}
    assert sorted(by_id) == sorted([a.id, b.id, other.id])
    assert by_id[b.id].tenant_mcp_servers == ("docs", "search") and by_id[other.id].tenant_mcp_servers == ()

    mark = store.max_event_id()
    assert store.set_tenant_mcp_servers("acme", ["docs", "search"]) == info  # no change: no events
    assert store.events_after(mark) == []

    # the budget and the MCP servers are set independently, each keeping the other
    with_budget = store.set_tenant_budget("acme", 50, "day")
    assert (with_budget.budget_usd, with_budget.budget_period) == (50.0, "day")
    assert with_budget.mcp_servers == ("docs", "search")
    narrowed = store.set_tenant_mcp_servers("acme", ["docs"])
    assert (narrowed.budget_usd, narrowed.budget_period, narrowed.mcp_servers) == (50.0, "day", ("docs",))
    p = store.verify(key_a)
    assert p is not None and (p.tenant_budget_usd, p.tenant_mcp_servers) == (50.0, ("docs",))

    mark = store.max_event_id()
    reset = store.set_tenant_mcp_servers("acme", [])
    assert reset.mcp_servers == () and reset.budget_usd == 50.0
    assert sorted(e.key_id for e in store.events_after(mark)) == sorted([a.id, b.id])
    p = store.verify(key_a)
    assert p is not None and p.tenant_mcp_servers == ()

    # a tenant first made by its budget gets every server; one made by its servers, no budget
    assert store.set_tenant_budget("gamma", 5).mcp_servers == ()
    assert store.set_tenant_mcp_servers("delta", ["x"]) == TenantInfo("delta", 0.0, "none", NOW, ("x",))
    assert store.set_tenant_budget("delta", 5).mcp_servers == ("x",)


@pytest.mark.parametrize(
    ("servers", "says"),
    [
        ([""], "mcp_servers entry is required"),
        (["docs", "  "], "mcp_servers entry is required"),
        (["x" * (MAX_TEXT + 1)], f"mcp_servers entry is longer than {MAX_TEXT}"),
        ([f"s{i}" for i in range(MAX_MODELS + 1)], f"mcp_servers holds more than {MAX_MODELS}"),
        (["bad name!"], "'bad name!' is not an MCP server name"),
        (["docs", "a/b"], "'a/b' is not an MCP server name"),
        (["x" * 65], "is not an MCP server name"),
    ],
)
def test_bad_tenant_mcp_server_lists_are_refused(store: KeyStore, servers: Sequence[str], says: str) -> None:
    with pytest.raises(InvalidKeyArgument, match=says):
        clean_mcp_servers(servers)
    with pytest.raises(InvalidKeyArgument, match=says):  # a key's list follows the same rule
        store.create_key(name="k", tenant="acme", mcp_servers=servers)
    store.set_tenant_mcp_servers("acme", ["docs"])
    mark = store.max_event_id()
    with pytest.raises(InvalidKeyArgument, match=says):
        store.set_tenant_mcp_servers("acme", servers)
    assert store.get_tenant("acme").mcp_servers == ("docs",)  # refused: nothing changed
    assert store.events_after(mark) == []


def test_a_tenant_is_required(store: KeyStore) -> None:
    for tenant in ("", "  "):
        with pytest.raises(InvalidKeyArgument, match="tenant is required"):
            store.set_tenant_mcp_servers(tenant, ["docs"])
    with pytest.raises(InvalidKeyArgument, match="tenant is longer"):
        store.set_tenant_mcp_servers("t" * (MAX_TEXT + 1), [])


def test_upgrade_from_schema_v4_keeps_keys_and_tenants(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'v4.db'}")
    assert migrate(engine, "auth", store_mod.MIGRATIONS[:4]) == 4
    api_key = "sk-tail-" + "C" * 43
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO api_keys (id, key_hash, prefix, name, tenant, allowed_models, rpm, tpm, "
                "max_concurrency, expires_at, revoked, created_at, updated_at, response_cache, "
                "mcp_servers, budget_usd, budget_period) VALUES ('key_v4', :h, 'sk-tail-CCCC', 'v4', "
                "'acme', '[]', 5, 0, 0, 0, 0, 1, 1, 0, '[\"docs\"]', 2.5, 'day')"
            ),
            {"h": PEPPER.hash_key(api_key)},
        )
        conn.execute(
            sa.text(
                "INSERT INTO tenants (tenant, budget_usd, budget_period, updated_at) "
                "VALUES ('acme', 10, 'month', 7)"
            )
        )
    s = KeyStore(engine, PEPPER, clock=lambda: NOW)
    assert s.migrate() == len(store_mod.MIGRATIONS) == 5
    p = s.verify(api_key)
    assert p is not None and (p.key_id, p.rpm, p.mcp_servers) == ("key_v4", 5, ("docs",))
    assert (p.budget_usd, p.budget_period, p.tenant_budget_usd, p.tenant_budget_period) == (
        2.5,
        "day",
        10.0,
        "month",
    )
    assert p.tenant_mcp_servers == ()
    assert s.get_tenant("acme") == TenantInfo("acme", 10.0, "month", 7, ())
    assert s.set_tenant_mcp_servers("acme", ["docs"]).budget_usd == 10.0
    again = s.verify(api_key)
    assert again is not None and (again.mcp_servers, again.tenant_mcp_servers) == (("docs",), ("docs",))
    engine.dispose()


# --- the gateway's principal ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "tenant", "allowed", "refused"),
    [
        ((), (), {"a", "b", "c"}, set()),  # no list on either side: every server
        (("a",), (), {"a"}, {"b", "c"}),
        ((), ("a",), {"a"}, {"b", "c"}),
        (("a", "b"), ("b", "c"), {"b"}, {"a", "c", "d"}),  # both lists must allow it
        (("a",), ("b",), set(), {"a", "b", "c"}),
        (("a", "b"), ("a", "b"), {"a", "b"}, {"c"}),
    ],
)
def test_allows_mcp_server_needs_the_key_and_its_tenant(
    key: tuple[str, ...], tenant: tuple[str, ...], allowed: set[str], refused: set[str]
) -> None:
    p = Principal(
        key_id="key_1", tenant="acme", mcp_servers=frozenset(key), tenant_mcp_servers=frozenset(tenant)
    )
    assert {name for name in allowed | refused if p.allows_mcp_server(name)} == allowed


def test_principal_json_round_trips_the_tenant_servers_and_reads_old_json() -> None:
    p = Principal(
        key_id="key_1",
        tenant="acme",
        mcp_servers=frozenset({"facts"}),
        tenant_mcp_servers=frozenset({"search", "facts", "docs"}),
    )
    raw = principal_to_json(p)
    assert json.loads(raw)["tenant_mcp_servers"] == ["docs", "facts", "search"]  # sorted
    loaded = principal_from_json(raw)
    assert loaded == p and isinstance(loaded.tenant_mcp_servers, frozenset)
    assert not loaded.allows_mcp_server("docs") and loaded.allows_mcp_server("facts")

    old = json.loads(
        principal_to_json(Principal(key_id="key_2", tenant="acme", mcp_servers=frozenset({"x"})))
    )
    del old["tenant_mcp_servers"]  # written before tenants had MCP servers
    before = principal_from_json(json.dumps(old))
    assert before.tenant_mcp_servers == frozenset() and before.mcp_servers == frozenset({"x"})
    assert before.allows_mcp_server("x") and not before.allows_mcp_server("y")


def test_the_auth_client_reads_the_tenant_servers_of_a_principal() -> None:
    p = principal_from_proto(
        auth_pb2.Principal(
            key_id="key_1", tenant="acme", mcp_servers=["a", "b"], tenant_mcp_servers=["b", "c"]
        )
    )
    assert (p.mcp_servers, p.tenant_mcp_servers) == (frozenset({"a", "b"}), frozenset({"b", "c"}))
    assert [n for n in "abc" if p.allows_mcp_server(n)] == ["b"]
    older = principal_from_proto(auth_pb2.Principal(key_id="key_1", tenant="acme"))  # an older auth-service
    assert older.tenant_mcp_servers == frozenset() and older.allows_mcp_server("anything")
