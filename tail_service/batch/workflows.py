"""The batch engine on DBOS: durable workflows, steps and queues (PostgreSQL or SQLite).

A batch is the workflow ``tail.batch`` (its workflow id is the batch id): a validate step,
then one ``tail.batch.chunk`` workflow per chunk of lines, enqueued on the chunk queue (at
most ``worker_concurrency`` chunks run on one worker; the lines of a chunk run
concurrently on its event loop), then a finalize step. DBOS checkpoints each step and
child workflow, so after a crash a worker resumes the batch where it stopped; a chunk
that runs again skips the lines whose result is stored.

DBOS is a process-wide singleton, so :func:`register` is called once per worker process,
before :func:`launch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dbos import DBOS, DBOSConfig, Queue, SetWorkflowID

from tail_service import __version__
from tail_service.agent import workflows as agent_workflows
from tail_service.agent.engine import AgentEngine
from tail_service.agent.workflows import AgentWorkflows
from tail_service.batch.engine import BatchEngine

#: the queue of batch workflows (each mostly waits for its chunks)
BATCH_QUEUE = "tail_batches"
#: the queue of chunk workflows
CHUNK_QUEUE = "tail_batch_chunks"
#: seconds between a worker's looks for chunks to run while batches run, and while none does
#: (an idle worker then costs ~1% of a core instead of ~3%)
CHUNK_POLL_BUSY = 0.25
CHUNK_POLL_IDLE = 2.0
#: one version for every worker of a release: DBOS recovers only workflows of its own
#: application version, and the default (a hash of the workflow code) would strand the
#: pending work of a worker restarted with a patched build
APP_VERSION = f"tail-service-{__version__}"


@dataclass(frozen=True, slots=True)
class Workflows:
    """The registered workflow functions and their queues (after :func:`launch`)."""

    batch: Any
    chunk: Any
    batch_queue: Queue
    chunk_queue: Queue

    async def set_chunk_polling(self, busy: bool, worker_concurrency: int) -> None:
        """Poll the chunk queue often while batches run, rarely otherwise. The setting lives
        in the system database (every worker reads it on its next poll)."""
        await DBOS.register_queue_async(
            CHUNK_QUEUE,
            worker_concurrency=worker_concurrency,
            polling_interval_sec=CHUNK_POLL_BUSY if busy else CHUNK_POLL_IDLE,
            on_conflict="always_update",
        )

    async def start_batch(self, batch_id: str) -> None:
        """Enqueue the batch's workflow; a batch already started is left as it is."""
        with SetWorkflowID(batch_id):
            await self.batch_queue.enqueue_async(self.batch, batch_id)


def register(engine: BatchEngine) -> tuple[Any, Any]:
    """Declare the batch workflows and steps (closures over ``engine``) with DBOS."""

    @DBOS.step(name="tail.batch.validate", retries_allowed=True, max_attempts=8, interval_seconds=1.0)
    async def validate(batch_id: str) -> list[tuple[int, int]]:
        return await engine.validate(batch_id)

    @DBOS.step(name="tail.batch.run_chunk", retries_allowed=True, max_attempts=8, interval_seconds=1.0)
    async def run_chunk(batch_id: str, first: int, last: int) -> int:
        return await engine.run_chunk(batch_id, first, last)

    @DBOS.step(name="tail.batch.finalize", retries_allowed=True, max_attempts=8, interval_seconds=1.0)
    async def finalize(batch_id: str) -> str | None:
        return await engine.finalize(batch_id)

    @DBOS.workflow(name="tail.batch.chunk")
    async def chunk_workflow(batch_id: str, first: int, last: int) -> int:
        return await run_chunk(batch_id, first, last)

    @DBOS.workflow(name="tail.batch")
    async def batch_workflow(batch_id: str) -> str | None:
        chunks = await validate(batch_id)
        queue = await DBOS.retrieve_queue_async(CHUNK_QUEUE)
        assert queue is not None
        handles = [await queue.enqueue_async(chunk_workflow, batch_id, first, last) for first, last in chunks]
        for handle in handles:
            try:
                await handle.get_result()
            except Exception:  # a chunk that failed for good: finalize records its lines
                DBOS.logger.exception("a chunk of batch %s failed", batch_id)
        return await finalize(batch_id)

    return batch_workflow, chunk_workflow


def dbos_config(system_database_url: str, executor_id: str, log_level: str) -> DBOSConfig:
    return {
        "name": "tail-service",
        "system_database_url": system_database_url,
        "executor_id": executor_id,
        "application_version": APP_VERSION,
        "log_level": "DEBUG" if log_level == "debug" else "WARNING",
        "enable_otlp": False,
    }


async def launch(
    engine: BatchEngine, config: DBOSConfig, agent: AgentEngine
) -> tuple[Workflows, AgentWorkflows]:
    """Register the workflows (batches and agent runs), start DBOS in this event loop (its
    workflows run on it), and register the queues. DBOS then recovers this executor's own
    unfinished work."""
    batch, chunk = register(engine)
    segment = agent_workflows.register(agent)
    DBOS(config=config)
    DBOS.launch()
    batch_queue = await DBOS.register_queue_async(
        BATCH_QUEUE, worker_concurrency=64, polling_interval_sec=1.0, on_conflict="always_update"
    )
    chunk_queue = await DBOS.register_queue_async(
        CHUNK_QUEUE,
        worker_concurrency=engine.settings.worker_concurrency,
        polling_interval_sec=CHUNK_POLL_IDLE,
        on_conflict="always_update",
    )
    return Workflows(batch, chunk, batch_queue, chunk_queue), AgentWorkflows(
        segment, agent.settings.worker_concurrency
    )


def recover(executor_id: str) -> int:
    """Take over the unfinished workflows of the dead worker ``executor_id`` (blocking)."""
    return len(DBOS._recover_pending_workflows([executor_id]))


def shutdown(timeout: int = 0) -> None:
    DBOS.destroy(workflow_completion_timeout_sec=timeout)
