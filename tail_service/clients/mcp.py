"""Calls to operator-configured MCP servers (the ``mcp`` SDK 2.x), for server-side agent runs.

One session per server is kept open and shared by every call of the process (the SDK
multiplexes concurrent requests on it): a stdio server is started once, not per call, and
an HTTP server is not asked to negotiate again each time. A session lives in a task of its
own (the SDK's transports are entered and left in one task), and closes after
``idle_timeout`` seconds without calls, when its transport breaks, or at :meth:`aclose`.
Each call, connecting included, is bounded by the server's ``timeout`` (default
``agent.tool_timeout``); a call that times out is abandoned (the SDK tells the server it was
cancelled) and the session goes on. A call that finds its reused session broken (the stdio
child died, the HTTP server forgot the session) is tried once more on a new session, so a
call that broke the connection in the middle may run twice, as after a worker crash. A
stdio child is always stopped and reaped by the SDK's transport when its session closes.

Every failure is a :class:`~tail_service.core.tools.ToolError` the model reads. Its text,
and the log lines here, name the server only: never its URL (which may carry a token),
its header or environment values, or its command line. Those values are also scrubbed
from whatever the server answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import anyio
import httpx2
import orjson
from mcp import Client, MCPError, StdioServerParameters
from mcp.client import Transport
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import (
    CONNECTION_CLOSED,
    AudioContent,
    CallToolResult,
    EmbeddedResource,
    ImageContent,
    Implementation,
    ResourceLink,
    TextContent,
    TextResourceContents,
)
from pydantic import ValidationError

from tail_service import __version__
from tail_service.core.tools import ToolError, ToolSpec, cut_text
from tail_service.settings import McpServerEntry

__all__ = ["McpClient", "render_result"]

log = logging.getLogger("tail_service.clients.mcp")

#: most pages of ``tools/list`` followed (a server whose cursor never ends cannot hang us)
MAX_LIST_PAGES = 100
#: secret values shorter than this are not scrubbed from answers (they would mangle text)
_MIN_SCRUB_LEN = 8
#: longest server-written error message passed on
_MAX_ERROR_CHARS = 500
_URL_RE = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
_CONNECTION_ERRORS = (
    OSError,
    httpx2.TransportError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
)


def render_result(result: CallToolResult) -> str:
    """A tool result as text for the model: text blocks, placeholders for the rest."""
    parts: list[str] = []
    has_text = False
    for block in result.content:
        if isinstance(block, TextContent):
            has_text = True
            parts.append(block.text)
        elif isinstance(block, ImageContent):
            parts.append(f"[image content: {block.mime_type}]")
        elif isinstance(block, AudioContent):
            parts.append(f"[audio content: {block.mime_type}]")
        elif isinstance(block, EmbeddedResource):
            res = block.resource
            if isinstance(res, TextResourceContents):
                has_text = True
                parts.append(res.text)
            else:
                parts.append(f"[resource content: {res.mime_type or 'application/octet-stream'}]")
        elif isinstance(block, ResourceLink):
            parts.append(f"[resource link: {block.uri}]")
        else:  # a block type newer than this code
            parts.append(f"[{getattr(block, 'type', 'unknown')} content]")
    if result.structured_content is not None and not has_text:
        parts.insert(0, orjson.dumps(result.structured_content, default=str).decode())
    return "\n".join(parts)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


_T = TypeVar("_T")


def _broken(exc: BaseException) -> bool:
    """Whether ``exc`` says the session's connection is gone (not that a request failed)."""
    leaves = _leaves(exc)
    return all(
        isinstance(e, _CONNECTION_ERRORS) or (isinstance(e, MCPError) and e.code == CONNECTION_CLOSED)
        for e in leaves
    )


class _Session:
    """One open session to a server, held by a task of its own; calls from any task share it."""

    def __init__(self, entry: McpServerEntry) -> None:
        self.entry = entry
        self.ready: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
        self.closing = asyncio.Event()
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    @property
    def usable(self) -> bool:
        return (
            self.task is not None
            and not self.task.done()
            and not self.closing.is_set()
            and (not self.ready.done() or self.ready.exception() is None)
        )

    async def close(self) -> None:
        self.closing.set()
        if self.task is not None:
            if not self.ready.done():  # still connecting (maybe for ever): stop it
                self.task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self.task


class McpClient:
    """Lists and calls the tools of the configured MCP servers (a shared session per server)."""

    def __init__(
        self,
        servers: Sequence[McpServerEntry],
        *,
        tool_timeout: float,
        max_output_bytes: int,
        idle_timeout: float = 60.0,
    ) -> None:
        self._servers: dict[str, McpServerEntry] = {}
        for entry in servers:
            if entry.name in self._servers:
                raise ValueError(f"MCP server {entry.name!r} is configured twice")
            self._servers[entry.name] = entry
        self._tool_timeout = tool_timeout
        self._max_output_bytes = max_output_bytes
        self._idle_timeout = idle_timeout
        self._sessions: dict[str, _Session] = {}
        self._connecting: dict[str, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"McpClient(servers={sorted(self._servers)!r})"

    def configured(self, name: str) -> bool:
        """Whether a server of that name is configured."""
        return name in self._servers

    async def list_tools(self, server: str) -> list[ToolSpec]:
        """The server's tools (all pages), within its timeout."""

        async def pages(client: Client) -> list[ToolSpec]:
            specs: list[ToolSpec] = []
            cursor: str | None = None
            for _ in range(MAX_LIST_PAGES):
                page = await client.list_tools(cursor=cursor)
                specs.extend(
                    ToolSpec(name=t.name, description=t.description or "", parameters=t.input_schema)
                    for t in page.tools
                )
                cursor = page.next_cursor
                if not cursor:
                    break
            return specs

        return await self._request(self._entry(server), pages)

    async def call_tool(self, server: str, tool: str, arguments: dict[str, Any]) -> str:
        """Call ``tool``; its result as text (cut to the output limit), or a :class:`ToolError`."""
        entry = self._entry(server)
        result = await self._request(entry, lambda client: client.call_tool(tool, arguments))
        text = self._scrub(entry, render_result(result))
        if result.is_error:
            raise ToolError(cut_text(text or f"MCP tool {tool!r} failed", self._max_output_bytes))
        return cut_text(text, self._max_output_bytes)

    async def aclose(self) -> None:
        """Close every session (stdio children are stopped and reaped)."""
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions))

    def _entry(self, name: str) -> McpServerEntry:
        entry = self._servers.get(name)
        if entry is None:
            raise ToolError(f"MCP server {name!r} is not configured")
        return entry

    async def _request(self, entry: McpServerEntry, op: Callable[[Client], Awaitable[_T]]) -> _T:
        """``op`` on the server's session, connecting first when there is none; the whole
        bounded by the server's timeout; every failure a :class:`ToolError`."""
        timeout = entry.timeout or self._tool_timeout
        try:
            async with asyncio.timeout(timeout):
                for attempt in range(2):
                    session, fresh = await self._session(entry)
                    client = session.ready.result()
                    session.in_flight += 1
                    try:
                        return await op(client)
                    except Exception as exc:
                        if not _broken(exc):
                            raise self._failure(entry, exc, connected=True) from None
                        session.closing.set()  # its connection is gone: the next call reconnects
                        if fresh or attempt:
                            raise self._failure(entry, exc, connected=True) from None
                        log.info("MCP server %r: its session broke; trying a new one", entry.name)
                    finally:
                        session.in_flight -= 1
                        session.last_used = time.monotonic()
        except TimeoutError:
            log.warning("MCP server %r did not answer within %g s", entry.name, timeout)
            raise ToolError(f"MCP server {entry.name!r} did not answer within {timeout:g} s") from None
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _session(self, entry: McpServerEntry) -> tuple[_Session, bool]:
        """The server's open session (``False``) or a new one, connected (``True``)."""
        session = self._sessions.get(entry.name)
        if session is not None and session.ready.done() and session.usable:
            return session, False
        lock = self._connecting.setdefault(entry.name, asyncio.Lock())
        async with lock:  # one connect at a time: concurrent first calls share it
            session = self._sessions.get(entry.name)
            if session is not None and session.usable:
                return session, False
            if session is not None:
                await session.close()
            session = _Session(entry)
            session.task = asyncio.create_task(self._hold(session), name=f"mcp-session-{entry.name}")
            self._sessions[entry.name] = session
            try:
                await asyncio.shield(session.ready)
            except asyncio.CancelledError:
                if session.ready.cancelled():  # its task ended without connecting or saying why
                    raise ToolError(f"MCP server {entry.name!r} is unreachable") from None
                await session.close()  # our deadline (or our caller) ended the wait
                raise
            except Exception as exc:
                raise self._failure(entry, exc, connected=False) from None
            return session, True

    async def _hold(self, session: _Session) -> None:
        """Open the session, then keep it until it is closed, idles out or breaks."""
        entry = session.entry
        try:
            async with AsyncExitStack() as stack:
                transport: Transport
                if entry.url is not None:
                    http = httpx2.AsyncClient(
                        headers={k: v.get_secret_value() for k, v in entry.headers.items()},
                        # each request's own deadline is the one that counts
                        timeout=httpx2.Timeout((entry.timeout or self._tool_timeout) + 1.0),
                    )
                    await stack.enter_async_context(http)
                    transport = streamable_http_client(entry.url, http_client=http)
                else:
                    assert entry.command is not None  # the settings require url or command
                    params = StdioServerParameters(
                        command=entry.command[0],
                        args=list(entry.command[1:]),
                        env={k: v.get_secret_value() for k, v in entry.env.items()},
                    )
                    transport = stdio_client(params)
                client = Client(
                    transport,
                    cache=None,
                    client_info=Implementation(name="tail-service", version=__version__),
                )
                await stack.enter_async_context(client)
                session.ready.set_result(client)
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(session.closing.wait(), min(self._idle_timeout, 5.0))
                    idle = time.monotonic() - session.last_used
                    if session.closing.is_set() or (session.in_flight == 0 and idle >= self._idle_timeout):
                        break
        except Exception as exc:
            if not session.ready.done():
                session.ready.set_exception(exc)
            else:  # the transport broke under an open session: calls on it fail and reconnect
                kinds = ", ".join(sorted({type(e).__name__ for e in _leaves(exc)}))
                log.warning("MCP server %r: its session ended (%s)", entry.name, kinds)
        finally:
            session.closing.set()
            if not session.ready.done():
                session.ready.cancel()

    def _failure(self, entry: McpServerEntry, exc: Exception, connected: bool) -> ToolError:
        """The ToolError for a failed session; logs the exception types (never their text)."""
        leaves = _leaves(exc)
        kinds = ", ".join(sorted({type(e).__name__ for e in leaves}))
        log.warning(
            "MCP server %r failed %s: %s", entry.name, "in a call" if connected else "to connect", kinds
        )
        name = entry.name
        mcp_errors = [e for e in leaves if isinstance(e, MCPError) and e.code != CONNECTION_CLOSED]
        if any(isinstance(e, httpx2.TimeoutException) for e in leaves):
            return ToolError(f"MCP server {name!r} did not answer in time")
        if mcp_errors and connected:
            message = _URL_RE.sub("[url]", self._scrub(entry, mcp_errors[0].message))
            return ToolError(f"MCP server {name!r} failed: {message[:_MAX_ERROR_CHARS]}")
        if mcp_errors:
            return ToolError(f"MCP server {name!r} refused the connection (MCP error {mcp_errors[0].code})")
        if all(isinstance(e, (*_CONNECTION_ERRORS, MCPError)) for e in leaves):
            return ToolError(f"MCP server {name!r} is unreachable")
        if any(isinstance(e, ValidationError) for e in leaves):
            return ToolError(f"MCP server {name!r} failed: it sent an invalid answer")
        return ToolError(f"MCP server {name!r} failed ({kinds})")

    @staticmethod
    def _scrub(entry: McpServerEntry, text: str) -> str:
        """``text`` without the entry's URL, header values or environment values."""
        secrets = {entry.url or ""}
        for value in (*entry.headers.values(), *entry.env.values()):
            revealed = value.get_secret_value()
            secrets.add(revealed)
            secrets.update(revealed.split())
        for secret in sorted(secrets, key=len, reverse=True):
            if len(secret) >= _MIN_SCRUB_LEN and secret in text:
                text = text.replace(secret, "[redacted]")
        return text
