"""Micro-benchmark: CPU per request of the request-id middleware with metrics and access log.

Run: ``python -m tests.observability.bench_request_path``. It drives the pure-ASGI
middleware around a trivial app (which fills the request stats as the inference
endpoints do) and prints microseconds per request for: nothing observed, metrics only,
and metrics plus the access log (plain and JSON lines written to /dev/null).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, TextIO

from tail_service.api.middleware import RequestIdMiddleware
from tail_service.core.types import TokenUsage
from tail_service.logging import log_handler
from tail_service.metrics import Metrics, RequestMetrics

N = 20_000
USAGE = TokenUsage(12, 34)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    stats = scope["state"]["stats"]
    stats.key_id = "key_123"
    stats.model = "gpt-test"
    stats.deployment = "gpt-test#0"
    stats.usage = USAGE
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": b"{}", "more_body": False})


async def receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


async def send(message: Any) -> None:
    return None


def scope() -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


async def per_request(mw: RequestIdMiddleware) -> float:
    for _ in range(1000):  # warm up: label children resolved, caches filled
        await mw(scope(), receive, send)
    t0 = time.process_time()
    for _ in range(N):
        await mw(scope(), receive, send)
    return (time.process_time() - t0) / N * 1e6


async def main(devnull: TextIO) -> None:
    metrics = Metrics(["gpt-test"])
    paths = frozenset({"/v1/chat/completions"})
    access = logging.getLogger("tail_service.access")
    access.propagate = False
    access.setLevel(logging.INFO)
    base = await per_request(RequestIdMiddleware(app, fast_paths=paths))
    observed = await per_request(
        RequestIdMiddleware(app, observe=RequestMetrics(metrics).observe, fast_paths=paths)
    )
    print(f"middleware alone          {base:6.2f} us/request")
    print(f"+ metrics                 {observed:6.2f} us/request  (+{observed - base:.2f})")
    for json in (False, True):
        handler = log_handler(devnull, json=json)
        access.addHandler(handler)
        mw = RequestIdMiddleware(
            app,
            access_log_enabled=True,
            observe=RequestMetrics(metrics).observe,
            fast_paths=paths,
            models=metrics.models,
        )
        logged = await per_request(mw)
        access.removeHandler(handler)
        kind = "json" if json else "plain"
        print(f"+ metrics + access ({kind:5}) {logged:6.2f} us/request  (+{logged - base:.2f})")


if __name__ == "__main__":
    with open(os.devnull, "w") as sink:
        asyncio.run(main(sink))
