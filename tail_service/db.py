"""SQL storage for the services: one code path for SQLite and PostgreSQL (SQLAlchemy 2).

:func:`make_engine` turns a URL from config into an engine (SQLite paths relative to the
state directory; WAL and a busy timeout so several processes can share the file).
:func:`migrate` applies a service's numbered schema migrations at start-up, each in
its own transaction, and records the version reached in ``schema_migrations``.

A small runner instead of Alembic: each service has a handful of linear migrations,
applied by the service itself at start-up on both backends; Alembic's revision graph,
env.py and CLI would be more machinery than schema.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("tail_service.db")

Migration = Callable[[Connection], None]

_MIGRATIONS = sa.Table(
    "schema_migrations",
    sa.MetaData(),
    sa.Column("service", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("applied_at", sa.BigInteger, nullable=False),
)


def normalize_url(url: str, base_dir: Path | None = None) -> str:
    """Resolve a relative SQLite path against ``base_dir``; pick psycopg 3 for PostgreSQL."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and base_dir is not None:
        rel = url[len("sqlite:///") :]
        if rel and rel != ":memory:":
            return "sqlite:///" + str((base_dir / rel).resolve())
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str, base_dir: Path | None = None) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout.

    ``hide_parameters``: SQL errors never carry bound values (key hashes, ciphertexts).
    """
    url = normalize_url(url, base_dir)
    if url.startswith("sqlite"):
        path = url[len("sqlite:///") :]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True
        )

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: object, _record: object) -> None:
            cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True)


def migrate(engine: Engine, service: str, migrations: Sequence[Migration]) -> int:
    """Apply ``migrations[current:]`` for ``service``; returns the schema version reached."""
    _MIGRATIONS.metadata.create_all(engine, tables=[_MIGRATIONS])
    with engine.begin() as conn:
        row = conn.execute(sa.select(_MIGRATIONS.c.version).where(_MIGRATIONS.c.service == service)).first()
        current = row[0] if row else 0
    for version in range(current + 1, len(migrations) + 1):
        with engine.begin() as conn:
            migrations[version - 1](conn)
            values = {"service": service, "version": version, "applied_at": int(time.time())}
            if version == 1:
                conn.execute(sa.insert(_MIGRATIONS).values(**values))
            else:
                conn.execute(sa.update(_MIGRATIONS).where(_MIGRATIONS.c.service == service).values(**values))
        log.info("migrated", extra={"service": service, "version": version})
    return max(current, len(migrations))
