"""Build deployments and provider adapters from settings. Holds no secrets itself."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import aiohttp

from tail_service.core.provider import Provider
from tail_service.core.types import Deployment, Endpoint
from tail_service.errors import ServiceUnavailableError
from tail_service.settings import LocalSettings, ModelEntry

if TYPE_CHECKING:
    from pydantic import SecretStr

_LOCAL_ENDPOINTS = {
    "smollm2-135m-instruct": frozenset({Endpoint.CHAT, Endpoint.COMPLETION}),
    "all-minilm-l6-v2": frozenset({Endpoint.EMBEDDING}),
}
_DEFAULT_ENDPOINTS = {
    "openai": frozenset(Endpoint),
    "anthropic": frozenset({Endpoint.CHAT, Endpoint.COMPLETION}),
}


def build_deployments(entries: Iterable[ModelEntry]) -> list[Deployment]:
    """One :class:`Deployment` per config entry, ids ``<name>#<n>`` in config order."""
    counts: dict[str, int] = {}
    out = []
    for e in entries:
        n = counts.get(e.name, 0)
        counts[e.name] = n + 1
        upstream = e.upstream_model or e.name
        if e.endpoints is not None:
            endpoints = frozenset(Endpoint(x) for x in e.endpoints)
        elif e.provider == "local":
            endpoints = _LOCAL_ENDPOINTS.get(upstream, frozenset())
        else:
            endpoints = _DEFAULT_ENDPOINTS[e.provider]
        out.append(
            Deployment(
                id=f"{e.name}#{n}",
                model=e.name,
                provider=e.provider,
                base_url=e.base_url,
                upstream_model=upstream,
                endpoints=endpoints,
                weight=e.weight,
                timeout=e.timeout,
                connect_timeout=e.connect_timeout,
                max_retries=e.max_retries,
                allowed_fails=e.allowed_fails,
                cooldown=e.cooldown,
                supports_dimensions=e.supports_dimensions,
                owned_by=e.owned_by or ("tail-service" if e.provider == "local" else e.provider),
                headers=tuple(e.headers.items()),
                rpm=e.rpm,
                tpm=e.tpm,
                max_concurrency=e.max_concurrency,
                total_rpm=e.total_rpm,
                total_tpm=e.total_tpm,
                total_max_concurrency=e.total_max_concurrency,
                credential=(
                    f"env:{e.api_key_env}"
                    if e.api_key_env
                    else f"secret:{e.api_key_secret}"
                    if e.api_key_secret
                    else None
                ),
            )
        )
    return out


class SecretLookup(Protocol):
    def get(self, name: str) -> str: ...


class Credentials:
    """Resolves a deployment's credential reference from memory, never from the network.

    ``env:NAME`` is an environment variable read once at settings load;
    ``secret:NAME`` is a secret-service secret kept fresh by the secrets client.
    """

    def __init__(self, env: dict[str, SecretStr], secrets: SecretLookup | None = None) -> None:
        self._env = env
        self._secrets = secrets

    def get(self, name: str | None) -> str | None:
        if name is None:
            return None
        kind, _, ref = name.partition(":")
        if kind == "secret" and self._secrets is not None:
            return self._secrets.get(ref)
        value = self._env.get(ref) if kind == "env" else None
        if value is None:
            raise ServiceUnavailableError(
                f"The credential `{ref}` is not available.", code="credential_unavailable"
            )
        return value.get_secret_value()


def build_providers(
    deployments: Iterable[Deployment], session: aiohttp.ClientSession, local: LocalSettings
) -> dict[str, Provider]:
    """Instantiate each adapter that some deployment uses (local models load lazily)."""
    deployments = list(deployments)
    needed = {d.provider for d in deployments}
    providers: dict[str, Provider] = {}
    if "openai" in needed:
        from tail_service.providers.openai_compat import OpenAICompatProvider

        providers["openai"] = OpenAICompatProvider(session)
    if "anthropic" in needed:
        from tail_service.providers.anthropic import AnthropicProvider

        providers["anthropic"] = AnthropicProvider(session)
    if "local" in needed:
        # Imported only when a local deployment is configured. It imports without the
        # `local` extra too: the engines (NumPy, onnxruntime, ...) load with the models.
        from tail_service.providers.local.provider import LocalProvider

        providers["local"] = LocalProvider(
            models={d.upstream_model for d in deployments if d.provider == "local"},
            chat_threads=local.chat_threads,
            embed_threads=local.embed_threads,
            max_embed_batch=local.max_embed_batch,
        )
    return providers
