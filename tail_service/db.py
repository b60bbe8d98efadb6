"""SQL storage for the services: one code path for SQLite and PostgreSQL (SQLAlchemy 2).

:func:`make_engine` turns a URL from config into an engine (SQLite paths relative to the
state directory; WAL and a busy timeout so several processes can share the file).
:func:`migrate` applies a service's numbered schema migrations at start-up, each in
its own transaction, and records the version reached in ``schema_migrations``. Replicas
that start together take turns: the whole run holds a lock (a PostgreSQL advisory lock
keyed by the service; on SQLite an ``flock`` on a file beside the database), so each
migration is applied once, by whoever gets the lock first, and the others find it done.

A small runner instead of Alembic: each service has a handful of linear migrations,
applied by the service itself at start-up on both backends; Alembic's revision graph,
env.py and CLI would be more machinery than schema.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
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
    """Apply ``migrations[current:]`` for ``service``; returns the schema version reached.

    Safe to run from several processes at once (see the module doc): the version is read
    only once the migration lock is held.
    """
    with _migration_lock(engine, service):
        _MIGRATIONS.metadata.create_all(engine, tables=[_MIGRATIONS])
        with engine.begin() as conn:
            row = conn.execute(
                sa.select(_MIGRATIONS.c.version).where(_MIGRATIONS.c.service == service)
            ).first()
            current = row[0] if row else 0
        for version in range(current + 1, len(migrations) + 1):
            with engine.begin() as conn:
                migrations[version - 1](conn)
                values = {"service": service, "version": version, "applied_at": int(time.time())}
                if version == 1:
                    conn.execute(sa.insert(_MIGRATIONS).values(**values))
                else:
                    conn.execute(
                        sa.update(_MIGRATIONS).where(_MIGRATIONS.c.service == service).values(**values)
                    )
            log.info("migrated", extra={"service": service, "version": version})
    return max(current, len(migrations))


def advisory_lock_key(service: str) -> int:
    """The PostgreSQL advisory-lock key of ``service``'s migrations (a signed 64-bit int)."""
    digest = hashlib.sha256(f"tail_service.migrate:{service}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def _migration_lock(engine: Engine, service: str) -> Iterator[None]:
    """Hold the migration lock of ``service`` (blocking until it is free)."""
    if engine.dialect.name == "postgresql":
        key = advisory_lock_key(service)
        # A session lock on a connection of its own, outside any transaction: the
        # migrations run in transactions on other connections while it is held, and
        # the server drops it with the connection if this process dies.
        with engine.connect() as raw:
            conn = raw.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                try:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                except sa.exc.SQLAlchemyError:
                    # never back to the pool still locked: closing the session unlocks
                    raw.invalidate()
                    log.warning("could not release the migration lock; connection dropped")
        return
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield  # nobody else can see this database
        return
    with open(f"{database}.migrate-lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield
