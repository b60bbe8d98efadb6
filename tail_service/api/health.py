"""``/health`` (every dependency and its state), ``/livez`` and ``/readyz`` for probes."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tail_service.api.deps import get_services, json_response


async def livez(request: Request) -> Response:
    """The process is up and its event loop answers."""
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready for traffic once the lifespan has built the services."""
    if getattr(request.app.state, "services", None) is None or getattr(request.app.state, "draining", False):
        return json_response({"status": "unavailable"}, status=503)
    return json_response({"status": "ok"})


async def health(request: Request) -> Response:
    """Each dependency with its state; ``degraded`` when any is not ``ok``."""
    services = get_services(request)
    names = list(services.health_checks)
    results = await asyncio.gather(*(services.health_checks[n]() for n in names), return_exceptions=True)
    deps: dict[str, Any] = {}
    for name, res in zip(names, results, strict=True):
        deps[name] = res if isinstance(res, dict) else {"status": "error", "detail": type(res).__name__}
    deployments = services.router.health()
    deps["deployments"] = {
        "status": "degraded" if any(d["cooling_down"] for d in deployments.values()) else "ok",
        "items": deployments,
    }
    overall = "ok" if all(d.get("status") == "ok" for d in deps.values()) else "degraded"
    return json_response({"status": overall, "dependencies": deps})
