"""Pure-ASGI server span per HTTP request (installed only when tracing is on).

The span (kind SERVER, named ``{method} {route}``) continues the trace of an incoming
W3C ``traceparent`` and is made current for the whole request, streamed bodies included,
so admission, upstream attempts and the gRPC calls to auth-service are its children.
Attributes are the ``http.*`` / ``url.*`` semantic conventions plus ``tail.request_id``
(from :class:`~tail_service.api.middleware.RequestIdMiddleware`, which runs outside this
one) and ``tail.key_id`` (set in the request state by authentication). Never a header,
the query string, the key or the body.

The tracer comes from the app's :class:`~tail_service.services.Services` (built in the
lifespan); before start-up finished there is none and the request is passed on untraced.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = (b"traceparent", b"tracestate")


def _carrier(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The W3C trace-context headers of the request, for the propagator."""
    return {
        name.decode("latin-1"): value.decode("latin-1") for name, value in headers if name in _TRACE_HEADERS
    }


def route_template(scope: Scope, static: frozenset[str]) -> str | None:
    """The route the request matched, with ``{param}`` placeholders; ``None`` if none did.

    A path the router matched has its parameters in ``path_params``; the inference
    endpoints are dispatched before the router, by their exact (static) path.
    """
    params: dict[str, Any] | None = scope.get("path_params")
    path: str = scope["path"]
    if params and "endpoint" in scope:
        names = {str(value): "{" + name + "}" for name, value in params.items()}
        return "/".join(names.get(segment, segment) for segment in path.split("/"))
    return path if path in static else None


class TracingMiddleware:
    """Opens the server span of each HTTP request."""

    def __init__(self, app: ASGIApp, *, routes: frozenset[str]) -> None:
        self.app = app
        #: every route path the app serves (templates for those with parameters)
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = scope["app"].state.services if scope["type"] == "http" else None
        if services is None:
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        parent = _PROPAGATOR.extract(_carrier(scope["headers"]))
        span = services.tracer.start_span(method, context=parent, kind=SpanKind.SERVER)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException as exc:
            if span.is_recording():
                span.set_attribute("error.type", type(exc).__name__)
                span.set_status(StatusCode.ERROR)
            raise
        finally:
            otel_context.detach(token)
            if span.is_recording():
                self._describe(span, scope, method, status)
            span.end()

    def _describe(self, span: trace.Span, scope: Scope, method: str, status: int) -> None:
        state = scope.get("state") or {}
        attrs: dict[str, Any] = {
            "http.request.method": method,
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        route = route_template(scope, self.routes)
        if route is not None:
            attrs["http.route"] = route
            span.update_name(f"{method} {route}")
        if status:
            attrs["http.response.status_code"] = status
            if status >= 500:
                attrs["error.type"] = str(status)
                span.set_status(StatusCode.ERROR)
        if rid := state.get("request_id"):
            attrs["tail.request_id"] = rid
        stats = state.get("stats")
        if stats is not None and stats.key_id != "-":
            attrs["tail.key_id"] = stats.key_id
        span.set_attributes(attrs)
