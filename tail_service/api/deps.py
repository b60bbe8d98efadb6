"""Small accessors shared by the handlers."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tail_service.core.types import Endpoint, ProxyRequest
from tail_service.services import Services


def get_services(request: Request) -> Services:
    """The app's :class:`Services`, set by the lifespan."""
    services: Services = request.app.state.services
    return services


def request_id(request: Request) -> str:
    return str(request.scope["state"]["request_id"])


def proxy_request(endpoint: Endpoint, body: dict[str, Any], rid: str) -> ProxyRequest:
    """Wrap a validated body; the fields the proxy acts on are read once here."""
    opts = body.get("stream_options")
    return ProxyRequest(
        endpoint=endpoint,
        model=body["model"],
        body=body,
        stream=body.get("stream") is True,
        include_usage=isinstance(opts, dict) and opts.get("include_usage") is True,
        request_id=rid,
    )


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")
