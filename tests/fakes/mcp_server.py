"""A real MCP test server built with the ``mcp`` SDK: streamable HTTP in a thread, or stdio.

    with RunningMcpServer(token="s3cret") as srv:  # http://127.0.0.1:PORT/mcp
        ...  # point an McpServerEntry at srv.url; srv.counts() -> {"add": 1}
    python tests/fakes/mcp_server.py --stdio      # the same tools over stdin/stdout

Tools: ``add(a, b)``, ``lookup(city)``, ``slow(seconds)``, ``fail()``, ``big(n)``. Calls are
counted per tool (at the start of the call) in memory and, if ``MCP_COUNTS_FILE`` names a
file, written there as JSON after each call (atomically: a temporary file, then ``os.replace``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import threading
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["CITIES", "COUNTS_ENV", "RunningMcpServer", "build_server", "read_counts"]

COUNTS_ENV = "MCP_COUNTS_FILE"
CITIES = {"Paris": 2_100_000, "Berlin": 3_600_000, "Tokyo": 14_000_000}


class _Counts:
    """Calls per tool, mirrored to a JSON file when one is given."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.values: dict[str, int] = {}
        self._lock = threading.Lock()

    def hit(self, tool: str) -> None:
        with self._lock:
            self.values[tool] = self.values.get(tool, 0) + 1
            if self.path is not None:
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                tmp.write_bytes(orjson.dumps(self.values))
                os.replace(tmp, self.path)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.values)


def read_counts(path: Path) -> dict[str, int]:
    """The counts another process wrote to ``path`` (empty if it has not written yet)."""
    try:
        data: dict[str, int] = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    return data


def build_server(counts: _Counts) -> MCPServer:
    """The test server with its five tools, counting calls into ``counts``."""
    server: MCPServer = MCPServer("tail-test-mcp", log_level="WARNING")

    @server.tool(description="Add two numbers.")
    def add(a: float, b: float) -> str:
        counts.hit("add")
        return f"{a + b:g}"

    @server.tool(description="How many people live in a city.")
    def lookup(city: str) -> str:
        counts.hit("lookup")
        if city not in CITIES:
            raise ToolError(f"unknown city {city}")
        return f"{city} has {CITIES[city]} inhabitants"

    @server.tool(description="Sleep, then answer.")
    async def slow(seconds: float) -> str:
        counts.hit("slow")
        await asyncio.sleep(seconds)
        return f"slept {seconds:g}"

    @server.tool(description="Always fails.")
    def fail() -> str:
        counts.hit("fail")
        raise ToolError("fail always fails")

    @server.tool(description="A long answer: n times 'x'.")
    def big(n: int) -> str:
        counts.hit("big")
        return "x" * n

    return server


class _BearerGate:
    """Answers 401 to HTTP requests without ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != self.expected:
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


class RunningMcpServer:
    """The test server over streamable HTTP, served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, *, token: str | None = None, counts_file: Path | None = None, port: int = 0) -> None:
        self._counts = _Counts(counts_file)
        app: Any = build_server(self._counts).streamable_http_app()
        if token is not None:
            app = _BearerGate(app, token)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ``port``: a restart
        self._sock.bind(("127.0.0.1", port))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        config = uvicorn.Config(
            app,
            lifespan="on",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="mcp-test-server", daemon=True)
        self._thread.start()
        for _ in range(1000):
            if self._server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not self._server.started:
            self.stop()
            raise RuntimeError("the MCP test server did not start")

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def counts(self) -> dict[str, int]:
        """Calls per tool so far."""
        return self._counts.snapshot()

    def stop(self) -> None:
        """Stop serving and wait for the thread (idempotent)."""
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    def __enter__(self) -> RunningMcpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stdio", action="store_true", help="serve over stdin/stdout")
    args = parser.parse_args()
    if not args.stdio:
        parser.error("only --stdio is supported as a script; tests use RunningMcpServer for HTTP")
    counts_file = os.environ.get(COUNTS_ENV)
    build_server(_Counts(Path(counts_file) if counts_file else None)).run("stdio")


if __name__ == "__main__":
    main()
