"""Rate limiting: what a limiter is asked, what it answers, and how the answer is shown.

Pure: no I/O here. A :class:`RateLimiter` (``clients/ratelimit_redis.py`` is the shared
one) admits or rejects a request against the limits of its API key, of the key's use of
one model, and of that model over all keys together, over a sliding window of one minute:

- requests per minute (``rpm``): admissions in the last 60 s;
- tokens per minute (``tpm``): tokens reserved up front by admissions in the last 60 s,
  corrected to the real usage by :meth:`RateLimiter.settle`;
- concurrency (``max_concurrency``): admitted requests not settled yet.

The answer carries what the HTTP layer needs for the OpenAI ``x-ratelimit-*`` headers
(:func:`ratelimit_headers`), the 429 message (:func:`rate_limit_message`) and
``Retry-After``. All times are integer milliseconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

#: the window of the per-minute limits, in milliseconds
WINDOW_MS = 60_000

#: every value :attr:`Admission.reason` can take, in the order a limiter checks them
REASONS: tuple[str, ...] = (
    "requests",
    "tokens",
    "concurrency",
    "model_requests",
    "model_tokens",
    "model_concurrency",
    "total_requests",
    "total_tokens",
    "total_concurrency",
    "budget",
    "tenant_budget",
)


@dataclass(frozen=True, slots=True)
class Budget:
    """A budget in force for one admission: ``limit_nanos`` (nano-dollars) per ``period``.

    ``period`` names the period's counters (``d20261206``, ``m202612`` or ``all``);
    ``resets_at`` is the unix second it ends (0: never), after which its counters may go.
    """

    limit_nanos: int
    period: str
    resets_at: int = 0
    #: how the period reads in a message: "per day", "per month", "in total"
    label: str = "in total"
    #: the unix second the period began (0: always)
    starts_at: int = 0


@dataclass(frozen=True, slots=True)
class Limits:
    """One set of limits; ``0`` means no limit of that kind. Values must not be negative."""

    #: admissions per sliding minute
    rpm: int = 0
    #: tokens (reserved, then settled) per sliding minute
    tpm: int = 0
    #: requests in flight (admitted, not settled yet)
    max_concurrency: int = 0

    def __post_init__(self) -> None:
        if min(self.rpm, self.tpm, self.max_concurrency) < 0:
            raise ValueError(f"limits must not be negative: {self!r}")

    @property
    def any(self) -> bool:
        """Whether at least one kind is limited."""
        return bool(self.rpm or self.tpm or self.max_concurrency)


class Priority(enum.StrEnum):
    """How much of a limit a request may use."""

    #: a person is waiting: may use the whole limit
    INTERACTIVE = "interactive"
    #: background work: admitted only while a headroom of every limit stays free for interactive traffic
    BATCH = "batch"


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """One request asking to be admitted; pass the same object to ``settle`` later.

    ``subject`` is the API key id: all of its limiter state lives in one Redis Cluster
    hash slot, so it must not be empty. ``request_id`` must be unique per admission.
    ``tokens`` (>= 0) is reserved against the token limits up front: prompt tokens plus
    ``max_tokens`` (or a default when the client sent none).
    """

    subject: str
    request_id: str
    model: str
    tokens: int
    #: the key's own limits (from auth-service)
    key_limits: Limits
    #: limits from config, applied per key per model
    model_limits: Limits
    priority: Priority = Priority.INTERACTIVE
    #: limits from config for the model over all keys together (its capacity)
    total_limits: Limits = Limits()
    #: the most this request may cost (nano-dollars), reserved against the budgets
    cost_nanos: int = 0
    #: the key's budget
    budget: Budget | None = None
    #: the key's tenant and its budget (all the tenant's keys together)
    tenant: str = ""
    tenant_budget: Budget | None = None

    def __post_init__(self) -> None:
        if not self.subject:
            raise ValueError("the rate-limit subject (API key id) must not be empty")
        if self.tokens < 0 or self.cost_nanos < 0:
            raise ValueError(f"tokens and cost must not be negative: {self.tokens}, {self.cost_nanos}")
        if self.tenant_budget is not None and not self.tenant:
            raise ValueError("a tenant budget needs the tenant")

    @property
    def limited(self) -> bool:
        """Whether any limit applies at all (if not, a limiter admits without I/O)."""
        return (
            self.key_limits.any
            or self.model_limits.any
            or self.total_limits.any
            or self.budget is not None
            or self.tenant_budget is not None
        )


@dataclass(frozen=True, slots=True)
class Admission:
    """A limiter's answer.

    For requests and tokens, ``limit_*``/``remaining_*``/``reset_*_ms`` describe the
    tightest applicable limit of that kind (for a rejection: the limit that rejected, if
    it is of that kind). ``remaining_*`` counts this request when it was admitted.
    ``reset_*_ms`` is the time until the window holds nothing of the key's any more.
    A ``limit_*`` of 0 means no limit of that kind: its headers are omitted.
    """

    allowed: bool
    #: ``None`` when allowed, otherwise one of :data:`REASONS`
    reason: str | None
    limit_requests: int
    remaining_requests: int
    reset_requests_ms: int
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_ms: int
    #: 0 when allowed; otherwise the time until the request could fit, in (0, 60000]
    retry_after_ms: int = 0
    #: for a budget rejection: what was spent in the period before this request (nano-dollars)
    budget_spent_nanos: int = 0


#: the answer when no limit applies, or when the limiter let a request in without recording
#: it (Redis down, failing open): this very object means there is nothing to settle
UNLIMITED = Admission(True, None, 0, 0, 0, 0, 0, 0, 0)


def format_duration(ms: int) -> str:
    """``ms`` milliseconds as a Go-style duration, the way OpenAI's reset headers show them.

    ``0s``, ``12ms``, ``1s``, ``8.64s``, ``6m0s``, ``1h2m3s``. Negative values count as 0.
    The result always matches ``^(?=\\d)(\\d+h)?(\\d+m)?(\\d+(\\.\\d+)?(ms|us|µs|ns|s))?$``.
    """
    ms = max(0, int(ms))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    sec = f"{seconds}.{millis:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{sec}"
    if minutes:
        return f"{minutes}m{sec}"
    return sec


def ratelimit_headers(a: Admission) -> dict[str, str]:
    """The ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers of ``a``.

    A kind without a limit (``limit_* == 0``) contributes no headers.
    """
    headers: dict[str, str] = {}
    if a.limit_requests > 0:
        headers["x-ratelimit-limit-requests"] = str(a.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(max(0, a.remaining_requests))
        headers["x-ratelimit-reset-requests"] = format_duration(a.reset_requests_ms)
    if a.limit_tokens > 0:
        headers["x-ratelimit-limit-tokens"] = str(a.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, a.remaining_tokens))
        headers["x-ratelimit-reset-tokens"] = format_duration(a.reset_tokens_ms)
    return headers


def rate_limit_message(a: Admission, req: AdmissionRequest) -> str:
    """The OpenAI-style 429 message for the rejection ``a`` of ``req``.

    E.g. ``Rate limit reached for gpt-x on requests per min (RPM): Limit 50, Used 50,
    Requested 1. Please try again in 1.2s.``; a request larger than the whole token
    limit gets ``Request too large ...`` instead, since waiting cannot help it.
    """
    retry = f"Please try again in {format_duration(a.retry_after_ms)}."
    reason = a.reason or "requests"
    batch_note = (
        " Batch requests leave part of every limit to interactive traffic."
        if req.priority is Priority.BATCH
        else ""
    )
    everyone = " (all API keys together)" if reason.startswith("total_") else ""
    if reason.endswith("concurrency"):
        scope = reason.split("_")[0]
        limits = {"model": req.model_limits, "total": req.total_limits}.get(scope, req.key_limits)
        where = {
            "model": f"this API key on {req.model}",
            "total": f"{req.model} (all API keys together)",
        }.get(scope, "this API key")
        return (
            f"Too many concurrent requests for {where}: Limit {limits.max_concurrency} in flight. "
            f"{retry}{batch_note}"
        )
    if reason.endswith("tokens"):
        limit, used, requested = a.limit_tokens, a.limit_tokens - a.remaining_tokens, req.tokens
        if requested > limit:
            return (
                f"Request too large for {req.model} on tokens per min (TPM): Limit {limit}, "
                f"Requested {requested}. The input or output tokens must be reduced in order to run "
                "successfully."
            )
        kind = "tokens per min (TPM)"
    else:
        limit, used, requested = a.limit_requests, a.limit_requests - a.remaining_requests, 1
        kind = "requests per min (RPM)"
    return (
        f"Rate limit reached for {req.model}{everyone} on {kind}: Limit {limit}, Used {used}, "
        f"Requested {requested}. {retry}{batch_note}"
    )


def combine(first: Admission, second: Admission) -> Admission:
    """One answer from two limiters' answers on the same request (all limits must pass).

    The reason and the retry time are the first rejection's (the longest retry when both
    reject). For each kind, the headers describe the rejecting limit when it is of that
    kind, otherwise the one with the least remaining (then the smaller limit).
    """
    allowed = first.allowed and second.allowed
    rejecting = [a for a in (first, second) if not a.allowed]
    reason = rejecting[0].reason if rejecting else None

    def pick(kind: str) -> Admission:
        if rejecting and reason is not None and reason.endswith(kind):
            return rejecting[0]
        present = [a for a in (first, second) if getattr(a, f"limit_{kind}") > 0] or [first]
        return min(present, key=lambda a: (getattr(a, f"remaining_{kind}"), getattr(a, f"limit_{kind}")))

    req, tok = pick("requests"), pick("tokens")
    return Admission(
        allowed=allowed,
        reason=reason,
        limit_requests=req.limit_requests,
        remaining_requests=req.remaining_requests,
        reset_requests_ms=req.reset_requests_ms,
        limit_tokens=tok.limit_tokens,
        remaining_tokens=tok.remaining_tokens,
        reset_tokens_ms=tok.reset_tokens_ms,
        retry_after_ms=max((a.retry_after_ms for a in rejecting), default=0),
        budget_spent_nanos=rejecting[0].budget_spent_nanos if rejecting else 0,
    )


class RateLimiter(Protocol):
    """Admits requests against their limits and settles them when they end."""

    async def admit(self, req: AdmissionRequest) -> Admission:
        """Check every applicable limit and, only if all pass, record the request in all of them.

        A rejection records nothing. Raises :class:`~tail_service.errors.TailError` when
        the failure policy says so (fail-closed).
        """
        ...

    def settle_later(
        self, req: AdmissionRequest, *, used_tokens: int | None, used_cost: int | None = None
    ) -> None:
        """Replace the token reservation of ``req`` by ``used_tokens`` and its cost
        reservation by ``used_cost`` (``None``: keep them) and release its concurrency
        slot, without waiting for the backend.

        Call exactly once per admitted request, whatever its end: success, error,
        client disconnect or cut stream. Idempotent: a second call changes nothing.
        """
        ...

    async def drain(self) -> None:
        """Deliver the settlements still on their way (at shutdown)."""
        ...
