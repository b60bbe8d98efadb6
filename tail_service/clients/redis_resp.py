"""The wire half of :class:`~tail_service.clients.redis_pipe.PipelinedRedis`: RESP and one socket.

:func:`encode` writes a command as RESP. :class:`RespConnection` is the asyncio protocol
of one connection: commands queued with :meth:`~RespConnection.send` in the same
event-loop iteration leave in one ``write`` (or within ``delay`` seconds, if every one
of them may wait). Replies are parsed by ``hiredis`` (the C parser redis-py uses) and
handed to their sinks (a future someone awaits, or a callback) in order, as RESP
guarantees. A lost connection, a reply nobody asked for or bytes that are not RESP fail
every command in flight with :class:`redis.exceptions.ConnectionError`. Connecting,
authenticating and choosing the database are the client's job, not this module's.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

# the pipelined client's logger: its records keep that name whichever of its modules logs
log = logging.getLogger("tail_service.clients.redis_pipe")

#: a reply, or the exception that stands for it (a Redis error reply or a lost connection)
Reply = Any
#: where a reply goes: a future someone awaits, or a callback
Sink = asyncio.Future[Reply] | Callable[[Reply], None]
Arg = str | bytes | int


def encode(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else (b"%d" % a if isinstance(a, int) else a)
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def deliver(sink: Sink, reply: Reply) -> None:
    """Hand ``reply`` (or the exception that stands for it) to ``sink``; a failing callback is logged."""
    if isinstance(sink, asyncio.Future):
        if not sink.done():  # a caller that timed out has cancelled it
            if isinstance(reply, BaseException):
                sink.set_exception(reply)
            else:
                sink.set_result(reply)
        return
    try:
        sink(reply)
    except Exception:
        log.exception("a redis reply callback failed")


class RespConnection(asyncio.Protocol):
    """One socket: a write buffer flushed once per loop iteration and the FIFO of sinks."""

    def __init__(self, on_lost: Callable[[RespConnection], None]) -> None:
        self._on_lost = on_lost
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._sinks: deque[Sink] = deque()
        self._buffer: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._soon: asyncio.Handle | None = None
        self._later: asyncio.TimerHandle | None = None
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        reader, sinks = self._reader, self._sinks
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                if not sinks:  # cannot happen with a well-behaved server
                    self.abort(RedisConnectionError("redis sent a reply nobody asked for"))
                    return
                deliver(sinks.popleft(), reply)
        except hiredis.ProtocolError as exc:  # not RESP: this is not (or no longer) Redis
            self.abort(RedisConnectionError(f"redis protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection to redis lost: {exc or 'closed by the server'}"))

    # ours
    def send(self, payload: bytes, sink: Sink, delay: float) -> None:
        """Queue ``payload``; it goes out this loop iteration, or within ``delay`` seconds."""
        self._buffer.append(payload)
        self._sinks.append(sink)
        if delay <= 0:
            if self._soon is None:
                self._soon = asyncio.get_running_loop().call_soon(self._flush)
        elif self._soon is None and self._later is None:
            self._later = asyncio.get_running_loop().call_later(delay, self._flush)

    @property
    def in_flight(self) -> int:
        return len(self._sinks)

    def _flush(self) -> None:
        self._soon = None
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._buffer and self._transport is not None and not self.closed:
            data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
            self._buffer.clear()
            self._transport.write(data)

    def abort(self, exc: Exception) -> None:
        """Drop the socket; everything in flight fails with ``exc``."""
        if self._transport is not None:
            self._transport.abort()
        self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        if self.closed:
            return
        self.closed = True
        for handle in (self._soon, self._later):
            if handle is not None:
                handle.cancel()
        self._buffer.clear()
        sinks, self._sinks = self._sinks, deque()
        for sink in sinks:
            deliver(sink, exc)
        self._on_lost(self)
