"""Redis Cluster for the limiter: one pipelined connection per primary, commands routed by slot.

Every script the limiter runs touches the keys of one hash tag, so it belongs to one
slot (CRC16 of the tag, as Redis computes it). The slot map comes from ``CLUSTER SLOTS``
on any known node; a ``MOVED`` reply (a slot changed hands) refreshes the map and sends
the command once more to the new owner, and ``ASK`` (a slot being migrated) sends it to
the importing node after ``ASKING``; ``TRYAGAIN`` (a multi-key script while its slot is
half migrated) is retried after a short pause. Per node, commands are auto-pipelined exactly as
with :class:`~tail_service.clients.redis_pipe.PipelinedRedis`, so a request is still one
round trip. The seed URL's password, user and TLS options apply to every node.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tail_service.clients.redis_pipe import Arg, PipelinedRedis, Reply, Script

log = logging.getLogger("tail_service.clients.redis_cluster")

Address = tuple[str, int]
#: tries per command: redirections and TRYAGAIN pauses included
_ATTEMPTS = 5
#: seconds before retrying after TRYAGAIN (times the attempt number)
_TRYAGAIN_PAUSE = 0.01


def _redirect(reply: Reply) -> tuple[str, Address] | None:
    """``("MOVED" | "ASK", (host, port))`` for a redirection error, else ``None``."""
    if not isinstance(reply, ResponseError):
        return None
    parts = str(reply).split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    host, _, port = parts[2].rpartition(":")
    return parts[0], (host, int(port))


class ClusterPipelinedRedis:
    """The limiter's Redis client for a Redis Cluster (``redis.cluster: true``)."""

    def __init__(self, url: str, *, connect_timeout: float = 1.0) -> None:
        self._seed_url = url
        self._connect_timeout = connect_timeout
        seed = urlsplit(url)
        if seed.scheme not in ("redis", "rediss") or not seed.hostname:
            raise ValueError("a Redis Cluster seed is a redis:// or rediss:// URL with a host")
        self._seed: Address = (seed.hostname, seed.port or 6379)
        self._nodes: dict[Address, PipelinedRedis] = {}
        #: slot ranges, sorted: the first slot of each, its last, and its primary
        self._starts: list[int] = []
        self._ranges: list[tuple[int, Address]] = []
        self._refreshing: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"ClusterPipelinedRedis(seed={self._seed[0]}:{self._seed[1]}, nodes={len(self._nodes)})"

    # nodes and the slot map
    def _node(self, addr: Address) -> PipelinedRedis:
        node = self._nodes.get(addr)
        if node is None:
            parts = urlsplit(self._seed_url)
            auth, _, _ = parts.netloc.rpartition("@")
            host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            netloc = (auth + "@" if auth else "") + f"{host}:{addr[1]}"
            node_url = urlunsplit((parts.scheme, netloc, "/0", parts.query, ""))
            node = self._nodes[addr] = PipelinedRedis(node_url, connect_timeout=self._connect_timeout)
        return node

    def _owner(self, slot: int) -> Address | None:
        i = bisect.bisect_right(self._starts, slot) - 1
        if i < 0:
            return None
        last, addr = self._ranges[i]
        return addr if slot <= last else None

    async def refresh(self) -> None:
        """Read the slot map (single-flight: concurrent callers share one refresh)."""
        if self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        task = self._refreshing
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and self._refreshing is task:
                self._refreshing = None

    async def _refresh(self) -> None:
        candidates = [self._seed, *(a for a in self._nodes if a != self._seed)]
        error: BaseException | None = None
        for addr in candidates:
            try:
                slots = await self._node(addr).execute(
                    "CLUSTER", "SLOTS", timeout=max(self._connect_timeout, 1.0)
                )
            except (RedisConnectionError, ResponseError, TimeoutError, OSError) as exc:
                error = exc
                continue
            table = sorted(
                (int(entry[0]), int(entry[1]), (entry[2][0].decode() or addr[0], int(entry[2][1])))
                for entry in slots
            )
            self._starts = [start for start, _, _ in table]
            self._ranges = [(last, owner) for _, last, owner in table]
            return
        raise RedisConnectionError(f"no cluster node answered CLUSTER SLOTS: {type(error).__name__}")

    async def _node_for(self, keys: Sequence[Arg]) -> PipelinedRedis:
        slot = _slot(keys[0])
        owner = self._owner(slot)
        if owner is None:
            await self.refresh()
            owner = self._owner(slot)
            if owner is None:
                raise RedisConnectionError(f"no cluster node serves slot {slot}")
        return self._node(owner)

    # the limiter's and the cache's interface (see PipelinedRedis)
    async def _routed(self, key: Arg, call: Callable[[PipelinedRedis], Awaitable[Reply]]) -> Reply:
        """``call`` on the owner of ``key``'s slot, following ``MOVED`` (a new map) and ``ASK``
        (``ASKING`` first, in the same write), and pausing briefly on ``TRYAGAIN`` (a
        multi-key script while its slot is being migrated)."""
        node = await self._node_for((key,))
        asking = False
        for attempt in range(_ATTEMPTS):
            if asking:
                node.submit(("ASKING",), _ignore)
            try:
                return await call(node)
            except ResponseError as exc:
                if attempt == _ATTEMPTS - 1:
                    raise
                if str(exc).startswith("TRYAGAIN"):
                    await asyncio.sleep(_TRYAGAIN_PAUSE * (attempt + 1))
                    continue
                redirect = _redirect(exc)
                if redirect is None:
                    raise
                kind, addr = redirect
                node, asking = self._node(addr), kind == "ASK"
                if kind == "MOVED":
                    await self.refresh()
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def execute_keyed(self, key: Arg, *args: Arg, timeout: float | None = None) -> Reply:  # noqa: ASYNC109 - a deadline, not asyncio.timeout
        return await self._routed(key, lambda node: node.execute(*args, timeout=timeout))

    async def evalsha(
        self,
        script: Script,
        keys: Sequence[Arg],
        args: Sequence[Arg],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a deadline, not asyncio.timeout
    ) -> Reply:
        return await self._routed(keys[0], lambda node: node.evalsha(script, keys, args, timeout=timeout))

    def submit_script(
        self,
        script: Script,
        keys: Sequence[Arg],
        args: Sequence[Arg],
        callback: Callable[[Reply], None],
        *,
        delay: float = 0.0,
    ) -> None:
        owner = self._owner(_slot(keys[0]))
        if owner is None:  # no map yet: ask for it, then send
            self._spawn(self._submit_after_refresh(script, keys, args, callback))
            return

        def on_reply(reply: Reply) -> None:
            redirect = _redirect(reply)
            if redirect is None:
                callback(reply)
                return
            kind, addr = redirect
            target = self._node(addr)
            if kind == "ASK":
                target.submit(("ASKING",), _ignore)
            else:
                self._spawn(self.refresh())
            target.submit_script(script, keys, args, callback)

        self._node(owner).submit_script(script, keys, args, on_reply, delay=delay)

    async def _submit_after_refresh(
        self, script: Script, keys: Sequence[Arg], args: Sequence[Arg], callback: Callable[[Reply], None]
    ) -> None:
        try:
            node = await self._node_for(keys)
        except (RedisConnectionError, TimeoutError, OSError) as exc:
            callback(exc)
            return
        node.submit_script(script, keys, args, callback)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_task_error)

    async def load(self, script: Script) -> None:
        await self.refresh()
        await asyncio.gather(*(self._node(addr).load(script) for _, addr in self._ranges))

    async def barrier(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a deadline
        """Return once every command sent so far, on every node, is answered."""
        await asyncio.gather(*(node.barrier(timeout=timeout) for node in list(self._nodes.values())))

    def reset(self) -> None:
        for node in self._nodes.values():
            node.reset()
        self._starts, self._ranges = [], []

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for task in list(self._tasks):
            task.cancel()
        for node in self._nodes.values():
            await node.close()


def _slot(key: Arg) -> int:
    """The cluster slot of ``key`` (CRC16 of its hash tag, as Redis computes it)."""
    return int(key_slot(key if isinstance(key, bytes) else str(key).encode()))


def _ignore(reply: Reply) -> None:
    pass


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("redis cluster background work failed: %s", type(task.exception()).__name__)
