"""Admission control end to end: real Redis, real auth-service (mTLS), the official openai SDK.

Exactness is checked across two ``tail-service serve`` processes sharing one Redis and one
auth-service; everything else runs in-process gateways (``serve_app``). Each scenario uses
a fresh API key, so the limiter state of one never leaks into another.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from tail_service.authsvc.keys import ensure_pepper_file
from tail_service.clients.limiter_guard import GuardedLimiter
from tail_service.clients.ratelimit_redis import RedisRateLimiter, bucket_keys
from tail_service.clients.redis_pipe import PipelinedRedis
from tail_service.core.ratelimit import UNLIMITED, AdmissionRequest, Limits
from tail_service.proto import auth_pb2
from tail_service.redis_embedded import EmbeddedRedis
from tail_service.settings import RedisSettings, Settings, TLSFiles
from tail_service.tiktoken_counter import TiktokenCounter
from tests.conftest import RunningApp, model_entry, serve_app
from tests.fakes.openai_upstream import FakeOpenAI, run_openai_upstream_in_thread
from tests.stack_fixtures import Stack

EXE = str(Path(sys.executable).with_name("tail-service"))
MODEL = "gpt-test"
GO_DURATION = re.compile(r"^(?=\d)(\d+h)?(\d+m)?(\d+(\.\d+)?(ms|us|µs|ns|s))?$")
#: an answer of 40 tokens: with a chunk delay, a stream that stays open for seconds
LONG_TEXT = " ".join(f"w{i}" for i in range(40))


# ------------------------------------------------------------------------------------------ helpers
@dataclass(frozen=True)
class Key:
    api_key: str
    key_id: str


def new_key(stack: Stack, **limits: int) -> Key:
    """A fresh API key with these per-key limits (rpm, tpm, max_concurrency)."""
    resp = stack.admin_auth().CreateKey(
        auth_pb2.CreateKeyRequest(name="admission", tenant="acme", limits=auth_pb2.Limits(**limits)),
        timeout=5,
    )
    return Key(resp.api_key, resp.key.id)


def sdk(base_url: str, key: Key, **kw: Any) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 30)
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key.api_key, **kw)


def chat_body(text: str = "hi", **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **kw}


def ratelimit_headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}


def limited_settings(stack: Stack, upstream: FakeOpenAI, redis_url: str, **redis_kw: Any) -> Settings:
    """Gateway settings on ``stack`` with rate limiting on, against ``redis_url``."""
    settings: Settings = stack.gateway_settings(
        [model_entry(MODEL, upstream, max_retries=0)],
        ratelimit={"enabled": True},
        redis={"url": redis_url, **redis_kw},
    )
    return settings


def live_slots(r: redis.Redis, key: Key) -> int:
    """Concurrency slots of ``key`` currently taken in Redis (expired leases excluded)."""
    conc = bucket_keys(key.key_id)[2]
    now_ms = int(time.time() * 1000)
    return int(r.zcount(conc, now_ms, "+inf"))


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``pred`` every 20 ms; the seconds it took to hold."""
    start = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def assert_rate_limited(exc: openai.RateLimitError) -> None:
    """What every 429 of the gateway carries."""
    assert exc.status_code == 429
    assert exc.code == "rate_limit_exceeded"
    h = exc.response.headers
    assert re.fullmatch(r"\d+", h["retry-after"]), h["retry-after"]
    assert int(h["retry-after"]) >= 1
    ms = int(h["retry-after-ms"])
    assert 0 < ms <= 60_000
    assert int(h["retry-after"]) == max(1, -(-ms // 1000))


def assert_concurrency_429(exc: openai.RateLimitError, limit: int) -> None:
    assert_rate_limited(exc)
    assert exc.type == "requests"
    assert f"Too many concurrent requests for this API key: Limit {limit} in flight" in exc.message
    assert exc.response.headers["retry-after"] == "1"
    assert exc.response.headers["retry-after-ms"] == "1000"


def burst(clients: list[openai.OpenAI], n: int, body: dict[str, Any]) -> list[Any]:
    """``n`` chat calls released at once from ``n`` threads, round-robin over ``clients``.

    Each result is the completion or the ``openai.APIError`` raised.
    """
    barrier = threading.Barrier(n)

    def one(i: int) -> Any:
        barrier.wait(30)
        try:
            return clients[i % len(clients)].chat.completions.create(**body)
        except openai.APIError as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def split(results: list[Any]) -> tuple[list[Any], list[openai.RateLimitError]]:
    ok = [r for r in results if not isinstance(r, Exception)]
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    others = [r for r in results if isinstance(r, Exception) and not isinstance(r, openai.RateLimitError)]
    assert not others, others[:3]
    return ok, limited


# ---------------------------------------------------------------------- two `serve` processes
@dataclass
class Replicas:
    stack: Stack
    upstream: FakeOpenAI
    urls: list[str]
    logs: list[list[str]]

    def clients(self, key: Key, **kw: Any) -> list[openai.OpenAI]:
        return [sdk(url, key, **kw) for url in self.urls]

    def log_tail(self) -> str:
        """The end of each replica's stderr, for failure messages."""
        return "\n".join("".join(log[-20:]) for log in self.logs)


def _tls_yaml(tls: TLSFiles) -> str:
    return f"{{ca_file: '{tls.ca_file}', cert_file: '{tls.cert_file}', key_file: '{tls.key_file}'}}"


@contextmanager
def serve_processes(cfg: Path, env: dict[str, str], n: int) -> Iterator[tuple[list[str], list[list[str]]]]:
    """``n`` ``tail-service serve --config cfg --port 0`` processes; yields their URLs and stderr logs."""
    procs = [
        subprocess.Popen(
            [EXE, "serve", "--config", str(cfg), "--port", "0"],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        for _ in range(n)
    ]
    urls: list[str] = []
    logs: list[list[str]] = []
    drains: list[threading.Thread] = []
    try:
        for proc in procs:
            assert proc.stderr is not None
            log: list[str] = []
            for line in proc.stderr:
                log.append(line)
                if m := re.search(r"listening on (http://\S+)", line):
                    urls.append(m.group(1))
                    break
            assert len(urls) == len(logs) + 1, f"no listening line: {''.join(log)[-2000:]}"
            logs.append(log)
            drain = threading.Thread(target=lambda p=proc, lg=log: lg.extend(p.stderr or ()), daemon=True)
            drain.start()
            drains.append(drain)
        yield urls, logs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for drain in drains:
            drain.join(5)


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
    tls_for: Callable[[str], TLSFiles],
    redis_server: EmbeddedRedis,
) -> Iterator[Replicas]:
    """Two gateway processes sharing one Redis and one auth-service, on one fake upstream."""
    tmp = tmp_path_factory.mktemp("replicas")
    ensure_pepper_file(tmp / "pepper")
    stack = Stack(tmp, tls_for, 0, 0)
    stack.start_auth()
    with ExitStack() as es:
        es.callback(lambda: stack.auth.stop(grace=0.2) if stack.auth is not None else None)
        upstream = es.enter_context(run_openai_upstream_in_thread("r", api_key="sk-up-r"))
        cfg = tmp / "tail.yaml"
        cfg.write_text(
            f"""
models:
  - name: {MODEL}
    provider: openai
    base_url: {upstream.base_url}
    api_key_env: ADMISSION_UPSTREAM_KEY
    max_retries: 0
    timeout: 30
auth:
  mode: grpc
  address: 127.0.0.1:{stack.auth_port}
  tls: {_tls_yaml(tls_for("tail"))}
  timeout: 5
redis:
  url: {redis_server.url()}
  timeout: 2
ratelimit:
  enabled: true
server:
  sse_keepalive: 0
log_level: warning
"""
        )
        urls, logs = es.enter_context(serve_processes(cfg, {"ADMISSION_UPSTREAM_KEY": "sk-up-r"}, 2))
        yield Replicas(stack, upstream, urls, logs)


@pytest.fixture
def fresh_replicas(replicas: Replicas) -> Replicas:
    replicas.upstream.clear()
    replicas.upstream.chunk_delay = 0.0
    return replicas


@pytest.mark.slow
def test_rpm_is_exact_across_two_replicas(fresh_replicas: Replicas) -> None:
    reps = fresh_replicas
    key = new_key(reps.stack, rpm=50)
    # every call claims the same request id: the limiter must count each one regardless
    same_id = {"x-request-id": "req_the_same_for_all"}
    results = burst(reps.clients(key, default_headers=same_id), 100, chat_body("rpm"))
    ok, limited = split(results)
    assert (len(ok), len(limited)) == (50, 50), reps.log_tail()
    assert all(r.choices[0].message.content == "[r] rpm" for r in ok)
    assert len(reps.upstream.requests) == 50  # a rejected call never reaches the upstream
    for exc in limited:
        assert_rate_limited(exc)
        assert exc.type == "requests"
        assert (
            "Rate limit reached for gpt-test on requests per min (RPM): Limit 50, Used 50, Requested 1."
            in (exc.message)
        )
        h = exc.response.headers
        assert h["x-ratelimit-limit-requests"] == "50"
        assert h["x-ratelimit-remaining-requests"] == "0"
        assert GO_DURATION.match(h["x-ratelimit-reset-requests"])
        # the oldest admission leaves the window within a minute
        assert 1 <= int(h["retry-after"]) <= 60


@pytest.mark.slow
def test_tpm_is_exact_across_two_replicas(fresh_replicas: Replicas) -> None:
    reps = fresh_replicas
    body = chat_body("how many tokens does this prompt take", max_tokens=40)
    reserved = TiktokenCounter().count_prompt(body, "chat") + 40
    tpm = 7 * reserved + reserved // 2
    admitted = tpm // reserved
    assert admitted == 7
    key = new_key(reps.stack, tpm=tpm)
    # the admitted calls stay in flight until every other call was decided, so no settlement
    # (which lowers a reservation to the real usage) can let an extra call in
    reps.upstream.delay_next(100, seconds=2.0)
    results = burst(reps.clients(key), 100, body)
    ok, limited = split(results)
    assert (len(ok), len(limited)) == (admitted, 100 - admitted), (reserved, tpm, reps.log_tail())
    for exc in limited:
        assert_rate_limited(exc)
        assert exc.type == "tokens"
        assert (
            f"Rate limit reached for gpt-test on tokens per min (TPM): Limit {tpm}, "
            f"Used {admitted * reserved}, Requested {reserved}." in exc.message
        )
        h = exc.response.headers
        assert h["x-ratelimit-limit-tokens"] == str(tpm)
        assert h["x-ratelimit-remaining-tokens"] == str(tpm - admitted * reserved)
        assert GO_DURATION.match(h["x-ratelimit-reset-tokens"])
        assert "x-ratelimit-limit-requests" not in h


@pytest.mark.slow
def test_concurrency_is_exact_across_two_replicas(fresh_replicas: Replicas) -> None:
    reps = fresh_replicas
    key = new_key(reps.stack, max_concurrency=3)
    # each admitted call holds its slot for 2 s, longer than the whole burst takes to be decided
    reps.upstream.delay_next(100, seconds=2.0)
    results = burst(reps.clients(key), 100, chat_body("conc"))
    ok, limited = split(results)
    assert (len(ok), len(limited)) == (3, 97), reps.log_tail()
    assert len(reps.upstream.requests) == 3
    # the three ran at once: all arrived upstream before the first could have finished
    arrivals = sorted(r.time for r in reps.upstream.requests)
    assert arrivals[-1] - arrivals[0] < 2.0
    for exc in limited:
        assert_concurrency_429(exc, 3)
        assert not ratelimit_headers(exc.response.headers)  # no rpm/tpm on this key


# ------------------------------------------------------------------------ slots come back
def _auth(key: Key) -> dict[str, str]:
    return {"Authorization": f"Bearer {key.api_key}"}


def open_stream(es: ExitStack, app: RunningApp, key: Key) -> None:
    """A streaming chat call that has delivered its first event and is left open in ``es``."""
    http = es.enter_context(httpx.Client(base_url=app.base_url, timeout=10))
    resp = es.enter_context(
        http.stream(
            "POST", "/v1/chat/completions", json=chat_body(LONG_TEXT, stream=True), headers=_auth(key)
        )
    )
    assert resp.status_code == 200, resp.read()
    # keep the iterator referenced: a collected iterator closes the connection (httpcore)
    lines = es.enter_context(closing(resp.iter_lines()))
    line = next(ln for ln in lines if ln)
    assert line.startswith("data: {"), line


def raw_stream_then_reset(
    app: RunningApp, key: Key, got_first: threading.Event, die: threading.Event
) -> None:
    """A client on a bare socket: starts a stream, reads the first event, then dies (TCP RST)."""
    body = orjson.dumps(chat_body(LONG_TEXT, stream=True))
    port = int(app.base_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {key.api_key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(head + body)
        seen = b""
        while b"data: {" not in seen:
            data = sock.recv(65536)
            assert data, "connection closed before the first event"
            seen += data
        assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
        got_first.set()
        die.wait(10)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST: the way a killed process's connection ends


def assert_full_capacity(app: RunningApp, key: Key, r: redis.Redis, limit: int) -> None:
    """``limit`` streams are admitted at once, one more call is refused; then all slots come back."""
    with ExitStack() as es:
        for _ in range(limit):
            open_stream(es, app, key)
        assert live_slots(r, key) == limit
        with pytest.raises(openai.RateLimitError) as exc:
            sdk(app.base_url, key).chat.completions.create(**chat_body("one too many"))
        assert_concurrency_429(exc.value, limit)
    wait_for(lambda: live_slots(r, key) == 0, 2.0, "slots released after the streams closed")


def test_concurrency_slots_come_back_on_disconnect_and_cut_streams(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, redis_server: EmbeddedRedis
) -> None:
    upstream.chunk_delay = 0.2  # LONG_TEXT streams for ~8 s
    key = new_key(stack, max_concurrency=2)
    with (
        closing(redis.Redis.from_url(redis_server.url())) as r,
        serve_app(limited_settings(stack, upstream, redis_server.url(), timeout=1)) as app,
    ):
        client = sdk(app.base_url, key)

        # 1. two streams read one event each, then the clients close them abruptly
        with ExitStack() as es:
            open_stream(es, app, key)
            open_stream(es, app, key)
            assert live_slots(r, key) == 2
            with pytest.raises(openai.RateLimitError) as exc:
                client.chat.completions.create(**chat_body("third"))
            assert_concurrency_429(exc.value, 2)
        wait_for(lambda: live_slots(r, key) == 0, 2.0, "slots released on disconnect")
        assert client.chat.completions.create(**chat_body("again")).choices[0].message.content == "[a] again"
        assert_full_capacity(app, key, r, 2)

        # 2. two clients die mid-stream (connection reset from another thread)
        die = threading.Event()
        firsts = [threading.Event(), threading.Event()]
        threads = [
            threading.Thread(target=raw_stream_then_reset, args=(app, key, ev, die), daemon=True)
            for ev in firsts
        ]
        for t in threads:
            t.start()
        for ev in firsts:
            assert ev.wait(10)
        assert live_slots(r, key) == 2
        with pytest.raises(openai.RateLimitError) as exc:
            client.chat.completions.create(**chat_body("third"))
        assert_concurrency_429(exc.value, 2)
        die.set()
        for t in threads:
            t.join(5)
        wait_for(lambda: live_slots(r, key) == 0, 2.0, "slots released after the clients died")
        assert_full_capacity(app, key, r, 2)

        # 3. a non-streaming call whose client gives up while the upstream is still thinking
        upstream.delay_next(1, seconds=5.0)
        gave_up: list[BaseException] = []

        def give_up() -> None:
            with httpx.Client(base_url=app.base_url, timeout=1.0) as http:
                try:
                    http.post("/v1/chat/completions", json=chat_body("slow"), headers=_auth(key))
                except httpx.ReadTimeout as exc:
                    gave_up.append(exc)

        impatient = threading.Thread(target=give_up, daemon=True)
        impatient.start()
        wait_for(lambda: live_slots(r, key) == 1, 2.0, "the slow call holds a slot")
        impatient.join(5)
        assert gave_up, "the client should have timed out while the upstream was still thinking"
        wait_for(lambda: live_slots(r, key) == 0, 2.0, "slot released after a non-streaming disconnect")

        # 4. the upstream cuts two streams after one event, and a non-streaming answer halfway
        upstream.cut_stream_next(2, after_chunks=1)
        for _ in range(2):
            with pytest.raises(openai.APIError):
                for _chunk in client.chat.completions.create(**chat_body("cut", stream=True)):
                    pass
            wait_for(lambda: live_slots(r, key) == 0, 2.0, "slot released after a cut upstream stream")
        upstream.cut_stream_next(1)
        with pytest.raises(openai.APIStatusError) as cut:
            client.chat.completions.create(**chat_body("cut"))
        assert cut.value.status_code == 502
        wait_for(lambda: live_slots(r, key) == 0, 2.0, "slot released after a cut upstream answer")
        assert_full_capacity(app, key, r, 2)


# ------------------------------------------------------------------------------------ headers
def test_ratelimit_headers_on_sequential_calls(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, redis_server: EmbeddedRedis
) -> None:
    key = new_key(stack, rpm=10, tpm=10_000)
    body = chat_body("count my tokens please", max_tokens=30)
    reserved = TiktokenCounter().count_prompt(body, "chat") + 30
    with serve_app(limited_settings(stack, upstream, redis_server.url(), timeout=1)) as app:
        client = sdk(app.base_url, key)
        prev_remaining = 10_000
        prev_used = 0
        for i in (*range(1, 6), *range(7, 11)):
            raw = client.chat.completions.with_raw_response.create(**body)
            h = raw.headers
            usage = raw.parse().usage
            assert usage is not None
            assert h["x-ratelimit-limit-requests"] == "10"
            assert h["x-ratelimit-remaining-requests"] == str(10 - i)
            assert GO_DURATION.match(h["x-ratelimit-reset-requests"]), h["x-ratelimit-reset-requests"]
            assert h["x-ratelimit-limit-tokens"] == "10000"
            assert GO_DURATION.match(h["x-ratelimit-reset-tokens"]), h["x-ratelimit-reset-tokens"]
            remaining = int(h["x-ratelimit-remaining-tokens"])
            if i == 1:
                assert remaining == 10_000 - reserved
            else:
                # the previous call was settled to its real usage (or, if that has not landed
                # yet, still counts as reserved); this one counts as reserved
                assert remaining in (prev_remaining - prev_used, prev_remaining - reserved), (
                    remaining,
                    prev_remaining,
                    prev_used,
                    reserved,
                )
            assert 0 <= remaining <= prev_remaining <= 10_000
            prev_remaining, prev_used = remaining, usage.total_tokens
            if i == 5:  # an upstream failure after admission carries the headers too
                upstream.fail_next(1, 500)
                with pytest.raises(openai.InternalServerError) as failed:
                    client.chat.completions.create(**body)
                assert failed.value.response.headers["x-ratelimit-limit-requests"] == "10"
                assert failed.value.response.headers["x-ratelimit-remaining-requests"] == "4"
        with pytest.raises(openai.RateLimitError) as exc:
            client.chat.completions.create(**body)
        assert_rate_limited(exc.value)
        assert exc.value.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_no_headers_without_limits_model_limits_per_key_and_for_all_keys(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, redis_server: EmbeddedRedis
) -> None:
    settings = stack.gateway_settings(
        [
            model_entry(MODEL, upstream, max_retries=0),
            model_entry("gpt-limited", upstream, rpm=2),
            model_entry("gpt-shared", upstream, total_rpm=3),
        ],
        ratelimit={"enabled": True},
        redis={"url": redis_server.url(), "timeout": 1},
    )
    unlimited = new_key(stack)
    first, second = new_key(stack), new_key(stack)
    with serve_app(settings) as app:
        for _ in range(3):
            raw = sdk(app.base_url, unlimited).chat.completions.with_raw_response.create(**chat_body())
            assert raw.status_code == 200
            assert not ratelimit_headers(raw.headers)
        for key in (first, second):
            client = sdk(app.base_url, key)
            for i in (1, 2):
                raw = client.chat.completions.with_raw_response.create(**chat_body(model="gpt-limited"))
                assert raw.headers["x-ratelimit-limit-requests"] == "2"
                assert raw.headers["x-ratelimit-remaining-requests"] == str(2 - i)
                assert "x-ratelimit-limit-tokens" not in raw.headers
            with pytest.raises(openai.RateLimitError) as exc:
                client.chat.completions.create(**chat_body(model="gpt-limited"))
            assert_rate_limited(exc.value)
            assert "Rate limit reached for gpt-limited on requests per min (RPM): Limit 2, Used 2" in (
                exc.value.message
            )
            # the model's limit is per model: the key's other model is untouched
            raw = client.chat.completions.with_raw_response.create(**chat_body())
            assert raw.status_code == 200
            assert not ratelimit_headers(raw.headers)
        # a model-wide limit is shared by every key: 3 calls in all, then a 429 for anyone
        shared = chat_body(model="gpt-shared")
        for key, remaining in ((first, "2"), (second, "1"), (first, "0")):
            raw = sdk(app.base_url, key).chat.completions.with_raw_response.create(**shared)
            assert raw.headers["x-ratelimit-limit-requests"] == "3"
            assert raw.headers["x-ratelimit-remaining-requests"] == remaining
        for key in (first, second, unlimited):
            with pytest.raises(openai.RateLimitError) as exc:
                sdk(app.base_url, key).chat.completions.create(**shared)
            assert_rate_limited(exc.value)
            assert "gpt-shared (all API keys together) on requests per min (RPM): Limit 3, Used 3" in (
                exc.value.message
            )


# --------------------------------------------------------------------------------- Redis down
@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server this test may stop, freeze and restart."""
    server = EmbeddedRedis(tmp_path / "r").start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()


async def test_one_slow_moment_is_one_breaker_failure_however_many_were_in_flight(
    own_redis: EmbeddedRedis,
) -> None:
    settings = RedisSettings(timeout=0.05, breaker_failures=3, breaker_reset=30, failure_mode="open")
    guarded = GuardedLimiter(RedisRateLimiter(PipelinedRedis(own_redis.url())), settings)
    limits = Limits(rpm=1000)

    def ask() -> AdmissionRequest:
        return AdmissionRequest("k", os.urandom(6).hex(), "m", 1, limits, Limits())

    try:
        assert (await guarded.admit(ask())).allowed
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        wave = await asyncio.gather(*(guarded.admit(ask()) for _ in range(40)))
        assert all(a == UNLIMITED for a in wave)  # fail-open: admitted without limits
        assert guarded.degraded_admissions == 40
        assert not guarded.breaker_open  # 40 timeouts of one moment: one failure
        await guarded.admit(ask())
        assert not guarded.breaker_open  # two
        await guarded.admit(ask())
        assert guarded.breaker_open  # three waves in a row: Redis is really gone
    finally:
        if own_redis.proc is not None:
            own_redis.proc.send_signal(signal.SIGCONT)
        await guarded.close()


@dataclass(frozen=True)
class Reply:
    status: int
    #: the x-ratelimit-* headers
    limits: dict[str, str]
    code: str | None = None

    @property
    def remaining(self) -> str | None:
        return self.limits.get("x-ratelimit-remaining-requests")


def call(client: openai.OpenAI, **kw: Any) -> Reply:
    """One chat call through the SDK, success or not."""
    try:
        raw = client.chat.completions.with_raw_response.create(**chat_body(**kw))
        return Reply(raw.status_code, ratelimit_headers(raw.headers))
    except openai.APIStatusError as exc:
        return Reply(exc.status_code, ratelimit_headers(exc.response.headers), exc.code)


def warm_up(app: RunningApp, stack: Stack) -> None:
    """Wait out the gateway's start-up before timing anything against a 50 ms Redis deadline.

    At start-up the gateway builds its tokenizer in a background thread, which holds the GIL
    for a few hundred milliseconds, and its first admission still has to connect to Redis and
    load the script. A call limited on tokens counts its prompt, so it waits for that build;
    once a call carries rate-limit headers, Redis answered within the deadline.
    """
    probe = sdk(app.base_url, new_key(stack, tpm=10_000_000))
    wait_for(lambda: bool(call(probe).limits), 10.0, "the gateway admits through Redis")


def breaker_settings(stack: Stack, upstream: FakeOpenAI, server: EmbeddedRedis, mode: str) -> Settings:
    """Limits through ``server`` with a 50 ms deadline and a breaker that opens after
    3 failures for 0.5 s, failing ``mode`` ("open" or "closed")."""
    return limited_settings(
        stack, upstream, server.url(), failure_mode=mode, timeout=0.05, breaker_failures=3, breaker_reset=0.5
    )


def test_redis_down_fail_open_then_recovers(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, own_redis: EmbeddedRedis
) -> None:
    settings = breaker_settings(stack, upstream, own_redis, "open")
    key = new_key(stack, rpm=3)
    with serve_app(settings) as app, app.http() as http:
        warm_up(app, stack)
        client = sdk(app.base_url, key)
        assert [(r.status, r.remaining) for r in (call(client) for _ in range(4))] == [
            (200, "2"),
            (200, "1"),
            (200, "0"),
            (429, "0"),
        ]
        assert http.get("/health").json()["dependencies"]["redis"]["status"] == "ok"

        own_redis.stop()
        for _ in range(3):  # the failures that open the breaker
            assert call(client) == Reply(200, {})
        health = http.get("/health").json()
        assert health["status"] == "degraded"
        assert health["dependencies"]["redis"]["status"] != "ok"
        assert health["dependencies"]["redis"]["breaker"] == "open"
        t0 = time.monotonic()
        for _ in range(20):
            assert call(client) == Reply(200, {})  # admitted without limits, and without headers
        assert time.monotonic() - t0 < 0.6
        # requests let in without Redis were never recorded: nothing waits to settle them
        # (only the admissions whose Redis call failed, which may have been recorded)
        assert http.get("/health").json()["dependencies"]["redis"]["pending_releases"] <= 3

        own_redis.start()
        # within breaker_reset (0.5 s) of the restart, plus a poll
        wait_for(lambda: bool(call(client).limits), 0.5 + 0.5, "limits apply again after Redis is back")
        # the restarted Redis reloaded its append-only file: the window still holds the
        # first three admissions (the ones let in without Redis were never recorded)
        assert [(r.status, r.remaining) for r in (call(client) for _ in range(3))] == [
            (429, "0"),
            (429, "0"),
            (429, "0"),
        ]
        assert http.get("/health").json()["dependencies"]["redis"]["status"] == "ok"


def test_redis_down_fail_closed_then_recovers(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, own_redis: EmbeddedRedis
) -> None:
    settings = breaker_settings(stack, upstream, own_redis, "closed")
    key, unlimited = new_key(stack, rpm=100), new_key(stack)
    with serve_app(settings) as app, app.http() as http:
        warm_up(app, stack)
        client = sdk(app.base_url, key)
        assert call(client).remaining == "99"
        served = len(upstream.requests)

        own_redis.stop()
        for _ in range(6):  # before and after the breaker opened
            with pytest.raises(openai.InternalServerError) as exc:
                client.chat.completions.create(**chat_body())
            assert exc.value.status_code == 503
            assert exc.value.code == "rate_limiter_unavailable"
            assert exc.value.response.headers["retry-after"] == "1"
            assert not ratelimit_headers(exc.value.response.headers)
        # a key without limits never needs Redis
        assert call(sdk(app.base_url, unlimited)) == Reply(200, {})
        health = http.get("/health").json()
        assert health["dependencies"]["redis"]["status"] != "ok"
        assert health["dependencies"]["redis"]["failure_mode"] == "closed"
        assert len(upstream.requests) == served + 1  # nothing refused reached the upstream

        own_redis.start()
        wait_for(lambda: call(client).status == 200, 0.5 + 0.5, "admissions resume after Redis is back")
        reply = call(client)
        assert (reply.status, reply.limits["x-ratelimit-limit-requests"]) == (200, "100")
        assert http.get("/health").json()["dependencies"]["redis"]["status"] == "ok"


def test_hung_redis_costs_no_latency_once_the_breaker_is_open(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, own_redis: EmbeddedRedis
) -> None:
    """A Redis that accepts connections but never answers (SIGSTOP): the worst case for latency."""
    settings = breaker_settings(stack, upstream, own_redis, "open")
    key = new_key(stack, rpm=1000)
    with serve_app(settings) as app, app.http() as http:
        warm_up(app, stack)
        client = sdk(app.base_url, key)
        assert call(client).remaining == "999"
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(3):  # each waits for redis.timeout, then the breaker opens
                t0 = time.monotonic()
                assert call(client) == Reply(200, {})
                assert 0.05 <= time.monotonic() - t0 < 0.5
            t0 = time.monotonic()
            for _ in range(20):
                assert call(client) == Reply(200, {})
            took = time.monotonic() - t0
            assert took < 0.6, f"20 calls took {took:.3f}s with the breaker open"
            assert http.get("/livez").status_code == 200
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: bool(call(client).limits), 0.5 + 0.5, "limits apply again after Redis thawed")


def test_an_admission_that_timed_out_holds_no_slot(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, own_redis: EmbeddedRedis
) -> None:
    """A request refused because Redis answered too late must not keep a concurrency slot.

    The admission script was already on its way when ``redis.timeout`` expired; Redis runs it
    as soon as it answers again. The request got a 503, so a slot recorded for it would shut
    the key out for ``ratelimit.lease_ttl`` (600 s by default) unless the gateway gives it back.
    """
    settings = limited_settings(
        stack,
        upstream,
        own_redis.url(),
        failure_mode="closed",
        timeout=0.05,
        breaker_failures=1,
        breaker_reset=0.3,
    )
    key = new_key(stack, max_concurrency=1)
    with closing(redis.Redis.from_url(own_redis.url())) as r, serve_app(settings) as app:
        warm_up(app, stack)
        client = sdk(app.base_url, key)
        assert call(client).status == 200
        wait_for(lambda: live_slots(r, key) == 0, 2.0, "the first call settled")
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)  # Redis stops answering for a moment
        try:
            reply = call(client)
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        assert (reply.status, reply.code) == (503, "rate_limiter_unavailable")
        assert r.ping()  # Redis answers again (and has run whatever was waiting for it)
        # The gateway gives the slot back in the background as soon as Redis answers.
        wait_for(lambda: live_slots(r, key) == 0, 3.0, "the refused request's slot released")
        wait_for(lambda: call(client).status == 200, 2.0, "the key is admitted again")


# -------------------------------------------------------------------------------- SDK retries
def test_sdk_retries_honour_retry_after_on_concurrency(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, redis_server: EmbeddedRedis
) -> None:
    key = new_key(stack, max_concurrency=1)
    with serve_app(limited_settings(stack, upstream, redis_server.url(), timeout=1)) as app:
        upstream.delay_next(1, seconds=1.5)
        first: list[Any] = []
        holder = threading.Thread(
            target=lambda: first.append(sdk(app.base_url, key).chat.completions.create(**chat_body("first"))),
            daemon=True,
        )
        holder.start()
        wait_for(lambda: len(upstream.requests) == 1, 5.0, "the first call reached the upstream")

        attempts: list[tuple[int, dict[str, str]]] = []
        http_client = openai.DefaultHttpxClient(
            event_hooks={"response": [lambda resp: attempts.append((resp.status_code, dict(resp.headers)))]}
        )
        client = sdk(app.base_url, key, max_retries=2, http_client=http_client)
        t0 = time.monotonic()
        answer = client.chat.completions.create(**chat_body("second"))
        took = time.monotonic() - t0
        holder.join(5)

        assert answer.choices[0].message.content == "[a] second"
        assert first and first[0].choices[0].message.content == "[a] first"
        assert took >= 1.0
        statuses = [status for status, _ in attempts]
        # 429 while the first call held the slot, then 200 once it was done: 1 or 2 retries
        assert statuses in ([429, 200], [429, 429, 200]), statuses
        for status, headers in attempts[:-1]:
            assert status == 429
            assert headers["retry-after"] == "1"
            assert headers["retry-after-ms"] == "1000"


async def test_an_admission_cancelled_in_flight_holds_no_slot(own_redis: EmbeddedRedis) -> None:
    settings = RedisSettings(timeout=5, breaker_failures=3, failure_mode="open")
    guarded = GuardedLimiter(RedisRateLimiter(PipelinedRedis(own_redis.url())), settings)
    limits = Limits(max_concurrency=2)
    conc = bucket_keys("k")[2]
    probe = redis.Redis.from_url(own_redis.url())
    try:
        await guarded.prepare()
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)  # the script waits in Redis's socket ...
        asks = [AdmissionRequest("k", f"c{i}", "m", 1, limits, Limits()) for i in range(2)]
        pending = [asyncio.ensure_future(guarded.admit(a)) for a in asks]
        await asyncio.sleep(0.1)
        for p in pending:  # ... when the clients go away
            p.cancel()
        own_redis.proc.send_signal(signal.SIGCONT)
        await asyncio.gather(*pending, return_exceptions=True)
        await guarded.drain()
        assert probe.zcard(conc) == 0  # both admissions ran, and both slots came back
        assert (await guarded.admit(AdmissionRequest("k", "after", "m", 1, limits, Limits()))).allowed
    finally:
        if own_redis.proc is not None:
            own_redis.proc.send_signal(signal.SIGCONT)
        probe.close()
        await guarded.close()
