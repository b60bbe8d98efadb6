"""Pure-ASGI request-id, metrics and access-log middleware (no BaseHTTPMiddleware: it
would buffer streams).

Every response gets ``x-request-id``. An id sent by the platform's Gateway is kept if
it is sane (printable, at most 128 characters); otherwise one is minted as
``req_<32 hex>``. The id is put into ``scope["state"]`` for handlers and into the
logging context variable for log lines, and is forwarded upstream.

Each request also gets a :class:`~tail_service.core.types.RequestStats` in
``scope["state"]["stats"]``, which the handlers, the inference service, the proxy and
the SSE response fill in (key id, model, deployment, usage, cache verdict, a stream's
final status). When the response is complete (for a stream: when it ends) the middleware
hands it to the metrics and writes one access-log line.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tail_service.api.errors import error_response
from tail_service.core.types import RequestStats
from tail_service.errors import ClientDisconnected, TailError
from tail_service.logging import AccessLog, request_id_var

access_log = logging.getLogger("tail_service.access")
log = logging.getLogger("tail_service.api")

_HEADER = b"x-request-id"
#: the status recorded for a client that left before its answer (nginx's 499)
CLIENT_CLOSED = ClientDisconnected.status
#: the route label of a path no route matched
UNMATCHED = "other"

#: ``observe(route, status, started, ended, stats)``, times in ``perf_counter`` seconds
Observer = Callable[[str, int, float, float, RequestStats], None]


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
    """Assigns the request id, echoes it on the response, records the request's metrics and
    writes its access-log line.

    It also renders a bug (an exception no handler took) as the OpenAI 500 envelope
    naming the request id, so even that response carries ``x-request-id``. A client
    that disconnects before its answer is no bug: one INFO line, status 499.

    ``fast_paths`` are the paths served ahead of the router (their route template is the
    path itself); any other path is labelled by the route Starlette matched, else
    :data:`UNMATCHED`. ``models`` are the configured model names: the access log names
    any other model ``unknown``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        access_log_enabled: bool = False,
        observe: Observer | None = None,
        fast_paths: frozenset[str] = frozenset(),
        models: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.access_log = access_log_enabled
        self._access = AccessLog(access_log)
        self.observe = observe
        self.fast_paths = fast_paths
        self.models = models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = _incoming_id(scope) or "req_" + os.urandom(16).hex()
        stats = RequestStats()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["stats"] = stats
        token = request_id_var.set(rid)
        raw_id = rid.encode("ascii")
        status: list[int] = [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[Any] = list(message.get("headers", ()))
                headers.append((b"x-request-id", raw_id))
                message["headers"] = headers
                status[0] = message["status"]
            elif stats.stream and not stats.first_byte:
                stats.first_byte = time.perf_counter()
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
            final = stats.status or status[0]
            if final == CLIENT_CLOSED:
                log.info("client closed the connection (%s %s)", scope["method"], scope["path"])
            ended = time.perf_counter()
            route = self._route(scope)
            if self.observe is not None:
                self.observe(route, final, started, ended, stats)
            if self.access_log and access_log.isEnabledFor(logging.INFO):
                self._log(scope["method"], route, final, started, ended, stats)
            request_id_var.reset(token)

    def _route(self, scope: Scope) -> str:
        """The route template (never the raw path: it may carry ids)."""
        route = scope.get("route")
        if route is not None:
            path: str = getattr(route, "path", UNMATCHED)
            return path
        path = scope["path"]
        return path if path in self.fast_paths else UNMATCHED

    def _log(
        self, method: str, route: str, status: int, started: float, ended: float, stats: RequestStats
    ) -> None:
        """One line: fields, never the key, the prompt or the answer."""
        model = stats.model
        fields: dict[str, Any] = {
            "method": method,
            "route": route,
            "status": status,
            "ms": round((ended - started) * 1000, 2),
            "key_id": stats.key_id,
            "model": model if model in self.models else ("unknown" if model else "-"),
        }
        if stats.deployment:
            fields["deployment"] = stats.deployment
        if stats.first_byte:
            fields["ttft_ms"] = round((stats.first_byte - started) * 1000, 2)
        usage = stats.usage
        if usage is not None:
            fields["prompt_tokens"] = usage.prompt_tokens
            fields["completion_tokens"] = usage.completion_tokens
        if stats.cache:
            fields["cache"] = stats.cache
        self._access.write(request_id_var.get(), fields)
