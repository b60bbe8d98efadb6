"""Handlers for the three inference endpoints: parse, call one service, render."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tail_service.api.body import read_json
from tail_service.api.deps import (
    authenticate,
    cache_mode,
    get_services,
    json_response,
    proxy_request,
    request_id,
    request_stats,
)
from tail_service.api.sse import SSEResponse, race_disconnect
from tail_service.core.types import Endpoint, ProxyRequest
from tail_service.schemas.chat import ChatCompletionRequest
from tail_service.schemas.common import RequestSchema, parse_body
from tail_service.schemas.completions import CompletionRequest
from tail_service.schemas.embeddings import EmbeddingRequest
from tail_service.services import Services


async def _parse(
    request: Request, schema: type[RequestSchema], endpoint: Endpoint
) -> tuple[Services, ProxyRequest]:
    services = get_services(request)
    principal = await authenticate(request, services)
    body, size = await read_json(request, services.settings.server, services.large_body_gate)
    params = parse_body(schema, body)
    mode = cache_mode(request, "use" if principal.response_cache else services.settings.cache.default)
    stats = request_stats(request)
    return services, proxy_request(endpoint, body, params, request_id(request), principal, mode, size, stats)


async def _generate(request: Request, services: Services, req: ProxyRequest) -> Response | SSEResponse:
    if not req.params.stream:
        answer = await race_disconnect(request.receive, services.inference.complete(req))
        return json_response(answer.body, headers=answer.headers)
    # The first chunk is awaited before any byte is sent, so failures up to here are
    # ordinary JSON errors with a real status code.
    stream = await race_disconnect(request.receive, services.inference.open_stream(req))
    return SSEResponse(
        stream.first,
        stream.rest,
        request_id=req.request_id,
        keepalive=services.settings.server.sse_keepalive,
        headers=stream.headers,
    )


async def chat_completions(request: Request) -> Response | SSEResponse:
    """``POST /v1/chat/completions``: JSON, or SSE when ``stream`` is true."""
    services, req = await _parse(request, ChatCompletionRequest, Endpoint.CHAT)
    return await _generate(request, services, req)


async def completions(request: Request) -> Response | SSEResponse:
    """``POST /v1/completions`` (legacy): JSON, or SSE when ``stream`` is true."""
    services, req = await _parse(request, CompletionRequest, Endpoint.COMPLETION)
    return await _generate(request, services, req)


async def embeddings(request: Request) -> Response:
    """``POST /v1/embeddings``: float or base64 vectors, in input order."""
    services, req = await _parse(request, EmbeddingRequest, Endpoint.EMBEDDING)
    answer = await race_disconnect(request.receive, services.inference.embed(req))
    return json_response(answer.body, headers=answer.headers)
