"""Agent runs, their steps and stream events in the store (blocking calls; callers run them
through :meth:`~tail_service.store.Store.run`).

A run's row is a small state machine (``phase``, ``next_step``, the conversation). A step
applies its result with :meth:`AgentStore.advance`, a conditional update on ``next_step``
that also appends the step's events in the same transaction: a step that runs again after
a crash finds the run already advanced and changes nothing twice. Events are numbered from
the run's ``next_seq`` counter (an atomic increment), so readers see one gap-free sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tail_service.core.agent import TERMINAL, event, usage_object
from tail_service.store import Store
from tail_service.store.schema import agent_events, agent_runs, agent_steps

#: events one read returns at most
_EVENT_PAGE = 500


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


@dataclass(frozen=True, slots=True)
class RunRow:
    """One row of ``agent_runs``."""

    id: str
    tenant: str
    key_id: str
    principal: str
    model: str
    status: str
    background: bool
    request: str
    tools: str | None
    messages: str
    next_step: int
    phase: str
    model_calls: int
    tool_calls: int
    prompt_tokens: int
    completion_tokens: int
    worked_ms: int
    segment: int
    started_segment: int
    segment_started_at: float | None
    cancel_requested: bool
    required_action: str | None
    output: str | None
    error: str | None
    incomplete_reason: str | None
    metadata: str | None
    next_seq: int
    created_at: int
    started_at: int | None
    completed_at: int | None
    unstored: bool

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> RunRow:
        return cls(**{f.name: row._mapping[f.name] for f in dataclasses.fields(cls)})

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self, steps: Sequence[StepRow] | None = None) -> dict[str, Any]:
        """The ``agentic.run`` object; with ``steps``, each step too."""
        output = loads(self.output)
        request = loads(self.request)
        out: dict[str, Any] = {
            "id": self.id,
            "object": "agentic.run",
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "model": self.model,
            "status": self.status,
            "incomplete_details": {"reason": self.incomplete_reason} if self.incomplete_reason else None,
            "background": self.background,
            "output": output,
            "output_text": output.get("content") if isinstance(output, dict) else None,
            "required_action": loads(self.required_action),
            "usage": usage_object(self.prompt_tokens, self.completion_tokens),
            "model_calls": self.model_calls,
            "tool_calls": self.tool_calls,
            "limits": request["limits"],
            "error": loads(self.error),
            "metadata": loads(self.metadata),
        }
        if steps is not None:
            out["steps"] = [s.data for s in steps]
        return out


@dataclass(frozen=True, slots=True)
class StepRow:
    step_no: int
    type: str
    status: str
    data: dict[str, Any]


#: an event to append: its type and its own fields
NewEvent = tuple[str, Mapping[str, Any]]
#: a step to write: ``(step_no, type, status, data)``
NewStep = tuple[int, str, str, Mapping[str, Any]]


class AgentStore:
    """Blocking queries over the agent tables of one :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self._engine = store.engine

    # -- runs ---------------------------------------------------------------------------

    def create(self, values: Mapping[str, Any], steps: Sequence[NewStep] = ()) -> RunRow:
        """Insert a run (with the steps it starts with) and its first event, ``run.created``."""
        with self._engine.begin() as conn:
            conn.execute(sa.insert(agent_runs).values(**values))
            for step_no, kind, status, data in steps:
                self._put_step(conn, values["id"], step_no, kind, status, data)
            row = RunRow.from_row(
                conn.execute(sa.select(agent_runs).where(agent_runs.c.id == values["id"])).one()
            )
            self._append(conn, row.id, [("run.created", {"run": row.to_openai()})])
        return row

    def get(self, tenant: str, run_id: str) -> RunRow | None:
        """The run, if it exists and belongs to ``tenant``."""
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(agent_runs).where(agent_runs.c.id == run_id, agent_runs.c.tenant == tenant)
            ).first()
        return None if row is None else RunRow.from_row(row)

    def delete(self, tenant: str, run_id: str) -> bool:
        """Delete a run with its steps and events; ``False`` if the tenant has no such run."""
        with self._engine.begin() as conn:
            gone = conn.execute(
                sa.delete(agent_runs).where(agent_runs.c.id == run_id, agent_runs.c.tenant == tenant)
            ).rowcount
            if gone:
                conn.execute(sa.delete(agent_steps).where(agent_steps.c.run_id == run_id))
                conn.execute(sa.delete(agent_events).where(agent_events.c.run_id == run_id))
        return bool(gone)

    def purge_unstored(self, before: int, limit: int = 500) -> int:
        """Delete up to ``limit`` runs marked ``unstored`` created before ``before`` (with
        their steps and events); how many went."""
        with self._engine.begin() as conn:
            ids = list(
                conn.execute(
                    sa.select(agent_runs.c.id)
                    .where(agent_runs.c.unstored.is_(True), agent_runs.c.created_at < before)
                    .limit(limit)
                ).scalars()
            )
            if ids:
                conn.execute(sa.delete(agent_steps).where(agent_steps.c.run_id.in_(ids)))
                conn.execute(sa.delete(agent_events).where(agent_events.c.run_id.in_(ids)))
                conn.execute(sa.delete(agent_runs).where(agent_runs.c.id.in_(ids)))
        return len(ids)

    def get_any(self, run_id: str) -> RunRow | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(agent_runs).where(agent_runs.c.id == run_id)).first()
        return None if row is None else RunRow.from_row(row)

    def advance(
        self,
        run_id: str,
        where: Mapping[str, Any],
        values: Mapping[str, Any],
        events: Sequence[NewEvent] = (),
        steps: Sequence[NewStep] = (),
    ) -> bool:
        """Apply a step's result if the run's columns still hold ``where``: the new
        ``values``, with ``steps`` written and ``events`` appended in the same transaction.
        ``False`` (and nothing written) when the result was applied before."""
        conditions = [agent_runs.c.id == run_id, *(agent_runs.c[k] == v for k, v in where.items())]
        with self._engine.begin() as conn:
            done = conn.execute(sa.update(agent_runs).where(*conditions).values(**values)).rowcount
            if done:
                for step_no, kind, status, data in steps:
                    self._put_step(conn, run_id, step_no, kind, status, data)
                self._append(conn, run_id, events)
        return bool(done)

    def request_cancel(self, tenant: str, run_id: str, now: int) -> RunRow | None:
        """Cancel a run: at once when no worker is on it (queued or paused), else ask its
        worker to stop before its next step. The run as it now is (``None``: not found)."""
        with self._engine.begin() as conn:
            row = conn.execute(
                sa.select(agent_runs.c.status, agent_runs.c.next_step).where(
                    agent_runs.c.id == run_id, agent_runs.c.tenant == tenant
                )
            ).first()
            if row is None:
                return None
            status, step = row
            if status in TERMINAL:
                return self.get(tenant, run_id)
            # a worker that takes the run from here on sees the request
            conn.execute(sa.update(agent_runs).where(agent_runs.c.id == run_id).values(cancel_requested=True))
            if status in ("queued", "requires_action"):
                ended = conn.execute(
                    sa.update(agent_runs)
                    .where(
                        agent_runs.c.id == run_id,
                        agent_runs.c.status == status,
                        agent_runs.c.next_step == step,
                    )
                    .values(
                        status="cancelled",
                        phase="end",
                        required_action=None,
                        completed_at=now,
                        next_step=step + 1,
                    )
                ).rowcount
                if ended:
                    now_row = conn.execute(sa.select(agent_runs).where(agent_runs.c.id == run_id)).one()
                    summary = RunRow.from_row(now_row).to_openai()
                    self._append(conn, run_id, [("run.cancelled", {"run": summary})])
        return self.get(tenant, run_id)

    def stopping(self, run_id: str) -> bool:
        """Whether the run is to stop: a cancel was asked for, or the run was deleted."""
        with self._engine.connect() as conn:
            value = conn.execute(
                sa.select(agent_runs.c.cancel_requested).where(agent_runs.c.id == run_id)
            ).scalar()
        return value is None or bool(value)

    def cancel_requested(self, run_id: str) -> bool:
        with self._engine.connect() as conn:
            value = conn.execute(
                sa.select(agent_runs.c.cancel_requested).where(agent_runs.c.id == run_id)
            ).scalar()
        return bool(value)

    # -- the worker side ----------------------------------------------------------------

    def to_start(self, limit: int = 100) -> list[tuple[str, int]]:
        """``(run id, segment)`` of the segments no worker has started yet."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(agent_runs.c.id, agent_runs.c.segment)
                .where(agent_runs.c.started_segment < agent_runs.c.segment, agent_runs.c.status == "queued")
                .order_by(agent_runs.c.created_at)
                .limit(limit)
            ).all()
        return [(r[0], int(r[1])) for r in rows]

    def mark_started(self, run_id: str, segment: int) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                sa.update(agent_runs)
                .where(agent_runs.c.id == run_id, agent_runs.c.started_segment < segment)
                .values(started_segment=segment)
            )

    # -- steps --------------------------------------------------------------------------

    def steps(self, run_id: str) -> list[StepRow]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(agent_steps).where(agent_steps.c.run_id == run_id).order_by(agent_steps.c.step_no)
            ).all()
        return [StepRow(r.step_no, r.type, r.status, orjson.loads(r.data)) for r in rows]

    def step(self, run_id: str, step_no: int) -> StepRow | None:
        with self._engine.connect() as conn:
            r = conn.execute(
                sa.select(agent_steps).where(agent_steps.c.run_id == run_id, agent_steps.c.step_no == step_no)
            ).first()
        return None if r is None else StepRow(r.step_no, r.type, r.status, orjson.loads(r.data))

    def put_step(
        self,
        run_id: str,
        step_no: int,
        kind: str,
        status: str,
        data: Mapping[str, Any],
        events: Sequence[NewEvent] = (),
    ) -> None:
        """Insert or replace a step's row, with its events."""
        with self._engine.begin() as conn:
            self._put_step(conn, run_id, step_no, kind, status, data)
            self._append(conn, run_id, events)

    @staticmethod
    def _put_step(
        conn: Connection, run_id: str, step_no: int, kind: str, status: str, data: Mapping[str, Any]
    ) -> None:
        values = {"type": kind, "status": status, "data": dumps(data)}
        updated = conn.execute(
            sa.update(agent_steps)
            .where(agent_steps.c.run_id == run_id, agent_steps.c.step_no == step_no)
            .values(**values)
        ).rowcount
        if not updated:
            conn.execute(sa.insert(agent_steps).values(run_id=run_id, step_no=step_no, **values))

    # -- events -------------------------------------------------------------------------

    def append_delta(self, run_id: str, events: Sequence[NewEvent]) -> bool:
        """Append a streaming model call's events; whether the run is to stop now (a cancel
        was asked for, or the run was deleted): the answer rides on the same transaction."""
        with self._engine.begin() as conn:
            cancel = conn.execute(
                sa.select(agent_runs.c.cancel_requested).where(agent_runs.c.id == run_id)
            ).scalar()
            if cancel is None:
                return True
            self._append(conn, run_id, events)
        return bool(cancel)

    def append(self, run_id: str, events: Sequence[NewEvent]) -> list[bytes]:
        with self._engine.begin() as conn:
            return self._append(conn, run_id, events)

    @staticmethod
    def _append(conn: Connection, run_id: str, events: Sequence[NewEvent]) -> list[bytes]:
        if not events:
            return []
        # an increment first: it takes the row's write lock, so concurrent writers queue here
        end = conn.execute(
            sa.update(agent_runs)
            .where(agent_runs.c.id == run_id)
            .values(next_seq=agent_runs.c.next_seq + len(events))
            .returning(agent_runs.c.next_seq)
        ).scalar_one()
        first = int(end) - len(events)
        rows, out = [], []
        for i, (kind, fields) in enumerate(events):
            data = orjson.dumps(event(run_id, first + i, kind, **fields))
            rows.append({"run_id": run_id, "seq": first + i, "type": kind, "data": data})
            out.append(data)
        conn.execute(sa.insert(agent_events), rows)
        return out

    def events(self, run_id: str, after: int, limit: int = _EVENT_PAGE) -> list[tuple[int, str, bytes]]:
        """Events numbered above ``after``, in order."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(agent_events.c.seq, agent_events.c.type, agent_events.c.data)
                .where(agent_events.c.run_id == run_id, agent_events.c.seq > after)
                .order_by(agent_events.c.seq)
                .limit(limit)
            ).all()
        return [(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]
