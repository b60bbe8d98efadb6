"""``GET /v1/models`` and ``GET /v1/models/{model}`` (ids may contain ``/``)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tail_service.api.deps import authenticate, get_services, json_response
from tail_service.errors import ModelNotFoundError
from tail_service.services import Services


def _model(services: Services, model_id: str, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": services.started_at, "owned_by": owned_by}


async def list_models(request: Request) -> Response:
    """The models this key may use."""
    services = get_services(request)
    principal = await authenticate(request, services)
    data = [_model(services, mid, owner) for mid, owner in services.router.models() if principal.allows(mid)]
    return json_response({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    services = get_services(request)
    principal = await authenticate(request, services)
    model_id: str = request.path_params["model"]
    for mid, owner in services.router.models():
        if mid == model_id and principal.allows(mid):
            return json_response(_model(services, mid, owner))
    raise ModelNotFoundError(model_id)
