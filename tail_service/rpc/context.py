"""The request context of an incoming call: the caller's request id and trace context.

The gateway sends ``x-request-id`` and ``traceparent`` with every call
(:mod:`tail_service.clients.grpc_metadata`). :class:`RequestContextInterceptor` puts the
request id into the logging context variable for the duration of a unary call, so every
line the handler logs carries the id of the HTTP request that caused it, and logs the call
itself at DEBUG with the trace id (a log line, not a span: these services build no tracer
provider of their own).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from tail_service.logging import request_id_var

log = logging.getLogger("tail_service.rpc.context")

_MAX_ID = 128


def _sane(value: str | bytes) -> str | None:
    """The value as text if it is a printable id of at most 128 characters, else ``None``."""
    text = value if isinstance(value, str) else value.decode("ascii", "replace")
    if 0 < len(text) <= _MAX_ID and text.isascii() and text.isprintable() and " " not in text:
        return text
    return None


def caller_context(metadata: Any) -> tuple[str | None, str | None]:
    """``(request id, trace id)`` from a call's invocation metadata (``None`` if absent)."""
    rid = trace_id = None
    for key, value in metadata or ():
        if key == "x-request-id":
            rid = _sane(value)
        elif key == "traceparent":
            parts = (_sane(value) or "").split("-")
            if len(parts) == 4 and len(parts[1]) == 32:
                trace_id = parts[1]
    return rid, trace_id


class RequestContextInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Sets the request id of unary calls for logging; other calls pass through unchanged."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        rid, trace_id = caller_context(handler_call_details.invocation_metadata)
        if rid is None and trace_id is None:
            return handler
        method: str = handler_call_details.method
        inner = handler.unary_unary

        def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
            token = request_id_var.set(rid or "-")
            try:
                log.debug("rpc %s", method, extra={"trace_id": trace_id})
                return inner(request, context)
            finally:
                request_id_var.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
