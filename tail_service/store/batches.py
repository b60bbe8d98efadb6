"""Batches, their input lines and results, and worker heartbeats in the store (blocking calls;
callers run them through :meth:`~tail_service.store.Store.run`).

Status changes are conditional updates (``WHERE status IN (...)``), so concurrent actors (a
cancel from the API, a worker finishing) never overwrite each other's transition. Lines and
results are inserted with ``ON CONFLICT DO NOTHING`` on ``(batch_id, line_no)``: running a
step again after a crash adds nothing twice.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from tail_service.core.batch import batch_usage
from tail_service.store import Store, beyond
from tail_service.store.schema import batch_lines, batch_results, batches, workers

#: statuses after which nothing changes any more
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: statuses of a batch that has not ended
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
#: statuses a cancel request applies to
CANCELLABLE = ("validating", "in_progress")

_PAGE = 1000


@dataclass(frozen=True, slots=True)
class BatchRow:
    """One row of ``batches``."""

    id: str
    tenant: str
    key_id: str
    principal: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    enqueued: bool
    model: str | None
    metadata: str | None
    errors: str | None
    output_file_id: str | None
    error_file_id: str | None
    output_expires_after: int | None
    total: int
    completed: int
    failed: int
    usage: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    idempotency_key: str | None
    request_hash: str | None

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> BatchRow:
        return cls(**{f.name: row._mapping[f.name] for f in dataclasses.fields(cls)})

    def to_openai(self, progress: Progress | None = None) -> dict[str, Any]:
        """The OpenAI ``Batch`` object; live counts and usage from ``progress`` while it runs."""
        if progress is not None:
            completed, failed, usage = progress.completed, progress.failed, progress.usage()
        else:
            completed, failed = self.completed, self.failed
            usage = json.loads(self.usage) if self.usage else batch_usage(0, 0, 0, 0)
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": json.loads(self.errors) if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": completed, "failed": failed},
            "usage": usage,
            "metadata": json.loads(self.metadata) if self.metadata else None,
        }


@dataclass(frozen=True, slots=True)
class Progress:
    """Results stored so far for one batch."""

    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    def usage(self) -> dict[str, Any]:
        return batch_usage(
            self.prompt_tokens, self.completion_tokens, self.cached_tokens, self.reasoning_tokens
        )


@dataclass(frozen=True, slots=True)
class ResultRow:
    """One line's stored result."""

    line_no: int
    ok: bool
    record: bytes
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


def _without_result(batch_id: str, *columns: sa.ColumnElement[Any]) -> sa.Select[Any]:
    """``columns`` of the batch's lines that have no stored result, in line order."""
    has_result = sa.and_(
        batch_results.c.batch_id == batch_lines.c.batch_id,
        batch_results.c.line_no == batch_lines.c.line_no,
    )
    return (
        sa.select(*columns)
        .select_from(batch_lines.outerjoin(batch_results, has_result))
        .where(batch_lines.c.batch_id == batch_id, batch_results.c.line_no.is_(None))
        .order_by(batch_lines.c.line_no)
    )


class IdempotencyConflict(Exception):
    """The ``Idempotency-Key`` was used before for a different request."""


class BatchStore:
    """Blocking queries over the batch tables of one :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self._engine = store.engine
        self._postgres = store.dialect == "postgresql"

    def _insert_ignore(self, table: sa.Table) -> Any:
        insert = postgresql.insert if self._postgres else sqlite.insert
        return insert(table).on_conflict_do_nothing()

    # -- the API side ---------------------------------------------------------------------

    def create(self, values: dict[str, Any]) -> tuple[BatchRow, bool]:
        """Insert a new batch; ``(row, True)``. With an ``idempotency_key`` already used by
        the tenant for the same request: ``(that batch, False)``; for another request:
        :class:`IdempotencyConflict`."""
        key = values.get("idempotency_key")
        try:
            with self._engine.begin() as conn:
                conn.execute(sa.insert(batches).values(**values))
        except sa.exc.IntegrityError:
            if key is None:
                raise
            with self._engine.connect() as conn:
                row = conn.execute(
                    sa.select(batches).where(
                        batches.c.tenant == values["tenant"], batches.c.idempotency_key == key
                    )
                ).first()
            if row is None:
                raise
            existing = BatchRow.from_row(row)
            if existing.request_hash != values.get("request_hash"):
                raise IdempotencyConflict from None
            return existing, False
        found = self.get(values["tenant"], values["id"])
        assert found is not None
        return found, True

    def get(self, tenant: str, batch_id: str) -> BatchRow | None:
        """The batch, if it exists and belongs to ``tenant``."""
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(batches).where(batches.c.id == batch_id, batches.c.tenant == tenant)
            ).first()
        return BatchRow.from_row(row) if row is not None else None

    def get_any(self, batch_id: str) -> BatchRow | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(batches).where(batches.c.id == batch_id)).first()
        return BatchRow.from_row(row) if row is not None else None

    def page(self, tenant: str, after: str | None, limit: int) -> tuple[list[BatchRow], bool]:
        """A page of the tenant's batches, newest first, after the batch ``after``."""
        query = sa.select(batches).where(batches.c.tenant == tenant)
        with self._engine.connect() as conn:
            if after is not None:
                anchor = conn.execute(
                    sa.select(batches.c.created_at, batches.c.id).where(
                        batches.c.id == after, batches.c.tenant == tenant
                    )
                ).first()
                if anchor is None:
                    return [], False
                query = query.where(beyond(batches, anchor.created_at, anchor.id, desc=True))
            rows = conn.execute(
                query.order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit + 1)
            ).all()
        page = [BatchRow.from_row(r) for r in rows[:limit]]
        return page, len(rows) > limit

    def request_cancel(self, tenant: str, batch_id: str, now: int) -> BatchRow | None:
        """Move a running batch to ``cancelling``; the batch as it now is (``None``: not found)."""
        with self._engine.begin() as conn:
            conn.execute(
                sa.update(batches)
                .where(
                    batches.c.id == batch_id, batches.c.tenant == tenant, batches.c.status.in_(CANCELLABLE)
                )
                .values(status="cancelling", cancelling_at=now)
            )
        return self.get(tenant, batch_id)

    def progress(self, batch_id: str) -> Progress:
        """Counts and token sums of the results stored so far."""
        ok = sa.case((batch_results.c.ok, 1), else_=0)
        query = sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(ok), 0),
            sa.func.coalesce(sa.func.sum(batch_results.c.prompt_tokens), 0),
            sa.func.coalesce(sa.func.sum(batch_results.c.completion_tokens), 0),
            sa.func.coalesce(sa.func.sum(batch_results.c.cached_tokens), 0),
            sa.func.coalesce(sa.func.sum(batch_results.c.reasoning_tokens), 0),
        ).where(batch_results.c.batch_id == batch_id)
        with self._engine.connect() as conn:
            total, ok_count, prompt, completion, cached, reasoning = conn.execute(query).one()
        return Progress(
            int(ok_count), int(total - ok_count), int(prompt), int(completion), int(cached), int(reasoning)
        )

    # -- the worker side ------------------------------------------------------------------

    def unenqueued(self, limit: int = 100) -> list[str]:
        """Batches whose workflow no worker has started yet."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(batches.c.id)
                .where(batches.c.enqueued == sa.false())
                .order_by(batches.c.created_at)
                .limit(limit)
            ).all()
        return [r[0] for r in rows]

    def any_running(self) -> bool:
        """Whether some batch has not ended yet (its chunks may be waiting to run)."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(batches.c.id).where(batches.c.status.in_(RUNNING)).limit(1)).first()
        return row is not None

    def mark_enqueued(self, batch_id: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(sa.update(batches).where(batches.c.id == batch_id).values(enqueued=True))

    def transition(self, batch_id: str, from_: Sequence[str], to: str, **values: Any) -> bool:
        """Set ``status = to`` (and ``values``) if the status is one of ``from_``."""
        with self._engine.begin() as conn:
            result = conn.execute(
                sa.update(batches)
                .where(batches.c.id == batch_id, batches.c.status.in_(list(from_)))
                .values(status=to, **values)
            )
        return bool(result.rowcount)

    def update(self, batch_id: str, **values: Any) -> None:
        with self._engine.begin() as conn:
            conn.execute(sa.update(batches).where(batches.c.id == batch_id).values(**values))

    def insert_lines(self, batch_id: str, lines: Sequence[tuple[int, str, bytes]]) -> None:
        """Store validated input lines ``(line_no, custom_id, body JSON)``."""
        if not lines:
            return
        rows = [{"batch_id": batch_id, "line_no": n, "custom_id": c, "body": b} for n, c, b in lines]
        with self._engine.begin() as conn:
            conn.execute(self._insert_ignore(batch_lines), rows)

    def delete_lines(self, batch_id: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(sa.delete(batch_lines).where(batch_lines.c.batch_id == batch_id))

    def line_numbers(self, batch_id: str) -> list[int]:
        """Every stored line number of the batch, in order (for cutting it into chunks)."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(batch_lines.c.line_no)
                .where(batch_lines.c.batch_id == batch_id)
                .order_by(batch_lines.c.line_no)
            ).all()
        return [r[0] for r in rows]

    def pending_lines(self, batch_id: str, first: int, last: int) -> list[tuple[int, str, bytes]]:
        """Lines ``first..last`` (inclusive) that have no stored result yet."""
        query = _without_result(
            batch_id, batch_lines.c.line_no, batch_lines.c.custom_id, batch_lines.c.body
        ).where(batch_lines.c.line_no >= first, batch_lines.c.line_no <= last)
        with self._engine.connect() as conn:
            return [(r[0], r[1], r[2]) for r in conn.execute(query).all()]

    def insert_results(self, batch_id: str, results: Sequence[ResultRow]) -> None:
        """Store line results; a line that already has one keeps it."""
        if not results:
            return
        rows = [{"batch_id": batch_id, **dataclasses.asdict(r)} for r in results]
        with self._engine.begin() as conn:
            conn.execute(self._insert_ignore(batch_results), rows)

    def iter_records(self, batch_id: str, ok: bool) -> Iterator[bytes]:
        """The stored output lines (``ok``) or error lines, in line order, a page at a time."""
        last = 0
        while True:
            with self._engine.connect() as conn:
                rows = conn.execute(
                    sa.select(batch_results.c.line_no, batch_results.c.record)
                    .where(
                        batch_results.c.batch_id == batch_id,
                        batch_results.c.ok == ok,
                        batch_results.c.line_no > last,
                    )
                    .order_by(batch_results.c.line_no)
                    .limit(_PAGE)
                ).all()
            if not rows:
                return
            for row in rows:
                yield row[1]
            last = rows[-1][0]

    def unanswered(self, batch_id: str, after: int, limit: int = _PAGE) -> list[tuple[int, str]]:
        """Lines after ``after`` without a result: ``(line_no, custom_id)``, in order."""
        query = (
            _without_result(batch_id, batch_lines.c.line_no, batch_lines.c.custom_id)
            .where(batch_lines.c.line_no > after)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            return [(r[0], r[1]) for r in conn.execute(query).all()]

    # -- worker heartbeats -----------------------------------------------------------------

    def beat(self, executor_id: str, host: str, pid: int, started_at: int, now: float) -> None:
        """Record that ``executor_id`` is alive (insert or refresh its row)."""
        with self._engine.begin() as conn:
            updated = conn.execute(
                sa.update(workers)
                .where(workers.c.executor_id == executor_id)
                .values(host=host, pid=pid, started_at=started_at, last_seen=now)
            ).rowcount
            if not updated:
                conn.execute(
                    self._insert_ignore(workers).values(
                        executor_id=executor_id, host=host, pid=pid, started_at=started_at, last_seen=now
                    )
                )

    def dead_workers(self, now: float, dead_after: float) -> list[tuple[str, float]]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(workers.c.executor_id, workers.c.last_seen).where(
                    workers.c.last_seen < now - dead_after
                )
            ).all()
        return [(r[0], r[1]) for r in rows]

    def live_workers(self, now: float, dead_after: float) -> int:
        """Workers whose heartbeat is recent."""
        with self._engine.connect() as conn:
            count = conn.execute(
                sa.select(sa.func.count()).select_from(workers).where(workers.c.last_seen >= now - dead_after)
            ).scalar()
        return int(count or 0)

    def claim_dead(self, executor_id: str, last_seen: float) -> bool:
        """Take over a dead worker: delete its row if it is still as seen. One caller wins."""
        with self._engine.begin() as conn:
            result = conn.execute(
                sa.delete(workers).where(
                    workers.c.executor_id == executor_id, workers.c.last_seen == last_seen
                )
            )
        return bool(result.rowcount)

    def forget_worker(self, executor_id: str) -> None:
        """A worker shutting down cleanly (it left no work behind)."""
        with self._engine.begin() as conn:
            conn.execute(sa.delete(workers).where(workers.c.executor_id == executor_id))
