"""Pure-ASGI request-id middleware (no BaseHTTPMiddleware: it would buffer streams).

Every response gets ``x-request-id``. An id sent by the platform's Gateway is kept if
it is sane (printable, at most 128 characters); otherwise one is minted as
``req_<32 hex>``. The id is put into ``scope["state"]`` for handlers and into the
logging context variable for log lines, and is forwarded upstream.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tail_service.api.errors import error_response
from tail_service.errors import ClientDisconnected, TailError
from tail_service.logging import request_id_var

access_log = logging.getLogger("tail_service.access")
log = logging.getLogger("tail_service.api")

_HEADER = b"x-request-id"
#: the status recorded for a client that left before its answer (nginx's 499)
CLIENT_CLOSED = ClientDisconnected.status


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _HEADER:
            if 0 < len(value) <= 128 and value.isascii():
                text: str = value.decode("ascii")
                if text.isprintable() and " " not in text:
                    return text
            return None
    return None


class RequestIdMiddleware:
    """Assigns the request id, echoes it on the response, and writes the access log.

    It also renders a bug (an exception no handler took) as the OpenAI 500 envelope
    naming the request id, so even that response carries ``x-request-id``. A client
    that disconnects before its answer is no bug: one INFO line, status 499.
    """

    def __init__(self, app: ASGIApp, *, access_log_enabled: bool = False) -> None:
        self.app = app
        self.access_log = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _incoming_id(scope) or "req_" + os.urandom(16).hex()
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        raw_id = rid.encode("ascii")
        status: list[int] = [0]
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[Any] = list(message.get("headers", ()))
                headers.append((b"x-request-id", raw_id))
                message["headers"] = headers
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # the client left while its request was being read: nobody to answer, no bug
            status[0] = status[0] or CLIENT_CLOSED
        except Exception as exc:
            log.exception("unhandled error", exc_info=exc)
            if status[0]:
                raise
            err = TailError(
                f"The server had an error processing your request (request id {rid}). Sorry about that!"
            )
            await error_response(err)(scope, receive, send_with_id)
        finally:
            if status[0] == CLIENT_CLOSED:
                log.info("client closed the connection (%s %s)", scope["method"], scope["path"])
            if self.access_log:
                access_log.info(
                    "%s %s %d",
                    scope["method"],
                    scope["path"],
                    status[0],
                    extra={"ms": round((time.perf_counter() - started) * 1000, 2)},
                )
            request_id_var.reset(token)
