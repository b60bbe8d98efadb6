"""Transport helpers shared by the HTTP adapters: SSE decoding, Retry-After, error text."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from tail_service.errors import ProviderProtocolError

#: longest SSE line accepted before the stream is declared broken
MAX_SSE_LINE = 16 * 1024 * 1024
_LINE_END = re.compile(rb"\r\n|\r|\n")


class SSEDecoder:
    """Incremental ``text/event-stream`` decoder.

    Handles LF, CR and CRLF line ends (also split across reads), multi-line ``data``,
    comments and ``id``/``retry`` fields (ignored). :meth:`feed` returns complete
    ``(event, data)`` pairs (``event`` defaults to ``"message"``); :meth:`close` flushes a
    trailing CR at end of stream; an event without its blank line is dropped, per spec.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        self._buf += chunk
        events: list[tuple[str, str]] = []
        pos = 0
        while (m := _LINE_END.search(self._buf, pos)) is not None:
            if m.group() == b"\r" and m.end() == len(self._buf):
                break  # maybe the first half of a CRLF: wait for the next read
            self._line(bytes(self._buf[pos : m.start()]), events)
            pos = m.end()
        del self._buf[:pos]
        if len(self._buf) > MAX_SSE_LINE:
            raise ProviderProtocolError("an SSE line was longer than 16 MiB")
        return events

    def close(self) -> list[tuple[str, str]]:
        events = self.feed(b"\n") if self._buf.endswith(b"\r") else []
        self._buf.clear()
        return events

    def _line(self, raw: bytes, events: list[tuple[str, str]]) -> None:
        if not raw:
            if self._data:
                events.append((self._event or "message", "\n".join(self._data)))
            self._event, self._data = "", []
            return
        line = raw.decode("utf-8", errors="replace").removeprefix("\ufeff")
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    with contextlib.suppress(ValueError):
        if (ms := headers.get("retry-after-ms")) and math.isfinite(float(ms)):
            return max(0.0, float(ms) / 1000)
    value = headers.get("retry-after")
    if not value:
        return None
    with contextlib.suppress(ValueError):
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_message(status: int, raw: bytes) -> tuple[str, Any]:
    """The upstream's error message (OpenAI envelope, ``message``/``detail`` or plain text)
    and the parsed body (``None`` when it is not JSON)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", "replace").strip()[:500]
        return (text or f"HTTP {status}"), None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"], body
        if isinstance(err, str):
            return err, body
        for key in ("message", "detail"):
            if isinstance(body.get(key), str):
                return body[key], body
    return f"HTTP {status}", body


def describe(exc: BaseException) -> str:
    """A short message for a transport failure; aiohttp's messages hold no credentials."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
