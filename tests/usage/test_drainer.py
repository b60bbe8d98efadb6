"""The ledger's drainer against a real redis-server and a real store: a record is stored
exactly once whoever reads it, and a bad entry never holds up the good ones."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions

from tail_service.app import _Closers
from tail_service.clients.usage_ledger import GROUP, UsageDrainer
from tail_service.redis_embedded import EmbeddedRedis
from tail_service.settings import UsageSettings
from tail_service.store import Store
from tests.usage.fixtures import open_store, record_row, store_url, stored_rows

STREAM = "tail:usage:v1:{ledger}"
SETTINGS = UsageSettings(stream=STREAM, claim_after=0.5, flush_interval=0.05, batch_size=3)


@asynccontextmanager
async def draining(url: str, store: Store) -> AsyncIterator[UsageDrainer]:
    """A drainer running in this loop until the block ends."""
    drainer = UsageDrainer(url, store, SETTINGS)
    task = asyncio.create_task(drainer.run())
    try:
        yield drainer
    finally:
        # more than one cancel: redis-py may swallow one (see
        # test_the_drainer_stops_at_its_first_cancellation, which checks that one is enough)
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=1.0)


async def until(pred_async: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Await ``pred_async()`` every 20 ms until true; the seconds it took."""
    start = time.monotonic()
    while not await pred_async():
        assert time.monotonic() - start < within, f"not within {within}s: {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_a_record_read_by_a_dead_drainer_is_claimed_after_claim_after_and_stored_once(
    private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    r = aioredis.from_url(private_redis.url())
    try:
        rows = [record_row(f"rec-{i}") for i in range(5)]
        await r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        for row in rows:
            await r.xadd(STREAM, {"r": orjson.dumps(row)})
        # a drainer reads all five and dies before storing or acking them
        read: Any = await r.xreadgroup(GROUP, "dead-drainer", {STREAM: ">"}, count=10)
        assert len(read[0][1]) == 5
        read_at = time.monotonic()
        with open_store(store_url(tmp_path)) as store:
            async with draining(private_redis.url(), store) as drainer:

                async def all_stored() -> bool:
                    return await asyncio.to_thread(lambda: len(stored_rows(store))) == 5

                await until(all_stored, 10, "the dead drainer's records stored")
                waited = time.monotonic() - read_at
                # entries another consumer holds are not taken before they were idle claim_after
                assert waited >= SETTINGS.claim_after - 0.05, waited
                await until(lambda: _settled(r), 5, "acked and deleted")
                await asyncio.sleep(3 * SETTINGS.claim_after)  # more claim rounds: nothing new
                stored = await asyncio.to_thread(stored_rows, store)
                assert drainer.stored == 5
            assert sorted(stored, key=_id) == rows  # each once, every column as sent
    finally:
        await r.aclose()


async def test_a_record_delivered_twice_is_stored_once(private_redis: EmbeddedRedis, tmp_path: Path) -> None:
    r = aioredis.from_url(private_redis.url())
    try:
        twice = record_row("rec-twice", prompt=11, completion=13)
        once = record_row("rec-once")
        # the same record twice (a drainer that stored it and died before its ack, then the
        # XAUTOCLAIM redelivery; or a replayed XADD): two stream entries, one record id
        for payload in (twice, once, twice):
            await r.xadd(STREAM, {"r": orjson.dumps(payload)})
        with open_store(store_url(tmp_path)) as store:
            async with draining(private_redis.url(), store):
                await until(lambda: _settled(r), 10, "three entries acked and deleted")
                stored = await asyncio.to_thread(stored_rows, store)
            # and a second drainer reading the same record again changes nothing
            await r.xadd(STREAM, {"r": orjson.dumps(twice)})
            async with draining(private_redis.url(), store):
                await until(lambda: _settled(r), 10, "the replay acked and deleted")
                again = await asyncio.to_thread(stored_rows, store)
        assert sorted(s["id"] for s in stored) == ["rec-once", "rec-twice"]
        assert again == stored
        by_id = {s["id"]: s for s in stored}
        assert by_id["rec-twice"] == twice
    finally:
        await r.aclose()


async def test_a_malformed_entry_is_skipped_and_the_rest_stored(
    private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    r = aioredis.from_url(private_redis.url())
    try:
        good = [record_row(f"good-{i}") for i in range(4)]
        entries: list[dict[str, bytes]] = [
            {"r": orjson.dumps(good[0])},
            {"r": b"{not json"},
            {"r": orjson.dumps([1, 2, 3])},  # JSON, not a record
            {"r": orjson.dumps({"prompt_tokens": 1})},  # a record without an id
            {"other": b"field"},  # no record field at all
            {"r": orjson.dumps(good[1])},
            {"r": orjson.dumps(good[2])},
            {"r": orjson.dumps(good[3])},
        ]
        for fields in entries:
            await r.xadd(STREAM, fields)  # type: ignore[arg-type]
        with open_store(store_url(tmp_path)) as store:
            async with draining(private_redis.url(), store) as drainer:
                await until(lambda: _settled(r), 10, "every entry acked and deleted")
                stored = await asyncio.to_thread(stored_rows, store)
                assert drainer.stored == 4
        assert sorted(s["id"] for s in stored) == [f"good-{i}" for i in range(4)]
    finally:
        await r.aclose()


async def _settled(r: aioredis.Redis) -> bool:
    """Nothing left in the stream and nothing pending in the group."""
    try:
        pending = await r.xpending(STREAM, GROUP)
    except redis.exceptions.ResponseError:  # no drainer has created the group yet
        return False
    return int(await r.xlen(STREAM)) == 0 and int(pending["pending"]) == 0


def _id(row: dict[str, Any]) -> str:
    return str(row["id"])


async def test_shutdown_stops_the_drainer_wherever_it_is(
    private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    """Shutdown (``_Closers.task``, as the app and the worker close) ends the drainer within
    about a second wherever the cancellation lands: in a blocking XREADGROUP, an XAUTOCLAIM,
    a store write. redis-py's asyncio client now and then swallows a cancellation that lands
    inside a command (reproduced with a bare xreadgroup loop), so one cancel is not enough:
    the closer cancels again until the task ends."""
    r = aioredis.from_url(private_redis.url())
    try:
        with open_store(store_url(tmp_path)) as store:
            for i in range(60):
                await r.xadd(STREAM, {"r": orjson.dumps(record_row(f"c-{i}"))})
                drainer = UsageDrainer(private_redis.url(), store, SETTINGS)
                async with AsyncExitStack() as stack:
                    _Closers(stack).task("the usage drainer", asyncio.create_task(drainer.run()))
                    await asyncio.sleep(0.01 + (i % 12) * 0.009)
                    t0 = time.monotonic()
                assert time.monotonic() - t0 < 2.5, f"attempt {i}: shutdown waited on the drainer"
    finally:
        await r.aclose()
