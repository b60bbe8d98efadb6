"""Redis Cluster for the limiter: one pipelined connection per primary, commands routed by slot.

Every script the limiter runs touches the keys of one hash tag, so it belongs to one
slot (CRC16 of the tag, as Redis computes it). The slot map comes from ``CLUSTER SLOTS``
on any known node; a ``MOVED`` reply (a slot changed hands) refreshes the map and sends
the command once more to the new owner, and ``ASK`` (a slot being migrated) sends it to
the importing node after ``ASKING``; ``TRYAGAIN`` (a multi-key script while its slot is
half migrated) is retried after a short pause. Per node, commands are auto-pipelined exactly as
with :class:`~tail_service.clients.redis_pipe.PipelinedRedis`, so a request is still one
round trip. The seed URL's password, user and TLS options apply to every node.

Failover: a primary that dies sends no ``MOVED``, only connection errors, so a
connection error also refreshes the map (single flight, at most once per
``_ERROR_REFRESH_SPACING``) and, if the slot has a new owner, the command is sent there
within the same call. Every wait for the map counts against the caller's deadline: a
hung node cannot stretch a 50 ms admission. A refresh asks the known nodes (seed first,
replicas included) one after another, starting the next one if the last has not answered
within ``_REFRESH_STAGGER`` seconds, and takes the first answer.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tail_service.clients.redis_pipe import PipelinedRedis, Script
from tail_service.clients.redis_resp import Arg, Reply

log = logging.getLogger("tail_service.clients.redis_cluster")

Address = tuple[str, int]
#: tries per command: redirections and TRYAGAIN pauses included
_ATTEMPTS = 5
#: seconds before retrying after TRYAGAIN (times the attempt number)
_TRYAGAIN_PAUSE = 0.01
#: seconds a refresh waits for one node before also asking the next
_REFRESH_STAGGER = 0.02
#: fewest seconds between two refreshes caused by connection errors
_ERROR_REFRESH_SPACING = 0.1
#: the errors of a node that is gone (or going): worth a new look at the map
_NODE_ERRORS = (RedisConnectionError, OSError)


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
        #: every node the last map named (replicas too): who to ask for the next one
        self._known: list[Address] = []
        #: slot ranges, sorted: the first slot of each, its last, and its primary
        self._starts: list[int] = []
        self._ranges: list[tuple[int, Address]] = []
        self._refreshing: asyncio.Task[None] | None = None
        self._error_refresh_at = float("-inf")
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

    async def refresh(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a deadline
        """Read the slot map (single flight: concurrent callers share one refresh).

        ``timeout``: the most this caller waits (:class:`TimeoutError`); the refresh itself
        goes on in the background for the others.
        """
        task = self._refreshing
        if task is None:
            task = self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
            task.add_done_callback(self._refresh_done)
        if timeout is not None and timeout <= 0:
            raise TimeoutError("redis did not answer in time")
        async with asyncio.timeout(timeout):
            await asyncio.shield(task)

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        if self._refreshing is task:
            self._refreshing = None
        if not task.cancelled() and task.exception() is not None:  # retrieved: callers may be gone
            log.debug("cluster map refresh failed: %s", task.exception())

    async def _refresh_after_error(self, timeout: float | None) -> None:  # noqa: ASYNC109 - a deadline
        """:meth:`refresh` after a connection error: joins one in flight, or starts one
        unless another connection error started one moments ago."""
        if self._refreshing is None:
            now = asyncio.get_running_loop().time()
            if now - self._error_refresh_at < _ERROR_REFRESH_SPACING:
                return
            self._error_refresh_at = now
        await self.refresh(timeout=timeout)

    def _refresh_soon(self) -> None:
        """A background :meth:`_refresh_after_error` whose failure is nobody's to report."""

        async def quietly() -> None:
            with contextlib.suppress(*_NODE_ERRORS, TimeoutError):
                await self._refresh_after_error(None)

        self._spawn(quietly())

    async def _refresh(self) -> None:
        candidates = list(dict.fromkeys([self._seed, *self._known, *self._nodes]))
        per_node = max(self._connect_timeout, 1.0)
        pending: set[asyncio.Task[Reply]] = set()
        owner: dict[asyncio.Task[Reply], Address] = {}
        error: BaseException | None = None
        try:
            while candidates or pending:
                if candidates:
                    addr = candidates.pop(0)
                    task = asyncio.get_running_loop().create_task(
                        self._node(addr).execute("CLUSTER", "SLOTS", timeout=per_node)
                    )
                    owner[task] = addr
                    pending.add(task)
                done, pending = await asyncio.wait(
                    pending,
                    timeout=_REFRESH_STAGGER if candidates else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                answers = [t for t in done if t.exception() is None]  # every outcome retrieved
                if answers:
                    self._apply(answers[0].result(), owner[answers[0]])
                    return
                for task in done:
                    exc = task.exception()
                    if not isinstance(exc, (*_NODE_ERRORS, ResponseError, TimeoutError)):
                        raise cast(BaseException, exc)
                    error = exc
        finally:
            for task in pending:
                task.cancel()
        raise RedisConnectionError(f"no cluster node answered CLUSTER SLOTS: {type(error).__name__}")

    def _apply(self, slots: Reply, answered: Address) -> None:
        table, known = [], []
        for entry in slots:
            nodes = [(n[0].decode() or answered[0], int(n[1])) for n in entry[2:]]
            table.append((int(entry[0]), int(entry[1]), nodes[0]))
            known.extend(nodes)
        table.sort()
        self._starts = [start for start, _, _ in table]
        self._ranges = [(last, primary) for _, last, primary in table]
        self._known = list(dict.fromkeys(known))

    async def _node_for(self, keys: Sequence[Arg], timeout: float | None = None) -> PipelinedRedis:  # noqa: ASYNC109
        slot = _slot(keys[0])
        owner = self._owner(slot)
        if owner is None:
            await self.refresh(timeout=timeout)
            owner = self._owner(slot)
            if owner is None:
                raise RedisConnectionError(f"no cluster node serves slot {slot}")
        return self._node(owner)

    # the limiter's and the cache's interface (see PipelinedRedis)
    async def _routed(
        self,
        key: Arg,
        call: Callable[[PipelinedRedis, float | None], Awaitable[Reply]],
        timeout: float | None,  # noqa: ASYNC109 - a deadline, not asyncio.timeout
    ) -> Reply:
        """``call(node, time left)`` on the owner of ``key``'s slot, within ``timeout`` in all.

        Follows ``MOVED`` (a new map) and ``ASK`` (``ASKING`` first, in the same write),
        pauses briefly on ``TRYAGAIN`` (a multi-key script while its slot is being
        migrated), and after a connection error reads the map again and tries the slot's
        new owner, if it has one (a failover).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def left() -> float | None:
            return None if deadline is None else max(deadline - loop.time(), 0.0)

        node = await self._node_for((key,), left())
        asking = False
        for attempt in range(_ATTEMPTS):
            if asking:
                node.submit(("ASKING",), _ignore)
            try:
                return await call(node, left())
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
                    await self.refresh(timeout=left())
            except TimeoutError:  # before _NODE_ERRORS: a TimeoutError is an OSError
                # a hung node, or a dead host: a replica may be taking over; the next
                # calls get the new map, this one has no time left for it
                self._refresh_soon()
                raise
            except _NODE_ERRORS:
                if attempt == _ATTEMPTS - 1:
                    raise
                failed = node
                try:
                    await self._refresh_after_error(left())
                except (*_NODE_ERRORS, TimeoutError):
                    pass  # the map is as it was: the connection error stands
                owner = self._owner(_slot(key))
                if owner is None or self._node(owner) is failed:
                    raise
                node, asking = self._node(owner), False
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def execute_keyed(self, key: Arg, *args: Arg, timeout: float | None = None) -> Reply:  # noqa: ASYNC109 - a deadline, not asyncio.timeout
        return await self._routed(key, lambda node, left: node.execute(*args, timeout=left), timeout)

    async def evalsha(
        self,
        script: Script,
        keys: Sequence[Arg],
        args: Sequence[Arg],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a deadline, not asyncio.timeout
    ) -> Reply:
        return await self._routed(
            keys[0], lambda node, left: node.evalsha(script, keys, args, timeout=left), timeout
        )

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
                if isinstance(reply, _NODE_ERRORS):  # the node is gone (or hung): a failover?
                    self._refresh_soon()
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
        await asyncio.gather(*(self._node(addr).load(script) for addr in self._primaries()))

    def _primaries(self) -> list[Address]:
        return list(dict.fromkeys(addr for _, addr in self._ranges))

    async def barrier(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a deadline
        """Return once every command sent so far, on every node, is answered.

        Asks the primaries of the map (read first if there is none) and any other node
        with commands in flight; a node that is gone and owes nothing is not waited for.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        if not self._ranges:
            await self.refresh(timeout=timeout)
        left = None if deadline is None else max(deadline - loop.time(), 0.0)
        nodes = {self._node(addr) for addr in self._primaries()}
        nodes.update(node for node in self._nodes.values() if node.in_flight)
        await asyncio.gather(*(node.barrier(timeout=left) for node in nodes))

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
