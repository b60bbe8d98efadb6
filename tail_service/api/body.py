"""Reading and parsing a JSON request body: size-limited, time-limited, parsed once with orjson;
and streaming an upload's body chunk by chunk (:func:`iter_body`) under the same time limits.

A body must keep coming: no chunk for ``server.body_idle_timeout`` seconds, or (once it
has been read for that long) an average under ``server.body_min_rate`` bytes per
second, is a 408 and the connection is closed, so a client trickling a byte every few
seconds cannot hold a connection and a handler open. A client that leaves while its
body is read is a 499 (logged at INFO by the request-id middleware), not a server error.

The parsed body is at most :data:`MAX_DEPTH` containers deep: orjson reads up to 1024
levels but writes only 254, and whatever is accepted must be forwardable upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from tail_service.errors import (
    ClientDisconnected,
    InvalidRequestError,
    RequestTimeoutError,
    RequestTooLargeError,
)
from tail_service.settings import ServerSettings

log = logging.getLogger("tail_service.api")

#: deepest nesting of objects and arrays accepted (the body itself is level 1); well
#: under orjson.dumps' limit, so providers may wrap what they forward
MAX_DEPTH = 128
#: the most nested objects and arrays orjson.dumps writes (checked by the tests)
DUMPS_DEPTH = 254
#: bodies this large or larger are parsed one at a time (see :func:`read_json`)
LARGE_BODY_BYTES = 1 << 20


async def read_json(
    request: Request, server: ServerSettings, large_gate: asyncio.Lock
) -> tuple[dict[str, Any], int]:
    """``(the body as a JSON object, its size in bytes)``; 413 past ``server.max_body_bytes``,
    408 if it stalls, 400 if it is not a JSON object or is nested deeper than :data:`MAX_DEPTH`.

    Parsing holds the event loop (45-70 ms for 30 MB), so bodies of :data:`LARGE_BODY_BYTES`
    or more are parsed one at a time through ``large_gate``, each after a turn of the loop:
    requests beside them wait for one parse at most, never for several in a row.
    """
    limit = server.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"The request body is larger than the {limit} byte limit.")
    raw = await _read(request, limit, server.body_idle_timeout, server.body_min_rate)
    if len(raw) < LARGE_BODY_BYTES:
        return _parse(raw), len(raw)
    async with large_gate:
        await asyncio.sleep(0)
        return _parse(raw), len(raw)


def _parse(raw: bytes | bytearray) -> dict[str, Any]:
    if not raw:
        raise InvalidRequestError(
            "We could not parse the JSON body of your request: the body is empty.",
            code="invalid_json",
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request ({exc.msg} at position {exc.pos}).",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    # The depth cannot exceed the number of opening brackets: a C-speed count spares
    # almost every request the check.
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and too_deep(body, MAX_DEPTH):
        raise InvalidRequestError(
            f"The request body is nested more than {MAX_DEPTH} levels deep.", code="nesting_too_deep"
        )
    return body


async def _read(request: Request, limit: int, idle: float, min_rate: int) -> bytes | bytearray:
    stall = _StallTimer(idle, min_rate)
    clock = stall.loop.time
    # One chunk (the usual case) is used as is; more are appended as they arrive, so a large
    # body is never joined in one long step on the event loop.
    raw: bytes | bytearray = b""
    size = 0
    with _stall_errors(stall, idle):
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestTooLargeError(f"The request body is larger than the {limit} byte limit.")
            if not raw:
                raw = chunk
            elif isinstance(raw, bytes):
                raw = bytearray(raw) + chunk
            else:
                raw += chunk
            stall.last = clock()
            stall.size = size
    return raw


async def iter_body(request: Request, server: ServerSettings) -> AsyncGenerator[bytes, None]:
    """The request body chunk by chunk as it arrives, under the stall limits of :func:`read_json`
    (408 when it stalls, 499 when the client leaves); no size limit: the caller counts.

    Time the caller spends between two chunks (writing the last one to the store) is not
    the client's: the stall timer is paused while the caller holds a chunk. Close the
    generator (``contextlib.aclosing``) so the timer stops with it.
    """
    idle = server.body_idle_timeout
    stall = _StallTimer(idle, server.body_min_rate)
    clock = stall.loop.time
    size = 0
    with _stall_errors(stall, idle):
        async for chunk in request.stream():
            if not chunk:
                continue
            size += len(chunk)
            stall.last = clock()
            stall.size = size
            stall.pause()
            yield chunk
            stall.resume()


@contextlib.contextmanager
def _stall_errors(stall: _StallTimer, idle: float) -> Iterator[None]:
    """Turn the stall timer's cancellation into a 408 and a client that left into a 499
    (``stall.size``: the bytes received so far); the timer stops on the way out."""
    try:
        yield
    except asyncio.CancelledError:
        if stall.fired and stall.task.uncancel() == 0:
            raise _stalled(stall.size, idle) from None
        raise
    except ClientDisconnect:
        raise _disconnected(stall.size) from None
    finally:
        stall.cancel()


def _stalled(size: int, idle: float) -> RequestTimeoutError:
    log.info("request body stalled after %d bytes", size)
    return RequestTimeoutError(
        f"The request body stalled (no data for {idle:g} s, or too slow); the connection is closed.",
        headers={"connection": "close"},
    )


def _disconnected(size: int) -> ClientDisconnected:
    return ClientDisconnected(
        f"The client closed the connection after sending {size} bytes of the request body."
    )


class _StallTimer:
    """Cancels the task reading a body once the body stalls: no chunk for ``idle``
    seconds, or, counting from the start, fewer than ``min_rate`` bytes a second
    beyond the first ``idle`` seconds.

    One timer per body, re-armed only when it fires and finds that chunks came in the
    meantime: a chunk costs two attribute writes, not a timer. The task is always
    waiting for a chunk when the timer fires, so the cancellation lands in ``_read``
    (or :func:`iter_body`). While paused (the caller busy with a chunk), a firing timer
    only re-arms, and :meth:`resume` takes the pause off both clocks.
    """

    __slots__ = (
        "_handle",
        "_idle",
        "_min_rate",
        "_paused_at",
        "_start",
        "fired",
        "last",
        "loop",
        "size",
        "task",
    )

    def __init__(self, idle: float, min_rate: int) -> None:
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self._idle = idle
        self._min_rate = min_rate
        self._start = self.last = self.loop.time()
        self.size = 0
        self.fired = False
        self._paused_at: float | None = None
        self._handle = self.loop.call_at(self._start + idle, self._check)

    def pause(self) -> None:
        self._paused_at = self.loop.time()

    def resume(self) -> None:
        if self._paused_at is not None:
            now = self.loop.time()
            self._start += now - self._paused_at
            self.last = now
            self._paused_at = None

    def _check(self) -> None:
        if self._paused_at is not None:
            self._handle = self.loop.call_at(self.loop.time() + self._idle, self._check)
            return
        deadline = self.last + self._idle
        if self._min_rate:
            deadline = min(deadline, self._start + self._idle + self.size / self._min_rate)
        if self.loop.time() >= deadline:
            self.fired = True
            self.task.cancel()
        else:
            self._handle = self.loop.call_at(deadline, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


def too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) nests objects and arrays more than ``limit`` levels.

    orjson does the walk, in C (a Python walk costs as much as the parse on a long
    conversation; this about a third of it): it refuses to write more than
    :data:`DUMPS_DEPTH` levels, so ``value`` inside ``DUMPS_DEPTH - limit`` lists fails
    to serialize exactly when ``value`` is deeper than ``limit``.
    """
    wrapped = value
    for _ in range(DUMPS_DEPTH - limit):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError:
        return True
    return False
