"""Responses created with ``store: false`` in the store, on SQLite and on PostgreSQL: the
schema upgrade that marks them, and the purge that deletes them with their steps and
events (what a worker runs for those no HTTP call deleted)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tail_service.settings import StoreSettings
from tail_service.store import Store
from tail_service.store.agent import AgentStore
from tail_service.store.schema import MIGRATIONS, SERVICE, agent_events, agent_runs, agent_steps


def _run(run_id: str, created_at: int, *, unstored: bool) -> dict[str, object]:
    return {
        "id": run_id,
        "tenant": "t1",
        "key_id": "key_1",
        "principal": "{}",
        "model": "gpt-test",
        "status": "completed",
        "background": False,
        "request": '{"limits": {}}',
        "messages": "[]",
        "created_at": created_at,
        "unstored": unstored,
    }


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store(StoreSettings(database_url=db_url), None)
    try:
        yield store
    finally:
        store.close()


def _count(store: Store, table: sa.Table) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_a_store_from_before_the_mark_is_upgraded(store: Store) -> None:
    from tail_service.db import migrate

    migrate(store.engine, SERVICE, MIGRATIONS[:3])
    with store.engine.begin() as conn:  # as version 3 made it: no mark, no index
        conn.execute(sa.text("DROP INDEX ix_agent_runs_unstored"))
        conn.execute(sa.text("ALTER TABLE agent_runs DROP COLUMN unstored"))
        conn.execute(
            sa.text(
                "INSERT INTO agent_runs (id, tenant, key_id, principal, model, status, background,"
                " request, messages, created_at) VALUES ('resp_old', 't1', 'k', '{}', 'm', 'completed',"
                " false, '{}', '[]', 1)"
            )
        )
    assert store.migrate() == len(MIGRATIONS)
    assert store.migrate() == len(MIGRATIONS)  # once only
    runs = AgentStore(store)
    old = runs.get_any("resp_old")
    assert old is not None and old.unstored is False
    assert runs.purge_unstored(before=10**12) == 0


def test_purge_deletes_only_old_unstored_runs_with_their_rows(store: Store) -> None:
    store.migrate()
    runs = AgentStore(store)
    steps = [(0, "model_call", "completed", {"index": 0})]
    runs.create(_run("resp_kept_stored", 100, unstored=False), steps)
    runs.create(_run("resp_gone", 100, unstored=True), steps)
    runs.create(_run("resp_gone_too", 150, unstored=True), steps)
    runs.create(_run("resp_too_new", 300, unstored=True), steps)
    assert runs.purge_unstored(before=200, limit=1) == 1  # in pages
    assert runs.purge_unstored(before=200) == 1
    assert runs.purge_unstored(before=200) == 0
    with store.engine.connect() as conn:
        left = set(conn.execute(sa.select(agent_runs.c.id)).scalars())
    assert left == {"resp_kept_stored", "resp_too_new"}
    assert _count(store, agent_steps) == 2 and _count(store, agent_events) == 2  # run.created each
