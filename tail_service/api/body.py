"""Reading and parsing a JSON request body: size-limited, parsed once with orjson."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from tail_service.errors import InvalidRequestError, RequestTooLargeError


async def read_json(request: Request, limit: int) -> tuple[dict[str, Any], int]:
    """``(the body as a JSON object, its size in bytes)``; 413 past ``limit`` bytes, 400 if it
    is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"The request body is larger than the {limit} byte limit.")
    # One chunk (the usual case) is used as is; more are appended as they arrive, so a large
    # body is never joined in one long step on the event loop.
    raw: bytes | bytearray = b""
    async for chunk in request.stream():
        if len(raw) + len(chunk) > limit:
            raise RequestTooLargeError(f"The request body is larger than the {limit} byte limit.")
        if not raw:
            raw = chunk
        else:
            if isinstance(raw, bytes):
                raw = bytearray(raw)
            raw += chunk
    if not raw:
        raise InvalidRequestError(
            "We could not parse the JSON body of your request: the body is empty.",
            code="invalid_json",
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request ({exc.msg} at position {exc.pos}).",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    return body, len(raw)
