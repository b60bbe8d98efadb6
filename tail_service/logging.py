"""Logging setup: plain or JSON lines, the request id on every record, secrets redacted.

The request id lives in a context variable set by the request-id middleware, so any
log line written while serving a request carries it without threading it through
calls. A redaction filter masks anything that looks like a bearer token or API key
(``sk-...``), as a last line of defence: code never logs credentials on purpose.
"""

from __future__ import annotations

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
