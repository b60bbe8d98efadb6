"""The cluster client under node faults (issue 8, faults 4), on real redis-server nodes.

- A primary dies and its replica takes over: admissions find the new primary at once
  (the connection error reads the map again) instead of opening the breaker for ~5 s.
- A hung node (SIGSTOP) while the map is being read does not stretch a 50 ms call.
- Connections to the nodes have TCP keepalive on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from tail_service.clients.limiter_guard import GuardedLimiter
from tail_service.clients.ratelimit_redis import RedisRateLimiter, hash_tag
from tail_service.clients.redis_cluster import ClusterPipelinedRedis
from tail_service.core.ratelimit import UNLIMITED, AdmissionRequest, Limits
from tail_service.redis_embedded import terminate
from tail_service.settings import RedisSettings
from tests.integration.test_redis_cluster import (
    SLOT_RANGES,
    free_ports,
    running_cluster,
    start_node,
    wait_until_up,
)
from tests.procfs import own_connections

NONE = Limits()


def _slots(node: redis.Redis) -> list[tuple[int, int, int, list[int]]]:
    """(first, last, primary port, replica ports) per range, as ``node`` sees them."""
    out = []
    for entry in node.execute_command("CLUSTER", "SLOTS"):
        ports = [int(n[1]) for n in entry[2:]]
        out.append((int(entry[0]), int(entry[1]), ports[0], ports[1:]))
    return sorted(out)


@contextlib.contextmanager
def replicated_cluster(base: Path) -> Iterator[tuple[list[int], dict[int, subprocess.Popen[bytes]]]]:
    """Three primaries (a third of the slots each), each with one replica.

    Yields the ports, primaries first (replica of ``ports[i]`` is ``ports[i + 3]``), and
    the processes by port.
    """
    ports = free_ports(6)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for port in ports:
            procs[port] = start_node(base, port)
        nodes = {p: redis.Redis(port=p, retry=None) for p in ports}
        for port, node in nodes.items():
            wait_until_up(node, procs[port])
        for port, (first, last) in zip(ports[:3], SLOT_RANGES, strict=True):
            nodes[port].execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        for port in ports[1:]:
            nodes[ports[0]].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        ids = {p: n.execute_command("CLUSTER", "MYID").decode() for p, n in nodes.items()}
        deadline = time.monotonic() + 30
        for primary, replica in zip(ports[:3], ports[3:], strict=True):
            while True:  # the replica must have heard of its primary first
                try:
                    nodes[replica].execute_command("CLUSTER", "REPLICATE", ids[primary])
                    break
                except redis.ResponseError:
                    assert time.monotonic() < deadline, "the replicas did not join"
                    time.sleep(0.05)
        expected = [(f, la, p, [r]) for (f, la), p, r in zip(SLOT_RANGES, ports[:3], ports[3:], strict=True)]
        while not all(
            b"cluster_state:ok" in n.execute_command("CLUSTER", "INFO") and _slots(n) == expected
            for n in nodes.values()
        ):
            assert time.monotonic() < deadline, "the cluster did not form"
            time.sleep(0.05)
        for n in nodes.values():
            n.close()
        yield ports, procs
    finally:
        for proc in procs.values():
            terminate(proc, 5)


def _subject_on(first: int, last: int) -> str:
    return next(s for s in (f"key_{i:04d}" for i in range(10_000)) if first <= _slot_of(s) <= last)


def _slot_of(subject: str) -> int:
    return int(key_slot(hash_tag(subject).encode()))


@pytest.mark.timeout(90)
async def test_admissions_follow_a_failover_at_once(tmp_path: Path) -> None:
    with replicated_cluster(tmp_path) as (ports, procs):
        victim, heir = ports[0], ports[3]
        # the seed is the primary that dies: the map must come from the others
        client = ClusterPipelinedRedis(f"redis://127.0.0.1:{victim}")
        guard = GuardedLimiter(RedisRateLimiter(client), RedisSettings(timeout=0.1))
        subject = _subject_on(*SLOT_RANGES[0])
        lim = Limits(rpm=1_000_000)
        count = itertools.count()

        async def admit() -> bool:
            """True when Redis admitted (not the failure policy)."""
            a = await guard.admit(AdmissionRequest(subject, f"r{next(count)}", "m", 1, lim, NONE))
            return a is not UNLIMITED and a.allowed

        try:
            assert all([await admit() for _ in range(5)])
            killed = time.monotonic()
            procs[victim].kill()
            procs[victim].wait()
            with redis.Redis(port=heir) as r:
                r.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
            survivors = [redis.Redis(port=p) for p in ports[1:]]
            try:
                while not all(_slots(n)[0][2] == heir for n in survivors):
                    assert time.monotonic() - killed < 20, "the replica did not take over"
                    await asyncio.sleep(0.01)
            finally:
                for n in survivors:
                    n.close()
            taken_over = time.monotonic()
            degraded_before = guard.degraded_admissions
            recovered_after = None
            while time.monotonic() - taken_over < 10:
                if await admit():
                    recovered_after = time.monotonic() - taken_over
                    break
                await asyncio.sleep(0.005)
            assert recovered_after is not None
            print(
                f"replica took over {taken_over - killed:.3f}s after the kill; "
                f"admissions recovered {recovered_after * 1000:.1f} ms later, "
                f"{guard.degraded_admissions - degraded_before} degraded meanwhile"
            )
            assert not guard.breaker_open
            assert guard.degraded_admissions - degraded_before <= 1
            assert recovered_after < 1.0
            assert all([await admit() for _ in range(5)])
        finally:
            await guard.close()


@pytest.mark.timeout(60)
async def test_a_hung_node_does_not_stretch_the_callers_deadline(tmp_path: Path) -> None:
    with running_cluster(tmp_path) as ports:
        with redis.Redis(port=ports[0]) as r:
            pid = int(r.info("server")["process_id"])
        client = ClusterPipelinedRedis(f"redis://127.0.0.1:{ports[0]}")
        on_hung, on_live = _subject_on(*SLOT_RANGES[0]), _subject_on(*SLOT_RANGES[1])
        try:
            await client.refresh()  # the map, and with it every node, is known
            os.kill(pid, signal.SIGSTOP)
            # the map must be read again (as after the breaker opens), and the seed hangs
            client.reset()
            started = time.monotonic()
            await client.execute_keyed(hash_tag(on_live), "SET", hash_tag(on_live), "1", timeout=0.1)
            live_took = time.monotonic() - started

            client.reset()
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await client.execute_keyed(hash_tag(on_hung), "GET", hash_tag(on_hung), timeout=0.05)
            hung_took = time.monotonic() - started
            print(f"live node answered in {live_took * 1000:.1f} ms; hung one gave up in {hung_took:.3f} s")
            assert live_took < 0.3
            assert hung_took < 0.25
        finally:
            os.kill(pid, signal.SIGCONT)
            await client.close()


@pytest.mark.timeout(60)
async def test_connections_to_the_nodes_have_tcp_keepalive(tmp_path: Path) -> None:
    with running_cluster(tmp_path) as ports:
        before = own_connections(set(ports))
        client = ClusterPipelinedRedis(f"redis://127.0.0.1:{ports[0]}")
        try:
            await client.refresh()
            for first, last in SLOT_RANGES:
                key = hash_tag(_subject_on(first, last))
                await client.execute_keyed(key, "GET", key, timeout=1)
            ours = {i: tr for i, tr in own_connections(set(ports)).items() if i not in before}
            assert len(ours) == 3, ours
            assert set(ours.values()) == {"02"}, ours
        finally:
            await client.close()
