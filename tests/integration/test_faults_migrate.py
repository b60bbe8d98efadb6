"""Replicas that start together migrate once (issue 8, faults 5): real PostgreSQL
(pgserver) and SQLite, two migrators started at the same moment in threads."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tail_service.db import Migration, make_engine, migrate


def _migrations() -> list[Migration]:
    def create(conn: Connection) -> None:
        conn.execute(sa.text("CREATE TABLE runs (version INTEGER NOT NULL)"))
        conn.execute(sa.text("INSERT INTO runs VALUES (1)"))
        time.sleep(0.5)  # a slow migration: the other replica starts meanwhile

    def second(conn: Connection) -> None:
        time.sleep(0.2)
        conn.execute(sa.text("INSERT INTO runs VALUES (2)"))

    return [create, second]


def test_two_replicas_migrating_at_once_apply_each_migration_once(db_url: str) -> None:
    barrier = threading.Barrier(2)
    engines = [make_engine(db_url), make_engine(db_url)]

    def replica(i: int) -> int:
        barrier.wait(10)
        return migrate(engines[i], "race", _migrations())

    try:
        with ThreadPoolExecutor(2) as pool:
            reached = list(pool.map(replica, range(2)))
        assert reached == [2, 2]
        with engines[0].connect() as conn:
            runs = [r[0] for r in conn.execute(sa.text("SELECT version FROM runs ORDER BY version"))]
            recorded = conn.execute(
                sa.text("SELECT version FROM schema_migrations WHERE service = 'race'")
            ).scalar_one()
        assert runs == [1, 2]
        assert recorded == 2
        # and later starts find nothing to do
        assert migrate(engines[1], "race", _migrations()) == 2
    finally:
        for engine in engines:
            engine.dispose()
