"""A fake OpenAI-compatible upstream: a real aiohttp server on 127.0.0.1, port 0.

    async with start_openai_upstream(name="a", api_key="sk-up-a") as up:
        ...  # point the gateway at up.base_url; inspect up.requests / up.cancelled
    with run_openai_upstream_in_thread(name="b") as up:  # own loop in a background thread
        ...

Answers are deterministic (see tests/fakes/_sse.py): chat content is ``"[<name>] " + last user text``.
Faults are queued from the test (``fail_next``, ``delay_next``, ``reset_next``, ``cut_stream_next``,
``error_event_next``) and consumed FIFO, one per inference request (chat, completions, embeddings).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import orjson
from aiohttp import web

from tests.fakes import _sse
from tests.fakes._sse import SSE_DONE, error_body, fake_embedding, sse

__all__ = [
    "FakeOpenAI",
    "RecordedRequest",
    "fake_embedding",
    "run_openai_upstream_in_thread",
    "start_openai_upstream",
]

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-3.5-turbo-instruct", "text-embedding-3-small")
_Handler = Callable[..., Awaitable[web.StreamResponse]]  # (request, rec, body, fault) -> response


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case keys
    json: Any  # parsed JSON body, or None (no body / not JSON)
    time: float  # time.monotonic() at arrival
    query: dict[str, str] = field(default_factory=dict)
    fault: str | None = None  # "fail" | "delay" | "reset" | "cut" | "error_event" applied to it
    cancelled: bool = False  # client disconnected before the response finished
    closed_by_server: bool = False  # reset/cut fault closed the connection on purpose


@dataclass(frozen=True)
class _Fault:
    kind: str
    status: int = 500
    body: Any = None
    headers: Mapping[str, str] | None = None
    seconds: float = 0.0
    after_chunks: int = 0
    error: Mapping[str, Any] | None = None


def _model_not_found(model: str) -> _sse.BadRequest:
    msg = f"The model `{model}` does not exist or you do not have access to it."
    return _sse.BadRequest(msg, code="model_not_found", status=404)


#: a chat message with exactly this content is refused with a 400 (a request the upstream rejects)
REJECT_CONTENT = "fake: reject this request"


def _check_reject(body: Any) -> None:
    for message in (body.get("messages") or []) if isinstance(body, dict) else []:
        if isinstance(message, dict) and message.get("content") == REJECT_CONTENT:
            raise _sse.BadRequest("The fake upstream rejects this request.", "messages", "invalid_value")


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, headers=headers, content_type="application/json"
    )


class FakeOpenAI:
    """State, recordings and fault controls of one fake upstream. Fault controls are thread-safe."""

    def __init__(
        self,
        *,
        name: str = "a",
        api_key: str | None = "sk-up-a",
        models: Sequence[str] | None = None,
        chunk_delay: float = 0.0,
        embedding_dim: int = 32,
    ) -> None:
        self.name = name
        self.api_key = api_key  # None: accept any (or no) key
        self.models = list(models) if models is not None else None  # None: accept any model
        self.chunk_delay = chunk_delay  # seconds between SSE events; header x-fake-chunk-delay overrides
        self.embedding_dim = embedding_dim
        self.omit_usage = False  # True: ignore stream_options.include_usage
        self.latency = 0.0  # seconds every inference request waits before it is answered
        # answers chat requests instead of the default plan (a scripted agent model)
        self.script: Callable[[dict[str, Any]], list[_sse.ChoicePlan]] | None = None
        self.base_url = ""  # "http://127.0.0.1:PORT/v1", set once listening
        self.port = 0
        self.requests: list[RecordedRequest] = []
        self.cancelled: list[RecordedRequest] = []
        self.cancel_seen = asyncio.Event()  # set on the server loop; use cancel_seen_sync across threads
        self.cancel_seen_sync = threading.Event()
        self._faults: deque[_Fault] = deque()
        self._lock = threading.Lock()
        self._call_ids = itertools.count(1)
        self._closing = False

    # ------------------------------------------------------------------------------ fault controls
    def _queue(self, n: int, fault: _Fault) -> None:
        with self._lock:
            self._faults.extend([fault] * n)

    def fail_next(
        self, n: int = 1, status: int = 500, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer with `status`; body: dict (JSON), str/bytes (raw), None (OpenAI envelope for status)."""
        self._queue(n, _Fault("fail", status=status, body=body, headers=dict(headers or {})))

    def delay_next(self, n: int = 1, seconds: float = 1.0) -> None:
        """Wait `seconds` before sending the response headers, then answer normally."""
        self._queue(n, _Fault("delay", seconds=seconds))

    def reset_next(self, n: int = 1) -> None:
        """Close the TCP connection abruptly without any response."""
        self._queue(n, _Fault("reset"))

    def cut_stream_next(self, n: int = 1, after_chunks: int = 1) -> None:
        """Send `after_chunks` SSE events, then close the connection (no [DONE]).

        A non-streaming request gets its headers and half of its JSON body, then the close."""
        self._queue(n, _Fault("cut", after_chunks=after_chunks))

    def error_event_next(
        self, n: int = 1, after_chunks: int = 1, error: Mapping[str, Any] | None = None
    ) -> None:
        """Send `after_chunks` SSE events, then ``data: {"error": ...}`` and end the body (no [DONE]).

        A non-streaming request gets HTTP 500 with that error instead."""
        err = dict(error or _sse.default_error(500)["error"] | {"code": "server_error"})
        self._queue(n, _Fault("error_event", after_chunks=after_chunks, error=err))

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def clear(self) -> None:
        """Forget recorded requests, cancellations and queued faults."""
        with self._lock:
            self._faults.clear()
        self.requests.clear()
        self.cancelled.clear()
        self.cancel_seen.clear()
        self.cancel_seen_sync.clear()

    def _pop_fault(self) -> _Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    # ----------------------------------------------------------------------------------- plumbing
    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._route(self._chat, inference=True))
        app.router.add_post("/v1/completions", self._route(self._completions, inference=True))
        app.router.add_post("/v1/embeddings", self._route(self._embeddings, inference=True))
        app.router.add_get("/v1/models", self._route(self._list_models))
        app.router.add_get("/v1/models/{model:.+}", self._route(self._get_model))
        app.router.add_route("*", "/{tail:.*}", self._route(self._not_found))
        return app

    def _route(self, handler: _Handler, inference: bool = False) -> Callable[[web.Request], Awaitable[Any]]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            return await self._dispatch(request, handler, inference)

        return wrapped

    async def _dispatch(self, request: web.Request, handler: _Handler, inference: bool) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        rec = RecordedRequest(
            method=request.method,
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            json=body,
            time=time.monotonic(),
            query=dict(request.query),
        )
        self.requests.append(rec)
        try:
            if (denied := self._check_auth(request)) is not None:
                return denied
            fault = self._pop_fault() if inference else None
            if fault is not None:
                rec.fault = fault.kind
                if fault.kind == "fail":
                    return self._fail_response(fault)
                if fault.kind == "delay":
                    await asyncio.sleep(fault.seconds)
                elif fault.kind == "reset":
                    await self._drop_connection(request, rec, abort=True)
            if inference:
                if self.latency:
                    await asyncio.sleep(self.latency)
                self._check_model(body)
                _check_reject(body)
            return await handler(request, rec, body or {}, fault)
        except _sse.BadRequest as exc:
            return _json(exc.body, exc.status, self._headers())
        except (asyncio.CancelledError, ConnectionResetError):
            if not rec.closed_by_server and not self._closing:
                rec.cancelled = True
                self.cancelled.append(rec)
                self.cancel_seen.set()
                self.cancel_seen_sync.set()
            raise

    def _check_auth(self, request: web.Request) -> web.Response | None:
        if self.api_key is None:
            return None
        auth = request.headers.get("Authorization", "")
        if not auth:
            return _json(error_body("You didn't provide an API key.", "invalid_request_error"), 401)
        if auth != f"Bearer {self.api_key}":
            msg = "Incorrect API key provided. You can find your API key at https://platform.openai.com."
            return _json(error_body(msg, "invalid_request_error", "invalid_api_key"), 401)
        return None

    def _check_model(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise _sse.BadRequest("We could not parse the JSON body of your request.")
        if not isinstance(model := body.get("model"), str) or not model:
            raise _sse.BadRequest(
                "Missing required parameter: 'model'.", "model", "missing_required_parameter"
            )
        if self.models is not None and model not in self.models:
            raise _model_not_found(model)

    def _fail_response(self, fault: _Fault) -> web.Response:
        headers = {**self._headers(), **(fault.headers or {})}
        body = _sse.default_error(fault.status) if fault.body is None else fault.body
        if isinstance(body, (dict, list)):
            return _json(body, fault.status, headers)
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "text/plain"
        data = body.encode() if isinstance(body, str) else bytes(body)
        return web.Response(body=data, status=fault.status, headers=headers)

    @staticmethod
    async def _drop_connection(request: web.Request, rec: RecordedRequest, *, abort: bool) -> NoReturn:
        """Close the TCP connection, then wait for aiohttp to cancel this handler (like a disconnect)."""
        rec.closed_by_server = True
        transport = request.transport
        if transport is not None and abort:
            transport.abort()  # drop buffered data too: nothing reaches the client
        elif transport is not None:
            transport.close()  # flush what was written, then FIN
        await asyncio.sleep(30)  # handler_cancellation cancels us on connection_lost
        raise ConnectionResetError("fake upstream closed the connection")

    def _headers(self) -> dict[str, str]:
        return {"x-request-id": f"req_{uuid.uuid4().hex}", "x-fake-upstream": self.name}

    def _base(self, body: dict[str, Any], prefix: str) -> dict[str, Any]:
        return {"id": f"{prefix}{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body["model"]}

    async def _respond(
        self, request: web.Request, rec: RecordedRequest, obj: dict[str, Any], fault: _Fault | None
    ) -> web.StreamResponse:
        if fault is not None and fault.kind == "error_event":
            return _json({"error": fault.error}, 500, self._headers())
        if fault is not None and fault.kind == "cut":  # headers + half the body, then close
            data = orjson.dumps(obj)
            resp = web.StreamResponse(headers=self._headers())
            resp.content_type, resp.content_length = "application/json", len(data)
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            await self._drop_connection(request, rec, abort=False)
        return _json(obj, headers=self._headers())

    async def _stream(
        self,
        request: web.Request,
        rec: RecordedRequest,
        chunks: list[dict[str, Any]],
        usage_chunk: dict[str, Any] | None,
        fault: _Fault | None,
    ) -> web.StreamResponse:
        delay = float(request.headers.get("x-fake-chunk-delay", self.chunk_delay))
        resp = web.StreamResponse(headers={**self._headers(), "Cache-Control": "no-cache"})
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        events = [sse(c) for c in chunks] + ([sse(usage_chunk)] if usage_chunk is not None else [])
        breaking = fault is not None and fault.kind in ("cut", "error_event")
        for i, event in enumerate([*events, SSE_DONE]):
            if i and delay:
                await asyncio.sleep(delay)
            if breaking and fault is not None and (i >= fault.after_chunks or event is SSE_DONE):
                if fault.kind == "cut":
                    await self._drop_connection(request, rec, abort=False)
                await resp.write(sse({"error": fault.error}))
                break
            await resp.write(event)
        await resp.write_eof()
        return resp

    def _usage_chunk(self, body: dict[str, Any], base: dict[str, Any], usage: dict[str, int]) -> Any:
        wanted = bool((body.get("stream_options") or {}).get("include_usage"))
        return {**base, "choices": [], "usage": usage} if wanted and not self.omit_usage else None

    # ----------------------------------------------------------------------------------- handlers
    async def _chat(
        self, request: web.Request, rec: RecordedRequest, body: dict[str, Any], fault: _Fault | None
    ) -> web.StreamResponse:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            msg = "Missing required parameter: 'messages'."
            raise _sse.BadRequest(msg, "messages", "missing_required_parameter")
        n = body.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= 128:
            raise _sse.BadRequest(f"Invalid 'n': {n!r}. Expected an integer between 1 and 128.", "n")
        plans = self.script(body) if self.script else _sse.plan_chat(body, self.name, self._call_ids)
        base = self._base(body, "chatcmpl-")
        if not body.get("stream"):
            return await self._respond(request, rec, _sse.chat_response(body, plans, base), fault)
        chunks = _sse.chat_stream_chunks(body, plans, base)
        usage = _sse.chat_usage(body, plans)
        usage_chunk = self._usage_chunk(body, {**base, "object": "chat.completion.chunk"}, usage)
        return await self._stream(request, rec, chunks, usage_chunk, fault)

    async def _completions(
        self, request: web.Request, rec: RecordedRequest, body: dict[str, Any], fault: _Fault | None
    ) -> web.StreamResponse:
        if "prompt" in body and not isinstance(body["prompt"], (str, list)):
            raise _sse.BadRequest("Invalid type for 'prompt'.", "prompt")
        choices, streams, usage = _sse.completion_choices(body, self.name)
        base = {**self._base(body, "cmpl-"), "object": "text_completion"}
        if not body.get("stream"):
            return await self._respond(request, rec, {**base, "choices": choices, "usage": usage}, fault)
        chunks = _sse.completion_stream_chunks(body, choices, streams, base)
        return await self._stream(request, rec, chunks, self._usage_chunk(body, base, usage), fault)

    async def _embeddings(
        self, request: web.Request, rec: RecordedRequest, body: dict[str, Any], fault: _Fault | None
    ) -> web.StreamResponse:
        items, dims, fmt = _sse.embedding_items(body, self.embedding_dim)
        obj = _sse.embeddings_response(body, items, self.embedding_dim, dims, fmt)
        return await self._respond(request, rec, obj, fault)

    def _model(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 1700000000, "owned_by": f"fake-{self.name}"}

    async def _list_models(self, request: web.Request, *_: Any) -> web.StreamResponse:
        models = self.models if self.models is not None else DEFAULT_MODELS
        return _json({"object": "list", "data": [self._model(m) for m in models]}, headers=self._headers())

    async def _get_model(self, request: web.Request, *_: Any) -> web.StreamResponse:
        model = request.match_info["model"]
        if self.models is not None and model not in self.models:
            err = _model_not_found(model)
            return _json(err.body, err.status)
        return _json(self._model(model), headers=self._headers())

    async def _not_found(self, request: web.Request, *_: Any) -> web.StreamResponse:
        msg = f"Invalid URL ({request.method} {request.path})"
        return _json(error_body(msg, "invalid_request_error"), 404)


@asynccontextmanager
async def start_openai_upstream(
    name: str = "a",
    api_key: str | None = "sk-up-a",
    models: Sequence[str] | None = None,
    chunk_delay: float = 0.0,
    *,
    embedding_dim: int = 32,
    host: str = "127.0.0.1",
) -> AsyncIterator[FakeOpenAI]:
    """Serve a FakeOpenAI on `host`, port 0, on the running loop; stop it on exit."""
    fake = FakeOpenAI(
        name=name, api_key=api_key, models=models, chunk_delay=chunk_delay, embedding_dim=embedding_dim
    )
    runner = web.AppRunner(fake.make_app(), handler_cancellation=True, shutdown_timeout=0.1, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0)
        await site.start()
        fake.port = runner.addresses[0][1]
        fake.base_url = f"http://{host}:{fake.port}/v1"
        yield fake
    finally:
        fake._closing = True
        await runner.cleanup()


@contextmanager
def run_openai_upstream_in_thread(
    name: str = "a",
    api_key: str | None = "sk-up-a",
    models: Sequence[str] | None = None,
    chunk_delay: float = 0.0,
    *,
    embedding_dim: int = 32,
    host: str = "127.0.0.1",
    start_timeout: float = 10.0,
) -> Iterator[FakeOpenAI]:
    """Same server on its own event loop in a daemon thread (for sync tests / gateways in threads)."""
    ready = threading.Event()
    started: list[tuple[FakeOpenAI, asyncio.AbstractEventLoop, asyncio.Event]] = []
    errors: list[BaseException] = []

    async def serve() -> None:
        stop = asyncio.Event()
        try:
            async with start_openai_upstream(
                name, api_key, models, chunk_delay, embedding_dim=embedding_dim, host=host
            ) as fake:
                started.append((fake, asyncio.get_running_loop(), stop))
                ready.set()
                await stop.wait()
        except BaseException as exc:  # reported to the caller's thread, never raised in this one
            errors.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name=f"fake-openai-{name}", daemon=True)
    thread.start()
    if not ready.wait(start_timeout) or not started:
        thread.join(start_timeout)
        raise RuntimeError("fake OpenAI upstream did not start") from (errors[0] if errors else None)
    fake, loop, stop = started[0]
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(start_timeout)
