"""The shared rate limiter: exact sliding-window logs in Redis, one script call per admission.

Every replica of the gateway talks to the same Redis. :meth:`RedisRateLimiter.admit` is
one ``EVALSHA`` of ``lua/admit_v2.lua``, which reads the server clock (``TIME``,
millisecond precision; the clients' clocks are never used), drops entries older than
60 s, checks every applicable limit and, only if all pass, records the request in all of
them. Redis runs a script atomically, so the limits are exact however many replicas
admit at once. Settling is one ``EVALSHA`` of ``lua/settle_v2.lua`` that nobody waits
for: it is pipelined with the next admission through the same connection (or sent
within ``settle_delay``), so under load a request costs one round trip, not two.

Key layout (version ``v2``; every key of one API key shares the hash tag ``{<subject>}``,
so one script only touches one Redis Cluster slot; a model's bucket for all keys together
has the tag ``{<model>}`` and is asked by a second script call in the same write)::

    tail:rl:v2:{<subject>}:log          ZSET  "<id>|<tokens>" -> admitted at (ms)
    tail:rl:v2:{<subject>}:total        STRING the tokens of the log's members
    tail:rl:v2:{<subject>}:conc         ZSET  request id -> lease expiry (ms)
    tail:rl:v2:{<subject>}:m:<model>:log  ... the same three for the key's use of one model
    tail:rl:v2:total:{<model>}:log      ... the same three for one model over all keys
    tail:budget:v1:{<subject>}:<period>       STRING nano-dollars spent or reserved
    tail:budget:v1:{<subject>}:<period>:open  HASH   request id -> cost reserved, not settled
    tail:budget:v1:tenant:{<tenant>}:<period>  ... the same two for a tenant (a third call)

``%``, ``{`` and ``}`` in the subject are percent-encoded so the hash tag is exactly the
subject. Window keys expire 61 s after their last write and lease keys ``lease_ttl_ms +
1 s`` after theirs, so idle state disappears by itself; a lease that is never settled
(a dead replica) stops counting after ``lease_ttl_ms``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from importlib import resources

from tail_service.clients.redis_pipe import Script, SharedRedis
from tail_service.clients.redis_resp import Reply
from tail_service.core.ratelimit import (
    REASONS,
    UNLIMITED,
    WINDOW_MS,
    Admission,
    AdmissionRequest,
    Budget,
    Limits,
    Priority,
    combine,
)

#: prefix of every key this limiter writes (bump the version when the layout changes)
KEY_PREFIX = "tail:rl:v2:"
#: prefix of the budget counters
BUDGET_PREFIX = "tail:budget:v1:"
#: the per-bucket key suffixes, in the order the scripts expect them
BUCKET_SUFFIXES: tuple[str, ...] = ("log", "total", "conc")
#: how many (subject, model) key tuples are kept ready
_KEY_CACHE_SIZE = 4096
_NONE = Limits()

log = logging.getLogger("tail_service.clients.ratelimit_redis")

#: called with the request, its used tokens and the error when a settlement failed
SettleFailure = Callable[[AdmissionRequest, "int | None", "int | None", BaseException], None]


def hash_tag(subject: str) -> str:
    """``{<subject>}`` with ``%``, ``{`` and ``}`` percent-encoded (an injective mapping)."""
    if not subject:
        raise ValueError("the rate-limit subject must not be empty")
    safe = subject.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return "{" + safe + "}"


def bucket_keys(subject: str, model: str | None = None) -> tuple[str, ...]:
    """The three keys of the key's bucket (``model`` None) or of its bucket for ``model``.

    Order: ``log``, ``total``, ``conc``.
    """
    base = KEY_PREFIX + hash_tag(subject) + ":" + ("" if model is None else f"m:{model}:")
    return tuple(base + suffix for suffix in BUCKET_SUFFIXES)


def total_bucket_keys(model: str) -> tuple[str, ...]:
    """The three keys of ``model``'s bucket for all API keys together (hash tag ``{model}``)."""
    return tuple(f"{KEY_PREFIX}total:{hash_tag(model)}:{suffix}" for suffix in BUCKET_SUFFIXES)


def budget_keys(subject: str, budget: Budget, *, tenant: bool = False) -> tuple[str, str]:
    """The spent counter and open reservations of ``budget`` for a key (or a tenant)."""
    base = BUDGET_PREFIX + ("tenant:" if tenant else "") + hash_tag(subject) + ":" + budget.period
    return base, base + ":open"


def _read_script(name: str) -> Script:
    return Script(resources.files("tail_service.clients").joinpath("lua", name).read_text(encoding="utf-8"))


class RedisRateLimiter:
    """A :class:`~tail_service.core.ratelimit.RateLimiter` over a shared Redis.

    ``lease_ttl_ms``: how long a concurrency slot stays taken when its request is never
    settled (a crashed replica). ``batch_headroom`` (in [0, 1)): the fraction of every
    limit that batch requests must leave free, rounded up to whole requests/tokens/slots
    (so a limit of 1 admits no batch request at all when the headroom is above 0).
    ``settle_delay``: the longest a settlement waits to share a write with other commands.
    Redis errors propagate as :class:`redis.exceptions.RedisError`.
    """

    def __init__(
        self,
        client: SharedRedis,
        *,
        lease_ttl_ms: int = 600_000,
        batch_headroom: float = 0.1,
        settle_delay: float = 0.002,
    ) -> None:
        if lease_ttl_ms <= 0:
            raise ValueError(f"lease_ttl_ms must be positive: {lease_ttl_ms}")
        if not 0.0 <= batch_headroom < 1.0:
            raise ValueError(f"batch_headroom must be in [0, 1): {batch_headroom}")
        self._client = client
        self.lease_ttl_ms = lease_ttl_ms
        self.batch_headroom = batch_headroom
        self.settle_delay = settle_delay
        self._headroom_ppm = round(batch_headroom * 1_000_000)
        self._admit = _read_script("admit_v2.lua")
        self._settle = _read_script("settle_v2.lua")
        self._keys: dict[tuple[str, str], tuple[str, ...]] = {}

    async def prepare(self) -> None:
        """Load both scripts now (optional), so the first admission needs no fallback."""
        for script in (self._admit, self._settle):
            await self._client.load(script)

    def reset(self) -> None:
        """Drop the connection (the breaker calls this when Redis stops answering)."""
        self._client.reset()

    async def close(self) -> None:
        await self._client.close()

    async def drain(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a deadline, not asyncio.timeout
        """Return once every command sent so far (settlements included) is answered."""
        await self._client.barrier(timeout=timeout)

    def _keys_of(self, req: AdmissionRequest) -> tuple[str, ...]:
        cache_key = (req.subject, req.model)
        keys = self._keys.get(cache_key)
        if keys is None:
            if len(self._keys) >= _KEY_CACHE_SIZE:
                self._keys.clear()
            keys = self._keys[cache_key] = bucket_keys(req.subject) + bucket_keys(req.subject, req.model)
        return keys

    def _total_keys_of(self, model: str) -> tuple[str, ...]:
        """The model-wide bucket, twice (the scripts take two buckets of one slot; the second
        is given no limits)."""
        cache_key = ("", model)  # no API key id is empty
        keys = self._keys.get(cache_key)
        if keys is None:
            keys = self._keys[cache_key] = total_bucket_keys(model) * 2
        return keys

    def _admit_args(
        self, req: AdmissionRequest, first: Limits, second: Limits, budget: Budget | None = None
    ) -> tuple[str | int, ...]:
        args: tuple[str | int, ...] = (
            WINDOW_MS,
            req.request_id,
            req.tokens,
            self.lease_ttl_ms,
            self._headroom_ppm,
            1 if req.priority is Priority.BATCH else 0,
            first.rpm,
            first.tpm,
            first.max_concurrency,
            second.rpm,
            second.tpm,
            second.max_concurrency,
        )
        if budget is not None:
            args += (budget.limit_nanos, req.cost_nanos, budget.resets_at * 1000)
        return args

    def _calls(self, req: AdmissionRequest) -> list[tuple[str, tuple[str, ...], Budget | None]]:
        """The buckets ``req`` is checked in, one script call each: ``(scope, keys, budget)``
        for its own (key and key-per-model limits, the key's budget), the model's over all
        keys, and its tenant's budget."""
        calls: list[tuple[str, tuple[str, ...], Budget | None]] = []
        if req.key_limits.any or req.model_limits.any or req.budget is not None:
            keys = self._keys_of(req)
            if req.budget is not None:
                keys += budget_keys(req.subject, req.budget)
            calls.append(("own", keys, req.budget))
        if req.total_limits.any:
            calls.append(("total", self._total_keys_of(req.model), None))
        if req.tenant_budget is not None:
            bucket = tuple(f"{BUDGET_PREFIX}tenant:{hash_tag(req.tenant)}:{s}" for s in BUCKET_SUFFIXES)
            keys = bucket * 2 + budget_keys(req.tenant, req.tenant_budget, tenant=True)
            calls.append(("tenant", keys, req.tenant_budget))
        return calls

    async def admit(self, req: AdmissionRequest, *, timeout: float | None = None) -> Admission:  # noqa: ASYNC109 - a deadline, not asyncio.timeout
        """Admit or reject ``req`` in one round trip; without any limit, admit without I/O.

        A rejection records nothing (expired entries are still purged). ``timeout``:
        seconds until :class:`TimeoutError`.

        The model-wide limits and the tenant's budget live in buckets of their own (other
        Cluster slots), asked by more script calls in the same write, so still one round
        trip. When one bucket admits and another refuses, the admission is undone in those
        that admitted (sent at once, applied before anything this process sends later);
        meanwhile, for that one round trip, it holds capacity there that another request
        may be refused.
        """
        if not req.limited:
            return UNLIMITED
        plan = self._calls(req)
        sent = []
        for scope, keys, budget in plan:
            own = scope == "own"
            args = self._admit_args(
                req,
                req.key_limits if own else (req.total_limits if scope == "total" else _NONE),
                req.model_limits if own else _NONE,
                budget,
            )
            sent.append(self._client.evalsha(self._admit, keys, args, timeout=timeout))
        if len(sent) == 1:
            return _answer(await sent[0], scope=plan[0][0])
        raws = await asyncio.gather(*sent, return_exceptions=True)
        for raw in raws:
            if isinstance(raw, BaseException):
                # an admission that may have happened is given back by the caller's failure path
                raise raw
        answers = [_answer(raw, scope=scope) for raw, (scope, _, _) in zip(raws, plan, strict=True)]
        if any(a.allowed for a in answers) and not all(a.allowed for a in answers):
            for answer, (_, keys, _) in zip(answers, plan, strict=True):
                if answer.allowed:
                    self._cancel(req, keys)
        combined = answers[0]
        for answer in answers[1:]:
            combined = combine(combined, answer)
        return combined

    def _cancel(self, req: AdmissionRequest, keys: tuple[str, ...]) -> None:
        """Undo the admission of ``req`` in the buckets of ``keys``."""
        args = (req.request_id, req.tokens, "cancel", 0, 0, 0, 0, "")
        self._client.submit_script(self._settle, keys, args, _log_failure)

    def _settle_calls(
        self, req: AdmissionRequest, used_tokens: int | None, used_cost: int | None = None
    ) -> list[tuple[tuple[str, ...], tuple[str | int, ...]]]:
        if used_tokens is not None and used_tokens < 0:
            raise ValueError(f"used_tokens must not be negative: {used_tokens}")
        used: str | int = "" if used_tokens is None else used_tokens
        cost: str | int = "" if used_cost is None else max(0, used_cost)
        calls: list[tuple[tuple[str, ...], tuple[str | int, ...]]] = []
        k, m, t = req.key_limits, req.model_limits, req.total_limits
        flags = (k.tpm > 0, k.max_concurrency > 0, m.tpm > 0, m.max_concurrency > 0)
        for scope, keys, budget in self._calls(req):
            if scope == "own" and (any(flags) or budget is not None):
                calls.append((keys, (req.request_id, req.tokens, used, *(int(f) for f in flags), cost)))
            elif scope == "total" and (t.tpm or t.max_concurrency):
                args = (req.request_id, req.tokens, used, int(t.tpm > 0), int(t.max_concurrency > 0), 0, 0)
                calls.append((keys, args))
            elif scope == "tenant":
                calls.append((keys, (req.request_id, req.tokens, used, 0, 0, 0, 0, cost)))
        return calls

    async def settle(
        self,
        req: AdmissionRequest,
        *,
        used_tokens: int | None,
        used_cost: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - a deadline, not asyncio.timeout
    ) -> None:
        """Set the reservations of ``req`` to ``used_tokens`` and ``used_cost`` (``None``:
        keep them) and free its slot.

        One round trip, none when ``req`` has no token, concurrency or budget limit.
        Idempotent: once a request is settled, later calls change nothing. An entry that
        already left the window is not touched.
        """
        calls = self._settle_calls(req, used_tokens, used_cost)
        await asyncio.gather(*(self._client.evalsha(self._settle, *c, timeout=timeout) for c in calls))

    def settle_later(
        self,
        req: AdmissionRequest,
        *,
        used_tokens: int | None,
        used_cost: int | None = None,
        on_error: SettleFailure,
    ) -> None:
        """:meth:`settle` without waiting: sent with the next command, or within ``settle_delay``.

        ``on_error`` hears of a failure (Redis down, an error reply).
        """

        def done(reply: Reply) -> None:
            if isinstance(reply, BaseException):
                on_error(req, used_tokens, used_cost, reply)

        for keys, args in self._settle_calls(req, used_tokens, used_cost):
            self._client.submit_script(self._settle, keys, args, done, delay=self.settle_delay)


_OFFSETS = {"own": 0, "total": 6, "tenant": 0}


def _answer(raw: Reply, *, scope: str) -> Admission:
    """An admit script's reply; ``scope`` (own, total, tenant) names the reason."""
    allowed, reason, lr, rr, resr, lt, rt, rest, retry, *more = raw
    ok = allowed == 1
    name = None
    if not ok:
        name = ("tenant_budget" if scope == "tenant" else "budget") if reason == 7 else None
        name = name or REASONS[_OFFSETS[scope] + reason - 1]
    return Admission(
        allowed=ok,
        reason=name,
        limit_requests=lr,
        remaining_requests=rr,
        reset_requests_ms=resr,
        limit_tokens=lt,
        remaining_tokens=rt,
        reset_tokens_ms=rest,
        retry_after_ms=0 if ok else retry,
        budget_spent_nanos=int(more[0]) if more else 0,
    )


def _log_failure(reply: Reply) -> None:
    if isinstance(reply, BaseException):  # the entry then ages out of the window by itself
        log.warning("undoing a refused admission failed: %s", type(reply).__name__)
