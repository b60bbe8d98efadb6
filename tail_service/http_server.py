"""The HTTP server: uvicorn's httptools protocol, hardened against hostile clients.

uvicorn with httptools puts no limit on a request's headers (httptools keeps a header
value in memory until it ends, so a never-ending header grows without bound) and no
deadline on them (a client that sends one byte every few seconds keeps its connection
forever). :class:`HardenedHttpToolsProtocol` adds, per connection:

- **max_header_bytes**: bytes are counted per read (one ``len()`` per
  ``data_received``, nothing per byte) while a request line and headers are being
  read; past the limit the client gets a 431 and the connection is closed. Headers
  that arrive whole in one read larger than the limit are measured exactly when they
  complete (only then: a normal request pays one comparison).
- **header_timeout**: from the connection (or a keep-alive request's first byte) until
  the headers are complete. A client that sent part of a request gets a 408; one that
  sent nothing is closed silently (it may be a pre-opened pooled connection). The
  timer is armed once per connection, and per request only when a request's head
  arrives in more than one read, so a normal keep-alive request costs no timer.
- **Malformed requests** are answered with a 400 in the OpenAI error envelope, not
  uvicorn's plain text.
- **A response that completes before its request body was fully received** closes the
  connection, so a body trickle cannot outlive the request it belongs to.

Rejections close gently: the answer is written, the write side is shut, and whatever
the client still sends is read and dropped for :data:`LINGER` seconds, so the client
reads the answer rather than a connection reset. The request body itself is timed by
the app (``api/body.py``: idle timeout and minimum rate), which can answer a 408 in
the envelope while a handler is waiting for it.

:func:`server_config` builds the uvicorn config; the limits travel on it (picklable,
so ``--workers N`` processes get them too).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from tail_service.errors import InvalidRequestError
from tail_service.settings import ServerSettings

log = logging.getLogger("tail_service.http")

#: seconds a rejected connection keeps reading (and dropping) input before it closes
LINGER = 2.0


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing a request whose headers are too large."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one connection may do before it is answered with an error and closed."""

    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0

    @classmethod
    def from_settings(cls, server: ServerSettings) -> ConnectionLimits:
        return cls(max_header_bytes=server.max_header_bytes, header_timeout=server.header_timeout)


class TailConfig(uvicorn.Config):
    """uvicorn's config with the hardened protocol and the limits it reads."""

    def __init__(self, app: Any, *, limits: ConnectionLimits, **kw: Any) -> None:
        kw["http"] = HardenedHttpToolsProtocol
        super().__init__(app, **kw)
        self.limits = limits


def server_config(app: Any, server: ServerSettings, **kw: Any) -> uvicorn.Config:
    """The uvicorn config for ``app`` (an ASGI app or an import string) under ``server``'s limits."""
    return TailConfig(app, limits=ConnectionLimits.from_settings(server), **kw)


def error_response(status: int, message: str, code: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A complete ``connection: close`` HTTP/1.1 response carrying the OpenAI error envelope."""
    body = orjson.dumps(InvalidRequestError(message, code=code).body())
    head = [STATUS_LINE[status]]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"x-request-id: req_" + os.urandom(16).hex().encode("ascii") + b"\r\n",
        b"connection: close\r\n\r\n",
        body,
    ]
    return b"".join(head)


class HardenedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header limits, a header deadline and JSON 400s."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = getattr(config, "limits", None) or ConnectionLimits()
        self._max_head = limits.max_header_bytes
        self._head_timeout = limits.header_timeout
        #: reading a request line and headers (or waiting for the next request)
        self._head = True
        #: bytes received while ``_head``; reset when a request's headers are complete
        self._head_bytes = 0
        #: the headers are complete and the body is not
        self._in_body = False
        #: the header deadline, then the linger deadline
        self._timer: asyncio.TimerHandle | None = None
        #: rejected: input is dropped until the connection closes
        self._rejected = False
        #: the headers that just completed were over the limit
        self._oversized = False

    # -- connection -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._rejected:
            return
        if self._head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._oversized:
                self._reject_oversized()
            else:
                log.info("invalid HTTP request from %s: %s", _peer(self.client), exc)
                self._reject(400, "Invalid HTTP request received.", "invalid_http_request")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._head and not self._rejected:
            if self._head_bytes > self._max_head:
                self._reject_oversized()
            elif self._head_bytes and self._timer is None:  # a keep-alive request's head is coming
                self._timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def send_400_response(self, msg: str) -> None:
        self._reject(400, msg, "invalid_http_request")

    # -- parser callbacks -----------------------------------------------------------

    def on_headers_complete(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Whole heads that arrived in one read were not checked in data_received; the
        # exact size is worked out only when the read itself was over the limit.
        if self._head_bytes > self._max_head and self._head_size() > self._max_head:
            self._oversized = True
            raise _HeadTooLarge  # stops the parser; data_received answers 431
        self._head = False
        self._head_bytes = 0
        self._in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._head = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._in_body and self.cycle.response_complete and not self.transport.is_closing():
            # answered before the body was all here: the rest of it is not waited for
            self._linger_close()

    def _head_size(self) -> int:
        """The size of the current request line and headers, give or take a few bytes."""
        return len(self.url) + 16 + sum(len(name) + len(value) + 4 for name, value in self.headers)

    # -- rejections -----------------------------------------------------------------

    def _reject_oversized(self) -> None:
        log.info("request headers over %d bytes from %s", self._max_head, _peer(self.client))
        self._reject(
            431,
            f"The request headers are larger than the {self._max_head} byte limit.",
            "request_header_fields_too_large",
        )

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._rejected:
            return
        if self._head_bytes == 0:
            self.transport.close()  # nothing was sent: no answer owed
            return
        log.info("request headers not complete after %gs from %s", self._head_timeout, _peer(self.client))
        self._reject(
            408,
            f"The request headers did not arrive within {self._head_timeout:g} seconds.",
            "request_timeout",
        )

    def _reject(self, status: int, message: str, code: str) -> None:
        """Answer ``status`` in the OpenAI envelope, then close gently."""
        if self._rejected or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # an answer is half-written: nothing else can be said
                self.transport.close()
                return
            # the app is still on this request: it now sees a disconnect, and writes nothing
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.write(error_response(status, message, code, self.server_state.default_headers))
        self._linger_close()

    def _linger_close(self) -> None:
        self._rejected = True
        self._cancel_timer()
        self._unset_keepalive_if_required()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self._timer = self.loop.call_later(LINGER, self.transport.close)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "-"
