"""The usage ledger in the store: batched inserts (each record once) and bucketed sums.

Blocking; run through :meth:`tail_service.store.Store.run`. The sums are in the shape of
OpenAI's organization Usage API (see :mod:`tail_service.core.usage_query`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from tail_service.core.usage import LEDGER_FIELDS
from tail_service.store import Store
from tail_service.store.schema import usage_records

#: the table's columns, in the order of a record's values (a test checks they agree)
_COLUMNS = LEDGER_FIELDS

#: the columns a query may group by, by their name in the API
GROUP_COLUMNS = {"model": "model", "api_key_id": "key_id", "tenant": "tenant", "source": "source"}


class UsageStore:
    """Blocking queries over ``usage_records``."""

    def __init__(self, store: Store) -> None:
        self._engine = store.engine
        # The driver's own executemany with a statement compiled once: SQLAlchemy's
        # per-row parameter processing cost ~12 us a row, most of a drainer's work.
        mark = "%s" if store.dialect == "postgresql" else "?"
        names = ", ".join(_COLUMNS)
        marks = ", ".join([mark] * len(_COLUMNS))
        self._sql = f"INSERT INTO {usage_records.name} ({names}) VALUES ({marks}) ON CONFLICT (id) DO NOTHING"

    def insert(self, rows: Sequence[dict[str, Any]]) -> int:
        """Store ``rows`` in one transaction; a row whose id is already stored is skipped.
        Returns how many were new."""
        if not rows:
            return 0
        values = [tuple(row[c] for c in _COLUMNS) for row in rows]
        with self._engine.begin() as conn:
            return max(0, conn.exec_driver_sql(self._sql, values).rowcount)

    def count(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(usage_records)).scalar_one())

    def sums(
        self,
        *,
        start: int,
        end: int,
        width: int,
        group_by: Iterable[str] = (),
        key_id: str | None = None,
        tenant: str | None = None,
        models: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """Sums per bucket (``(created_at - start) // width``) and group, over
        ``start <= created_at < end``: one dict per non-empty (bucket, group) with
        ``bucket`` and the grouped columns, ``requests``, the token sums and ``cost_nanos``."""
        t = usage_records.c
        groups = [t[GROUP_COLUMNS[g]].label(g) for g in group_by]
        bucket = ((t.created_at - start) // width).label("bucket")
        query = (
            sa.select(
                bucket,
                *groups,
                sa.func.count().label("requests"),
                sa.func.coalesce(sa.func.sum(t.prompt_tokens), 0).label("prompt_tokens"),
                sa.func.coalesce(sa.func.sum(t.completion_tokens), 0).label("completion_tokens"),
                sa.func.coalesce(sa.func.sum(t.cached_tokens), 0).label("cached_tokens"),
                sa.func.coalesce(sa.func.sum(t.cost_nanos), 0).label("cost_nanos"),
            )
            .where(t.created_at >= start, t.created_at < end)
            .group_by(bucket, *groups)
            .order_by(bucket, *groups)
        )
        if key_id is not None:
            query = query.where(t.key_id == key_id)
        if tenant is not None:
            query = query.where(t.tenant == tenant)
        if models:
            query = query.where(t.model.in_(list(models)))
        with self._engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]
