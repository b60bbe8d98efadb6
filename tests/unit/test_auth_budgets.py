"""Key and tenant budgets in the key store (SQLite), their checks, the schema upgrade that
adds them, and the principal's JSON form that batches keep."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tail_service.authsvc import store as store_mod
from tail_service.authsvc.keys import Pepper
from tail_service.authsvc.records import InvalidKeyArgument, clean_budget
from tail_service.authsvc.store import KeyStore
from tail_service.core.auth import principal_from_json, principal_to_json
from tail_service.core.types import Principal
from tail_service.db import make_engine, migrate

PEPPER = Pepper(b"p" * 32)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    s = KeyStore(engine, PEPPER, clock=lambda: 1_700_000_000)
    s.migrate()
    yield s
    engine.dispose()


@pytest.mark.parametrize(
    ("usd", "period", "expected"),
    [
        (0, "", (0.0, "none")),
        (0, "day", (0.0, "none")),  # no budget has no period
        (5, "", (5.0, "month")),
        (5, None, (5.0, "month")),
        (5, " Day ", (5.0, "day")),
        (2.5, "none", (2.5, "none")),
        (1e9, "month", (1e9, "month")),
    ],
)
def test_clean_budget(usd: float, period: str | None, expected: tuple[float, str]) -> None:
    assert clean_budget(usd, period) == expected


@pytest.mark.parametrize(
    ("usd", "period", "field"),
    [
        (-0.01, "day", "budget_usd"),
        (math.nan, "day", "budget_usd"),
        (math.inf, "day", "budget_usd"),
        (-math.inf, "", "budget_usd"),
        (1e9 + 1, "day", "budget_usd"),
        (5, "week", "budget_period"),
        (5, "daily", "budget_period"),
        (0, "year", "budget_period"),
    ],
)
def test_bad_budgets_name_the_field(usd: float, period: str, field: str) -> None:
    with pytest.raises(InvalidKeyArgument, match=field):
        clean_budget(usd, period)


def test_key_budget_is_created_updated_and_verified(store: KeyStore) -> None:
    info, api_key = store.create_key(tenant="acme", budget_usd=5, budget_period="day")
    assert (info.budget_usd, info.budget_period) == (5.0, "day")
    plain, _ = store.create_key(tenant="acme")
    assert (plain.budget_usd, plain.budget_period) == (0.0, "none")

    assert store.update(info.id, budget_usd=7).budget_period == "day"  # keeps its period
    assert store.update(info.id, budget_period="month").budget_usd == 7.0  # keeps its amount
    assert store.update(plain.id, budget_usd=3).budget_period == "month"  # the default
    removed = store.update(info.id, budget_usd=0)
    assert (removed.budget_usd, removed.budget_period) == (0.0, "none")
    with pytest.raises(InvalidKeyArgument, match="budget_period"):
        store.update(info.id, budget_period="day")  # no budget to give a period to
    with pytest.raises(InvalidKeyArgument, match="budget_usd"):
        store.update(plain.id, budget_usd=math.nan)
    with pytest.raises(InvalidKeyArgument, match="budget_period"):
        store.create_key(tenant="acme", budget_usd=1, budget_period="hour")
    assert store.get(plain.id).budget_usd == 3.0  # a refused update changed nothing

    store.update(info.id, budget_usd=9.5, budget_period="none")
    p = store.verify(api_key)
    assert p is not None and (p.budget_usd, p.budget_period) == (9.5, "none")
    assert (p.tenant_budget_usd, p.tenant_budget_period) == (0.0, "none")
    assert sorted((k.id, k.budget_usd) for k in store.list_keys("acme")) == sorted(
        [(info.id, 9.5), (plain.id, 3.0)]
    )


def test_tenant_budget_reaches_principals_and_logs_an_update_per_key(store: KeyStore) -> None:
    a, key_a = store.create_key(tenant="acme")
    b, _ = store.create_key(tenant="acme", budget_usd=1)
    gone, _ = store.create_key(tenant="acme")
    store.revoke(key_id=gone.id)
    other, key_other = store.create_key(tenant="beta")
    assert store.get_tenant("acme").budget_usd == 0 and store.get_tenant("acme").updated_at == 0

    before = store.max_event_id()
    info = store.set_tenant_budget("acme", 100)
    assert (info.tenant, info.budget_usd, info.budget_period, info.updated_at) == (
        "acme",
        100.0,
        "month",
        1_700_000_000,
    )
    assert store.get_tenant(" acme ") == info
    events = store.events_after(before)
    assert sorted(e.key_id for e in events) == sorted([a.id, b.id])
    assert {e.kind for e in events} == {"updated"}

    p = store.verify(key_a)
    assert p is not None and (p.tenant_budget_usd, p.tenant_budget_period) == (100.0, "month")
    q = store.verify(key_other)
    assert q is not None and q.tenant_budget_usd == 0 and q.tenant_budget_period == "none"
    by_id = {v.key_id: v for v in store.principals([a.id, b.id, other.id])}
    assert by_id[b.id].tenant_budget_usd == 100.0 and by_id[b.id].budget_usd == 1.0
    assert by_id[other.id].tenant_budget_usd == 0.0

    mark = store.max_event_id()
    assert store.set_tenant_budget("acme", 100, "month") == info  # no change: no events
    assert store.events_after(mark) == []
    store.set_tenant_budget("acme", 0)
    assert len(store.events_after(mark)) == 2
    assert store.get_tenant("acme").budget_period == "none"
    for bad, field in ((-1, "budget_usd"), (math.inf, "budget_usd")):
        with pytest.raises(InvalidKeyArgument, match=field):
            store.set_tenant_budget("acme", bad)
    with pytest.raises(InvalidKeyArgument, match="budget_period"):
        store.set_tenant_budget("acme", 1, "fortnight")
    with pytest.raises(InvalidKeyArgument, match="tenant"):
        store.set_tenant_budget(" ", 1)


def test_upgrade_from_schema_v3_keeps_keys_without_budgets(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'v3.db'}")
    assert migrate(engine, "auth", store_mod.MIGRATIONS[:3]) == 3
    api_key = "sk-tail-" + "B" * 43
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO api_keys (id, key_hash, prefix, name, tenant, allowed_models, rpm, tpm, "
                "max_concurrency, expires_at, revoked, created_at, updated_at, response_cache, "
                "mcp_servers) VALUES ('key_v3', :h, 'sk-tail-BBBB', 'v3', 'acme', '[]', 5, 0, 0, 0, "
                "0, 1, 1, 1, '[\"docs\"]')"
            ),
            {"h": PEPPER.hash_key(api_key)},
        )
    s = KeyStore(engine, PEPPER)
    assert s.migrate() == len(store_mod.MIGRATIONS) == 5
    p = s.verify(api_key)
    assert p is not None and (p.key_id, p.rpm, p.response_cache) == ("key_v3", 5, True)
    assert p.mcp_servers == ("docs",)
    assert (p.budget_usd, p.budget_period) == (0, "none")
    assert (p.tenant_budget_usd, p.tenant_budget_period) == (0, "none")
    assert s.set_tenant_budget("acme", 10, "day").budget_usd == 10
    assert s.update("key_v3", budget_usd=2).budget_period == "month"
    again = s.verify(api_key)
    assert again is not None and (again.budget_usd, again.tenant_budget_period) == (2.0, "day")
    engine.dispose()


def test_principal_json_round_trips_budgets_and_reads_old_json() -> None:
    p = Principal(
        key_id="key_1",
        tenant="acme",
        allowed_models=frozenset({"b", "a"}),
        budget_usd=5.5,
        budget_period="day",
        tenant_budget_usd=100.0,
        tenant_budget_period="month",
    )
    assert principal_from_json(principal_to_json(p)) == p
    old = json.loads(principal_to_json(Principal(key_id="key_2", tenant="acme", rpm=3)))
    for field in ("budget_usd", "budget_period", "tenant_budget_usd", "tenant_budget_period"):
        del old[field]
    loaded = principal_from_json(json.dumps(old))
    assert (loaded.key_id, loaded.rpm) == ("key_2", 3)
    assert (loaded.budget_usd, loaded.budget_period) == (0.0, "none")
    assert (loaded.tenant_budget_usd, loaded.tenant_budget_period) == (0.0, "none")
    whole = principal_from_json(json.dumps({**old, "budget_usd": 5, "budget_period": "month"}))
    assert isinstance(whole.budget_usd, float) and whole.budget_usd == 5.0
