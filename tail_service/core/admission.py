"""Admission of one request: build the limiter's question, ask once, turn a no into a 429.

The tokens reserved up front are the prompt's exact count (offline tokenizer; a large
prompt is counted in a worker thread, so it never holds up the event loop) plus the
request's ``max_completion_tokens`` / ``max_tokens`` times ``n``, or ``default_max_tokens``
when it gives none (no client is forced to send one). After the answer, :meth:`Admitter.settle`
replaces the reservation with the tokens actually used and releases the concurrency
slot without holding up the response (the limiter sends it with its next command); it
runs exactly once per admitted request, however the request ended.

The limiter gets its own id for every admission (a per-process random prefix and a
counter), never the request id a client may choose: two requests sent with the same
``x-request-id`` must still count twice.

Budgets ride in the same admission: the request's worst-case cost (its prompt plus every
output token it may produce, at the model's price) is reserved against the key's budget
and its tenant's, and settled to the real cost (see :mod:`tail_service.core.budget`). A
budget that cannot take the worst case is a 429 ``insufficient_quota``.

A key with no limits and no budget and a model with no limits cost nothing here: no token
count, no Redis.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.trace import Tracer

from tail_service.core.budget import Budgets, budget_message
from tail_service.core.pricing import Pricing
from tail_service.core.ratelimit import (
    UNLIMITED,
    AdmissionRequest,
    Limits,
    Priority,
    RateLimiter,
    rate_limit_message,
    ratelimit_headers,
)
from tail_service.core.routing import ModelRouter
from tail_service.core.spans import NOOP_TRACER, admission_span, record_failure
from tail_service.core.token_counter import COUNT_INLINE_MAX_BYTES, TokenCounter, count_prompt
from tail_service.core.types import Endpoint, ProxyRequest
from tail_service.errors import QuotaExceededError, RateLimitError, TokenRateLimitError


@dataclass(slots=True)
class Ticket:
    """An admitted request, to be settled once."""

    request: AdmissionRequest
    settled: bool = False


class Admitter:
    """Rate-limit admission for the inference endpoints."""

    def __init__(
        self,
        limiter: RateLimiter,
        router: ModelRouter,
        counter: TokenCounter,
        *,
        default_max_tokens: int,
        pricing: Pricing | None = None,
        clock: Callable[[], float] = time.time,
        tracer: Tracer = NOOP_TRACER,
    ) -> None:
        self._limiter = limiter
        self._tracer = tracer
        self._router = router
        self._counter = counter
        self._default_max_tokens = default_max_tokens
        self.pricing = pricing or Pricing({})
        self._clock = clock
        self._budgets = Budgets()
        self._id_prefix = "a" + os.urandom(6).hex() + ":"
        self._ids = itertools.count()

    def _answer_tokens(self, req: ProxyRequest) -> int:
        """Tokens reserved for the answer: the limit asked for (or the default), times ``n``."""
        answer = req.params.max_output_tokens
        if answer is None:
            answer = 0 if req.endpoint is Endpoint.EMBEDDING else self._default_max_tokens
        return answer * req.params.n

    async def admit(
        self, req: ProxyRequest, priority: Priority = Priority.INTERACTIVE
    ) -> tuple[Ticket | None, dict[str, str]]:
        """Reserve capacity for ``req``: ``(ticket, rate-limit headers for the reply)``.

        The ticket is ``None`` when nothing limits the request (then there are no headers
        either). Raises a 429 (carrying the same headers) when there is no capacity. Runs
        under a ``tail.admission`` span.
        """
        span = admission_span(self._tracer)
        try:
            ticket, headers = await self._admit(req, priority)
            if ticket is not None and span.is_recording():
                span.set_attribute("tail.ratelimit.reserved_tokens", ticket.request.tokens)
            return ticket, headers
        except BaseException as exc:
            record_failure(span, exc)
            reason = getattr(exc, "reason", None)
            if isinstance(reason, str) and span.is_recording():
                span.set_attribute("tail.ratelimit.reason", reason)
            raise
        finally:
            span.end()

    async def _admit(self, req: ProxyRequest, priority: Priority) -> tuple[Ticket | None, dict[str, str]]:
        p = req.principal
        key_limits = Limits(p.rpm, p.tpm, p.max_concurrency)
        model_limits, total_limits = self._router.model_limits(req.model)
        budgeted = p.budget_usd > 0 or p.tenant_budget_usd > 0
        if not (key_limits.any or model_limits.any or total_limits.any or budgeted):
            return None, {}
        tokens = cost = 0
        budget = tenant_budget = None
        priced = budgeted and self.pricing.price(req.model) is not None
        if key_limits.tpm or model_limits.tpm or total_limits.tpm or priced:
            if req.body_bytes <= COUNT_INLINE_MAX_BYTES:  # the usual case: no coroutine to await
                prompt = self._counter.count_prompt(req.body, req.endpoint.value)
            else:
                prompt = await count_prompt(self._counter, req)
            answer_tokens = self._answer_tokens(req)
            tokens = prompt + answer_tokens
            if priced:
                cost = self.pricing.worst_case_nanos(req.model, prompt, answer_tokens)
        if budgeted:
            now = self._clock()
            budget = self._budgets.get(p.budget_usd, p.budget_period, now)
            tenant_budget = self._budgets.get(p.tenant_budget_usd, p.tenant_budget_period, now)
        ask = AdmissionRequest(
            subject=p.key_id,
            request_id=self._id_prefix + str(next(self._ids)),
            model=req.model,
            tokens=tokens,
            key_limits=key_limits,
            model_limits=model_limits,
            priority=priority,
            total_limits=total_limits,
            cost_nanos=cost,
            budget=budget,
            tenant=p.tenant,
            tenant_budget=tenant_budget,
        )
        answer = await self._limiter.admit(ask)
        if answer is UNLIMITED:  # admitted without being recorded: nothing to settle
            return None, {}
        headers = ratelimit_headers(answer)
        if not answer.allowed:
            reason = answer.reason or "requests"
            if reason.endswith("budget"):
                quota = QuotaExceededError(budget_message(answer, ask), should_retry=False, headers=headers)
                quota.reason = reason
                raise quota
            kind = TokenRateLimitError if reason.endswith("tokens") else RateLimitError
            exc = kind(
                rate_limit_message(answer, ask),
                retry_after=answer.retry_after_ms / 1000,
                headers=headers,
            )
            exc.reason = reason
            raise exc
        return Ticket(ask), headers

    def settle(self, ticket: Ticket | None, used_tokens: int | None, used_cost: int | None = None) -> None:
        """Hand the settlement to the limiter (exactly once per ticket); never waits.
        ``used_cost``: the real cost in nano-dollars (``None``: keep the worst case)."""
        if ticket is None or ticket.settled:
            return
        ticket.settled = True
        self._limiter.settle_later(ticket.request, used_tokens=used_tokens, used_cost=used_cost)

    async def drain(self) -> None:
        """Wait for the settlements on their way (at shutdown)."""
        await self._limiter.drain()
