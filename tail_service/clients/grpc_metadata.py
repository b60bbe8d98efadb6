"""The metadata every call to auth-service and secret-service carries: the request id and
the W3C trace context of the calling request.

The request id comes from the logging context variable the request-id middleware sets
(tasks inherit it, so a verification shared by several requests carries the first one's
id); ``traceparent`` / ``tracestate`` come from the current span, and are absent when
tracing is off. The servers log the id with the call (:mod:`tail_service.rpc.context`).
"""

from __future__ import annotations

from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tail_service.logging import request_id_var

#: the metadata key of the request id (gRPC keys are lower case)
REQUEST_ID_KEY = "x-request-id"
_PROPAGATOR = TraceContextTextMapPropagator()


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """``(key, value)`` pairs for the next call: nothing outside a request."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    rid = request_id_var.get()
    if rid != "-":
        carrier[REQUEST_ID_KEY] = rid
    return tuple(carrier.items())
