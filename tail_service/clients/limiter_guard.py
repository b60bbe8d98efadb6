"""The Redis limiter behind a deadline, a circuit breaker and the configured failure policy.

Every admission waits at most ``redis.timeout`` for Redis. ``breaker_failures`` failures in
a row open the breaker: for ``breaker_reset`` seconds admissions do not call Redis at
all, so a dead Redis costs no latency; then one trial call decides whether to close it
again. Meanwhile a background probe pings Redis every ``breaker_probe_interval``
seconds and closes the breaker at the first answer, so a Redis that comes back (a
restart, a failover) enforces limits again within a fraction of a second, not after
the whole cooldown.
Failures of calls that were already in flight together count once: one slow moment
that times out 64 concurrent admissions is one failure, not 64, while a Redis that
stays dead fails three successive waves and opens the breaker within ~3 timeouts.
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

from tail_service.clients.ratelimit_redis import RedisRateLimiter
from tail_service.core.ratelimit import UNLIMITED, Admission, AdmissionRequest
from tail_service.errors import ServiceUnavailableError
from tail_service.settings import RedisSettings

log = logging.getLogger("tail_service.clients.limiter_guard")

_REDIS_ERRORS = (RedisError, TimeoutError, OSError)


class GuardedLimiter:
    """A :class:`~tail_service.core.ratelimit.RateLimiter` that applies the failure policy."""

    def __init__(
        self,
        inner: RedisRateLimiter,
        settings: RedisSettings,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._settings = settings
        self._monotonic = monotonic
        self._fails = 0
        self._last_failure = float("-inf")
        self._open_until = 0.0
        self.degraded_admissions = 0
        self._releases: set[asyncio.Task[None]] = set()
        self._probe: asyncio.Task[None] | None = None

    @property
    def breaker_open(self) -> bool:
        return self._open_until > self._monotonic()

    def _failed(self, exc: BaseException, sent_at: float) -> None:
        if sent_at < self._last_failure:
            return  # in flight with a failure already counted
        self._last_failure = self._monotonic()
        self._fails += 1
        if self._fails >= self._settings.breaker_failures and not self.breaker_open:
            self._open_until = self._monotonic() + self._settings.breaker_reset
            log.error("redis unavailable; circuit breaker open", extra={"error": type(exc).__name__})
            # a hung connection must not hold the trial call later: start afresh then
            self._inner.reset()
            if self._probe is None or self._probe.done():
                self._probe = asyncio.get_running_loop().create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        """Try Redis in the background while the breaker is open; close it at the first answer."""
        interval = self._settings.breaker_probe_interval
        wait = max(interval, self._settings.timeout, 0.25)
        while self.breaker_open:
            await asyncio.sleep(interval)
            if not self.breaker_open:
                return
            try:
                # loads the scripts too: a restarted Redis has none
                async with asyncio.timeout(wait):
                    await self._inner.prepare()
            except _REDIS_ERRORS:
                continue
            if self.breaker_open:
                self._open_until = 0.0
                self._fails = 0
                log.warning("redis answers again; circuit breaker closed")
            return

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
        sent_at = self._monotonic()
        try:
            admission = await self._inner.admit(req, timeout=self._settings.timeout)
        except asyncio.CancelledError:
            # The caller went away (a client disconnect) with the script sent: it may take a
            # slot nobody will settle. A settlement sent now follows it on the same
            # connection, so Redis applies it after the admission, whatever that was.
            self.settle_later(req, used_tokens=0, used_cost=0)
            raise
        except _REDIS_ERRORS as exc:
            self._failed(exc, sent_at)
            # The script may still run once Redis catches up and take a slot for a
            # request we did not count as admitted: give it back, in the background.
            self._release_later(req, 0, 0)
            return self._degraded()
        self._fails = 0
        return admission

    def settle_later(
        self, req: AdmissionRequest, *, used_tokens: int | None, used_cost: int | None = None
    ) -> None:
        """Settle with the limiter's next write; if Redis cannot take it, retry in the background."""
        if not req.limited:
            return
        if self.breaker_open:
            self._release_later(req, used_tokens, used_cost)
            return
        sent_at = self._monotonic()

        def failed(
            req: AdmissionRequest, used_tokens: int | None, used_cost: int | None, exc: BaseException
        ) -> None:
            if isinstance(exc, _REDIS_ERRORS):
                self._failed(exc, sent_at)
            else:
                log.error("settling an admission failed", extra={"error": type(exc).__name__})
            self._release_later(req, used_tokens, used_cost)

        self._inner.settle_later(req, used_tokens=used_tokens, used_cost=used_cost, on_error=failed)

    def _release_later(
        self, req: AdmissionRequest, used_tokens: int | None, used_cost: int | None = None
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._release(req, used_tokens, used_cost))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(
        self, req: AdmissionRequest, used_tokens: int | None, used_cost: int | None = None
    ) -> None:
        """Settle ``req`` despite the breaker, retrying with backoff for about a minute.

        Settling is idempotent, and it is repeated once after it first succeeds, for an
        admission script that reached Redis after the release did. Past the retries the
        slot's lease TTL is the last resort.
        """
        delay, confirmed = 0.5, False
        for _ in range(12):
            await asyncio.sleep(delay)
            try:
                await self._inner.settle(req, used_tokens=used_tokens, used_cost=used_cost, timeout=1.0)
            except _REDIS_ERRORS:
                delay = min(delay * 2, 10.0)
                continue
            if confirmed:
                return
            confirmed, delay = True, 2.0

    async def drain(self) -> None:
        """Wait (at most 2 s) for the settlements already sent to be answered."""
        if self.breaker_open:
            return
        try:
            await self._inner.drain(timeout=2.0)
        except _REDIS_ERRORS as exc:
            log.warning("settlements not confirmed at shutdown: %s", type(exc).__name__)

    async def close(self) -> None:
        """Stop the background releases (their slots fall back to the lease TTL)."""
        for task in list(self._releases):
            task.cancel()
        if self._probe is not None:
            self._probe.cancel()
        await self._inner.close()

    async def prepare(self) -> None:
        """Connect and load the scripts before the first request (best effort, 2 s)."""
        try:
            async with asyncio.timeout(2.0):
                await self._inner.prepare()
        except _REDIS_ERRORS as exc:
            log.warning("redis not reachable at start-up: %s", type(exc).__name__)

    async def health(self) -> dict[str, Any]:
        return {
            "status": "degraded" if self.breaker_open else "ok",
            "breaker": "open" if self.breaker_open else "closed",
            "failure_mode": self._settings.failure_mode,
            # settlements waiting for Redis to come back (a slot each, at most)
            "pending_releases": len(self._releases),
        }
