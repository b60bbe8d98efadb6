"""The response cache in Redis: one GET per lookup, one SET with a TTL per store.

Best effort by design: a cache that cannot answer in time is a miss, and a store that
fails is dropped, so Redis trouble never fails a request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import redis.asyncio
from redis.exceptions import RedisError

log = logging.getLogger("tail_service.clients.cache")


#: a single server or a cluster (the cache does single-key GET/SET only)
AnyRedis = redis.asyncio.Redis | redis.asyncio.RedisCluster


class RedisResponseCache:
    """:class:`~tail_service.core.cache.ResponseCache` on a shared Redis."""

    def __init__(self, client: AnyRedis, *, timeout: float) -> None:
        self._client = client
        self._timeout = timeout

    async def get(self, key: str) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(self._timeout):
                raw = await self._client.get(key)
        except (RedisError, TimeoutError, OSError) as exc:
            log.debug("cache lookup failed: %s", type(exc).__name__)
            return None
        if raw is None:
            return None
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None

    async def set(self, key: str, value: dict[str, Any], ttl: float) -> None:
        try:
            async with asyncio.timeout(max(self._timeout, 1.0)):
                await self._client.set(key, orjson.dumps(value), px=max(1, int(ttl * 1000)))
        except (RedisError, TimeoutError, OSError) as exc:
            log.debug("cache store failed: %s", type(exc).__name__)
