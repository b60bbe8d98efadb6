"""The spans of the core: names, attributes and how an attempt's span ends.

The core is handed a :class:`~opentelemetry.trace.Tracer` (the ``opentelemetry-api``
package only: without an SDK provider it is a no-op) and never looks up a global one;
:mod:`tail_service.tracing` builds the real one in the app factory. With tracing off the
tracer is :data:`NOOP_TRACER`: starting a span then returns the shared invalid span, and
every helper here checks :meth:`~opentelemetry.trace.Span.is_recording` before it builds
a single attribute, so the cost per request is a few function calls.

Attributes follow the OpenTelemetry GenAI semantic conventions (``gen_ai.*``), plus a few
``tail.*`` ones. A span never carries content: no prompt or completion text, no tool
arguments or outputs, no API key, no header, and no error message (an upstream's message
may quote the prompt); failures are described by ``error.type`` and the status code only.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar
from urllib.parse import urlsplit

from opentelemetry.trace import NoOpTracer, Span, SpanKind, StatusCode, Tracer

from tail_service.core.types import Deployment, Endpoint, ProxyRequest
from tail_service.errors import ProviderHTTPError, TailError

#: the tracer of a service with tracing off
NOOP_TRACER: Tracer = NoOpTracer()

#: ``gen_ai.operation.name`` per endpoint
OPERATION = {
    Endpoint.CHAT: "chat",
    Endpoint.COMPLETION: "text_completion",
    Endpoint.EMBEDDING: "embeddings",
}

P = ParamSpec("P")
R = TypeVar("R")


def error_type(exc: BaseException) -> str:
    """``error.type`` for a failure: the upstream's HTTP status, a ``TailError``'s code or
    type, else the exception's class name (never its message)."""
    if isinstance(exc, ProviderHTTPError):
        return str(exc.status)
    if isinstance(exc, TailError):
        return exc.code or exc.type
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return type(exc).__name__


def record_failure(span: Span, exc: BaseException) -> None:
    """Mark ``span`` failed by ``exc`` (status ERROR, ``error.type``); it stays open."""
    if not span.is_recording():
        return
    span.set_attribute("error.type", error_type(exc))
    if isinstance(exc, ProviderHTTPError):
        span.set_attribute("http.response.status_code", exc.status)
    span.set_status(StatusCode.ERROR)


def start_attempt(tracer: Tracer, req: ProxyRequest, dep: Deployment) -> Span:
    """The span of one upstream attempt (``{operation} {upstream model}``, kind CLIENT).

    Not made current: nothing runs under it but the provider's own HTTP call.
    """
    operation = OPERATION[req.endpoint]
    span = tracer.start_span(f"{operation} {dep.upstream_model}", kind=SpanKind.CLIENT)
    if not span.is_recording():
        return span
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": dep.provider,
        "gen_ai.system": dep.provider,  # the older name, still read by many backends
        "gen_ai.request.model": dep.upstream_model,
        "tail.model": req.model,
        "tail.deployment.id": dep.id,
        "tail.request_id": req.request_id,
    }
    url = urlsplit(dep.base_url)
    if url.hostname:
        attrs["server.address"] = url.hostname
        attrs["server.port"] = url.port or (443 if url.scheme == "https" else 80)
    if req.params.max_output_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = req.params.max_output_tokens
    if req.params.n != 1:
        attrs["gen_ai.request.choice.count"] = req.params.n
    for name in ("temperature", "top_p"):
        value = req.body.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            attrs[f"gen_ai.request.{name}"] = value
    span.set_attributes(attrs)
    return span


def _usage(span: Span, usage: object) -> None:
    if isinstance(usage, Mapping):
        for ours, theirs in (
            ("gen_ai.usage.input_tokens", "prompt_tokens"),
            ("gen_ai.usage.output_tokens", "completion_tokens"),
        ):
            value = usage.get(theirs)
            if isinstance(value, int):
                span.set_attribute(ours, value)


def _head(span: Span, body: Mapping[str, Any]) -> None:
    for ours, theirs in (("gen_ai.response.id", "id"), ("gen_ai.response.model", "model")):
        value = body.get(theirs)
        if isinstance(value, str):
            span.set_attribute(ours, value)


def _finish_reasons(body: Mapping[str, Any]) -> list[str]:
    return [
        c["finish_reason"]
        for c in body.get("choices") or ()
        if isinstance(c, Mapping) and isinstance(c.get("finish_reason"), str)
    ]


def answered(span: Span, result: Mapping[str, Any]) -> None:
    """Describe a one-shot answer on its attempt span (id, model, usage, finish reasons)."""
    if not span.is_recording():
        return
    _head(span, result)
    _usage(span, result.get("usage"))
    reasons = _finish_reasons(result)
    if reasons:
        span.set_attribute("gen_ai.response.finish_reasons", reasons)


async def traced_stream(
    span: Span, chunks: AsyncGenerator[dict[str, Any], None]
) -> AsyncGenerator[dict[str, Any], None]:
    """``chunks`` passed through, described on ``span``, which ends when the stream does.

    Closing this generator closes ``chunks``. A stream closed by its reader (failover
    after a held-back preamble, a client gone) ends the span without an error.
    """
    reasons: list[str] = []
    first = True
    try:
        async for chunk in chunks:
            if first:
                _head(span, chunk)
                first = False
            if chunk.get("usage"):
                _usage(span, chunk["usage"])
            reasons += _finish_reasons(chunk)
            yield chunk
    except GeneratorExit:
        raise
    except BaseException as exc:
        record_failure(span, exc)
        raise
    finally:
        if reasons:
            span.set_attribute("gen_ai.response.finish_reasons", reasons)
        span.end()
        await chunks.aclose()


def trace_stream(
    tracer: Tracer, req: ProxyRequest, dep: Deployment, chunks: AsyncGenerator[dict[str, Any], None]
) -> AsyncGenerator[dict[str, Any], None]:
    """``chunks`` under an attempt span, or ``chunks`` itself when it would not be recorded."""
    span = start_attempt(tracer, req, dep)
    if not span.is_recording():
        span.end()
        return chunks
    return traced_stream(span, chunks)


async def traced_call(
    tracer: Tracer, req: ProxyRequest, dep: Deployment, call: Awaitable[dict[str, Any]]
) -> dict[str, Any]:
    """Await a one-shot provider call under an attempt span."""
    span = start_attempt(tracer, req, dep)
    try:
        result = await call
    except BaseException as exc:
        record_failure(span, exc)
        raise
    else:
        answered(span, result)
        return result
    finally:
        span.end()


class HasTracer(Protocol):
    """An engine whose steps are traced (see :func:`step_span`)."""

    @property
    def tracer(self) -> Tracer: ...


S = TypeVar("S", bound=HasTracer)


def step_span(
    name: str, *arg_attrs: str, result: str | None = None
) -> Callable[
    [Callable[Concatenate[S, P], Awaitable[R]]],
    Callable[Concatenate[S, P], Awaitable[R]],
]:
    """Run an engine's async step method under a span named ``name``, made current so the
    model calls it makes are its children.

    The step's positional arguments become the attributes named ``arg_attrs`` (ids and
    numbers only: never pass content), and its return value the attribute ``result`` when
    it is a plain number or string. A failure sets ``error.type`` and status ERROR; the
    exception itself (its message may hold content) is not recorded.
    """

    def decorate(
        fn: Callable[Concatenate[S, P], Awaitable[R]],
    ) -> Callable[Concatenate[S, P], Awaitable[R]]:
        @functools.wraps(fn)
        async def run(engine: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            with engine.tracer.start_as_current_span(
                name,
                attributes=dict(zip(arg_attrs, args, strict=False)),  # type: ignore[arg-type]
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    out = await fn(engine, *args, **kwargs)
                except BaseException as exc:
                    record_failure(span, exc)
                    raise
                if result is not None and isinstance(out, int | str) and span.is_recording():
                    span.set_attribute(result, out)
                return out

        return run

    return decorate


def admission_span(tracer: Tracer) -> Span:
    """The span of one admission (rate limits and budgets), started now."""
    return tracer.start_span("tail.admission", kind=SpanKind.INTERNAL)
