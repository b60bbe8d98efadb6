"""The MCP client against a real MCP server: streamable HTTP on 127.0.0.1, and a stdio child."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp.types import (
    BlobResourceContents,
    CallToolResult,
    EmbeddedResource,
    ImageContent,
    TextContent,
    TextResourceContents,
)
from pydantic import SecretStr

from tail_service.clients.mcp import McpClient, render_result
from tail_service.core.tools import ToolError, cut_text
from tail_service.settings import McpServerEntry
from tests.fakes.mcp_server import CITIES, COUNTS_ENV, RunningMcpServer, read_counts

SERVER_SCRIPT = str(Path(__file__).resolve().parents[1] / "fakes" / "mcp_server.py")
TOKEN = "tok-0123456789-abcdef"
TOOLS = {"add", "lookup", "slow", "fail", "big"}


@pytest.fixture(scope="module")
def http_server() -> Iterator[RunningMcpServer]:
    with RunningMcpServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def token_server() -> Iterator[RunningMcpServer]:
    with RunningMcpServer(token=TOKEN) as srv:
        yield srv


@pytest.fixture
async def client() -> AsyncIterator[Callable[..., McpClient]]:
    """``client(*entries, **options)`` makes an McpClient; each is closed after the test
    (its sessions, and so its stdio children)."""
    made: list[McpClient] = []

    def make(
        *entries: McpServerEntry,
        tool_timeout: float = 10.0,
        max_output_bytes: int = 65536,
        idle_timeout: float = 60.0,
    ) -> McpClient:
        mcp = McpClient(
            entries, tool_timeout=tool_timeout, max_output_bytes=max_output_bytes, idle_timeout=idle_timeout
        )
        made.append(mcp)
        return mcp

    yield make
    for mcp in made:
        await mcp.aclose()


def stdio_entry(counts_file: Path | None = None, **kw: Any) -> McpServerEntry:
    env = {COUNTS_ENV: SecretStr(str(counts_file))} if counts_file else {}
    return McpServerEntry(name="local", command=(sys.executable, SERVER_SCRIPT, "--stdio"), env=env, **kw)


def stdio_children() -> list[int]:
    """Pids of this process's children that run the test server script, or are zombies (``/proc``)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")"
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == os.getpid():
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if state == "Z" or SERVER_SCRIPT.encode() in argv:
                    found.append(int(proc.name))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_list_tools_over_http(http_server: RunningMcpServer, client: Callable[..., McpClient]) -> None:
    specs = await client(McpServerEntry(name="web", url=http_server.url)).list_tools("web")
    by_name = {s.name: s for s in specs}
    assert set(by_name) == TOOLS
    add = by_name["add"]
    assert add.description == "Add two numbers."
    assert add.parameters["type"] == "object"
    assert set(add.parameters["properties"]) == {"a", "b"}
    assert add.parameters["properties"]["a"]["type"] == "number"
    assert sorted(add.parameters["required"]) == ["a", "b"]
    assert by_name["big"].parameters["properties"]["n"]["type"] == "integer"
    assert by_name["lookup"].parameters["properties"]["city"]["type"] == "string"


async def test_call_tools_over_http(http_server: RunningMcpServer, client: Callable[..., McpClient]) -> None:
    mcp = client(McpServerEntry(name="web", url=http_server.url))
    before = http_server.counts()
    assert await mcp.call_tool("web", "add", {"a": 2, "b": 3.5}) == "5.5"
    assert await mcp.call_tool("web", "lookup", {"city": "Paris"}) == "Paris has 2100000 inhabitants"
    after = http_server.counts()
    assert after.get("add", 0) == before.get("add", 0) + 1
    assert after.get("lookup", 0) == before.get("lookup", 0) + 1
    await mcp.aclose()


async def test_tool_errors_over_http(http_server: RunningMcpServer, client: Callable[..., McpClient]) -> None:
    mcp = client(McpServerEntry(name="web", url=http_server.url))
    with pytest.raises(ToolError, match="unknown city Atlantis"):
        await mcp.call_tool("web", "lookup", {"city": "Atlantis"})
    with pytest.raises(ToolError, match="fail always fails"):
        await mcp.call_tool("web", "fail", {})
    with pytest.raises(ToolError, match="nope"):
        await mcp.call_tool("web", "nope", {})


async def test_stdio_calls_and_counts(tmp_path: Path, client: Callable[..., McpClient]) -> None:
    counts = tmp_path / "counts.json"
    mcp = client(stdio_entry(counts))
    assert {s.name for s in await mcp.list_tools("local")} == TOOLS
    assert await mcp.call_tool("local", "add", {"a": 1, "b": 2}) == "3"
    assert (
        await mcp.call_tool("local", "lookup", {"city": "Tokyo"})
        == f"Tokyo has {CITIES['Tokyo']} inhabitants"
    )
    with pytest.raises(ToolError, match="unknown city Nowhere"):
        await mcp.call_tool("local", "lookup", {"city": "Nowhere"})
    # one child process served every call (its counts add up), and the env reached it
    assert read_counts(counts) == {"add": 1, "lookup": 2}
    assert len(stdio_children()) == 1
    await mcp.aclose()
    assert stdio_children() == []  # stopped and reaped


async def test_one_session_serves_concurrent_calls(tmp_path: Path, client: Callable[..., McpClient]) -> None:
    counts = tmp_path / "counts.json"
    mcp = client(stdio_entry(counts))
    results = await asyncio.gather(*(mcp.call_tool("local", "slow", {"seconds": 0.2}) for _ in range(8)))
    assert results == ["slept 0.2"] * 8
    assert read_counts(counts) == {"slow": 8} and len(stdio_children()) == 1


async def test_a_dead_stdio_child_is_replaced_on_the_next_call(
    tmp_path: Path, client: Callable[..., McpClient]
) -> None:
    mcp = client(stdio_entry(tmp_path / "counts.json"))
    assert await mcp.call_tool("local", "add", {"a": 1, "b": 1}) == "2"
    (first,) = stdio_children()
    os.kill(first, signal.SIGKILL)
    assert await mcp.call_tool("local", "add", {"a": 2, "b": 2}) == "4"
    (second,) = stdio_children()
    assert second != first


async def test_an_http_server_restart_is_survived(client: Callable[..., McpClient]) -> None:
    """The pooled session dies with the server; the next call opens a new one."""
    port = free_port()
    with RunningMcpServer(port=port) as first:
        mcp = client(McpServerEntry(name="web", url=first.url))
        assert await mcp.call_tool("web", "add", {"a": 1, "b": 1}) == "2"
    with pytest.raises(ToolError, match="unreachable"):
        await mcp.call_tool("web", "add", {"a": 1, "b": 1})
    with RunningMcpServer(port=port) as second:
        assert await mcp.call_tool("web", "add", {"a": 2, "b": 2}) == "4"
        assert second.counts() == {"add": 1}


_HOLDER = """
import asyncio, sys
from tail_service.clients.mcp import McpClient
from tail_service.settings import McpServerEntry

async def main() -> None:
    entry = McpServerEntry(name="local", command=(sys.executable, sys.argv[1], "--stdio"))
    mcp = McpClient([entry], tool_timeout=30, max_output_bytes=1000)
    print(await mcp.call_tool("local", "add", {"a": 1, "b": 1}), flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_pooled_stdio_child_ends_with_its_killed_worker(tmp_path: Path) -> None:
    """A worker killed with ``kill -9`` leaves no MCP server behind: its pooled stdio child
    reads the end of its stdin and exits."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, SERVER_SCRIPT],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "2"
        children = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit()
            and _ppid(p) == holder.pid
            and SERVER_SCRIPT.encode() in (p / "cmdline").read_bytes()
        ]
        assert len(children) == 1, children
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 15
    while Path(f"/proc/{children[0]}").exists() and _state(children[0]) != "Z":
        assert time.monotonic() < deadline, "the stdio MCP server outlived its killed worker"
        time.sleep(0.05)


def _ppid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


async def test_an_idle_session_closes(tmp_path: Path, client: Callable[..., McpClient]) -> None:
    mcp = client(stdio_entry(tmp_path / "counts.json"), idle_timeout=0.5)
    assert await mcp.call_tool("local", "add", {"a": 1, "b": 1}) == "2"
    assert len(stdio_children()) == 1
    deadline = time.monotonic() + 15
    while stdio_children():
        assert time.monotonic() < deadline, "the idle session's child is still running"
        await asyncio.sleep(0.1)
    assert await mcp.call_tool("local", "add", {"a": 2, "b": 2}) == "4"  # and opens again


async def test_http_timeout(http_server: RunningMcpServer, client: Callable[..., McpClient]) -> None:
    mcp = client(McpServerEntry(name="web", url=http_server.url, timeout=0.5))
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"MCP server 'web' did not answer within 0\.5 s"):
        await mcp.call_tool("web", "slow", {"seconds": 5})
    assert time.monotonic() - started < 3


async def test_stdio_timeout_leaves_the_session_and_close_reaps_the_child(
    tmp_path: Path, client: Callable[..., McpClient]
) -> None:
    counts = tmp_path / "counts.json"
    mcp = client(stdio_entry(counts), tool_timeout=2.0)
    started = time.monotonic()
    with pytest.raises(ToolError, match="did not answer within 2 s"):
        await mcp.call_tool("local", "slow", {"seconds": 30})
    assert time.monotonic() - started < 8
    assert read_counts(counts) == {"slow": 1}  # it was running the tool when it timed out
    assert await mcp.call_tool("local", "add", {"a": 1, "b": 2}) == "3"  # the session goes on
    await mcp.aclose()
    assert stdio_children() == []


async def test_server_down(caplog: pytest.LogCaptureFixture, client: Callable[..., McpClient]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp?token={TOKEN}"
    mcp = client(McpServerEntry(name="down", url=url))
    with caplog.at_level(logging.DEBUG, logger="tail_service.clients.mcp"):
        with pytest.raises(ToolError, match="MCP server 'down' is unreachable") as err:
            await mcp.call_tool("down", "add", {"a": 1, "b": 2})
        with pytest.raises(ToolError, match="unreachable"):
            await mcp.list_tools("down")
    for text in (
        str(err.value),
        *(r.getMessage() for r in caplog.records if r.name.startswith("tail_service")),
    ):
        assert str(port) not in text
        assert "127.0.0.1" not in text
        assert TOKEN not in text
    assert any("down" in r.getMessage() for r in caplog.records)


async def test_missing_stdio_command(client: Callable[..., McpClient]) -> None:
    mcp = client(McpServerEntry(name="gone", command=("/nonexistent/mcp-server", "--flag")))
    with pytest.raises(ToolError, match="MCP server 'gone' is unreachable") as err:
        await mcp.call_tool("gone", "add", {})
    assert "nonexistent" not in str(err.value)


async def test_bearer_token(
    token_server: RunningMcpServer, caplog: pytest.LogCaptureFixture, client: Callable[..., McpClient]
) -> None:
    good = McpServerEntry(
        name="auth", url=token_server.url, headers={"Authorization": SecretStr(f"Bearer {TOKEN}")}
    )
    assert await client(good).call_tool("auth", "add", {"a": 20, "b": 22}) == "42"

    wrong = "Bearer wrong-token-987654321"
    bad = McpServerEntry(name="auth", url=token_server.url, headers={"Authorization": SecretStr(wrong)})
    before = token_server.counts()
    mcp = client(bad)
    with (
        caplog.at_level(logging.DEBUG, logger="tail_service.clients.mcp"),
        pytest.raises(ToolError, match="MCP server 'auth'") as err,
    ):
        await mcp.call_tool("auth", "add", {"a": 1, "b": 1})
    assert token_server.counts() == before
    texts = [str(err.value), repr(mcp)]
    texts += [r.getMessage() for r in caplog.records if r.name.startswith("tail_service")]
    for text in texts:
        assert "wrong-token" not in text
        assert TOKEN not in text
        assert token_server.url not in text
    for text in (repr(bad), str(bad), bad.model_dump_json()):  # the entry masks its header values
        assert "wrong-token" not in text
    assert TOKEN not in repr(good) and TOKEN not in repr(client(good))


async def test_output_truncated(http_server: RunningMcpServer, client: Callable[..., McpClient]) -> None:
    mcp = client(McpServerEntry(name="web", url=http_server.url), max_output_bytes=1000)
    out = await mcp.call_tool("web", "big", {"n": 100_000})
    body, marker = out.split("\n[output truncated: ", 1)
    assert body == "x" * 1000
    assert marker == "99000 bytes omitted]"
    assert await mcp.call_tool("web", "big", {"n": 1000}) == "x" * 1000


def test_truncate_never_splits_a_character() -> None:
    text = "é" * 10  # 20 bytes
    assert cut_text(text, 20) == text
    assert cut_text(text, 5) == "éé\n[output truncated: 16 bytes omitted]"


def test_render_result_blocks() -> None:
    blocks: list[Any] = [
        TextContent(text="one"),
        ImageContent(data="AAAA", mime_type="image/png"),
        EmbeddedResource(resource=TextResourceContents(uri="file:///a.txt", text="inside")),
        EmbeddedResource(
            resource=BlobResourceContents(uri="file:///b", blob="AAAA", mime_type="application/pdf")
        ),
    ]
    assert render_result(CallToolResult(content=blocks)) == (
        "one\n[image content: image/png]\ninside\n[resource content: application/pdf]"
    )
    structured = CallToolResult(content=[], structured_content={"temp": 21.5, "unit": "C"})
    assert render_result(structured) == '{"temp":21.5,"unit":"C"}'
    both = CallToolResult(content=[TextContent(text="21.5 C")], structured_content={"temp": 21.5})
    assert render_result(both) == "21.5 C"


async def test_unknown_server(client: Callable[..., McpClient]) -> None:
    mcp = client(McpServerEntry(name="web", url="http://127.0.0.1:9/mcp"))
    assert mcp.configured("web")
    assert not mcp.configured("other")
    with pytest.raises(ToolError, match="'other' is not configured"):
        await mcp.call_tool("other", "add", {})
    with pytest.raises(ToolError, match="'other' is not configured"):
        await mcp.list_tools("other")
