"""The model proxy: retries, backoff, fallback, cooldown and streaming failover.

One policy for every adapter. For each request the router gives an attempt order.
Each healthy deployment gets ``1 + max_retries`` attempts on retryable failures (429,
408, 409, 5xx, connection errors, timeouts), sleeping with jittered exponential
backoff or for the upstream's ``Retry-After`` when it says so; then the next
deployment is tried. A deployment in cooldown gets one probe attempt. Errors that
are the caller's fault (other 4xx) end the request at once and are shown as they are.

Streams fail over until the first *meaningful* chunk (content, a tool call, a finish
reason or usage): a role-only preamble is held back, so an upstream that dies right
after its first event is still invisible to the client. After that, a failure is
raised as a :class:`~tail_service.errors.TailError` for the API layer to send in-band.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from opentelemetry.trace import Tracer

from tail_service.core.provider import Provider
from tail_service.core.routing import ModelRouter
from tail_service.core.spans import NOOP_TRACER, trace_stream, traced_call
from tail_service.core.types import Deployment, Endpoint, ProxyRequest, UpstreamCall
from tail_service.errors import (
    InvalidRequestError,
    ProviderConnectionError,
    ProviderError,
    ProviderHTTPError,
    ProviderNotInstalledError,
    ProviderStreamCut,
    ProviderTimeoutError,
    ProviderUnsupportedError,
    ServiceUnavailableError,
    TailError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)

log = logging.getLogger("tail_service.proxy")

#: the longest Retry-After we are willing to sleep on one deployment, in seconds
MAX_RETRY_WAIT = 30.0
#: Retry-After (s) on a 503 when the upstream gave no hint of its own
DEFAULT_UNAVAILABLE_RETRY = 1.0
BACKOFF_BASE = 0.25
BACKOFF_CAP = 8.0


class CredentialSource(Protocol):
    """Resolves a deployment's credential name to its plaintext value, from memory."""

    def get(self, name: str | None) -> str | None:
        """The credential, ``None`` when the deployment needs none.

        Raises :class:`~tail_service.errors.ServiceUnavailableError` when it is named
        but not (yet) available.
        """
        ...


class AttemptObserver(Protocol):
    """Told the outcome of every upstream attempt (the metrics implement it).

    Called on the event loop; must not block or raise.
    """

    def attempt(self, dep: Deployment, error: ProviderError | None, seconds: float) -> None:
        """``dep`` answered (``error`` is ``None``) or failed with ``error`` after ``seconds``.

        For a stream, ``seconds`` runs to its first meaningful chunk (the moment the proxy
        commits to the deployment), not to its end.
        """
        ...


def to_tail_error(exc: ProviderError, model: str) -> TailError:
    """Map the last provider failure of a request to what the client sees."""
    if isinstance(exc, ProviderHTTPError):
        if not exc.failover:
            # Keep the upstream's code and param: clients key on them
            # (e.g. ``context_length_exceeded``).
            err = exc.body.get("error") if isinstance(exc.body, dict) else None
            err = err if isinstance(err, dict) else {}
            code, param = err.get("code"), err.get("param")
            return UpstreamRejectedError(
                exc.message,
                upstream_status=exc.status,
                code=code if isinstance(code, str) else None,
                param=param if isinstance(param, str) else None,
            )
        if exc.status in (401, 403):
            return UpstreamError(
                f"The upstream for model `{model}` rejected the gateway's credentials (HTTP {exc.status}).",
                code="upstream_auth_error",
            )
        if exc.status in (429, 503, 529):
            return UpstreamUnavailableError(
                f"The upstream for model `{model}` is overloaded or rate limited "
                f"(HTTP {exc.status}): {exc.message}",
                retry_after=exc.retry_after if exc.retry_after is not None else DEFAULT_UNAVAILABLE_RETRY,
            )
        return UpstreamError(f"The upstream for model `{model}` failed with HTTP {exc.status}: {exc.message}")
    if isinstance(exc, ProviderTimeoutError):
        return UpstreamTimeoutError(f"The upstream for model `{model}` timed out: {exc.message}")
    if isinstance(exc, ProviderConnectionError):
        return UpstreamConnectionError(f"Could not reach the upstream for model `{model}`: {exc.message}")
    if isinstance(exc, ProviderStreamCut):
        return UpstreamError(
            f"The upstream stream for model `{model}` was cut: {exc.message}", code="upstream_stream_cut"
        )
    if isinstance(exc, ProviderUnsupportedError):
        return InvalidRequestError(exc.message, code="unsupported_parameter")
    if isinstance(exc, ProviderNotInstalledError):
        return ServiceUnavailableError(exc.message, code=exc.code)
    return UpstreamError(f"The upstream for model `{model}` answered badly: {exc.message}")


def _meaningful(chunk: dict[str, Any]) -> bool:
    """True once a chunk carries something beyond the role preamble."""
    if chunk.get("usage"):
        return True
    for choice in chunk.get("choices") or ():
        if choice.get("finish_reason") or choice.get("text"):
            return True
        delta = choice.get("delta")
        if delta and (
            delta.get("content")
            or delta.get("tool_calls")
            or delta.get("refusal")
            or delta.get("function_call")
        ):
            return True
        if choice.get("logprobs"):
            return True
    return False


async def _call_provider(provider: Provider, endpoint: Endpoint, call: UpstreamCall) -> dict[str, Any]:
    """The provider's one-shot method for ``endpoint``."""
    if endpoint is Endpoint.CHAT:
        return await provider.chat(call)
    if endpoint is Endpoint.COMPLETION:
        return await provider.completion(call)
    return await provider.embeddings(call)


def _open_provider_stream(
    provider: Provider, endpoint: Endpoint, call: UpstreamCall
) -> AsyncGenerator[dict[str, Any], None]:
    """The provider's streaming method for ``endpoint`` (chat or legacy completion)."""
    if endpoint is Endpoint.CHAT:
        return provider.chat_stream(call)
    if endpoint is Endpoint.COMPLETION:
        return provider.completion_stream(call)
    raise ProviderUnsupportedError(f"{endpoint.value} cannot be streamed")


class ModelProxy:
    """Sends a :class:`ProxyRequest` to the deployments of its model until one answers."""

    def __init__(
        self,
        router: ModelRouter,
        providers: Mapping[str, Provider],
        credentials: CredentialSource,
        *,
        request_timeout: float,
        monotonic: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        observer: AttemptObserver | None = None,
        tracer: Tracer = NOOP_TRACER,
    ) -> None:
        self.router = router
        self._providers = providers
        self._credentials = credentials
        self._request_timeout = request_timeout
        self._monotonic = monotonic
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._observer = observer
        #: one span per attempt (see :mod:`tail_service.core.spans`)
        self._tracer = tracer

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return max(0.0, retry_after)
        return float(min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt) * (0.5 + self._rng.random() / 2))

    def _call(self, req: ProxyRequest, dep: Deployment, remaining: float) -> UpstreamCall:
        body = req.body
        if body.get("model") != dep.upstream_model:
            body = {**body, "model": dep.upstream_model}
        return UpstreamCall(
            deployment=dep,
            body=body,
            api_key=self._credentials.get(dep.credential),
            request_id=req.request_id,
            timeout=min(dep.timeout, remaining),
            forward_headers=req.forward_headers,
        )

    async def _attempts(self, req: ProxyRequest) -> AsyncGenerator[tuple[Deployment, float], ProviderError]:
        """Yield ``(deployment, seconds left)`` per attempt; the caller sends back the failure.

        Implements the retry/backoff/fallback policy in one place for both the
        one-shot and the streaming paths. Raises the mapped error when attempts run out.
        """
        deadline = self._monotonic() + self._request_timeout
        last: ProviderError | None = None
        for dep, healthy in self.router.plan(req.model, req.endpoint):
            tries = 1 + (dep.max_retries if healthy else 0)
            for attempt in range(tries):
                started = self._monotonic()
                remaining = deadline - started
                if remaining <= 0:
                    break
                exc = yield dep, remaining
                last = exc
                if self._observer is not None:
                    self._observer.attempt(dep, exc, self._monotonic() - started)
                self._log_failure(req, dep, attempt, exc)
                if not exc.failover:
                    raise to_tail_error(exc, req.model)
                if not isinstance(exc, ProviderUnsupportedError | ProviderNotInstalledError):
                    self.router.record_failure(dep)
                if not exc.retryable or attempt == tries - 1:
                    break
                delay = self._backoff(attempt, exc.retry_after)
                if delay > MAX_RETRY_WAIT or self._monotonic() + delay >= deadline:
                    break
                await self._sleep(delay)
        if last is None:
            raise UpstreamTimeoutError(f"The request for model `{req.model}` ran out of time.")
        raise to_tail_error(last, req.model)

    @staticmethod
    def _log_failure(req: ProxyRequest, dep: Deployment, attempt: int, exc: ProviderError) -> None:
        log.warning(
            "upstream attempt failed",
            extra={
                "deployment": dep.id,
                "attempt": attempt,
                "error": type(exc).__name__,
                "detail": exc.message[:200],
                "retry_after": exc.retry_after,
            },
        )

    def _answered(self, req: ProxyRequest, dep: Deployment, started: float) -> None:
        self.router.record_success(dep)
        if req.stats is not None:
            req.stats.deployment = dep.id
        if self._observer is not None:
            self._observer.attempt(dep, None, self._monotonic() - started)

    async def call(self, req: ProxyRequest) -> tuple[dict[str, Any], Deployment]:
        """One-shot request: the provider's OpenAI-shaped answer and who gave it."""
        attempts = self._attempts(req)
        step = await anext(attempts)
        while True:
            dep, remaining = step
            started = self._monotonic()
            provider = self._providers[dep.provider]
            try:
                sent = _call_provider(provider, req.endpoint, self._call(req, dep, remaining))
                result = await traced_call(self._tracer, req, dep, sent)
            except ProviderError as exc:
                step = await attempts.asend(exc)
                continue
            except TimeoutError:
                step = await attempts.asend(ProviderTimeoutError(f"no answer within {remaining:.1f}s"))
                continue
            self._answered(req, dep, started)
            await attempts.aclose()
            return result, dep

    async def stream(self, req: ProxyRequest) -> AsyncGenerator[dict[str, Any], None]:
        """Stream chunks from the first deployment that produces a meaningful one.

        Failures before that point fail over; after it they raise a ``TailError``.
        Closing this generator closes the upstream stream at once.
        """
        deadline = self._monotonic() + self._request_timeout
        attempts = self._attempts(req)
        step = await anext(attempts)
        while True:
            dep, remaining = step
            started = self._monotonic()
            provider = self._providers[dep.provider]
            upstream = _open_provider_stream(provider, req.endpoint, self._call(req, dep, remaining))
            upstream = trace_stream(self._tracer, req, dep, upstream)
            held: list[dict[str, Any]] = []
            try:
                async with asyncio.timeout(remaining):
                    async for chunk in upstream:
                        held.append(chunk)
                        if _meaningful(chunk):
                            break
                    else:
                        raise ProviderStreamCut("the stream ended before any content")
            except ProviderError as exc:
                await upstream.aclose()
                step = await attempts.asend(exc)
                continue
            except TimeoutError:
                await upstream.aclose()
                step = await attempts.asend(ProviderTimeoutError(f"no first token within {remaining:.1f}s"))
                continue
            except BaseException:
                await upstream.aclose()
                raise
            break
        await attempts.aclose()
        self._answered(req, dep, started)
        try:
            for chunk in held:
                yield chunk
            async for chunk in upstream:
                if self._monotonic() > deadline:
                    raise UpstreamTimeoutError(
                        f"The stream for model `{req.model}` ran past the request timeout "
                        f"of {self._request_timeout:.0f}s."
                    )
                yield chunk
        except ProviderError as exc:
            raise to_tail_error(exc, req.model) from None
        finally:
            await upstream.aclose()
