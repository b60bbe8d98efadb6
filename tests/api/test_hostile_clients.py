"""Hostile clients against `tail-service serve` (a real process, so its RSS can be read).

Raw sockets send what no honest client does: never-ending headers, a byte now and then,
half a body, malformed requests, two ``Authorization`` headers. Every loop here is
bounded in count and time. The limits are set short in the config: headers 1 s, body
idle 1 s, body minimum rate 1024 bytes/s.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import orjson
import pytest

from tests.fakes.openai_upstream import FakeOpenAI, run_openai_upstream_in_thread
from tests.processes import run_tail

HOST = "127.0.0.1"
HEADER_TIMEOUT = 1.0
BODY_IDLE = 1.0


@dataclass
class Served:
    proc: subprocess.Popen[str]
    port: int
    log: list[str]
    upstream: FakeOpenAI

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    async def lines_with(self, text: str, until: str, wait: float = 5.0) -> list[str]:
        """The log lines containing ``text``, once one of them contains ``until`` (or after ``wait`` s)."""
        deadline = time.monotonic() + wait
        while True:
            found = [line for line in list(self.log) if text in line]
            if any(until in line for line in found) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with run_openai_upstream_in_thread("h", api_key="sk-up-h") as upstream:
        cfg = tmp_path_factory.mktemp("hostile") / "tail.yaml"
        cfg.write_text(
            f"""
server:
  header_timeout: {HEADER_TIMEOUT}
  body_idle_timeout: {BODY_IDLE}
  body_min_rate: 1024
models:
  - {{name: gpt-test, provider: openai, base_url: "{upstream.base_url}", api_key_env: HOSTILE_KEY}}
log_level: debug
auth: {{mode: disabled}}
ratelimit: {{enabled: false}}
"""
        )
        env = {**os.environ, "HOSTILE_KEY": "sk-up-h"}
        with run_tail(["serve", "--config", str(cfg), "--port", "0"], env) as running:
            client = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=5)
            client.models.list()  # up and answering
            yield Served(running.proc, running.port, running.log, upstream)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def assert_envelope(body: bytes, code: str | None = None) -> dict[str, object]:
    err = orjson.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    if code is not None:
        assert err["code"] == code
    return dict(err)


async def exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send ``data``, then read until the server closes (at most ``wait`` seconds)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()


async def trickle(port: int, first: bytes, byte: bytes, interval: float, bound: float) -> tuple[bytes, float]:
    """Send ``first``, then ``byte`` every ``interval`` s until the server answers or closes.

    Returns what the server sent and after how long; gives up (``b"<open>"``) at ``bound``.
    """
    reader, writer = await asyncio.open_connection(HOST, port)
    started = time.monotonic()
    answer = asyncio.ensure_future(reader.read())
    try:
        writer.write(first)
        for _ in range(int(bound / interval)):
            done, _ = await asyncio.wait({answer}, timeout=interval)
            if done:
                break
            try:
                writer.write(byte)
                await writer.drain()
            except OSError:
                break
        try:
            data = await asyncio.wait_for(answer, 2)
        except (TimeoutError, OSError):
            data = b"<open>"
        return data, time.monotonic() - started
    finally:
        answer.cancel()
        writer.close()


async def flood(port: int, megabytes: int) -> bytes:
    """A header that never ends: up to ``megabytes`` MB of it, until the server answers."""
    reader, writer = await asyncio.open_connection(HOST, port)
    answer = asyncio.ensure_future(reader.read(4096))
    chunk = b"a" * 65536
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nx-flood: ")
        for _ in range(megabytes * 16):
            if answer.done():
                break
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 5)
    except (OSError, TimeoutError):
        pass
    try:
        return await asyncio.wait_for(answer, 5)
    except OSError:
        return b"<reset>"
    except TimeoutError:
        return b"<open>"
    finally:
        answer.cancel()
        writer.close()


CHAT = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}'


def post(body_len: int, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%s\r\n" % (body_len, extra)
    )


# -- header flood and slow clients -------------------------------------------------------


async def test_header_flood_is_431_and_memory_stays_bounded(served: Served) -> None:
    before = served.rss_mb()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], served.rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        answers = await asyncio.gather(*(flood(served.port, 5) for _ in range(16)))
    finally:
        stop.set()
        sampler.join(5)
    after = served.rss_mb()
    for raw in answers:
        assert raw != b"<open>", "a never-ending header kept its connection"
        if raw != b"<reset>":
            status, headers, body = parse_response(raw)
            assert status == 431
            assert headers["connection"] == "close"
            assert_envelope(body, "request_header_fields_too_large")
    assert sum(raw.startswith(b"HTTP/1.1 431") for raw in answers) >= len(answers) // 2
    assert peak[0] - before < 30, f"RSS {before:.0f} -> peak {peak[0]:.0f} MB"
    assert after - before < 30
    # the server still answers, headers just under the limit included; a whole header
    # over it, sent in one write, is refused too
    for size, status in ((60_000, 200), (100_000, 431)):
        head = b"GET /livez HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * size + b"\r\nconnection: close\r\n\r\n"
        assert parse_response(await exchange(served.port, head))[0] == status


async def test_slow_headers_get_a_408_and_a_silent_connection_is_closed(served: Served) -> None:
    # headers split over reads inside the deadline are fine
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        writer.write(b"GET /livez HTTP/1.1\r\nhost: t\r\n")
        await asyncio.sleep(HEADER_TIMEOUT / 3)
        writer.write(b"connection: close\r\n\r\n")
        assert parse_response(await asyncio.wait_for(reader.read(), 5))[0] == 200
    finally:
        writer.close()
    # a header byte every 0.2 s: answered 408 once the header deadline passes
    raw, took = await trickle(served.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n", b"x", 0.2, 8)
    assert raw != b"<open>", "a slow-header client kept its connection"
    status, headers, body = parse_response(raw)
    assert status == 408
    assert headers["connection"] == "close"
    assert "x-request-id" in headers
    assert_envelope(body, "request_timeout")
    assert HEADER_TIMEOUT * 0.9 <= took < HEADER_TIMEOUT + 2
    # a connection that sends nothing at all is closed, without an answer
    started = time.monotonic()
    assert await exchange(served.port, b"", wait=8) == b""
    assert time.monotonic() - started < HEADER_TIMEOUT + 2


async def test_stalled_or_trickled_bodies_get_a_408(served: Served) -> None:
    # a body in chunks a third of the idle timeout apart, well over the minimum rate: fine
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        writer.write(post(len(CHAT), b"connection: close\r\n"))
        for i in range(0, len(CHAT), 24):
            writer.write(CHAT[i : i + 24])
            await asyncio.sleep(BODY_IDLE / 3)
        assert parse_response(await asyncio.wait_for(reader.read(), 5))[0] == 200
    finally:
        writer.close()
    # a body that stops: 408 after the idle timeout, and the connection is closed
    raw, took = await trickle(served.port, post(1000) + b"{", b"", BODY_IDLE * 3, 8)
    assert raw != b"<open>", "a stalled body kept its connection"
    status, headers, body = parse_response(raw)
    assert (status, headers["connection"]) == (408, "close")
    assert_envelope(body, "request_timeout")
    assert BODY_IDLE * 0.9 <= took < BODY_IDLE + 2
    # never idle, but a byte every 0.2 s is under the minimum rate: 408 as well
    raw, took = await trickle(served.port, post(1000) + b"{", b" ", 0.2, 8)
    assert raw != b"<open>", "a trickled body kept its connection"
    status, headers, body = parse_response(raw)
    assert (status, headers["connection"]) == (408, "close")
    assert_envelope(body, "request_timeout")
    assert took < BODY_IDLE + 2


# -- disconnects ---------------------------------------------------------------------------


async def test_a_client_leaving_mid_body_is_an_info_line_not_an_error(served: Served) -> None:
    rid = "req_hostile_half_body_" + os.urandom(4).hex()
    _, writer = await asyncio.open_connection(HOST, served.port)
    writer.write(post(len(CHAT) * 4, b"x-request-id: " + rid.encode() + b"\r\n") + CHAT[:20])
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await writer.wait_closed()
    lines = await served.lines_with(rid, until="tail_service.access")
    assert any(" INFO " in line and "client closed the connection" in line for line in lines), lines
    assert not any(" ERROR " in line for line in lines), lines
    access = [line for line in lines if "tail_service.access" in line]
    assert access and all("status=499" in line and "status=500" not in line for line in access), access
    assert not any("Traceback" in line or "ClientDisconnect" in line for line in served.log)


# -- protocol polish ---------------------------------------------------------------------


async def test_a_malformed_request_is_a_json_400(served: Served) -> None:
    for bad in (
        b"GET / HTTP/1.1\r\nhost: t\r\nno colon here\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\r\n\r\n",
    ):
        status, headers, body = parse_response(await exchange(served.port, bad))
        assert status == 400
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        assert_envelope(body, "invalid_http_request")


async def test_405_carries_allow(served: Served) -> None:
    cases = [
        (b"GET /v1/chat/completions", {"POST"}),  # a fast-path endpoint
        (b"DELETE /v1/models", {"GET", "HEAD"}),  # a router endpoint
    ]
    for line, allowed in cases:
        raw = await exchange(served.port, line + b" HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        status, headers, body = parse_response(raw)
        assert status == 405
        assert {m.strip() for m in headers["allow"].split(",")} == allowed
        assert_envelope(body, "method_not_allowed")


async def test_two_authorization_headers_are_a_400(served: Served) -> None:
    auth = b"authorization: Bearer sk-one\r\nauthorization: Bearer sk-two\r\nconnection: close\r\n"
    status, _, body = parse_response(await exchange(served.port, post(len(CHAT), auth) + CHAT))
    assert status == 400
    err = assert_envelope(body, "ambiguous_credentials")
    assert err["param"] == "authorization"
    assert "sk-one" not in body.decode() and "sk-two" not in body.decode()


# -- nesting -------------------------------------------------------------------------------


def nested(levels: int) -> object:
    """``levels`` objects and arrays, one inside the other, around a string."""
    return orjson.loads(nested_json(levels))


def nested_json(levels: int) -> bytes:
    """The JSON text of :func:`nested` (orjson.dumps itself cannot write past 254 levels)."""
    opening = [b"[" if i % 2 else b'{"k": ' for i in range(levels)]
    closing = [b"]" if i % 2 else b"}" for i in range(levels)]
    return b"".join(reversed(opening)) + b'"leaf"' + b"".join(closing)


async def test_nesting_at_the_limit_is_forwarded_deeper_is_a_400(served: Served) -> None:
    from tail_service.api.body import MAX_DEPTH

    # the body object is level 1: a pass-through field holding MAX_DEPTH - 1 levels is at the limit
    client = openai.AsyncOpenAI(base_url=f"http://{HOST}:{served.port}/v1", api_key="x", max_retries=0)
    deep = nested(MAX_DEPTH - 1)
    r = await client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "deep"}], extra_body={"x_deep": deep}
    )
    await client.close()
    assert r.choices[0].message.content == "[h] deep"
    assert served.upstream.requests[-1].json["x_deep"] == deep
    # one level more, orjson.dumps' limit (254) and beyond, up to orjson.loads' limit (1024)
    for levels in (MAX_DEPTH, 254, 600, 1023):
        body = (
            b'{"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "x": '
            + nested_json(levels)
            + b"}"
        )
        status, _, answer = parse_response(
            await exchange(served.port, post(len(body), b"connection: close\r\n") + body)
        )
        assert status == 400, (levels, answer[:200])
        assert_envelope(answer, "nesting_too_deep")
    # past orjson's own limit it is bad JSON, still a 400
    body = b'{"x": ' + b"[" * 1100 + b"]" * 1100 + b"}"
    status, _, answer = parse_response(
        await exchange(served.port, post(len(body), b"connection: close\r\n") + body)
    )
    assert status == 400
    assert_envelope(answer, "invalid_json")
