"""Logging setup: plain or JSON lines, the request id on every record, secrets redacted.

The request id lives in a context variable set by the request-id middleware, so any
log line written while serving a request carries it without threading it through
calls. A redaction filter masks anything that looks like a bearer token or API key
(``sk-...``), as a last line of defence: code never logs credentials on purpose.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import sys
import time
from typing import IO, Any

import orjson

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_SECRET_RE = re.compile(r"(sk-[A-Za-z0-9_\-]{4})[A-Za-z0-9_\-]{8,}|(Bearer\s+)[^\s\"']+", re.IGNORECASE)
_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's ANSI-coloured duplicate of the message
}


def redact(text: str) -> str:
    """Mask API keys and bearer tokens in ``text``."""
    lowered = text.lower()
    # The regex costs ~9 us on a 300-character line; a line with neither marker (nearly
    # all of them: every access-log line) cannot match it, and this check costs ~0.5 us.
    if "sk-" not in lowered and "bearer" not in lowered:
        return text
    return _SECRET_RE.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class _PlainFormatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        #: (unix second, its formatted date and time): ``strftime`` costs ~2.5 us a line
        self._stamp: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second, stamp = self._stamp
        if int(record.created) != second:
            second = int(record.created)
            stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._stamp = (second, stamp)
        return f"{stamp},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STD_ATTRS and k != "request_id"}
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return redact(base)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        for k, v in vars(record).items():
            if k not in _STD_ATTRS and k != "request_id":
                doc[k] = v
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(doc, default=str).decode())


def log_handler(stream: IO[str], *, json: bool) -> logging.Handler:
    """A handler writing our lines (JSON or plain, request id, redaction) to ``stream``."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(
        _JsonFormatter()
        if json
        else _PlainFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    return handler


def configure_logging(level: str, *, json: bool) -> None:
    """Install one stderr handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_tail", False):
            root.removeHandler(h)
    handler = log_handler(sys.stderr, json=json)
    handler._tail = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # SQLAlchemy echoes every statement when its logger is at INFO; the services poll.
    logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    # The MCP SDK and its HTTP client log request URLs (an operator's MCP URL may carry a
    # token) at INFO and DEBUG; our own MCP client logs the server's name instead.
    for name in ("httpx2", "httpx", "mcp"):
        logging.getLogger(name).setLevel(logging.WARNING)


class AccessLog:
    """Writes the access log's lines (logger ``tail_service.access``), cheaply.

    When the lines would go only to the handler :func:`configure_logging` installed (the
    usual case), they are formatted here, exactly as that handler would format them, and
    written together once per turn of the event loop: one ``write`` for all the requests
    that ended in that turn instead of a log record, a handler chain and a ``write`` each
    (measured in the loaded service: that path cost 0.05-0.09 ms per request). Any other
    set-up (a handler on the access logger, another on the root, a test capturing lines)
    gets ordinary log records. The fields are bounded values the caller chose: never a key
    or any content, so no redaction pass is needed.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._root = logging.getLogger()
        self._lines: list[str] = []
        self._handler: logging.StreamHandler[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: (unix second, its formatted date and time)
        self._stamp: tuple[int, str] = (-1, "")

    def _direct(self) -> logging.StreamHandler[Any] | None:
        """Our own stderr handler, when it is the only place these lines go."""
        handlers = self._root.handlers
        if self._logger.handlers or not self._logger.propagate or len(handlers) != 1:
            return None
        handler = handlers[0]
        if not getattr(handler, "_tail", False) or not isinstance(handler, logging.StreamHandler):
            return None
        return handler

    def write(self, request_id: str, fields: dict[str, Any]) -> None:
        """One line: ``access`` with ``fields`` (at INFO; the caller checked the level)."""
        handler = self._direct()
        if handler is None:
            record = self._logger.makeRecord(self._logger.name, logging.INFO, __file__, 0, "access", (), None)
            record.__dict__.update(fields)
            self._logger.handle(record)
            return
        now = time.time()
        if isinstance(handler.formatter, _JsonFormatter):
            doc = {
                "ts": round(now, 3),
                "level": "info",
                "logger": self._logger.name,
                "msg": "access",
                "request_id": request_id,
                **fields,
            }
            line = orjson.dumps(doc, default=str).decode()
        else:
            second, stamp = self._stamp
            if int(now) != second:
                second = int(now)
                stamp = time.strftime(logging.Formatter.default_time_format, time.localtime(now))
                self._stamp = (second, stamp)
            pairs = " ".join(f"{k}={v}" for k, v in fields.items())
            ms = int((now - second) * 1000)
            line = f"{stamp},{ms:03d} INFO {self._logger.name} [{request_id}] access {pairs}"
        if not self._lines:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._handler = handler
            self._loop.call_soon(self.flush)
        self._lines.append(line)

    def flush(self) -> None:
        """Write the lines gathered in this turn of the loop (one ``write``)."""
        lines, self._lines = self._lines, []
        handler = self._handler
        if not lines or handler is None:
            return
        with handler.lock or _NO_LOCK:
            handler.stream.write("\n".join(lines) + "\n")
            handler.stream.flush()


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()
