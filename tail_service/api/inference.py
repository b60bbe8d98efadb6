"""Handlers for the three inference endpoints: parse, call one service, render."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from pydantic import BaseModel
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
)
from tail_service.api.sse import SSEResponse, race_disconnect
from tail_service.core.types import Endpoint, ProxyRequest
from tail_service.errors import TailError, UpstreamError
from tail_service.schemas.chat import ChatCompletionRequest
from tail_service.schemas.common import validate_body
from tail_service.schemas.completions import CompletionRequest
from tail_service.schemas.embeddings import EmbeddingRequest
from tail_service.services import Services


async def _parse(
    request: Request, schema: type[BaseModel], endpoint: Endpoint
) -> tuple[Services, ProxyRequest]:
    services = get_services(request)
    principal = await authenticate(request, services)
    body = await read_json(request, services.settings.server.max_body_bytes)
    validate_body(schema, body)
    mode = cache_mode(request, "use" if principal.response_cache else services.settings.cache.default)
    return services, proxy_request(endpoint, body, request_id(request), principal, mode)


async def _generate(request: Request, services: Services, req: ProxyRequest) -> Response | SSEResponse:
    try:
        return await _generate_inner(request, services, req)
    except TailError as exc:
        _carry_reply_headers(exc, req)
        raise


def _carry_reply_headers(exc: TailError, req: ProxyRequest) -> None:
    """An error after admission still carries the rate-limit headers, as OpenAI's do."""
    if req.reply_headers:
        exc.headers = {**req.reply_headers, **exc.headers}


async def _generate_inner(request: Request, services: Services, req: ProxyRequest) -> Response | SSEResponse:
    if not req.stream:
        result = await race_disconnect(request.receive, services.inference.complete(req))
        return json_response(result, headers=req.reply_headers)
    chunks: AsyncGenerator[dict[str, Any], None] = services.inference.stream(req)
    try:
        # The first chunk is awaited before any byte is sent, so failures up to here
        # are ordinary JSON errors with a real status code.
        first = await race_disconnect(request.receive, anext(chunks))
    except StopAsyncIteration:
        raise UpstreamError("The upstream stream ended without any chunk.") from None
    except BaseException:
        await chunks.aclose()
        raise
    return SSEResponse(
        first,
        chunks,
        request_id=req.request_id,
        keepalive=services.settings.server.sse_keepalive,
        headers=req.reply_headers,
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
    try:
        result = await race_disconnect(request.receive, services.inference.embed(req))
    except TailError as exc:
        _carry_reply_headers(exc, req)
        raise
    return json_response(result, headers=req.reply_headers)
