"""The shared store of files and batches (SQLite embedded, PostgreSQL when a DSN is given).

:class:`Store` owns the engine and a small thread pool: every query runs in that pool
through :meth:`Store.run`, so no caller's event loop ever waits on the database.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tail_service.db import make_engine, migrate
from tail_service.settings import StoreSettings
from tail_service.store.schema import MIGRATIONS, SERVICE

P = ParamSpec("P")
T = TypeVar("T")


def beyond(table: sa.Table, created_at: int, row_id: str, *, desc: bool) -> sa.ColumnElement[bool]:
    """Rows after ``(created_at, row_id)`` in ``(created_at, id)`` order (a keyset cursor):
    older ones when ``desc``, newer ones otherwise."""
    at, key = table.c.created_at, table.c.id
    if desc:
        return sa.or_(at < created_at, sa.and_(at == created_at, key < row_id))
    return sa.or_(at > created_at, sa.and_(at == created_at, key > row_id))


class Store:
    """An engine on the store, migrated, with the pool its queries run in."""

    def __init__(self, settings: StoreSettings, base_dir: Path | None) -> None:
        self.settings = settings
        self.engine: Engine = make_engine(settings.database_url, base_dir)
        self._pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="store")

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> int:
        """Apply the store's migrations (blocking; at start-up)."""
        return migrate(self.engine, SERVICE, MIGRATIONS)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run the blocking ``fn`` in the store's pool and await its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.engine.dispose()
