"""The Redis limiter behind a deadline, a circuit breaker and the configured failure policy.

Every admission waits at most ``redis.timeout`` for Redis. ``breaker_failures`` failures in
a row open the breaker: for ``breaker_reset`` seconds Redis is not called at all, so a
dead Redis costs no latency; then one trial call decides whether to close it again.
While Redis cannot answer, ``failure_mode: open`` admits without limits (and without
rate-limit headers) and ``closed`` answers 503 ``rate_limiter_unavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from tail_service.core.ratelimit import UNLIMITED, Admission, AdmissionRequest, RateLimiter
from tail_service.errors import ServiceUnavailableError
from tail_service.settings import RedisSettings

log = logging.getLogger("tail_service.clients.admission")


class GuardedLimiter:
    """A :class:`~tail_service.core.ratelimit.RateLimiter` that applies the failure policy."""

    def __init__(
        self,
        inner: RateLimiter,
        settings: RedisSettings,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._settings = settings
        self._monotonic = monotonic
        self._fails = 0
        self._open_until = 0.0
        self.degraded_admissions = 0
        self._releases: set[asyncio.Task[None]] = set()

    @property
    def breaker_open(self) -> bool:
        return self._open_until > self._monotonic()

    def _failed(self, exc: BaseException) -> None:
        self._fails += 1
        if self._fails >= self._settings.breaker_failures:
            self._open_until = self._monotonic() + self._settings.breaker_reset
            log.error("redis unavailable; circuit breaker open", extra={"error": type(exc).__name__})

    def _degraded(self) -> Admission:
        self.degraded_admissions += 1
        if self._settings.failure_mode == "closed":
            raise ServiceUnavailableError(
                "Rate limiting is unavailable; please retry shortly.",
                code="rate_limiter_unavailable",
                retry_after=1.0,
            )
        return UNLIMITED

    async def admit(self, req: AdmissionRequest) -> Admission:
        if not req.limited:
            return UNLIMITED
        if self.breaker_open:
            return self._degraded()
        try:
            async with asyncio.timeout(self._settings.timeout):
                admission = await self._inner.admit(req)
        except (RedisError, TimeoutError, OSError) as exc:
            self._failed(exc)
            # The script may still run once Redis catches up and take a slot for a
            # request we did not count as admitted: give it back, in the background.
            self._release_later(req, 0)
            return self._degraded()
        self._fails = 0
        return admission

    async def settle(self, req: AdmissionRequest, *, used_tokens: int | None) -> None:
        """Settle now, or, if Redis cannot take it, keep retrying in the background."""
        if not req.limited:
            return
        if not self.breaker_open:
            try:
                async with asyncio.timeout(max(self._settings.timeout, 1.0)):
                    await self._inner.settle(req, used_tokens=used_tokens)
                return
            except (RedisError, TimeoutError, OSError) as exc:
                self._failed(exc)
        self._release_later(req, used_tokens)

    def _release_later(self, req: AdmissionRequest, used_tokens: int | None) -> None:
        task = asyncio.get_running_loop().create_task(self._release(req, used_tokens))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, req: AdmissionRequest, used_tokens: int | None) -> None:
        """Settle ``req`` despite the breaker, retrying with backoff for about a minute.

        Settling is idempotent, and it is repeated once after it first succeeds, for an
        admission script that reached Redis after the release did. Past the retries the
        slot's lease TTL is the last resort.
        """
        delay, confirmed = 0.5, False
        for _ in range(12):
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(1.0):
                    await self._inner.settle(req, used_tokens=used_tokens)
            except (RedisError, TimeoutError, OSError):
                delay = min(delay * 2, 10.0)
                continue
            if confirmed:
                return
            confirmed, delay = True, 2.0

    async def close(self) -> None:
        """Stop the background releases (their slots fall back to the lease TTL)."""
        for task in list(self._releases):
            task.cancel()

    async def prepare(self) -> None:
        """Connect and load the scripts before the first request (best effort, 2 s)."""
        prepare = getattr(self._inner, "prepare", None)
        if prepare is None:
            return
        try:
            async with asyncio.timeout(2.0):
                await prepare()
        except (RedisError, TimeoutError, OSError) as exc:
            log.warning("redis not reachable at start-up: %s", type(exc).__name__)

    async def health(self) -> dict[str, Any]:
        if self.breaker_open:
            return {"status": "degraded", "breaker": "open", "failure_mode": self._settings.failure_mode}
        return {"status": "ok", "breaker": "closed", "failure_mode": self._settings.failure_mode}
