"""The exact-match response cache: hit, miss, refresh, tenant isolation, SSE replay."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import redis

from tail_service.core.cache import cache_key
from tail_service.core.types import Endpoint, Principal, ProxyRequest
from tail_service.proto import auth_pb2
from tail_service.redis_embedded import EmbeddedRedis
from tests.conftest import RunningApp, model_entry, serve_app
from tests.fakes.openai_upstream import FakeOpenAI
from tests.stack_fixtures import Stack

MSG = [{"role": "user", "content": "cache me please"}]


@pytest.fixture
def cached_app(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI, redis_server: EmbeddedRedis
) -> RunningApp:
    redis.Redis.from_url(redis_server.url()).flushdb()
    return make_app([model_entry("gpt-test", upstream)], redis={"url": redis_server.url()})


def ask(app: RunningApp, mode: str | None, **kw: object) -> tuple[str, str | None, object]:
    headers = {"x-tail-cache": mode} if mode else {}
    raw = app.client().chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=MSG,
        extra_headers=headers,
        **kw,  # type: ignore[arg-type]
    )
    r = raw.parse()
    return r.choices[0].message.content or "", raw.headers.get("x-tail-cache"), r


def test_miss_then_hit_then_refresh_and_skip(cached_app: RunningApp, upstream: FakeOpenAI) -> None:
    first, state1, _ = ask(cached_app, "use")
    assert state1 == "miss"
    calls = len(upstream.requests)
    second, state2, r2 = ask(cached_app, "use")
    assert (state2, second) == ("hit", first)
    assert len(upstream.requests) == calls  # served without the upstream
    assert r2.model == "gpt-test"  # type: ignore[attr-defined]
    _, state3, _ = ask(cached_app, "refresh")
    assert state3 == "miss" and len(upstream.requests) == calls + 1
    _, state4, _ = ask(cached_app, None)  # default: skip
    assert state4 is None and len(upstream.requests) == calls + 2
    # a different request is a different entry
    other = cached_app.client().chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "another"}],
        extra_headers={"x-tail-cache": "use"},
    )
    assert other.headers.get("x-tail-cache") == "miss"


def test_stream_replays_a_hit_as_sse(cached_app: RunningApp, upstream: FakeOpenAI) -> None:
    client = cached_app.client()
    with client.chat.completions.stream(
        model="gpt-test", messages=MSG, extra_headers={"x-tail-cache": "use"}
    ) as s:
        fresh = s.get_final_completion()
    calls = len(upstream.requests)
    with client.chat.completions.stream(
        model="gpt-test",
        messages=MSG,
        extra_headers={"x-tail-cache": "use"},
        stream_options={"include_usage": True},
    ) as s:
        replayed = s.get_final_completion()
    assert len(upstream.requests) == calls
    assert replayed.choices[0].message.role == "assistant"
    assert replayed.choices[0].message.content == fresh.choices[0].message.content
    assert replayed.choices[0].finish_reason == "stop"
    assert replayed.usage is not None and replayed.usage.total_tokens > 0
    # the non-streamed form of the same request hits the entry the stream stored
    _, state, _ = ask(cached_app, "use")
    assert state == "hit"


def test_bad_header_is_a_400(cached_app: RunningApp) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(cached_app, "sometimes")
    assert info.value.param == "x-tail-cache"


def test_tenants_never_share_entries() -> None:
    body = {"model": "m", "messages": MSG}
    a = ProxyRequest(Endpoint.CHAT, "m", body, principal=Principal("k1", "tenant-a"))
    b = ProxyRequest(Endpoint.CHAT, "m", body, principal=Principal("k2", "tenant-b"))
    a2 = ProxyRequest(
        Endpoint.CHAT, "m", {**body, "stream": True, "user": "u"}, principal=Principal("k3", "tenant-a")
    )
    assert cache_key(a) != cache_key(b)
    assert cache_key(a) == cache_key(a2)  # stream and user do not change the answer


def test_key_policy_and_tenant_isolation_end_to_end(
    stack: Stack, upstream: FakeOpenAI, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys with the cache policy use it by default; tenant B never gets tenant A's entry."""
    redis.Redis.from_url(redis_server.url()).flushdb()
    monkeypatch.setenv("CACHE_UPSTREAM_KEY", "sk-up-a")
    model = {"name": "gpt-test", "provider": "openai", "base_url": upstream.base_url,
             "api_key_env": "CACHE_UPSTREAM_KEY"}  # fmt: skip
    settings = stack.gateway_settings([model], redis={"url": redis_server.url()})
    admin = stack.admin_auth()
    key_a = admin.CreateKey(
        auth_pb2.CreateKeyRequest(name="a", tenant="tenant-a", response_cache=True), timeout=5
    ).api_key
    key_b = admin.CreateKey(
        auth_pb2.CreateKeyRequest(name="b", tenant="tenant-b", response_cache=True), timeout=5
    ).api_key
    with serve_app(settings) as app:

        def call(key: str) -> str | None:
            client = openai.OpenAI(base_url=app.v1, api_key=key, max_retries=0)
            raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=MSG)
            return raw.headers.get("x-tail-cache")

        assert call(key_a) == "miss"
        assert call(key_a) == "hit"  # the key's policy: no header needed
        assert call(key_b) == "miss"  # same request, other tenant: never A's entry
        assert call(key_b) == "hit"


class RedisRelay:
    """A unix-socket relay in front of a redis-server that keeps every chunk clients send."""

    def __init__(self, target: Path, path: Path) -> None:
        self.target, self.path = target, path
        self.chunks: list[bytes] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_unix_connection(str(self.target))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if keep:
                        self.chunks.append(data)
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_w, True), pump(up_r, writer, False))

    def __enter__(self) -> RedisRelay:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(
            asyncio.start_unix_server(self._handle, str(self.path)), self._loop
        ).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def test_admission_and_lookup_leave_in_one_write(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    redis.Redis.from_url(redis_server.url()).flushdb()
    with RedisRelay(redis_server.socket, tmp_path / "relay.sock") as relay:
        app = make_app(
            [model_entry("gpt-test", upstream, rpm=1000)],
            redis={"url": f"unix://{relay.path}", "timeout": 1},
            ratelimit={"enabled": True},
        )
        assert ask(app, "use")[1] == "miss"  # connects, loads the scripts, stores the answer
        time.sleep(0.2)
        relay.chunks.clear()
        _, state, _ = ask(app, "use")
        assert state == "hit"
        # the admission script and the cache lookup went out together, in one write
        first = relay.chunks[0]
        assert b"EVALSHA" in first and b"\r\nGET\r\n" in first, relay.chunks
