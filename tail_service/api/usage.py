"""``GET /v1/usage`` (the calling key's usage) and the organization view over every key.

Both answer in the bucketed shape of OpenAI's organization Usage API (see
:mod:`tail_service.core.usage_query`), from the usage ledger in the store.
"""

from __future__ import annotations

import hmac
import time

from starlette.requests import Request
from starlette.responses import Response

from tail_service.api.deps import authenticate, get_services, json_response
from tail_service.core.usage_query import GROUPS, parse_query, usage_page
from tail_service.errors import AuthenticationError, PermissionDeniedError
from tail_service.store.usage import UsageStore


async def key_usage(request: Request) -> Response:
    """``GET /v1/usage?start_time=&bucket_width=&group_by=``: this key's own usage."""
    services = get_services(request)
    principal = await authenticate(request, services)
    return await _answer(request, key_id=principal.key_id)


async def organization_usage(request: Request) -> Response:
    """``GET /v1/organization/usage/completions``: every key's usage, for the holder of
    ``usage.admin_token`` (as OpenAI's needs an admin key)."""
    services = get_services(request)
    presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not presented:
        raise AuthenticationError("This view needs the usage admin token.", code="invalid_api_key")
    token = services.settings.usage.admin_token
    if token is None:
        raise PermissionDeniedError(
            "The organization usage view is off: set usage.admin_token to use it.", code="admin_view_disabled"
        )
    if not hmac.compare_digest(presented.encode(), token.get_secret_value().encode()):
        raise AuthenticationError("This view needs the usage admin token.", code="invalid_api_key")
    return await _answer(request)


async def _answer(request: Request, *, key_id: str | None = None) -> Response:
    services = get_services(request)
    params: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        params.setdefault(name, []).append(value)
    query, end = parse_query(params, int(time.time()))
    rows = await services.store.run(
        UsageStore(services.store).sums,
        start=query.start,
        end=query.end,
        width=query.width,
        group_by=query.group_by,
        key_id=key_id,
        models=query.models,
    )
    return json_response(usage_page(query, end, rows))


_QUERY = [
    {"name": "start_time", "in": "query", "required": True, "schema": {"type": "integer", "minimum": 0}},
    {
        "name": "end_time",
        "in": "query",
        "required": False,
        "description": "after start_time; default: now",
        "schema": {"type": "integer", "minimum": 1},
    },
    {
        "name": "bucket_width",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["1m", "1h", "1d"], "default": "1d"},
    },
    {
        "name": "group_by",
        "in": "query",
        "required": False,
        "style": "form",
        "explode": True,
        "schema": {
            "type": "array",
            "items": {"type": "string", "enum": list(GROUPS)},
        },
    },
    {
        "name": "models",
        "in": "query",
        "required": False,
        "style": "form",
        "explode": True,
        "schema": {"type": "array", "items": {"type": "string"}},
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": "buckets per page: at most 1440 of 1m, 168 of 1h, 31 of 1d",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1440},
    },
    {
        "name": "page",
        "in": "query",
        "required": False,
        "description": "the next_page of a previous answer",
        "schema": {"type": "string"},
    },
]

OPENAPI: dict[tuple[str, str], dict[str, object]] = {
    ("GET", "/v1/usage"): {"parameters": _QUERY},
    ("GET", "/v1/organization/usage/completions"): {"parameters": _QUERY},
}
