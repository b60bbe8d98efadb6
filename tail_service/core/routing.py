"""Public model id -> deployments, and the per-deployment health that drives cooldowns.

The router is built once from config and is read-only afterwards, except for the small
:class:`DeploymentHealth` records that the proxy updates. Those live in process
memory on purpose: a cooldown is a local observation of an upstream's health, cheap
to rebuild, and not worth a Redis round trip on the hot path.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tail_service.core.ratelimit import Limits
from tail_service.core.types import Deployment, Endpoint
from tail_service.errors import InvalidRequestError, ModelNotFoundError

_ENDPOINT_PATHS = {
    Endpoint.CHAT: "/v1/chat/completions",
    Endpoint.COMPLETION: "/v1/completions",
    Endpoint.EMBEDDING: "/v1/embeddings",
}


_NO_LIMITS = (Limits(), Limits())


@dataclass(slots=True)
class DeploymentHealth:
    """Failure bookkeeping for one deployment (monotonic seconds)."""

    consecutive_fails: int = 0
    cooldown_until: float = 0.0


class ModelRouter:
    """Resolves a public model id to an ordered list of deployments to try.

    Order: deployments not cooling down first, drawn by weight without replacement (so
    load spreads by weight and each request still has every fallback); then the ones
    cooling down, soonest recovery first. The proxy gives cooling deployments a single
    probe attempt and no retries.
    """

    def __init__(
        self,
        deployments: Iterable[Deployment],
        *,
        monotonic: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self._by_model: dict[str, tuple[Deployment, ...]] = {}
        for dep in deployments:
            self._by_model[dep.model] = (*self._by_model.get(dep.model, ()), dep)
        self._health = {d.id: DeploymentHealth() for deps in self._by_model.values() for d in deps}
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._limits: dict[str, tuple[Limits, Limits]] = {}

    def models(self) -> list[tuple[str, str]]:
        """Public model ids with their ``owned_by``, in config order."""
        return [(name, deps[0].owned_by) for name, deps in self._by_model.items()]

    def model_limits(self, model: str) -> tuple[Limits, Limits]:
        """The limits configured for ``model`` (its first deployment's): per key, and for all
        keys together; none for an unknown model."""
        limits = self._limits.get(model)
        if limits is None:
            deps = self._by_model.get(model)
            if not deps:
                return _NO_LIMITS
            d = deps[0]
            limits = self._limits[model] = (
                Limits(d.rpm, d.tpm, d.max_concurrency),
                Limits(d.total_rpm, d.total_tpm, d.total_max_concurrency),
            )
        return limits

    def has_model(self, model: str) -> bool:
        return model in self._by_model

    def deployments(self, model: str, endpoint: Endpoint) -> tuple[Deployment, ...]:
        """All deployments of ``model`` in config order; 404 or 400 when unusable."""
        deps = self._by_model.get(model)
        if deps is None:
            raise ModelNotFoundError(model)
        usable = tuple(d for d in deps if endpoint in d.endpoints)
        if not usable:
            raise InvalidRequestError(
                f"The model `{model}` does not support {_ENDPOINT_PATHS[endpoint]}.",
                param="model",
                code="model_not_supported",
            )
        return usable

    def plan(self, model: str, endpoint: Endpoint) -> list[tuple[Deployment, bool]]:
        """The attempt order for one request: ``(deployment, healthy)`` pairs."""
        deps = self.deployments(model, endpoint)
        now = self._monotonic()
        if len(deps) == 1:
            return [(deps[0], True)]
        healthy = [d for d in deps if self._health[d.id].cooldown_until <= now]
        cooling = sorted(
            (d for d in deps if self._health[d.id].cooldown_until > now),
            key=lambda d: self._health[d.id].cooldown_until,
        )
        return [(d, True) for d in self._weighted_order(healthy)] + [(d, False) for d in cooling]

    def _weighted_order(self, deps: list[Deployment]) -> list[Deployment]:
        if len(deps) <= 1:
            return deps
        pool = list(deps)
        order = []
        while pool:
            total = sum(d.weight for d in pool)
            pick = self._rng.random() * total
            for i, d in enumerate(pool):
                pick -= d.weight
                if pick <= 0 or i == len(pool) - 1:
                    order.append(pool.pop(i))
                    break
        return order

    def record_success(self, dep: Deployment) -> None:
        h = self._health[dep.id]
        h.consecutive_fails = 0
        h.cooldown_until = 0.0

    def record_failure(self, dep: Deployment) -> None:
        """Count a failure; ``allowed_fails`` in a row start a cooldown of ``dep.cooldown`` s."""
        h = self._health[dep.id]
        h.consecutive_fails += 1
        if h.consecutive_fails >= dep.allowed_fails and dep.cooldown > 0:
            h.cooldown_until = self._monotonic() + dep.cooldown
            h.consecutive_fails = 0

    def health(self) -> dict[str, dict[str, float | int | bool]]:
        """Per-deployment state for ``/health``."""
        now = self._monotonic()
        return {
            dep_id: {
                "cooling_down": h.cooldown_until > now,
                "cooldown_remaining_s": round(max(0.0, h.cooldown_until - now), 3),
                "consecutive_fails": h.consecutive_fails,
            }
            for dep_id, h in self._health.items()
        }
