#!/usr/bin/env python3
"""CPU cost of tracing per request, with tracing off and on, in-process.

    .venv/bin/python bench/tracing_bench.py --requests 20000

One "request" is what the gateway adds for tracing on the path of a non-streamed chat
completion: the server-span middleware (``tail_service.api.tracing``, installed only when
tracing is on) around a trivial ASGI app, and inside it the admission span and one
upstream attempt span with its ``gen_ai.*`` attributes. With tracing off the middleware
is absent and the spans come from the API's no-op tracer, exactly as the app factory
wires it. With it on, the batch processor's exporter encodes every span to the OTLP
protobuf (as the real one does, in its own thread) but sends nothing; the process CPU
time therefore includes that thread's encoding. Prints one JSON line, in µs per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import (  # noqa: E402
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Tracer  # noqa: E402

from tail_service.api.tracing import TracingMiddleware  # noqa: E402
from tail_service.core.spans import NOOP_TRACER, admission_span, answered, start_attempt  # noqa: E402
from tail_service.core.types import Deployment, Endpoint, ProxyRequest, RequestParams  # noqa: E402

DEP = Deployment(
    "gpt-test#0", "gpt-test", "openai", "http://127.0.0.1:9000/v1", "gpt-test", frozenset(Endpoint)
)
REQ = ProxyRequest(
    Endpoint.CHAT,
    "gpt-test",
    {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5},
    RequestParams(max_output_tokens=20),
    request_id="req_0123456789abcdef0123456789abcdef",
)
RESULT = {
    "id": "chatcmpl-1",
    "model": "gpt-test",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
}


class EncodingExporter(SpanExporter):
    """Encodes spans to the OTLP protobuf as the HTTP exporter does, then drops them."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


class _State:
    def __init__(self, tracer: Tracer) -> None:
        self.services = type("S", (), {"tracer": tracer})()


def make_app(tracer: Tracer | None, middleware: bool) -> Any:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        scope["state"]["key_id"] = "key_1"
        if tracer is None:  # the baseline: no tracing code at all
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        span = admission_span(tracer)
        span.end()
        attempt = start_attempt(tracer, REQ, DEP)
        answered(attempt, RESULT)
        attempt.end()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = type("App", (), {})()
    app.state = _State(tracer)
    handler = TracingMiddleware(inner, routes=frozenset({"/v1/chat/completions"})) if middleware else inner
    return app, handler


async def run(tracer: Tracer | None, middleware: bool, n: int) -> float:
    app, handler = make_app(tracer, middleware)
    headers = [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-x")]

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_m: Any) -> None:
        return None

    def scope() -> dict[str, Any]:
        return {
            "type": "http",
            "app": app,
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": headers,
            "state": {"request_id": "req_1"},
        }

    for _ in range(1000):  # warm up
        await handler(scope(), receive, send)
    started = time.process_time()
    for _ in range(n):
        await handler(scope(), receive, send)
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    n = parser.parse_args().requests
    base = asyncio.run(run(None, False, n))  # the same app without any tracing code
    off = asyncio.run(run(NOOP_TRACER, False, n))
    unexported = TracerProvider(shutdown_on_exit=False)  # spans made, no processor
    made = asyncio.run(run(unexported.get_tracer("bench"), True, n))
    exporter = EncodingExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    # a queue that holds a whole run: the bench measures cost, not the drop policy
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=4 * n))
    started = time.process_time()
    on_loop = asyncio.run(run(provider.get_tracer("bench"), True, n))
    provider.shutdown()  # flush: the exporter thread's encoding is counted below
    on_total = time.process_time() - started
    us = 1e6 / n
    print(
        json.dumps(
            {
                "requests": n,
                "baseline_us_per_request": round(base * us, 2),
                "off_us_per_request": round(off * us, 2),
                "on_us_per_request_spans_only": round(made * us, 2),
                "on_us_per_request_event_loop": round(on_loop * us, 2),
                "on_us_per_request_incl_export_thread": round(on_total * us, 2),
                "spans_exported": exporter.spans,
            }
        )
    )


if __name__ == "__main__":
    main()
