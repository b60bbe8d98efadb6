"""Redis pub/sub notices between the HTTP service and the workers.

A notice only saves waiting: whoever listens also looks at the store on a timer, so a lost
notice (Redis away, a reconnect) costs that timer, never a result. Notices are published
fire-and-forget on the shared auto-pipelined connection, and heard on a connection of their
own (a subscribed connection can carry nothing else).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

from tail_service.clients.redis_pipe import PipelinedRedis

log = logging.getLogger(__name__)


def publisher(client: PipelinedRedis, channel: str) -> Callable[[str], None]:
    """A fire-and-forget ``PUBLISH`` of a message on ``channel``."""

    def ignore(_reply: object) -> None:
        return None

    def publish(message: str) -> None:
        client.submit(("PUBLISH", channel, message), ignore)

    return publish


async def listen(url: str, channel: str, on_message: Callable[[bytes], None], *, what: str) -> None:
    """Call ``on_message`` with each message on ``channel``, until cancelled; after a lost
    connection, again after a pause (``what`` names the listener in the warning)."""
    import redis.asyncio as aioredis

    while True:
        client = aioredis.from_url(url)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30.0)
                    if message is not None and isinstance(message.get("data"), bytes):
                        on_message(message["data"])
        except Exception as exc:
            log.warning("not listening for %s (%s); polling the store meanwhile", what, type(exc).__name__)
        finally:
            await client.aclose()
        await asyncio.sleep(1.0)


class RunWatch:
    """Waits for news of agent runs: woken by the workers' notices (one listening
    connection per process, for every run) or, without them, by the timer alone."""

    def __init__(self, url: str | None, channel: str) -> None:
        self._url, self._channel = url, channel
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def notified(self) -> bool:
        """Whether notices can arrive (a listener runs)."""
        return self._task is not None

    def start(self) -> None:
        if self._url and self._task is None:
            self._task = asyncio.create_task(
                listen(self._url, self._channel, self._heard, what="agent run events")
            )

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _heard(self, message: bytes) -> None:
        for event in self._waiters.get(message.decode("ascii", "replace"), ()):
            event.set()

    @contextlib.contextmanager
    def watch(self, run_id: str) -> Iterator[Callable[[float], Awaitable[None]]]:
        """For the block's duration, hear of ``run_id``: yields ``pause(timeout)``, which
        returns at the first notice since the last pause (one that came while the caller
        looked at the store included), or after ``timeout`` seconds."""
        event = asyncio.Event()
        waiters = self._waiters.setdefault(run_id, set())
        waiters.add(event)

        async def pause(timeout: float) -> None:  # noqa: ASYNC109 - the store poll's period
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
            event.clear()

        try:
            yield pause
        finally:
            waiters.discard(event)
            if not waiters:
                del self._waiters[run_id]
