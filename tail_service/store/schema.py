"""The store's tables: files (content in chunks), batches, their input lines and results,
the workers' heartbeats, agent runs with their steps and stream events, and the usage ledger. One schema for
SQLite and PostgreSQL (SQLAlchemy Core).

Times are unix seconds. A file's bytes are rows of ``file_chunks`` so every worker on
every machine reads them from the one store. ``batch_results`` has one row per
``(batch_id, line_no)``: a chunk that runs again after a crash inserts nothing twice.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tail_service.db import Migration

SERVICE = "store"

metadata = sa.MetaData()

_ID = 64
_BigInt = sa.BigInteger().with_variant(sa.Integer, "sqlite")

files = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.String(_ID), primary_key=True),
    sa.Column("tenant", sa.String(256), nullable=False),
    sa.Column("filename", sa.String(512), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    #: ``uploading`` until the last chunk is stored (never listed), then ``processed``
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=True),
    sa.Index("ix_files_tenant_created", "tenant", "created_at", "id"),
    sa.Index("ix_files_expires", "expires_at"),
)

file_chunks = sa.Table(
    "file_chunks",
    metadata,
    sa.Column("file_id", sa.String(_ID), sa.ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.String(_ID), primary_key=True),
    sa.Column("tenant", sa.String(256), nullable=False),
    sa.Column("key_id", sa.String(64), nullable=False),
    #: the creating key's policy and limits (JSON), charged for every line
    sa.Column("principal", sa.Text, nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", sa.String(_ID), nullable=False),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    #: a worker has started the batch's workflow (whose id is the batch id)
    sa.Column("enqueued", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("model", sa.String(256), nullable=True),
    sa.Column("metadata", sa.Text, nullable=True),
    sa.Column("errors", sa.Text, nullable=True),
    sa.Column("output_file_id", sa.String(_ID), nullable=True),
    sa.Column("error_file_id", sa.String(_ID), nullable=True),
    sa.Column("output_expires_after", sa.BigInteger, nullable=True),
    sa.Column("total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("usage", sa.Text, nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("in_progress_at", sa.BigInteger, nullable=True),
    sa.Column("expires_at", sa.BigInteger, nullable=True),
    sa.Column("finalizing_at", sa.BigInteger, nullable=True),
    sa.Column("completed_at", sa.BigInteger, nullable=True),
    sa.Column("failed_at", sa.BigInteger, nullable=True),
    sa.Column("expired_at", sa.BigInteger, nullable=True),
    sa.Column("cancelling_at", sa.BigInteger, nullable=True),
    sa.Column("cancelled_at", sa.BigInteger, nullable=True),
    sa.Column("idempotency_key", sa.String(256), nullable=True),
    sa.Column("request_hash", sa.String(64), nullable=True),
    sa.Index("ix_batches_tenant_created", "tenant", "created_at", "id"),
    sa.Index("ix_batches_idempotency", "tenant", "idempotency_key", unique=True),
    sa.Index("ix_batches_enqueued", "enqueued"),
    sa.Index("ix_batches_status", "status"),
)

batch_lines = sa.Table(
    "batch_lines",
    metadata,
    sa.Column("batch_id", sa.String(_ID), primary_key=True),
    sa.Column("line_no", sa.Integer, primary_key=True),
    sa.Column("custom_id", sa.String(512), nullable=False),
    #: the line's request ``body``, as JSON bytes
    sa.Column("body", sa.LargeBinary, nullable=False),
)

batch_results = sa.Table(
    "batch_results",
    metadata,
    sa.Column("batch_id", sa.String(_ID), primary_key=True),
    sa.Column("line_no", sa.Integer, primary_key=True),
    #: true for the output file, false for the error file
    sa.Column("ok", sa.Boolean, nullable=False),
    #: the output line (JSON bytes, no newline)
    sa.Column("record", sa.LargeBinary, nullable=False),
    sa.Column("prompt_tokens", _BigInt, nullable=False, server_default="0"),
    sa.Column("completion_tokens", _BigInt, nullable=False, server_default="0"),
    sa.Column("cached_tokens", _BigInt, nullable=False, server_default="0"),
    sa.Column("reasoning_tokens", _BigInt, nullable=False, server_default="0"),
)

workers = sa.Table(
    "batch_workers",
    metadata,
    sa.Column("executor_id", sa.String(128), primary_key=True),
    sa.Column("host", sa.String(256), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.BigInteger, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
)


agent_runs = sa.Table(
    "agent_runs",
    metadata,
    sa.Column("id", sa.String(_ID), primary_key=True),
    sa.Column("tenant", sa.String(256), nullable=False),
    sa.Column("key_id", sa.String(64), nullable=False),
    #: the creating key's policy and limits (JSON), charged for every model call
    sa.Column("principal", sa.Text, nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("background", sa.Boolean, nullable=False),
    #: the validated request (sampling fields, tool choice, the tools asked for, limits)
    sa.Column("request", sa.Text, nullable=False),
    #: the tools the model is offered, resolved when the run starts (MCP tools listed)
    sa.Column("tools", sa.Text, nullable=True),
    #: the conversation so far (chat-completions messages)
    sa.Column("messages", sa.Text, nullable=False),
    #: the step number the run goes on with: a step applies its result only when it
    #: matches (a step run again after a crash changes nothing twice)
    sa.Column("next_step", sa.Integer, nullable=False, server_default="0"),
    #: what comes next: ``model`` (a model call), ``tools`` (the pending tool steps), ``wait``
    #: (paused for the client), or ``end``
    sa.Column("phase", sa.String(16), nullable=False, server_default="model"),
    sa.Column("model_calls", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tool_calls", sa.Integer, nullable=False, server_default="0"),
    sa.Column("prompt_tokens", _BigInt, nullable=False, server_default="0"),
    sa.Column("completion_tokens", _BigInt, nullable=False, server_default="0"),
    #: milliseconds worked in finished segments (time paused for the client does not count)
    sa.Column("worked_ms", _BigInt, nullable=False, server_default="0"),
    #: each pause for the client starts a new segment (a new workflow ``<id>.<segment>``)
    sa.Column("segment", sa.Integer, nullable=False, server_default="0"),
    #: the segment a worker has started
    sa.Column("started_segment", sa.Integer, nullable=False, server_default="-1"),
    sa.Column("segment_started_at", sa.Float, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("required_action", sa.Text, nullable=True),
    sa.Column("output", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("incomplete_reason", sa.String(32), nullable=True),
    sa.Column("metadata", sa.Text, nullable=True),
    #: the sequence number the next stream event gets
    sa.Column("next_seq", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("started_at", sa.BigInteger, nullable=True),
    sa.Column("completed_at", sa.BigInteger, nullable=True),
    #: a response created with ``store: false``: nobody may read it back, so it is deleted
    #: once answered (or, at the latest, by a worker once its request timeout has passed)
    sa.Column("unstored", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_agent_runs_tenant_created", "tenant", "created_at", "id"),
    sa.Index("ix_agent_runs_start", "started_segment", "segment"),
    sa.Index("ix_agent_runs_unstored", "unstored", "created_at"),
)

agent_steps = sa.Table(
    "agent_steps",
    metadata,
    sa.Column("run_id", sa.String(_ID), primary_key=True),
    sa.Column("step_no", sa.Integer, primary_key=True),
    #: ``model_call`` or ``tool_call``
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("status", sa.String(24), nullable=False),
    #: the step as the API shows it (JSON)
    sa.Column("data", sa.Text, nullable=False),
)

agent_events = sa.Table(
    "agent_events",
    metadata,
    sa.Column("run_id", sa.String(_ID), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("type", sa.String(32), nullable=False),
    #: the event as sent (JSON bytes)
    sa.Column("data", sa.LargeBinary, nullable=False),
)

usage_records = sa.Table(
    "usage_records",
    metadata,
    #: unique per record: a record delivered twice (a drainer that died before its ack) is stored once
    sa.Column("id", sa.String(_ID), primary_key=True),
    sa.Column("request_id", sa.String(256), nullable=False),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("tenant", sa.String(256), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("deployment", sa.String(256), nullable=True),
    sa.Column("endpoint", sa.String(32), nullable=False),
    #: ``api``, ``batch`` or ``agent``
    sa.Column("source", sa.String(8), nullable=False),
    sa.Column("prompt_tokens", _BigInt, nullable=False),
    sa.Column("completion_tokens", _BigInt, nullable=False),
    sa.Column("cached_tokens", _BigInt, nullable=False),
    #: nano-dollars (1e-9 USD)
    sa.Column("cost_nanos", _BigInt, nullable=False),
    sa.Column("latency_ms", sa.Integer, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    #: ``ok``, ``error`` or ``cancelled``
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("cache_hit", sa.Boolean, nullable=False),
    #: tokens counted offline (the upstream did not report them)
    sa.Column("estimated", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Index("ix_usage_created", "created_at"),
    sa.Index("ix_usage_key_created", "key_id", "created_at"),
    sa.Index("ix_usage_tenant_created", "tenant", "created_at"),
)

_V1_TABLES = ("files", "file_chunks", "batches", "batch_lines", "batch_results", "batch_workers")
_V2_TABLES = ("agent_runs", "agent_steps", "agent_events")


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[metadata.tables[name] for name in _V1_TABLES])


def _v2(conn: Connection) -> None:
    """Agent runs, their steps and their stream events."""
    metadata.create_all(conn, tables=[metadata.tables[name] for name in _V2_TABLES])


def _v3(conn: Connection) -> None:
    """The usage ledger."""
    metadata.create_all(conn, tables=[usage_records])


def _v4(conn: Connection) -> None:
    """``agent_runs.unstored`` (a store that ran ``_v2`` with today's table has it already)."""
    if "unstored" not in {c["name"] for c in sa.inspect(conn).get_columns("agent_runs")}:
        conn.execute(sa.text("ALTER TABLE agent_runs ADD COLUMN unstored BOOLEAN NOT NULL DEFAULT false"))
    for index in agent_runs.indexes:
        if index.name == "ix_agent_runs_unstored":
            index.create(conn, checkfirst=True)


MIGRATIONS: list[Migration] = [_v1, _v2, _v3, _v4]
