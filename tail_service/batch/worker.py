"""``tail-service worker``: a worker process for batches and agent runs.

It builds the same model proxy and admission as the HTTP service (lines are charged to
their key's limits at batch priority), opens the store, and launches DBOS in its event
loop. Alongside the workflows it runs three small loops:

* **start**: batches and agent runs created through the API are rows in the store; the
  worker enqueues each one's workflow (workflow id = batch id, or ``<run id>.<segment>``,
  so two workers starting the same one start it once) and marks it started;
* **heartbeat**: every ``heartbeat_interval`` the worker refreshes its row in
  ``batch_workers``;
* **take over**: a worker whose heartbeat is older than ``dead_after`` is dead. The first
  live worker to delete its row (a compare-and-delete, so exactly one wins) asks DBOS to
  re-enqueue the dead worker's pending workflows, which then run here or on any other
  worker. A worker that restarts with the same executor id recovers its own work at once.

Expired files are purged here too, so the HTTP replicas never do background writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path

from tail_service.agent.engine import AgentEngine
from tail_service.app import _Closers, build_core
from tail_service.batch import workflows
from tail_service.batch.engine import BatchEngine
from tail_service.clients.auth import AuthClient
from tail_service.clients.grpc_channel import ReloadingChannel
from tail_service.clients.mcp import McpClient
from tail_service.clients.redis_pipe import PipelinedRedis
from tail_service.clients.redis_pubsub import listen, publisher
from tail_service.core.agent import AGENT_WAKE_CHANNEL, RUN_EVENTS_CHANNEL
from tail_service.db import normalize_url
from tail_service.settings import Settings

log = logging.getLogger("tail_service.worker")

#: seconds between looks for newly created batches
START_POLL = 0.5
#: seconds between purges of expired files
PURGE_INTERVAL = 60.0
#: seconds past the request timeout after which a ``store: false`` response is purged
UNSTORED_GRACE = 60.0


def executor_id(settings: Settings) -> str:
    return settings.batch.executor_id or socket.gethostname()


def system_database_url(settings: Settings) -> str:
    """DBOS's own tables: beside the store (a ``dbos.sqlite`` file next to a SQLite store, the
    ``dbos`` schema of the same PostgreSQL database)."""
    url = normalize_url(settings.store.database_url, settings.state_dir)
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        return "sqlite:///" + str(Path(path).with_name(Path(path).stem + "-dbos.sqlite"))
    return "postgresql://" + url.split("://", 1)[1]


async def _every(interval: float, what: str, fn: Callable[[], Awaitable[object]]) -> None:
    """Run ``fn`` every ``interval`` seconds; a failure is logged and tried again next time."""
    while True:
        try:
            await fn()
        except Exception:
            log.exception("%s failed; trying again", what)
        await asyncio.sleep(interval)


async def _start_runs_loop(settings: Settings, start_runs: Callable[[], Awaitable[None]]) -> None:
    """Start waiting agent runs every ``agent.start_poll`` seconds, and at once when the HTTP
    service publishes on :data:`AGENT_WAKE_CHANNEL` (with Redis configured, not a cluster)."""
    wake = asyncio.Event()
    listener = None
    if settings.redis.url and not settings.redis.cluster:
        listener = asyncio.create_task(
            listen(settings.redis.url, AGENT_WAKE_CHANNEL, lambda _message: wake.set(), what="new agent runs")
        )
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), settings.agent.start_poll)
            wake.clear()
            try:
                await start_runs()
            except Exception:
                log.exception("starting agent runs failed; trying again")
    finally:
        if listener is not None:
            listener.cancel()


async def _stop_dbos() -> None:
    """Shut DBOS down from a thread of our own, then give the loop a fresh default executor:
    DBOS replaced it with its own pool and shuts that pool down, and the closers that run
    after this one still need threads."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1, thread_name_prefix="dbos-stop") as pool:
        await loop.run_in_executor(pool, workflows.shutdown)
    loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="asyncio"))


async def run_worker(settings: Settings, stop: asyncio.Event) -> None:
    """Run a worker until ``stop`` is set."""
    async with AsyncExitStack() as stack:
        closers = _Closers(stack)
        core = await build_core(settings, closers, response_cache=False, drain_usage=True)
        await core.warm
        if core.limiter is not None:
            await core.limiter.prepare()
        keys = None
        if settings.auth.mode == "grpc" and settings.auth.address:
            # the key that created a batch is checked again while the batch runs
            keys = AuthClient(ReloadingChannel(settings.auth.address, settings.auth.tls), settings.auth)
            closers.add("the auth-service client", keys.close)
        engine = BatchEngine(settings.batch, core.store, core.inference, keys=keys, tracer=core.tracer)
        mcp = McpClient(
            settings.mcp_servers,
            tool_timeout=settings.agent.tool_timeout,
            max_output_bytes=settings.agent.max_tool_output_bytes,
        )
        closers.add("the MCP client", mcp.aclose)
        agent = AgentEngine(
            settings.agent,
            core.store,
            core.inference,
            mcp,
            default_max_tokens=settings.ratelimit.default_max_tokens,
            tracer=core.tracer,
            # the HTTP side's waits and streams hear of each new event at once
            notify=publisher(core.redis_client, RUN_EVENTS_CHANNEL)
            if isinstance(core.redis_client, PipelinedRedis)
            else None,
        )
        me = executor_id(settings)
        config = workflows.dbos_config(system_database_url(settings), me, settings.log_level)
        flows, agent_flows = await workflows.launch(engine, config, agent)
        closers.add("DBOS", _stop_dbos)
        closers.add("the agent runs' watch", agent_flows.aclose)
        store, batches, files = core.store, engine.batches, engine.files
        started_at, host, pid = int(time.time()), socket.gethostname(), os.getpid()

        async def beat() -> None:
            await store.run(batches.beat, me, host, pid, started_at, time.time())

        polling_busy = False

        async def start_new() -> None:
            nonlocal polling_busy
            for batch_id in await store.run(batches.unenqueued):
                await flows.start_batch(batch_id)
                await store.run(batches.mark_enqueued, batch_id)
            busy = await store.run(batches.any_running)
            if busy != polling_busy:
                await flows.set_chunk_polling(busy, settings.batch.worker_concurrency)
                polling_busy = busy

        async def start_runs() -> None:
            if not agent_flows.room:
                return
            for run_id, segment in await store.run(agent.runs.to_start, agent_flows.room):
                await agent_flows.start(run_id, segment)
                await store.run(agent.runs.mark_started, run_id, segment)

        async def take_over() -> None:
            dead = await store.run(batches.dead_workers, time.time(), settings.batch.dead_after)
            for other, last_seen in dead:
                if other == me or not await store.run(batches.claim_dead, other, last_seen):
                    continue
                count = await asyncio.to_thread(workflows.recover, other)
                log.warning("took over the work of dead worker %s (%d workflows)", other, count)

        async def purge() -> None:
            removed = await store.run(files.purge_expired, int(time.time()))
            if removed:
                log.info("purged %d expired files", removed)
            # responses with ``store: false`` whose HTTP call may no longer be waiting (it
            # deletes them itself once answered; these are what a crash or a gone client left)
            unread = int(time.time() - settings.server.request_timeout - UNSTORED_GRACE)
            while (gone := await store.run(agent.runs.purge_unstored, unread)) > 0:
                log.info("purged %d responses created with store: false", gone)

        await beat()
        loops = [
            asyncio.create_task(_every(settings.batch.heartbeat_interval, "heartbeat", beat)),
            asyncio.create_task(_every(START_POLL, "starting new batches", start_new)),
            asyncio.create_task(_start_runs_loop(settings, start_runs)),
            asyncio.create_task(_every(settings.batch.dead_after / 3, "taking over dead workers", take_over)),
            asyncio.create_task(
                _every(PURGE_INTERVAL, "purging expired files and unstored responses", purge)
            ),
        ]
        for task in loops:
            closers.task("a worker loop", task)
        # printed whatever the log level: `up` (and the tests) wait for this line
        print(f"batch worker ready (executor {me})", file=sys.stderr, flush=True)
        await stop.wait()
        log.info("batch worker stopping", extra={"executor_id": me})


def main(settings: Settings) -> None:
    """Run a worker in this process until SIGTERM or SIGINT."""
    import signal

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
