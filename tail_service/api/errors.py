"""Exception handlers: everything a client sees as an error is the OpenAI envelope.

``TailError`` renders with its own status, type, code and param (bad input is always
a 400, never a 422); Starlette's 404/405 become OpenAI-shaped "Invalid URL" errors
(a 405 keeps the router's ``Allow`` header).
Anything else is a bug, rendered by the request-id middleware
as a 500 ``server_error`` that names the request id (traceback in the log only).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from tail_service.errors import (
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    RateLimitError,
    RequestTooLargeError,
    TailError,
)


def error_response(exc: TailError) -> Response:
    """The JSON error response for ``exc``, with retry headers when it has them."""
    headers = dict(exc.headers)
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(1, int(exc.retry_after + 0.999)))
        headers["retry-after-ms"] = str(int(exc.retry_after * 1000))
    if exc.should_retry is not None:
        headers["x-should-retry"] = "true" if exc.should_retry else "false"
    return Response(
        orjson.dumps(exc.body()), status_code=exc.http_status, headers=headers, media_type="application/json"
    )


def note_error(scope: Scope, exc: TailError) -> None:
    """Tell the request's stats what the metrics need of ``exc``: a 429's reason."""
    if isinstance(exc, RateLimitError):
        stats = scope["state"].get("stats")
        if stats is not None:
            stats.reject_reason = exc.reason


async def _tail_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TailError)
    note_error(request.scope, exc)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    url = f"{request.method} {request.url.path}"
    err: TailError
    if exc.status_code == 404:
        err = NotFoundError(f"Invalid URL ({url})")
    elif exc.status_code == 405:
        err = MethodNotAllowedError(f"Method not allowed ({url})", headers=dict(exc.headers or {}))
    elif exc.status_code == 413:
        err = RequestTooLargeError("The request body is too large.")
    elif exc.status_code < 500:
        err = InvalidRequestError(str(exc.detail))
    else:
        err = TailError(str(exc.detail))
    return error_response(err)


#: exception class -> handler, for the Starlette app
EXCEPTION_HANDLERS: dict[Any, Any] = {
    TailError: _tail_error,
    StarletteHTTPException: _http_error,
}
