"""Server-sent events: the only place ``data:`` is written.

:class:`SSEResponse` is a small ASGI response that frames OpenAI chunks as
``data: <json>\\n\\n`` and ends with ``data: [DONE]``. It races the stream against the
client's ``http.disconnect`` (a watcher task cancels the streaming task the moment the
client leaves, which closes the upstream at once: no polling). A failure after the
first byte is sent in-band as ``data: {"error": {...}}`` followed by ``[DONE]``: the
official SDKs raise ``APIError`` on it, so a broken stream never looks finished. Idle
streams get ``: keepalive`` comments so intermediaries do not time them out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tail_service.errors import ClientDisconnected, TailError

log = logging.getLogger("tail_service.sse")

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keepalive\n\n"


def frame(event: dict[str, Any]) -> bytes:
    """One SSE event carrying ``event`` as a single line of JSON."""
    return b"data: " + orjson.dumps(event) + b"\n\n"


def error_frame(exc: BaseException, request_id: str) -> bytes:
    if isinstance(exc, TailError):
        return frame(exc.body())
    return frame(TailError(f"The server had an error while streaming (request id {request_id}).").body())


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any], flag: list[bool]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            flag.append(True)
            task.cancel()
            return


async def race_disconnect(receive: Receive, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``, cancelling it as soon as the client disconnects.

    Call only after the request body has been read: from then on ``receive`` yields
    nothing but ``http.disconnect``. Raises :class:`ClientDisconnected` on disconnect.
    """
    task = asyncio.current_task()
    assert task is not None
    flag: list[bool] = []
    watcher = asyncio.create_task(_watch_disconnect(receive, task, flag))
    try:
        return await awaitable
    except asyncio.CancelledError:
        if flag and task.uncancel() == 0:
            raise ClientDisconnected("The client closed the connection.") from None
        raise
    finally:
        watcher.cancel()


class SSEResponse(Response):
    """Streams ``first`` then the rest of ``chunks`` as SSE, ending with ``[DONE]``.

    ``framer`` turns an item into its SSE bytes (default: a ``data:`` line of JSON);
    ``done`` is the last frame (``None``: none) and ``error_framer`` frames a failure
    after the first byte. A ``Response`` subclass only so frameworks pass it through
    untouched; it writes its own ASGI messages.
    """

    def __init__(
        self,
        first: Any,
        chunks: AsyncGenerator[Any, None],
        *,
        request_id: str,
        keepalive: float,
        headers: Mapping[str, str] | None = None,
        framer: Callable[[Any], bytes] = frame,
        done: bytes | None = DONE,
        error_framer: Callable[[BaseException, str], bytes] = error_frame,
    ) -> None:
        self.status_code = 200
        self.background = None
        self._first = first
        self._chunks = chunks
        self._request_id = request_id
        self._keepalive = keepalive
        self._framer = framer
        self._done = done
        self._error_framer = error_framer
        self._raw = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ] + [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        disconnected: list[bool] = []
        lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        last_sent = [loop.time()]

        async def emit(data: bytes, more: bool = True) -> None:
            async with lock:
                await send({"type": "http.response.body", "body": data, "more_body": more})
                last_sent[0] = loop.time()

        async def keepalive() -> None:
            while True:
                await asyncio.sleep(self._keepalive)
                if loop.time() - last_sent[0] >= self._keepalive * 0.9:
                    await emit(KEEPALIVE)

        # the final status for the access log and the metrics (the one sent is 200)
        stats = scope.get("state", {}).get("stats")
        if stats is not None:
            stats.stream = True
        watcher = asyncio.create_task(_watch_disconnect(receive, task, disconnected))
        pinger = asyncio.create_task(keepalive()) if self._keepalive > 0 else None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self._raw})
            await emit(self._framer(self._first))
            try:
                async for chunk in self._chunks:
                    await emit(self._framer(chunk))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, TailError):
                    log.exception("stream failed", exc_info=exc)
                else:
                    log.warning("stream failed after the first byte: %s", exc.message)
                if stats is not None:
                    stats.status = exc.http_status if isinstance(exc, TailError) else 500
                await emit(self._error_framer(exc, self._request_id))
            await emit(self._done or b"", more=False)
        except asyncio.CancelledError:
            if not (disconnected and task.uncancel() == 0):
                raise
            log.info("client disconnected mid-stream; upstream closed")
            if stats is not None:
                stats.status = ClientDisconnected.status
        finally:
            watcher.cancel()
            if pinger is not None:
                pinger.cancel()
            await self._chunks.aclose()
