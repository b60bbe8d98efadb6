"""A real HTTP server speaking Anthropic's Messages API, for tests over loopback sockets.

Deterministic answers: ``"You said: <last user text>"``; after a ``tool_result`` turn,
``"Tool said: <result>"``. With tools, a ``tool_choice`` of ``any``/``tool`` or a last user
text mentioning "weather" gets a ``tool_use`` answer (two parallel calls when the text
also says "parallel" and parallel use is allowed), whose JSON input is streamed as
several ``input_json_delta`` fragments. ``stop_sequences`` and ``max_tokens`` (one token
per word) are honoured.

Like the real API it checks ``x-api-key`` (401), ``anthropic-version`` and the request
shape (400, including user/assistant alternation and tool_result ids). Every request is
recorded in :attr:`FakeAnthropic.requests`. Misbehaviour is injected per test with
:meth:`FakeAnthropic.add_fault` (see :class:`Fault`).

Usage::

    async with start_anthropic_upstream(api_key="k") as fake:
        fake.add_fault(status=429, retry_after="7")
        ...  # point a deployment at fake.base_url
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass
class Fault:
    """A misbehaviour applied to the next ``times`` requests (in the order faults were added)."""

    #: answer this status with an Anthropic error body (``body`` replaces the generated one)
    status: int | None = None
    error_type: str | None = None
    message: str = "injected failure"
    body: Any = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    #: seconds to wait before answering at all
    delay: float = 0.0
    #: drop the connection without any answer
    reset: bool = False
    #: streaming: abort the connection after this many events (no ``message_stop``)
    cut_after: int | None = None
    #: streaming: end the body cleanly after this many events (no ``message_stop``)
    end_after: int | None = None
    #: streaming: send an ``error`` event of ``stream_error_type`` after this many events
    error_event_after: int | None = None
    stream_error_type: str = "overloaded_error"
    #: streaming: stop sending after this many events but keep the connection open
    stall_after: int | None = None
    #: streaming: pause between events
    event_delay: float = 0.0
    #: streaming: before the first event, send ``: keepalive`` comments every 50 ms for this long
    keepalive_for: float = 0.0
    times: int = 1


@dataclass
class RecordedRequest:
    method: str
    path: str
    #: header names lower-cased
    headers: dict[str, str]
    body: Any


@dataclass
class FakeAnthropic:
    """The server; start it with :func:`start_anthropic_upstream`."""

    api_key: str = "sk-ant-test-key"
    #: SSE line ending (``"\\r\\n"`` and ``"\\r"`` exercise the client's decoder)
    line_ending: str = "\n"
    #: write SSE bytes in pieces of this size (``None``: one write per event)
    chunk_size: int | None = None
    #: send ``: keepalive`` comment lines between events
    comments: bool = False
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    #: put the received key into 401 messages (to test that clients scrub it)
    echo_key_in_errors: bool = False
    requests: list[RecordedRequest] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    #: streams the client abandoned while we were still writing
    disconnects: int = 0
    completed_streams: int = 0
    base_url: str = ""
    _runner: web.AppRunner | None = None
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: int = 0

    def add_fault(self, fault: Fault | None = None, **kwargs: Any) -> Fault:
        fault = fault or Fault(**kwargs)
        self.faults.append(fault)
        return fault

    async def wait_disconnect(self, within: float = 5.0) -> None:
        """Wait until a client abandoned a stream mid-way (TimeoutError after ``within`` s)."""
        await asyncio.wait_for(self._disconnected.wait(), within)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _take_fault(self) -> Fault | None:
        for fault in self.faults:
            if fault.times > 0:
                fault.times -= 1
                return fault
        return None

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    # -- request handling -------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(RecordedRequest(request.method, request.path, headers, body))
        fault = self._take_fault() or Fault(times=0)
        if fault.delay:
            await self._sleep(fault.delay)
        if fault.reset:
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError  # nothing can be sent any more
        if fault.status is not None:
            return self._error(
                fault.status,
                fault.error_type or ERROR_TYPES.get(fault.status, "api_error"),
                fault.message,
                body=fault.body,
                retry_after=fault.retry_after,
                retry_after_ms=fault.retry_after_ms,
            )
        key = request.headers.get("x-api-key")
        if key != self.api_key:
            shown = f" {key}" if self.echo_key_in_errors and key else ""
            return self._error(401, "authentication_error", f"invalid x-api-key{shown}")
        if request.headers.get("anthropic-version") != "2023-06-01":
            return self._error(400, "invalid_request_error", "anthropic-version header is required")
        problem = validate(body)
        if problem:
            return self._error(400, "invalid_request_error", problem)
        message = self._answer(body)
        if not body.get("stream"):
            return web.json_response(message, headers={"request-id": f"req_{self._ids:06d}"})
        return await self._stream(request, message, fault)

    def _error(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        body: Any = None,
        retry_after: str | None = None,
        retry_after_ms: str | None = None,
    ) -> web.Response:
        payload = body if body is not None else error_body(error_type, message)
        headers = {}
        if retry_after is not None:
            headers["retry-after"] = retry_after
        if retry_after_ms is not None:
            headers["retry-after-ms"] = retry_after_ms
        text = payload if isinstance(payload, str) else json.dumps(payload)
        return web.Response(status=status, text=text, content_type="application/json", headers=headers)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    def _answer(self, body: dict[str, Any]) -> dict[str, Any]:
        n = self._next_id()
        messages = body["messages"]
        last = messages[-1]
        blocks = last["content"] if isinstance(last["content"], list) else []
        results = [b for b in blocks if b.get("type") == "tool_result"]
        user_text = text_of(last["content"]) if last["role"] == "user" else ""
        tools = body.get("tools") or []
        choice = body.get("tool_choice") or {"type": "auto"}
        forced = choice["type"] in ("any", "tool")
        wants_tool = bool(tools) and choice["type"] != "none"
        wants_tool = wants_tool and (forced or ("weather" in user_text.lower() and not results))
        content: list[dict[str, Any]] = []
        stop_reason, stop_sequence = "end_turn", None
        if wants_tool:
            name = choice.get("name") or next(
                (t["name"] for t in tools if "weather" in t["name"]), tools[0]["name"]
            )
            if not forced:
                content.append({"type": "text", "text": "Let me check the weather."})
            cities = ["Paris"]
            if "parallel" in user_text.lower() and not choice.get("disable_parallel_tool_use"):
                cities.append("Tokyo")
            for i, city in enumerate(cities):
                tool_input = {"city": city, "unit": "celsius"}
                content.append(
                    {"type": "tool_use", "id": f"toolu_{n:04d}_{i}", "name": name, "input": tool_input}
                )
            stop_reason = "tool_use"
        else:
            prefix = "Tool said: " if results else "You said: "
            said = " ".join(text_of(r.get("content", "")) for r in results) if results else user_text
            words = (prefix + said).split(" ")
            for seq in body.get("stop_sequences") or []:
                joined = " ".join(words)
                if seq in joined:
                    words = joined[: joined.index(seq)].split(" ")
                    stop_reason, stop_sequence = "stop_sequence", seq
            if len(words) > body["max_tokens"]:
                words, stop_reason = words[: body["max_tokens"]], "max_tokens"
            content.append({"type": "text", "text": " ".join(words)})
        output_tokens = sum(len(b["text"].split()) for b in content if b["type"] == "text")
        output_tokens += sum(len(json.dumps(b["input"])) // 4 for b in content if b["type"] == "tool_use")
        usage = {
            "input_tokens": max(1, count_words(body)),
            "output_tokens": output_tokens,
            "cache_read_input_tokens": self.cache_read_tokens,
            "cache_creation_input_tokens": self.cache_creation_tokens,
        }
        return {
            "id": f"msg_fake{n:04d}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }

    async def _stream(
        self, request: web.Request, message: dict[str, Any], fault: Fault
    ) -> web.StreamResponse:
        events = stream_events(message)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        eol = self.line_ending
        try:
            await resp.prepare(request)
            for _ in range(int(fault.keepalive_for / 0.05)):
                await resp.write(f": keepalive{eol}".encode())
                await asyncio.sleep(0.05)
            for i, (name, data) in enumerate(events):
                if i == fault.error_event_after:
                    name, data = "error", error_body(fault.stream_error_type, "Overloaded")
                if i == fault.cut_after:
                    assert request.transport is not None
                    request.transport.abort()
                    raise asyncio.CancelledError
                if i == fault.end_after:
                    break
                if i == fault.stall_after:
                    while not self._closing.is_set() and not _gone(request):  # noqa: ASYNC110 (polls a socket)
                        await asyncio.sleep(0.01)
                    if _gone(request):
                        raise ConnectionResetError
                    return resp
                if fault.event_delay:
                    await asyncio.sleep(fault.event_delay)
                if _gone(request):
                    raise ConnectionResetError
                comment = f": keepalive{eol}" if self.comments else ""
                text = f"{comment}event: {name}{eol}data: {json.dumps(data)}{eol}{eol}".encode()
                size = self.chunk_size or len(text)
                for start in range(0, len(text), size):
                    await resp.write(text[start : start + size])
                if name == "error":
                    break
            else:
                self.completed_streams += 1
            await resp.write_eof()
        except ConnectionResetError:
            self.disconnects += 1
            self._disconnected.set()
        return resp


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(b["text"] for b in content if isinstance(b, dict) and b.get("type") == "text")


def count_words(body: dict[str, Any]) -> int:
    total = len(str(body.get("system") or "").split())
    for msg in body["messages"]:
        content = msg["content"]
        total += len(text_of(content).split())
        for block in content if isinstance(content, list) else []:
            if block.get("type") == "tool_result":
                total += len(text_of(block.get("content", "")).split())
    return total


def stream_events(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The SSE events the real API sends for ``message``."""
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {**message["usage"], "output_tokens": 1}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start})
    ]
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            first: dict[str, Any] = {"type": "text", "text": ""}
            words = block["text"].split(" ")
            pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
            deltas = [{"type": "text_delta", "text": p} for p in pieces]
        else:
            first = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            raw = json.dumps(block["input"])
            deltas = [{"type": "input_json_delta", "partial_json": ""}]
            deltas += [
                {"type": "input_json_delta", "partial_json": raw[i : i + 7]} for i in range(0, len(raw), 7)
            ]
        events.append(
            ("content_block_start", {"type": "content_block_start", "index": index, "content_block": first})
        )
        if index == 0:
            events.append(("ping", {"type": "ping"}))
        events += [
            ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
            for d in deltas
        ]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    delta = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
    usage = {"output_tokens": message["usage"]["output_tokens"]}
    events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def validate(body: Any) -> str | None:
    """The subset of the real API's request validation that catches translation bugs."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str):
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        return "max_tokens: Field required"
    temperature = body.get("temperature")
    if temperature is not None and not 0 <= temperature <= 1:
        return "temperature: Input should be less than or equal to 1"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    tool_ids: set[str] = set()
    for i, msg in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if msg.get("role") != want:
            return 'messages: roles must alternate between "user" and "assistant"'
        content = msg.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            return f"messages.{i}.content: must be a string or a non-empty list"
        for block in content:
            kind = block.get("type")
            if kind == "text" and not block.get("text"):
                return f"messages.{i}: text content blocks must be non-empty"
            if kind == "tool_result" and block.get("tool_use_id") not in tool_ids:
                return f"messages.{i}: tool_result block(s) provided without a matching tool_use"
            if kind not in ("text", "image", "tool_use", "tool_result"):
                return f"messages.{i}: unknown content block type {kind!r}"
        tool_ids = {b["id"] for b in content if b.get("type") == "tool_use"}
    return None


@contextlib.asynccontextmanager
async def start_anthropic_upstream(**opts: Any) -> AsyncIterator[FakeAnthropic]:
    """Start a :class:`FakeAnthropic` on ``127.0.0.1:<free port>``; shut it down on exit."""
    fake = FakeAnthropic(**opts)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()
