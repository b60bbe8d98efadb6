"""The bundled redis-server starts privately and speaks Redis (Lua and server TIME included)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import redis
import redis.asyncio

from tail_service.redis_embedded import EmbeddedRedis, EmbeddedRedisError


def test_sync_client_and_private_socket(redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url())
    try:
        assert client.ping() is True
        assert stat.S_IMODE(redis_server.directory.stat().st_mode) == 0o700
        assert client.config_get("save")["save"] == ""
        seconds, micros = client.time()
        assert seconds > 1_700_000_000 and 0 <= micros < 1_000_000
    finally:
        client.close()


async def test_asyncio_client_runs_lua_with_server_time(redis_server: EmbeddedRedis) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url())
    try:
        script = client.register_script("local t = redis.call('TIME'); return tonumber(t[1])")
        assert await script() > 1_700_000_000
    finally:
        await client.aclose()


def test_stop_removes_the_socket(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r").start()
    assert server.socket.exists()
    server.stop()
    assert not server.socket.exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url(), socket_connect_timeout=0.5).ping()


def test_a_dead_server_is_a_clear_error(tmp_path: Path) -> None:
    bad = EmbeddedRedis(tmp_path / ("d" * 120))  # a unix socket path longer than 107 bytes
    with pytest.raises(EmbeddedRedisError):
        bad.start(timeout=1.5)


def test_a_socket_path_too_long_is_a_clear_error(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with pytest.raises(EmbeddedRedisError, match="shorter --state-dir"):
        EmbeddedRedis(deep).start()
    assert not deep.exists()  # nothing created
