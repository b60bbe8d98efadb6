"""OpenTelemetry traces, seen by a collector: an OTLP/HTTP stand-in on 127.0.0.1:0.

The gateway runs under uvicorn with the real auth-service (mTLS gRPC, in-process), Redis
rate limiting and a fake OpenAI upstream; the client is the official ``openai`` SDK. The
spans are read back from the protobuf bodies the exporter posted, after the app's
lifespan ended (its shutdown flushes the batch processor).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tail_service.logging import request_id_var
from tail_service.proto import auth_pb2
from tail_service.redis_embedded import EmbeddedRedis
from tests.conftest import RunningApp, model_entry, serve_app
from tests.fakes.openai_upstream import FakeOpenAI
from tests.stack_fixtures import Stack

MODEL = "gpt-test"
PROMPT = "the-secret-prompt-7f3a9c"
SERVER, CLIENT = 2, 3  # Span.SpanKind in the OTLP protobuf


@dataclass
class Collector:
    """What an OTLP/HTTP collector received: raw bodies and their request headers."""

    url: str
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def spans(self) -> list[dict[str, Any]]:
        """Every exported span, flattened: name, ids (hex), kind, attributes, status code."""
        out = []
        for body in self.bodies:
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            for rs in req.resource_spans:
                resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append(
                            {
                                "name": s.name,
                                "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex(),
                                "kind": s.kind,
                                "attrs": {kv.key: _value(kv.value) for kv in s.attributes},
                                "status": s.status.code,
                                "resource": resource,
                            }
                        )
        return out


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@pytest.fixture
def collector() -> Iterator[Collector]:
    """A real HTTP server accepting ``POST /v1/traces`` (``application/x-protobuf``)."""
    server: ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            ok = self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf"
            if ok:
                got.bodies.append(body)
                got.headers.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(200 if ok else 400)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    got = Collector(f"http://127.0.0.1:{server.server_address[1]}/v1/traces")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        server.shutdown()
        server.server_close()


class _RpcLog(logging.Handler):
    """Records, per auth-service call, the request id in the logging context and the trace id."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.calls: list[tuple[str, str, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.calls.append((record.getMessage(), request_id_var.get(), getattr(record, "trace_id", None)))


@pytest.fixture
def rpc_log() -> Iterator[_RpcLog]:
    logger = logging.getLogger("tail_service.rpc.context")
    handler, level = _RpcLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _traced_settings(
    stack: Stack, upstream: FakeOpenAI, redis: EmbeddedRedis, collector: Collector, *, enabled: bool
) -> Any:
    return stack.gateway_settings(
        [model_entry(MODEL, upstream, max_retries=1)],
        ratelimit={"enabled": True},
        redis={"url": redis.url(), "timeout": 1},
        tracing={
            "enabled": enabled,
            "otlp_endpoint": collector.url,
            "headers": {"x-vendor-key": "vendor-secret-1"},
            "service_name": "tail-test",
        },
    )


def _key(stack: Stack) -> tuple[str, str]:
    resp = stack.admin_auth().CreateKey(
        auth_pb2.CreateKeyRequest(name="otel", tenant="acme", limits=auth_pb2.Limits(rpm=1000, tpm=10**6)),
        timeout=5,
    )
    return resp.api_key, resp.key.id


def _chat(app: RunningApp, api_key: str, **kw: Any) -> Any:
    client = openai.OpenAI(base_url=app.v1, api_key=api_key, max_retries=0, timeout=30)
    return client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=20,
        temperature=0.5,
        **kw,
    )


def _children(spans: list[dict[str, Any]], parent: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in spans if s["parent"] == parent["span_id"] and s["trace_id"] == parent["trace_id"]]


def test_one_trace_per_request_with_admission_and_attempt_spans(
    stack: Stack,
    upstream: FakeOpenAI,
    upstream_key: str,
    redis_server: EmbeddedRedis,
    collector: Collector,
    rpc_log: _RpcLog,
) -> None:
    api_key, key_id = _key(stack)
    trace_id, parent_id = os.urandom(16).hex(), os.urandom(8).hex()
    with serve_app(_traced_settings(stack, upstream, redis_server, collector, enabled=True)) as app:
        upstream.fail_next(1, 500)  # the first attempt fails; the retry answers
        raw = _chat(app, api_key, extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
        answer = raw.parse()
        rid = raw.headers["x-request-id"]
        streamed = list(
            openai.OpenAI(base_url=app.v1, api_key=api_key, max_retries=0).chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": PROMPT}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        with app.http() as http:
            missing = http.get("/v1/batches/batch_nope", headers={"authorization": f"Bearer {api_key}"})
    assert missing.status_code == 404
    spans = collector.spans()

    # the first request: one trace, continuing the caller's
    [server] = [s for s in spans if s["kind"] == SERVER and s["attrs"].get("tail.request_id") == rid]
    assert server["trace_id"] == trace_id and server["parent"] == parent_id
    assert server["name"] == "POST /v1/chat/completions"
    assert server["resource"]["service.name"] == "tail-test"
    assert (
        server["attrs"]
        | {
            "http.request.method": "POST",
            "http.route": "/v1/chat/completions",
            "http.response.status_code": 200,
            "tail.key_id": key_id,
        }
        == server["attrs"]
    )
    children = _children(spans, server)
    [admission] = [s for s in children if s["name"] == "tail.admission"]
    assert admission["attrs"]["tail.ratelimit.reserved_tokens"] > 20
    attempts = sorted((s for s in children if s["kind"] == CLIENT), key=lambda s: s["span_id"])
    assert len(attempts) == 2
    failed, ok = sorted(attempts, key=lambda s: "error.type" in s["attrs"], reverse=True)
    assert failed["attrs"]["error.type"] == "500"
    assert failed["attrs"]["http.response.status_code"] == 500
    assert failed["status"] == 2  # STATUS_CODE_ERROR
    assert ok["name"] == f"chat {MODEL}"
    assert "error.type" not in ok["attrs"]
    assert (
        ok["attrs"]
        | {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": MODEL,
            "gen_ai.response.model": answer.model,
            "gen_ai.response.id": answer.id,
            "gen_ai.request.max_tokens": 20,
            "gen_ai.request.temperature": 0.5,
            "gen_ai.usage.input_tokens": answer.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": answer.usage.completion_tokens,
            "gen_ai.response.finish_reasons": [answer.choices[0].finish_reason],
            "tail.deployment.id": f"{MODEL}#0",
            "tail.request_id": rid,
        }
        == ok["attrs"]
    )

    # the stream: its attempt span is described from the chunks
    [stream_attempt] = [
        s for s in spans if s["kind"] == CLIENT and s["attrs"].get("gen_ai.response.id") == streamed[0].id
    ]
    usage = streamed[-1].usage
    assert usage is not None
    assert stream_attempt["attrs"]["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert stream_attempt["attrs"]["gen_ai.response.finish_reasons"] == ["stop"]
    [stream_server] = [s for s in spans if s["span_id"] == stream_attempt["parent"]]
    assert stream_server["kind"] == SERVER

    # a routed path is named by its template, never by the id in it
    [get] = [s for s in spans if s["attrs"].get("http.request.method") == "GET"]
    assert get["name"] == "GET /v1/batches/{batch_id}"
    assert get["attrs"]["http.response.status_code"] == 404

    # auth-service saw the request id and the trace of the request that verified the key
    assert ("rpc /tail.auth.v1.AuthService/VerifyKey", rid, trace_id) in rpc_log.calls

    # no content and no secret anywhere in what was exported
    exported = b"".join(collector.bodies)
    for secret in (api_key, PROMPT, answer.choices[0].message.content, "vendor-secret-1", upstream_key):
        assert secret and secret.encode() not in exported
    assert all(h["x-vendor-key"] == "vendor-secret-1" for h in collector.headers)


def test_nothing_is_exported_when_tracing_is_off(
    stack: Stack,
    upstream: FakeOpenAI,
    upstream_key: str,
    redis_server: EmbeddedRedis,
    collector: Collector,
) -> None:
    api_key, _ = _key(stack)
    with serve_app(_traced_settings(stack, upstream, redis_server, collector, enabled=False)) as app:
        upstream.fail_next(1, 500)
        raw = _chat(app, api_key, extra_headers={"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"})
        assert raw.parse().choices[0].message.content
    assert collector.bodies == []


def test_a_collector_that_is_down_costs_the_client_nothing(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI
) -> None:
    """Export failures stay in the exporter's thread: requests still answer, shutdown ends."""
    app = make_app(
        [model_entry(MODEL, upstream)],
        tracing={"enabled": True, "otlp_endpoint": "http://127.0.0.1:9/v1/traces"},
    )
    for _ in range(3):
        r = httpx.post(
            app.v1 + "/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert r.status_code == 200


def _memory_tracer() -> tuple[Any, Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


async def test_step_spans_parent_the_model_calls_and_record_failures_without_messages() -> None:
    """Batch chunks and agent steps (``step_span``) are current spans: attempts nest under them."""
    from tail_service.core.spans import step_span, traced_call
    from tail_service.core.types import Deployment, Endpoint, ProxyRequest

    tracer, exporter = _memory_tracer()
    dep = Deployment("m#0", "m", "openai", "http://up/v1", "up-model", frozenset(Endpoint))
    req = ProxyRequest(Endpoint.EMBEDDING, "m", {"input": PROMPT})

    class Engine:
        def __init__(self) -> None:
            self.tracer = tracer

        @step_span(
            "tail.batch.chunk", "tail.batch.id", "tail.batch.first_line", result="tail.batch.lines_run"
        )
        async def run_chunk(self, batch_id: str, first: int) -> int:
            async def upstream() -> dict[str, Any]:
                return {"model": "up-model", "usage": {"prompt_tokens": 3, "total_tokens": 3}}

            await traced_call(self.tracer, req, dep, upstream())
            return 7

        @step_span("tail.agent.tool_call", "tail.agent.run_id", "tail.agent.step")
        async def tool_call(self, run_id: str, step_no: int) -> None:
            raise ValueError(PROMPT)

    engine = Engine()
    assert await engine.run_chunk("batch_1", 0) == 7
    with pytest.raises(ValueError):
        await engine.tool_call("run_1", 2)
    attempt, chunk, tool = exporter.get_finished_spans()
    assert attempt.parent is not None and attempt.parent.span_id == chunk.context.span_id
    assert attempt.name == "embeddings up-model"
    assert attempt.attributes["gen_ai.usage.input_tokens"] == 3
    assert dict(chunk.attributes) == {
        "tail.batch.id": "batch_1",
        "tail.batch.first_line": 0,
        "tail.batch.lines_run": 7,
    }
    assert tool.attributes["error.type"] == "ValueError"
    assert tool.attributes["tail.agent.step"] == 2
    assert not tool.events and PROMPT not in str(tool.to_json())


async def test_a_stream_attempt_cut_by_the_upstream_is_an_error_span() -> None:
    from tail_service.core.spans import trace_stream
    from tail_service.core.types import Deployment, Endpoint, ProxyRequest
    from tail_service.errors import ProviderStreamCut

    tracer, exporter = _memory_tracer()
    dep = Deployment("m#0", "m", "anthropic", "https://api.example.com", "claude", frozenset(Endpoint))

    async def chunks() -> Any:
        yield {"id": "msg_1", "model": "claude", "choices": [{"delta": {"content": "x"}}]}
        raise ProviderStreamCut("cut")

    stream = trace_stream(tracer, ProxyRequest(Endpoint.CHAT, "m", {}), dep, chunks())
    with pytest.raises(ProviderStreamCut):
        async for _ in stream:
            pass
    [span] = exporter.get_finished_spans()
    assert span.attributes["gen_ai.response.id"] == "msg_1"
    assert span.attributes["error.type"] == "ProviderStreamCut"
    assert span.attributes["server.port"] == 443
    assert span.status.status_code.name == "ERROR"
