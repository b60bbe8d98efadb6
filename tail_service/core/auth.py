"""Authentication as the core sees it: a protocol, and the model-access policy."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from typing import Protocol

from tail_service.core.types import Principal
from tail_service.errors import PermissionDeniedError


class Authenticator(Protocol):
    """Turns a presented API key into a :class:`Principal`.

    Raises :class:`~tail_service.errors.AuthenticationError` (401) for a key that is
    unknown, revoked or expired, and :class:`~tail_service.errors.ServiceUnavailableError`
    with code ``auth_unavailable`` (503) when it cannot tell. It never fails open.
    """

    async def authenticate(self, api_key: str | None) -> Principal: ...


class KeyDirectory(Protocol):
    """The current state of keys known by id (for work that outlives a request: batches)."""

    async def principals(self, key_ids: Iterable[str]) -> dict[str, Principal]:
        """Principals of the keys that are still valid; revoked and expired ones are absent.
        Raises :class:`~tail_service.errors.ServiceUnavailableError` when it cannot tell."""
        ...


def check_model_access(principal: Principal, model: str) -> None:
    """403 when the key may not use ``model`` (the model's existence is checked later)."""
    if not principal.allows(model):
        raise PermissionDeniedError(f"This API key is not allowed to use the model `{model}`.", param="model")


def principal_to_json(principal: Principal) -> str:
    """``principal`` as JSON (batches and agent runs keep the principal that created them)."""
    data = asdict(principal)
    data["allowed_models"] = sorted(principal.allowed_models)
    data["mcp_servers"] = sorted(principal.mcp_servers)
    data["tenant_mcp_servers"] = sorted(principal.tenant_mcp_servers)
    return json.dumps(data)


def principal_from_json(raw: str) -> Principal:
    """The principal :func:`principal_to_json` wrote; fields added since (budgets, the
    tenant's MCP servers) take their defaults when the JSON is older than they are."""
    data = json.loads(raw)
    for field in ("allowed_models", "mcp_servers", "tenant_mcp_servers"):
        data[field] = frozenset(data.get(field) or ())
    for field in ("budget_usd", "tenant_budget_usd"):
        if field in data:
            data[field] = float(data[field])
    return Principal(**data)
