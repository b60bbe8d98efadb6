"""The auto-pipelining Redis client against real redis-servers: ordering, errors, loss, auth, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
import uvloop

from tail_service.clients.redis_pipe import PipelinedRedis, Script
from tail_service.redis_embedded import EmbeddedRedis, redis_server_binary, terminate
from tail_service.settings import TLSFiles


@pytest.fixture
async def plain(redis_server: EmbeddedRedis) -> AsyncIterator[redis.asyncio.Redis]:
    r = redis.asyncio.Redis.from_url(redis_server.url())
    await r.flushdb()
    try:
        yield r
    finally:
        await r.aclose()


@pytest.fixture
async def pipe(redis_server: EmbeddedRedis, plain: redis.asyncio.Redis) -> AsyncIterator[PipelinedRedis]:
    p = PipelinedRedis(redis_server.url())
    try:
        yield p
    finally:
        await p.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tcp_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server on a loopback TCP port with an ACL user ``tail`` (password ``s3cret-pw``)."""
    port = free_port()
    args = [
        str(redis_server_binary()),
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(tmp_path), "--requirepass", "default-pw",
        "--user", "tail", "on", ">s3cret-pw", "~*", "+@all",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            proc.poll()
            assert proc.returncode is None, "redis-server did not start"
            subprocess.run(["sleep", "0.02"], check=True)
        yield port
    finally:
        terminate(proc, 5)


async def test_concurrent_callers_get_their_own_replies_in_order(
    pipe: PipelinedRedis, plain: redis.asyncio.Redis
) -> None:
    results = await asyncio.gather(*(pipe.execute("INCR", "n") for _ in range(200)))
    assert sorted(results) == list(range(1, 201))
    assert results == list(range(1, 201))  # issued in this order, answered in this order
    assert await pipe.execute("GET", "n") == b"200"
    assert pipe.in_flight == 0


async def test_an_error_reply_raises_and_the_connection_carries_on(pipe: PipelinedRedis) -> None:
    await pipe.execute("SET", "s", "text")
    with pytest.raises(redis.exceptions.ResponseError, match="not an integer"):
        await pipe.execute("INCR", "s")
    assert await pipe.execute("PING") == b"PONG"


async def test_a_caller_that_gave_up_does_not_desynchronise_the_replies(pipe: PipelinedRedis) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await pipe.execute("BLPOP", "never", "0.3")
    # the late nil reply to BLPOP must be dropped, not handed to the next caller
    assert await pipe.execute("ECHO", "mine") == b"mine"


async def test_a_lost_connection_fails_what_is_in_flight_and_reconnects(
    pipe: PipelinedRedis, plain: redis.asyncio.Redis
) -> None:
    await pipe.execute("CLIENT", "SETNAME", "victim")
    waiting = asyncio.ensure_future(pipe.execute("BLPOP", "never", "5"))
    await asyncio.sleep(0.05)
    await plain.client_kill_filter(_type="normal", skipme=True)
    with pytest.raises(redis.exceptions.ConnectionError):
        await waiting
    assert await pipe.execute("PING") == b"PONG"
    assert pipe.in_flight == 0


async def test_an_unreachable_server_fails_fast_with_a_connection_error(tmp_path: Path) -> None:
    p = PipelinedRedis(f"unix://{tmp_path}/absent.sock")
    got: list[Any] = []
    p.submit(("PING",), got.append)
    with pytest.raises(redis.exceptions.ConnectionError):
        await p.execute("PING")
    assert len(got) == 1 and isinstance(got[0], redis.exceptions.ConnectionError)
    await p.close()
    with pytest.raises(redis.exceptions.ConnectionError, match="closed"):
        await p.execute("PING")


async def test_scripts_fall_back_to_eval_when_redis_lost_them(
    pipe: PipelinedRedis, plain: redis.asyncio.Redis
) -> None:
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    await plain.script_flush()
    assert await pipe.evalsha(script, ["c"], [2]) == 2
    assert await pipe.evalsha(script, ["c"], [3]) == 5  # EVAL loaded it: EVALSHA works now
    await plain.script_flush()
    got: list[Any] = []
    pipe.submit_script(script, ["c"], [4], got.append)
    await pipe.execute("PING")  # answered after the EVALSHA, and the EVAL fallback is sent at once
    await pipe.execute("PING")
    assert got == [9]


async def test_a_delayed_command_leaves_with_the_next_one(
    pipe: PipelinedRedis, plain: redis.asyncio.Redis
) -> None:
    got: list[Any] = []
    pipe.submit(("SET", "d", "1"), got.append, delay=30.0)
    await asyncio.sleep(0.05)
    assert got == [] and await plain.get("d") is None  # still waiting for company
    assert await pipe.execute("GET", "d") == b"1"  # written first, in the same write
    assert got == [b"OK"]
    arrived = asyncio.Event()

    def on_reply(reply: Any) -> None:
        got.append(reply)
        arrived.set()

    pipe.submit(("SET", "e", "2"), on_reply, delay=0.01)
    async with asyncio.timeout(5):
        await arrived.wait()
    assert got[1] == b"OK" and await plain.get("e") == b"2"


async def test_password_user_and_database_from_the_url(tcp_redis: int) -> None:
    good = PipelinedRedis(f"redis://tail:s3cret-pw@127.0.0.1:{tcp_redis}/2")
    default = PipelinedRedis(f"redis://:default-pw@127.0.0.1:{tcp_redis}/0")
    wrong = PipelinedRedis(f"redis://tail:not-it@127.0.0.1:{tcp_redis}/0")
    anonymous = PipelinedRedis(f"redis://127.0.0.1:{tcp_redis}/0")
    try:
        assert "s3cret-pw" not in repr(good)
        await good.execute("SET", "where", "db2")
        assert await good.execute("ACL", "WHOAMI") == b"tail"
        assert await default.execute("GET", "where") is None  # another database
        await default.execute("SELECT", "2")
        assert await default.execute("GET", "where") == b"db2"
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGPASS"):
            await wrong.execute("PING")
        with pytest.raises(redis.exceptions.ResponseError, match="NOAUTH"):
            await anonymous.execute("PING")
    finally:
        for p in (good, default, wrong, anonymous):
            await p.close()


@contextlib.asynccontextmanager
async def tls_front(server: TLSFiles, unix_path: Path) -> AsyncIterator[int]:
    """A mutual-TLS front on a loopback port that relays to the redis-server's unix socket."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(server.ca_file))
    ctx.load_cert_chain(str(server.cert_file), str(server.key_file))
    ctx.verify_mode = ssl.CERT_REQUIRED

    async def relay(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        r2, w2 = await asyncio.open_unix_connection(str(unix_path))
        await asyncio.gather(relay(reader, w2), relay(r2, writer))

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield int(srv.sockets[0].getsockname()[1])
    finally:
        srv.close()


async def test_rediss_with_client_certificates(
    redis_server: EmbeddedRedis,
    tls_for: Callable[[str], TLSFiles],
    rogue_tls: Callable[[str], TLSFiles],
) -> None:
    server, me, rogue = tls_for("secrets"), tls_for("tail"), rogue_tls("tail")
    async with tls_front(server, redis_server.socket) as port:
        base = f"rediss://127.0.0.1:{port}/0"
        good = PipelinedRedis(
            f"{base}?ssl_ca_certs={me.ca_file}&ssl_certfile={me.cert_file}&ssl_keyfile={me.key_file}"
        )
        # trusts another CA: the server's certificate does not verify
        untrusting = PipelinedRedis(
            f"{base}?ssl_ca_certs={rogue.ca_file}&ssl_certfile={me.cert_file}&ssl_keyfile={me.key_file}"
        )
        # presents a certificate the server's CA did not sign
        stranger = PipelinedRedis(
            f"{base}?ssl_ca_certs={me.ca_file}&ssl_certfile={rogue.cert_file}&ssl_keyfile={rogue.key_file}"
        )
        try:
            assert await good.execute("ECHO", "over tls") == b"over tls"
            with pytest.raises(redis.exceptions.ConnectionError):
                await untrusting.execute("PING")
            with pytest.raises(redis.exceptions.ConnectionError):
                await stranger.execute("PING")
        finally:
            for p in (good, untrusting, stranger):
                await p.close()


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_stall_of_this_process_is_not_a_redis_timeout(redis_server: EmbeddedRedis, loop_name: str) -> None:
    class Stalling(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:  # blocks past the deadline, like a GC pause
            time.sleep(0.15)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        p = PipelinedRedis(redis_server.url())
        a, b = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(Stalling, a)
        try:
            await p.execute("PING")
            # Redis answers after 20 ms, in the middle of a 150 ms stall of this process
            # that starts right after the command is written
            call = asyncio.ensure_future(p.execute("DEBUG", "SLEEP", "0.02", timeout=0.05))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            b.send(b"x")
            assert await call == b"OK"  # the reply was there: no TimeoutError
            with pytest.raises(TimeoutError):
                await p.execute("BLPOP", "never", "1", timeout=0.05)
        finally:
            transport.close()
            b.close()
            await p.close()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(scenario())


async def test_a_peer_that_is_not_redis_fails_the_calls_cleanly(tmp_path: Path) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # e.g. the URL points at a web server
        await writer.drain()

    server = await asyncio.start_unix_server(garbage, str(tmp_path / "web.sock"))
    p = PipelinedRedis(f"unix://{tmp_path}/web.sock")
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match="protocol error"):
            await p.execute("PING", timeout=5)
        assert p.in_flight == 0
    finally:
        await p.close()
        server.close()
