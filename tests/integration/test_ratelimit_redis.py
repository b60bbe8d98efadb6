"""The Redis rate limiter against a real redis-server: exact limits under concurrency, settling, leases."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
from redis.crc import key_slot

from tail_service.clients.ratelimit_redis import RedisRateLimiter, bucket_keys, hash_tag, total_bucket_keys
from tail_service.clients.redis_pipe import PipelinedRedis
from tail_service.core.ratelimit import (
    UNLIMITED,
    Admission,
    AdmissionRequest,
    Limits,
    Priority,
    rate_limit_message,
    ratelimit_headers,
)
from tail_service.redis_embedded import EmbeddedRedis

GO_DURATION = re.compile(r"^(?=\d)(\d+h)?(\d+m)?(\d+(\.\d+)?(ms|us|µs|ns|s))?$")
NONE = Limits()


@pytest.fixture
async def clients(redis_server: EmbeddedRedis) -> AsyncIterator[list[redis.asyncio.Redis]]:
    """Four separate clients (four "replicas") on a flushed database."""
    cs = [redis.asyncio.Redis.from_url(redis_server.url()) for _ in range(4)]
    await cs[0].flushdb()
    try:
        yield cs
    finally:
        for c in cs:
            await c.aclose()


@pytest.fixture
async def pipes(
    redis_server: EmbeddedRedis, clients: list[redis.asyncio.Redis]
) -> AsyncIterator[list[PipelinedRedis]]:
    """The limiters' own connections: four "replicas"."""
    ps = [PipelinedRedis(redis_server.url()) for _ in range(4)]
    try:
        yield ps
    finally:
        for p in ps:
            await p.close()


@pytest.fixture
def limiter(pipes: list[PipelinedRedis]) -> RedisRateLimiter:
    return RedisRateLimiter(pipes[0])


_ids = itertools.count()


def req(
    key: Limits = NONE,
    model: Limits = NONE,
    *,
    total: Limits = NONE,
    tokens: int = 1,
    subject: str = "key-1",
    model_name: str = "gpt-x",
    priority: Priority = Priority.INTERACTIVE,
) -> AdmissionRequest:
    return AdmissionRequest(subject, f"r{next(_ids)}", model_name, tokens, key, model, priority, total)


async def burst(limiters: list[RedisRateLimiter], reqs: list[AdmissionRequest]) -> list[Admission]:
    """Admit all of ``reqs`` at once, spread round-robin over ``limiters``."""
    return list(await asyncio.gather(*(limiters[i % len(limiters)].admit(r) for i, r in enumerate(reqs))))


async def snapshot(client: redis.asyncio.Redis) -> dict[bytes, Any]:
    """Every key's full content (TTL aside)."""
    out: dict[bytes, Any] = {}
    async for k in client.scan_iter(match="tail:rl:*"):
        kind = await client.type(k)
        if kind == b"zset":
            out[k] = await client.zrange(k, 0, -1, withscores=True)
        elif kind == b"hash":
            out[k] = await client.hgetall(k)
        else:
            out[k] = await client.get(k)
    return out


async def test_requests_are_exact_under_concurrency(
    clients: list[redis.asyncio.Redis], pipes: list[PipelinedRedis]
) -> None:
    limiters = [RedisRateLimiter(p) for p in pipes]
    results = await burst(limiters, [req(Limits(rpm=50)) for _ in range(200)])
    allowed = [a for a in results if a.allowed]
    assert len(allowed) == 50
    assert sorted(a.remaining_requests for a in allowed) == list(range(50))
    rejected = [a for a in results if not a.allowed]
    assert {a.reason for a in rejected} == {"requests"}
    assert all(0 < a.retry_after_ms <= 60_000 for a in rejected)
    assert all(a.limit_requests == 50 and a.remaining_requests == 0 for a in rejected)
    assert await clients[1].zcard(bucket_keys("key-1")[0]) == 50


async def test_tokens_are_exact_under_concurrency(
    clients: list[redis.asyncio.Redis], pipes: list[PipelinedRedis]
) -> None:
    limiters = [RedisRateLimiter(p) for p in pipes]
    results = await burst(limiters, [req(Limits(tpm=1000), tokens=100) for _ in range(200)])
    assert sum(a.allowed for a in results) == 10
    assert {a.reason for a in results if not a.allowed} == {"tokens"}
    assert int(await clients[0].get(bucket_keys("key-1")[1]) or 0) == 1000
    # requests-only headers are absent, tokens ones present
    assert set(ratelimit_headers(results[0])) == {
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    }


async def test_concurrency_slots_come_back_on_settle(
    clients: list[redis.asyncio.Redis], pipes: list[PipelinedRedis]
) -> None:
    limiters = [RedisRateLimiter(p) for p in pipes]
    reqs = [req(Limits(max_concurrency=4)) for _ in range(50)]
    results = await burst(limiters, reqs)
    admitted = [r for r, a in zip(reqs, results, strict=True) if a.allowed]
    assert len(admitted) == 4
    assert {a.reason for a in results if not a.allowed} == {"concurrency"}
    assert {a.retry_after_ms for a in results if not a.allowed} == {1000}
    assert not (await limiters[0].admit(req(Limits(max_concurrency=4)))).allowed

    await limiters[2].settle(admitted[0], used_tokens=None)
    again = await burst(limiters, [req(Limits(max_concurrency=4)) for _ in range(10)])
    assert sum(a.allowed for a in again) == 1

    for r in admitted:  # settling twice (admitted[0]) frees nothing extra
        await limiters[1].settle(r, used_tokens=None)
    third = await burst(limiters, [req(Limits(max_concurrency=4)) for _ in range(10)])
    assert sum(a.allowed for a in third) == 3


async def test_leases_of_a_dead_process_expire(
    clients: list[redis.asyncio.Redis], pipes: list[PipelinedRedis]
) -> None:
    short = RedisRateLimiter(pipes[0], lease_ttl_ms=300)
    lim = Limits(max_concurrency=2)
    assert all(a.allowed for a in [await short.admit(req(lim)), await short.admit(req(lim))])
    assert not (await short.admit(req(lim))).allowed
    conc = bucket_keys("key-1")[2]
    assert 0 < await clients[0].pttl(conc) <= 1300
    await asyncio.sleep(0.4)  # nobody settles: the "process" died
    assert (await short.admit(req(lim))).allowed
    assert await clients[0].zcard(conc) == 1


async def test_model_limits_combine_with_key_limits(limiter: RedisRateLimiter) -> None:
    key, model = Limits(rpm=10), Limits(rpm=3)
    results = [await limiter.admit(req(key, model)) for _ in range(4)]
    assert [a.allowed for a in results] == [True, True, True, False]
    assert results[2].limit_requests == 3 and results[2].remaining_requests == 0  # the tighter one
    assert results[3].reason == "model_requests"
    assert results[3].limit_requests == 3
    assert "Limit 3, Used 3, Requested 1" in rate_limit_message(results[3], req(key, model))
    # another model has its own per-model bucket but shares the key's
    other = [await limiter.admit(req(key, model, model_name="org/other:v1")) for _ in range(3)]
    assert all(a.allowed for a in other)
    assert other[-1].limit_requests == 3 and other[-1].remaining_requests == 0
    more = [await limiter.admit(req(key, Limits(), model_name=f"m{i}")) for i in range(5)]
    assert [a.allowed for a in more] == [True, True, True, True, False]
    assert more[-1].reason == "requests" and more[-1].limit_requests == 10


async def test_a_rejection_reserves_nothing(
    clients: list[redis.asyncio.Redis], pipes: list[PipelinedRedis]
) -> None:
    limiter = RedisRateLimiter(pipes[0])
    key = Limits(rpm=100, tpm=10_000, max_concurrency=10)
    model = Limits(rpm=100, tpm=500, max_concurrency=2)
    assert (await limiter.admit(req(key, model, tokens=300))).allowed
    before = await snapshot(clients[0])
    assert len(before) == 6  # log, total, conc for the key and for the model
    for _ in range(3):
        a = await limiter.admit(req(key, model, tokens=300))
        assert not a.allowed and a.reason == "model_tokens"
        assert a.limit_tokens == 500 and a.remaining_tokens == 200
    assert await snapshot(clients[0]) == before
    assert (await limiter.admit(req(key, model, tokens=200))).allowed
    c = await limiter.admit(req(key, model, tokens=0))
    assert not c.allowed and c.reason == "model_concurrency"
    after = await snapshot(clients[0])
    assert (await limiter.admit(req(key, model, tokens=0))).reason == "model_concurrency"
    assert await snapshot(clients[0]) == after


async def test_too_large_request_is_rejected_for_a_minute(limiter: RedisRateLimiter) -> None:
    r = req(Limits(tpm=1000), tokens=1001)
    a = await limiter.admit(r)
    assert not a.allowed and a.reason == "tokens" and a.retry_after_ms == 60_000
    assert rate_limit_message(a, r).startswith("Request too large for gpt-x")


async def test_settle_adjusts_tokens_and_is_idempotent(
    clients: list[redis.asyncio.Redis], pipes: list[PipelinedRedis]
) -> None:
    limiter = RedisRateLimiter(pipes[0])
    key = Limits(tpm=1000, max_concurrency=5)
    big = req(key, tokens=500)
    assert (await limiter.admit(big)).allowed
    assert (await limiter.admit(req(key, tokens=500))).allowed
    assert not (await limiter.admit(req(key, tokens=400))).allowed
    await limiter.settle(big, used_tokens=100)
    total = bucket_keys("key-1")[1]
    assert int(await clients[0].get(total) or 0) == 600
    state = await snapshot(clients[0])
    await limiter.settle(big, used_tokens=100)
    await limiter.settle(big, used_tokens=0)
    await limiter.settle(big, used_tokens=None)
    assert await snapshot(clients[0]) == state
    a = await limiter.admit(req(key, tokens=400))
    assert a.allowed and a.remaining_tokens == 0
    b = await limiter.admit(req(key, tokens=1))
    assert not b.allowed and b.reason == "tokens" and 0 < b.retry_after_ms <= 60_000


async def test_settle_without_usage_keeps_the_reservation(
    clients: list[redis.asyncio.Redis], pipes: list[PipelinedRedis]
) -> None:
    limiter = RedisRateLimiter(pipes[0])
    r = req(Limits(tpm=1000, max_concurrency=1), tokens=700)
    assert (await limiter.admit(r)).allowed
    await limiter.settle(r, used_tokens=None)
    a = await limiter.admit(req(Limits(tpm=1000, max_concurrency=1), tokens=301))
    assert not a.allowed and a.reason == "tokens"  # the slot is free, the tokens are not
    assert a.remaining_tokens == 300


async def test_batch_leaves_headroom_for_interactive(
    clients: list[redis.asyncio.Redis], pipes: list[PipelinedRedis]
) -> None:
    limiters = [RedisRateLimiter(p) for p in pipes]
    batch = await burst(limiters, [req(Limits(rpm=10), priority=Priority.BATCH) for _ in range(30)])
    assert sum(a.allowed for a in batch) == 9
    rejected = [a for a in batch if not a.allowed]
    assert all(a.remaining_requests == 1 and 0 < a.retry_after_ms <= 60_000 for a in rejected)
    inter = await burst(limiters, [req(Limits(rpm=10)) for _ in range(5)])
    assert sum(a.allowed for a in inter) == 1
    tok = await burst(
        limiters,
        [req(Limits(tpm=1000), priority=Priority.BATCH, tokens=100, subject="k2") for _ in range(20)],
    )
    assert sum(a.allowed for a in tok) == 9


async def test_headers_are_consistent_across_calls(limiter: RedisRateLimiter) -> None:
    key = Limits(rpm=5, tpm=1000)
    seen = []
    for _ in range(5):
        a = await limiter.admit(req(key, tokens=10))
        assert a.allowed and a.retry_after_ms == 0
        h = ratelimit_headers(a)
        assert len(h) == 6
        assert all(GO_DURATION.match(h[f"x-ratelimit-reset-{k}"]) for k in ("requests", "tokens"))
        assert h["x-ratelimit-reset-requests"] == "1m0s"
        seen.append((int(h["x-ratelimit-remaining-requests"]), int(h["x-ratelimit-remaining-tokens"])))
    assert seen == [(4, 990), (3, 980), (2, 970), (1, 960), (0, 950)]
    a = await limiter.admit(req(key, tokens=10))
    assert not a.allowed and a.reason == "requests"
    assert a.remaining_requests == 0 and a.remaining_tokens == 950
    assert 0 < a.reset_requests_ms <= 60_000 and 0 < a.retry_after_ms <= a.reset_requests_ms
    assert GO_DURATION.match(ratelimit_headers(a)["x-ratelimit-reset-requests"])


async def test_every_key_carries_the_hash_tag_and_expires(
    clients: list[redis.asyncio.Redis], pipes: list[PipelinedRedis]
) -> None:
    limiter = RedisRateLimiter(pipes[0], lease_ttl_ms=5000)
    every = Limits(rpm=10, tpm=1000, max_concurrency=3)
    subjects = ["key-1", "we{ird}:key%", "plain"]
    for s in subjects:
        for model in ("gpt-x", "org/a:b", "{x}"):
            assert (await limiter.admit(req(every, every, subject=s, model_name=model))).allowed
    keys = [k.decode() async for k in clients[0].scan_iter(match="*")]
    assert len(keys) == 3 * (3 + 3 * 3)
    for s in subjects:
        mine = [k for k in keys if k.startswith(f"tail:rl:v2:{hash_tag(s)}:")]
        assert len(mine) == 12
        assert len({key_slot(k.encode()) for k in mine}) == 1
        assert key_slot(mine[0].encode()) == key_slot(hash_tag(s).encode())
    for k in keys:
        ttl = await clients[0].pttl(k)
        limit = 6000 if k.endswith(":conc") else 61_000
        assert 0 < ttl <= limit, (k, ttl)


async def test_no_limits_means_no_redis(tmp_path: Any) -> None:
    dead = PipelinedRedis(f"unix://{tmp_path}/nothing.sock")
    try:
        limiter = RedisRateLimiter(dead)
        r = req()
        assert await limiter.admit(r) == UNLIMITED
        await limiter.settle(r, used_tokens=5)
        await limiter.settle(req(Limits(rpm=3)), used_tokens=5)  # nothing to settle for rpm alone
        with pytest.raises(redis.exceptions.RedisError):
            await limiter.admit(req(Limits(rpm=1)))
    finally:
        await dead.close()


async def test_scripts_reload_after_script_flush(
    clients: list[redis.asyncio.Redis], pipes: list[PipelinedRedis]
) -> None:
    limiter = RedisRateLimiter(pipes[0])
    await limiter.prepare()
    r = req(Limits(max_concurrency=1))
    assert (await limiter.admit(r)).allowed
    await clients[0].script_flush()
    await limiter.settle(r, used_tokens=None)
    assert (await limiter.admit(req(Limits(max_concurrency=1)))).allowed


async def test_retry_after_points_at_the_entries_that_must_leave(limiter: RedisRateLimiter) -> None:
    key = Limits(rpm=2, tpm=300)
    assert (await limiter.admit(req(key, tokens=100))).allowed
    await asyncio.sleep(0.2)
    assert (await limiter.admit(req(key, tokens=200))).allowed
    a = await limiter.admit(req(key, tokens=1))  # the oldest admission must leave first
    assert a.reason == "requests" and 59_000 <= a.retry_after_ms <= 59_810
    assert a.retry_after_ms + 190 <= a.reset_requests_ms <= 60_000
    key = Limits(tpm=300)
    b = await limiter.admit(req(key, tokens=50))  # freeing the first 100 tokens is enough
    assert b.reason == "tokens" and 59_000 <= b.retry_after_ms <= 59_810
    c = await limiter.admit(req(key, tokens=250))  # needs both entries gone
    assert c.reason == "tokens" and b.retry_after_ms + 190 <= c.retry_after_ms <= 60_000


async def test_expired_entries_are_purged_and_subtracted(
    clients: list[redis.asyncio.Redis], pipes: list[PipelinedRedis]
) -> None:
    limiter = RedisRateLimiter(pipes[0])
    key = Limits(rpm=2, tpm=1000)
    old = req(key, tokens=600)
    assert (await limiter.admit(old)).allowed
    assert (await limiter.admit(req(key, tokens=300))).allowed
    assert not (await limiter.admit(req(key, tokens=200))).allowed
    # age the first admission past the window (as if 60 s had gone by for it)
    log, total, _ = bucket_keys("key-1")
    member = f"{old.request_id}|600"
    score = await clients[0].zscore(log, member)
    assert score is not None
    await clients[0].zadd(log, {member: score - 60_000})
    a = await limiter.admit(req(key, tokens=700))
    assert a.allowed and a.remaining_tokens == 0 and a.remaining_requests == 0
    assert int(await clients[0].get(total) or 0) == 1000
    assert await clients[0].zscore(log, member) is None
    assert await clients[0].zcard(log) == 2
    await limiter.settle(old, used_tokens=1)  # its entry left the window: nothing to adjust
    assert int(await clients[0].get(total) or 0) == 1000


async def test_a_settled_entry_leaves_the_window_with_its_used_tokens(
    clients: list[redis.asyncio.Redis], limiter: RedisRateLimiter
) -> None:
    key = Limits(tpm=1000)
    r = req(key, tokens=600)
    assert (await limiter.admit(r)).allowed
    await limiter.settle(r, used_tokens=250)
    log, total, _ = bucket_keys("key-1")
    assert await clients[0].zrange(log, 0, -1) == [f"{r.request_id}|250|s".encode()]
    assert int(await clients[0].get(total) or 0) == 250
    score = await clients[0].zscore(log, f"{r.request_id}|250|s")
    assert score is not None
    await clients[0].zadd(log, {f"{r.request_id}|250|s": score - 60_000})
    a = await limiter.admit(req(key, tokens=1000))
    assert a.allowed and a.remaining_tokens == 0
    assert int(await clients[0].get(total) or 0) == 1000


async def test_a_request_id_with_the_separator_is_parsed_from_the_end(limiter: RedisRateLimiter) -> None:
    key = Limits(tpm=100)
    odd = AdmissionRequest("key-1", "a|7|s|42", "gpt-x", 60, key, NONE)
    assert (await limiter.admit(odd)).allowed
    await limiter.settle(odd, used_tokens=10)
    a = await limiter.admit(req(key, tokens=90))
    assert a.allowed and a.remaining_tokens == 0


async def test_model_wide_limits_are_exact_across_keys_and_replicas(
    clients: list[redis.asyncio.Redis], pipes: list[PipelinedRedis]
) -> None:
    limiters = [RedisRateLimiter(p) for p in pipes]
    total = Limits(rpm=30, tpm=10_000, max_concurrency=40)
    reqs = [req(total=total, subject=f"key-{i % 7}", tokens=10) for i in range(120)]
    results = await burst(limiters, reqs)
    assert sum(a.allowed for a in results) == 30
    refused = [a for a in results if not a.allowed]
    assert {a.reason for a in refused} == {"total_requests"}
    assert "(all API keys together)" in rate_limit_message(refused[0], reqs[0])
    log, tot, conc = total_bucket_keys("gpt-x")
    assert await clients[0].zcard(log) == 30
    assert int(await clients[0].get(tot) or 0) == 300
    assert await clients[0].zcard(conc) == 30
    assert len({key_slot(k.encode()) for k in (log, tot, conc)}) == 1
    # settling frees the model-wide slots and corrects the tokens
    admitted = [r for r, a in zip(reqs, results, strict=True) if a.allowed]
    for r in admitted:
        await limiters[1].settle(r, used_tokens=4)
    assert await clients[0].zcard(conc) == 0
    assert int(await clients[0].get(tot) or 0) == 120


async def test_a_refusal_by_one_side_undoes_the_other(
    clients: list[redis.asyncio.Redis], limiter: RedisRateLimiter
) -> None:
    # the key refuses: the model-wide bucket must not keep the request
    key, total = Limits(rpm=2, max_concurrency=5), Limits(rpm=100, tpm=1000, max_concurrency=100)
    results = [await limiter.admit(req(key, total=total, tokens=10)) for _ in range(5)]
    assert [a.allowed for a in results] == [True, True, False, False, False]
    assert results[2].reason == "requests" and results[2].limit_requests == 2
    await limiter.drain()  # the undo was sent right after the answer
    log, tot, conc = total_bucket_keys("gpt-x")
    assert await clients[0].zcard(log) == 2
    assert int(await clients[0].get(tot) or 0) == 20
    assert await clients[0].zcard(conc) == 2
    # the model-wide bucket refuses: the key's own buckets must not keep it
    tight, roomy = Limits(tpm=25), Limits(rpm=5, max_concurrency=5)
    other = [
        await limiter.admit(req(roomy, total=tight, tokens=10, subject="key-2", model_name="gpt-y"))
        for _ in range(3)
    ]
    assert [a.allowed for a in other] == [True, True, False]
    assert other[2].reason == "total_tokens" and other[2].limit_tokens == 25
    await limiter.drain()
    own_log, _, own_conc = bucket_keys("key-2")
    assert await clients[0].zcard(own_log) == 2
    assert await clients[0].zcard(own_conc) == 2
