"""The usage ledger's way into the store: a Redis stream, drained in batches.

How no record is lost:

* **The request path** (:class:`UsageLedger`) sends each record as an ``XADD`` on the
  shared auto-pipelined connection, so it leaves in the same write as the request's
  settlement (no extra round trip, no SQL). The inference service waits for the reply,
  at most ``durable_wait`` (50 ms), before the response's last byte: a response that was
  sent has its record in Redis, and a ``kill -9`` of this process afterwards loses nothing.
* **Redis unreachable** (or not configured): records go to an in-memory buffer that a
  background task writes straight to the store in batches (bounded by ``max_buffer``;
  overflow is logged as an error with the count, never silently).
* **The drainer** (:class:`UsageDrainer`, in every worker, and in HTTP replicas with
  ``usage.drain_in_http``) reads the stream as one consumer of the group ``ledger``, writes a batch
  to the store in one transaction, then ``XACK`` + ``XDEL``. Each record has a unique id and
  the insert skips ids already stored, so a drainer that dies between its write and its
  ack (the entries stay pending) only causes a harmless repeat: another drainer claims
  entries pending longer than ``claim_after`` (``XAUTOCLAIM``) and stores them again as
  nothing new.

Redis must keep the stream: with the embedded server that is its append-only file (see
:mod:`tail_service.redis_embedded`); in production, Redis persistence as usual.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson

from tail_service.clients.redis_pipe import PipelinedRedis, Script, SharedRedis
from tail_service.clients.redis_resp import Reply
from tail_service.core.usage import LEDGER_FIELDS, UsageRecord
from tail_service.settings import UsageSettings
from tail_service.store import Store
from tail_service.store.usage import UsageStore

log = logging.getLogger("tail_service.usage")

#: the consumer group every drainer reads in
GROUP = "ledger"

# On a cluster, a script rather than a bare XADD: the cluster client routes scripts by key.
_XADD = Script("return redis.call('XADD', KEYS[1], '*', 'r', ARGV[1])")


class UsageLedger:
    """A :class:`~tail_service.core.usage.UsageSink` that writes to the ledger (see module)."""

    def __init__(
        self,
        redis: SharedRedis | None,
        store: Store,
        settings: UsageSettings,
        *,
        durable_wait: float = 0.05,
        redis_down: Callable[[], bool] = lambda: False,
    ) -> None:
        self._redis = redis
        #: the rate limiter's breaker: while it is open, records skip Redis
        self._redis_down = redis_down
        self._durable_wait = durable_wait
        #: when each XADD still unanswered was sent (replies come in order)
        self._pending: collections.deque[float] = collections.deque()
        self._rows = UsageStore(store)
        self._store = store
        self._settings = settings
        self._stream = settings.stream
        self._buffer: list[dict[str, Any]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._dropped = 0

    def record(self, rec: UsageRecord) -> asyncio.Future[None] | None:
        if self._redis is None or self._redis_down():
            self._hold(rec.to_row())
            return None
        now = time.monotonic()
        # Redis is stalled when an earlier record waits longer than a response would: then
        # responses stop waiting (the records still go, or fall back to the store).
        stalled = bool(self._pending) and now - self._pending[0] > self._durable_wait
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # the values in LEDGER_FIELDS order: a third of the bytes of a JSON object
        payload = orjson.dumps(rec.to_values())

        def sent(reply: Reply) -> None:
            if self._pending:
                self._pending.popleft()
            if isinstance(reply, BaseException):
                self._hold(rec.to_row())
            if not done.done():
                done.set_result(None)

        self._pending.append(now)
        if isinstance(self._redis, PipelinedRedis):
            self._redis.submit(("XADD", self._stream, "*", "r", payload), sent)
        else:
            self._redis.submit_script(_XADD, (self._stream,), (payload,), sent)
        return None if stalled else done

    def _hold(self, row: dict[str, Any]) -> None:
        """Keep ``row`` for a direct write to the store (Redis is not there)."""
        if len(self._buffer) >= self._settings.max_buffer:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.error(
                    "usage ledger: the store is not keeping up and Redis is unreachable; "
                    "%d records dropped so far",
                    self._dropped,
                )
            return
        self._buffer.append(row)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_buffer())

    async def _flush_buffer(self) -> None:
        """Write the held records to the store in batches until none are left."""
        while self._buffer:
            await asyncio.sleep(self._settings.flush_interval)
            rows = self._buffer[: self._settings.batch_size]
            try:
                await self._store.run(self._rows.insert, rows)
            except Exception as exc:  # kept, and tried again after the next interval
                log.warning("usage ledger: storing %d records failed (%s); retrying", len(rows), exc)
                await asyncio.sleep(1.0)
                continue
            del self._buffer[: len(rows)]

    async def close(self) -> None:
        """Wait (briefly) for the records on their way to Redis, then write what is held to
        the store (at shutdown)."""
        if self._redis is not None and self._pending:
            try:
                await self._redis.barrier(timeout=2.0)
            except Exception as exc:  # those not answered were held by their callback
                log.warning("usage ledger: Redis did not confirm the last records (%s)", type(exc).__name__)
        if self._flusher is not None:
            self._flusher.cancel()
        while self._buffer:
            rows = self._buffer[: self._settings.batch_size]
            await self._store.run(self._rows.insert, rows)
            del self._buffer[: len(rows)]


class UsageDrainer:
    """Moves records from the Redis stream into the store (see module)."""

    def __init__(self, url: str, store: Store, settings: UsageSettings, *, cluster: bool = False) -> None:
        self._url = url
        self._cluster = cluster
        self._store = store
        self._rows = UsageStore(store)
        self._settings = settings
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        #: records this drainer stored (not counting ones already stored)
        self.stored = 0

    def _client(self) -> Any:
        import redis.asyncio as aioredis

        # a read that hangs (a Redis that stopped answering) ends: the blocking read's wait
        # plus a margin
        timeout = self._settings.flush_interval + 10.0
        if self._cluster:
            return aioredis.RedisCluster.from_url(self._url, socket_timeout=timeout)
        return aioredis.from_url(self._url, socket_timeout=timeout)

    async def run(self) -> None:
        """Drain until cancelled, reconnecting (after a pause) when Redis goes away."""
        while True:
            client = self._client()
            try:
                await self._drain(client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("usage ledger: draining paused (%s: %s)", type(exc).__name__, exc)
            finally:
                await client.aclose()
            await asyncio.sleep(1.0)

    async def _drain(self, client: Any) -> None:
        import redis.exceptions

        stream, s = self._settings.stream, self._settings
        try:
            await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        claim_ms = int(s.claim_after * 1000)
        block_ms = max(1, int(s.flush_interval * 1000))
        loop = asyncio.get_running_loop()
        next_claim = 0.0
        while True:
            if loop.time() >= next_claim:  # entries another drainer read and never acked
                next_claim = loop.time() + s.claim_after / 2
                cursor = "0-0"
                while True:
                    reply = await client.xautoclaim(
                        stream, GROUP, self.consumer, claim_ms, start_id=cursor, count=s.batch_size
                    )
                    cursor, entries = reply[0], reply[1]
                    await self._store_entries(client, entries)
                    if not entries or cursor in (b"0-0", "0-0"):
                        break
            await self._store_entries(client, await self._gather(client, block_ms))

    async def _gather(self, client: Any, block_ms: int) -> list[Any]:
        """New entries for one store transaction: the first that arrive (waiting at most
        ``block_ms`` for them), then, ``flush_interval`` later, what came meanwhile, up to
        ``batch_size``. Two reads and one commit per batch, rather than a read per record
        and a commit per read (a commit of SQLite syncs the disk)."""
        s = self._settings
        reply = await client.xreadgroup(
            GROUP, self.consumer, {s.stream: ">"}, count=s.batch_size, block=block_ms
        )
        batch = [entry for _name, entries in reply or () for entry in entries]
        if batch and len(batch) < s.batch_size:
            await asyncio.sleep(s.flush_interval)
            reply = await client.xreadgroup(
                GROUP, self.consumer, {s.stream: ">"}, count=s.batch_size - len(batch)
            )
            batch += [entry for _name, entries in reply or () for entry in entries]
        return batch

    async def _store_entries(self, client: Any, entries: list[Any]) -> None:
        if not entries:
            return
        ids, rows = [], []
        for entry_id, fields in entries:
            ids.append(entry_id)
            if not fields:  # deleted meanwhile (XDEL): nothing to store
                continue
            raw = fields.get(b"r") or fields.get("r")
            try:
                row = orjson.loads(raw)
                if isinstance(row, list) and len(row) == len(LEDGER_FIELDS):
                    row = dict(zip(LEDGER_FIELDS, row, strict=True))
                if not isinstance(row, dict) or not row.get("id"):
                    raise ValueError("not a usage record")
            except (ValueError, TypeError):
                log.error("usage ledger: skipping a malformed stream entry %r", entry_id)
                continue
            rows.append(row)
        stored = await self._store.run(self._rows.insert, rows)
        stream = self._settings.stream
        await client.xack(stream, GROUP, *ids)
        await client.xdel(stream, *ids)
        self.stored += stored
