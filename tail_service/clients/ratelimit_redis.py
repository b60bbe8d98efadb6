"""The shared rate limiter: exact sliding-window logs in Redis, one script call per admission.

Every replica of the gateway talks to the same Redis (or Redis Cluster). :meth:`admit`
is one ``EVALSHA`` of ``lua/admit_v1.lua``, which reads the server clock (``TIME``,
millisecond precision; the clients' clocks are never used), drops entries older than
60 s, checks every applicable limit and, only if all pass, records the request in all
of them. Redis runs a script atomically, so the limits are exact however many replicas
admit at once. :meth:`settle` is one ``EVALSHA`` of ``lua/settle_v1.lua``.

Key layout (version ``v1``; every key of one API key shares the hash tag ``{<subject>}``,
so one script only touches one Cluster slot)::

    tail:rl:v1:{<subject>}:req        ZSET  request id -> admitted at (ms)
    tail:rl:v1:{<subject>}:tok        ZSET  request id -> admitted at (ms)
    tail:rl:v1:{<subject>}:tokamt     HASH  "a:<id>" -> tokens, "s:<id>" -> settled marker
    tail:rl:v1:{<subject>}:toktotal   STRING sum of the amounts in the window
    tail:rl:v1:{<subject>}:conc       ZSET  request id -> lease expiry (ms)
    tail:rl:v1:{<subject>}:m:<model>:req   ... the same five for the key's use of one model

``%``, ``{`` and ``}`` in the subject are percent-encoded so the hash tag is exactly the
subject. Window keys expire 61 s after their last write and lease keys ``lease_ttl_ms +
1 s`` after theirs, so idle state disappears by itself; a lease that is never settled
(a dead replica) stops counting after ``lease_ttl_ms``.
"""

from __future__ import annotations

from importlib import resources

import redis.asyncio

from tail_service.core.ratelimit import (
    REASONS,
    UNLIMITED,
    WINDOW_MS,
    Admission,
    AdmissionRequest,
    Priority,
)

#: prefix of every key this limiter writes (bump the version when the layout changes)
KEY_PREFIX = "tail:rl:v1:"
#: the per-bucket key suffixes, in the order the admit script expects them
BUCKET_SUFFIXES: tuple[str, ...] = ("req", "tok", "tokamt", "toktotal", "conc")


def hash_tag(subject: str) -> str:
    """``{<subject>}`` with ``%``, ``{`` and ``}`` percent-encoded (an injective mapping)."""
    if not subject:
        raise ValueError("the rate-limit subject must not be empty")
    safe = subject.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return "{" + safe + "}"


def bucket_keys(subject: str, model: str | None = None) -> tuple[str, ...]:
    """The five keys of the key's bucket (``model`` None) or of its bucket for ``model``.

    Order: ``req``, ``tok``, ``tokamt``, ``toktotal``, ``conc``.
    """
    base = KEY_PREFIX + hash_tag(subject) + ":" + ("" if model is None else f"m:{model}:")
    return tuple(base + suffix for suffix in BUCKET_SUFFIXES)


def _read_script(name: str) -> str:
    return resources.files("tail_service.clients").joinpath("lua", name).read_text(encoding="utf-8")


class RedisRateLimiter:
    """A :class:`~tail_service.core.ratelimit.RateLimiter` over a shared Redis.

    ``lease_ttl_ms``: how long a concurrency slot stays taken when its request is never
    settled (a crashed replica). ``batch_headroom`` (in [0, 1)): the fraction of every
    limit that batch requests must leave free, rounded up to whole requests/tokens/slots
    (so a limit of 1 admits no batch request at all when the headroom is above 0).
    Redis errors propagate as :class:`redis.exceptions.RedisError`.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        lease_ttl_ms: int = 600_000,
        batch_headroom: float = 0.1,
    ) -> None:
        if lease_ttl_ms <= 0:
            raise ValueError(f"lease_ttl_ms must be positive: {lease_ttl_ms}")
        if not 0.0 <= batch_headroom < 1.0:
            raise ValueError(f"batch_headroom must be in [0, 1): {batch_headroom}")
        self._client = client
        self.lease_ttl_ms = lease_ttl_ms
        self.batch_headroom = batch_headroom
        self._headroom_ppm = round(batch_headroom * 1_000_000)
        self._admit = client.register_script(_read_script("admit_v1.lua"))
        self._settle = client.register_script(_read_script("settle_v1.lua"))

    async def prepare(self) -> None:
        """Load both scripts now (optional), so the first admission needs no NOSCRIPT retry."""
        for script in (self._admit, self._settle):
            script.sha = await self._client.script_load(script.script)

    async def admit(self, req: AdmissionRequest) -> Admission:
        """Admit or reject ``req`` in one round trip; without any limit, admit without I/O.

        A rejection records nothing (expired entries are still purged).
        """
        if not req.limited:
            return UNLIMITED
        k, m = req.key_limits, req.model_limits
        keys = bucket_keys(req.subject) + bucket_keys(req.subject, req.model)
        args = (
            WINDOW_MS,
            req.request_id,
            req.tokens,
            self.lease_ttl_ms,
            self._headroom_ppm,
            1 if req.priority is Priority.BATCH else 0,
            k.rpm,
            k.tpm,
            k.max_concurrency,
            m.rpm,
            m.tpm,
            m.max_concurrency,
        )
        raw = await self._admit(keys=keys, args=args)
        allowed, reason, lr, rr, resr, lt, rt, rest, retry = (int(v) for v in raw)
        return Admission(
            allowed=bool(allowed),
            reason=None if allowed else REASONS[reason - 1],
            limit_requests=lr,
            remaining_requests=rr,
            reset_requests_ms=resr,
            limit_tokens=lt,
            remaining_tokens=rt,
            reset_tokens_ms=rest,
            retry_after_ms=0 if allowed else retry,
        )

    async def settle(self, req: AdmissionRequest, *, used_tokens: int | None) -> None:
        """Set the reservation of ``req`` to ``used_tokens`` (``None``: keep it) and free its slot.

        One round trip, none when ``req`` has neither a token nor a concurrency limit.
        Idempotent: once a request is settled, later calls change nothing. An amount whose
        entry already left the window is not touched.
        """
        if used_tokens is not None and used_tokens < 0:
            raise ValueError(f"used_tokens must not be negative: {used_tokens}")
        k, m = req.key_limits, req.model_limits
        flags = (k.tpm > 0, k.max_concurrency > 0, m.tpm > 0, m.max_concurrency > 0)
        if not any(flags):
            return
        key_b, model_b = bucket_keys(req.subject), bucket_keys(req.subject, req.model)
        keys = (*key_b[2:], *model_b[2:])
        args = (req.request_id, "" if used_tokens is None else used_tokens, *(int(f) for f in flags))
        await self._settle(keys=keys, args=args)
