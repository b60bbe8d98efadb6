"""Small accessors shared by the handlers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tail_service.core.types import (
    ANONYMOUS,
    Endpoint,
    Principal,
    ProxyRequest,
    RequestParams,
    RequestStats,
)
from tail_service.errors import InvalidRequestError
from tail_service.services import Services


def get_services(request: Request) -> Services:
    """The app's :class:`Services`, set by the lifespan."""
    services: Services = request.app.state.services
    return services


def bearer_token(request: Request) -> str | None:
    """The key in ``Authorization: Bearer <key>``, or ``None`` when there is none.

    Two ``Authorization`` headers are ambiguous (which one would a proxy in front of
    us have checked?): a 400, never a guess.
    """
    found: bytes | None = None
    for name, value in request.scope["headers"]:
        if name == b"authorization":
            if found is not None:
                raise InvalidRequestError(
                    "The request has more than one Authorization header; send exactly one.",
                    param="authorization",
                    code="ambiguous_credentials",
                )
            found = value
    if found is None:
        return None
    scheme, _, token = found.decode("latin-1").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def request_stats(request: Request) -> RequestStats | None:
    """The request's :class:`RequestStats` (set by the request-id middleware)."""
    stats: RequestStats | None = request.scope["state"].get("stats")
    return stats


async def authenticate(request: Request, services: Services) -> Principal:
    """The caller's principal (401 / 503 ``auth_unavailable`` as the authenticator decides).

    Its key id (never the key) goes in the request's stats, for the access log, the
    metrics and the server span.
    """
    principal = await services.auth.authenticate(bearer_token(request))
    stats = request_stats(request)
    if stats is not None:
        stats.key_id = principal.key_id
    return principal


def request_id(request: Request) -> str:
    return str(request.scope["state"]["request_id"])


_CACHE_MODES = frozenset({"use", "skip", "refresh"})


def cache_mode(request: Request, default: str) -> str:
    """The ``x-tail-cache`` request header (``use``, ``skip`` or ``refresh``), else ``default``."""
    for name, value in request.scope["headers"]:
        if name == b"x-tail-cache":
            mode: str = value.decode("latin-1").strip().lower()
            if mode not in _CACHE_MODES:
                raise InvalidRequestError(
                    "The x-tail-cache header must be use, skip or refresh.", param="x-tail-cache"
                )
            return mode
    return default


def proxy_request(
    endpoint: Endpoint,
    body: dict[str, Any],
    params: RequestParams,
    rid: str,
    principal: Principal = ANONYMOUS,
    cache: str = "skip",
    body_bytes: int = 0,
    stats: RequestStats | None = None,
) -> ProxyRequest:
    """Wrap a validated body and its typed parameters."""
    if stats is not None:
        stats.model = body["model"]
    return ProxyRequest(
        endpoint=endpoint,
        model=body["model"],
        body=body,
        params=params,
        request_id=rid,
        principal=principal,
        cache_mode=cache,
        body_bytes=body_bytes,
        stats=stats,
    )


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


def query_param(name: str, schema: dict[str, object], *, required: bool = False) -> dict[str, object]:
    """An OpenAPI query parameter (for the routes' ``OPENAPI`` additions)."""
    return {"name": name, "in": "query", "required": required, "schema": schema}


#: ``after`` and ``limit`` of a list paged by cursor, as OpenAI's lists take them
PAGE_PARAMS = [
    query_param("after", {"type": "string"}),
    query_param("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}),
]
