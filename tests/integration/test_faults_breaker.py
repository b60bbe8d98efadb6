"""The breaker closes as soon as Redis answers again, not after the whole cooldown
(issue 8, faults 1): a restarted redis-server enforces limits within a fraction of a second."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from tail_service.clients.limiter_guard import GuardedLimiter
from tail_service.clients.ratelimit_redis import RedisRateLimiter
from tail_service.clients.redis_pipe import PipelinedRedis
from tail_service.core.ratelimit import UNLIMITED, AdmissionRequest, Limits
from tail_service.redis_embedded import EmbeddedRedis
from tail_service.settings import RedisSettings


def ask() -> AdmissionRequest:
    return AdmissionRequest("k", os.urandom(6).hex(), "m", 1, Limits(rpm=1000), Limits())


async def test_a_restarted_redis_closes_the_breaker_long_before_its_cooldown(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r").start()
    settings = RedisSettings(timeout=0.05, breaker_failures=3, breaker_reset=30, breaker_probe_interval=0.1)
    guarded = GuardedLimiter(RedisRateLimiter(PipelinedRedis(server.url())), settings)
    try:
        assert (await guarded.admit(ask())) is not UNLIMITED
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()
        for _ in range(50):
            if guarded.breaker_open:
                break
            assert await guarded.admit(ask()) is UNLIMITED  # fail-open meanwhile
            await asyncio.sleep(0.01)
        assert guarded.breaker_open
        server.start()  # a restart, as `up`'s supervisor does: empty, no scripts loaded
        restarted = time.monotonic()
        while (await guarded.admit(ask())) is UNLIMITED:
            assert time.monotonic() - restarted < 5, "the breaker stayed open"
            await asyncio.sleep(0.01)
        took = time.monotonic() - restarted
        assert not guarded.breaker_open
        assert took < 1.0, f"limits back after {took:.2f}s (breaker_reset is 30 s)"
    finally:
        await guarded.close()
        server.stop()
