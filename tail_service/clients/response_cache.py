"""The response cache in Redis: one GET per lookup, one SET with a TTL per store.

It shares the limiter's pipelined connection, so a lookup issued together with the
request's admission leaves in the same write (one round trip for both).

Best effort by design: a cache that cannot answer in time is a miss, and a store that
fails is dropped, so Redis trouble never fails a request.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from redis.exceptions import RedisError

from tail_service.clients.redis_pipe import SharedRedis

log = logging.getLogger("tail_service.clients.cache")


class RedisResponseCache:
    """:class:`~tail_service.core.cache.ResponseCache` on a shared Redis."""

    def __init__(self, client: SharedRedis, *, timeout: float) -> None:
        self._client = client
        self._timeout = timeout

    async def get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await self._client.execute_keyed(key, "GET", key, timeout=self._timeout)
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
            await self._client.execute_keyed(
                key,
                "SET",
                key,
                orjson.dumps(value),
                "PX",
                max(1, int(ttl * 1000)),
                timeout=max(self._timeout, 1.0),
            )
        except (RedisError, TimeoutError, OSError) as exc:
            log.debug("cache store failed: %s", type(exc).__name__)
