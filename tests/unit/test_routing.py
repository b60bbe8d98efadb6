"""The router's attempt order: weights, cooldown, and the single-deployment exception."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tail_service.core.routing import ModelRouter
from tail_service.core.types import Deployment, Endpoint
from tail_service.errors import InvalidRequestError, ModelNotFoundError

ALL = frozenset(Endpoint)


def dep(model: str, i: int, *, weight: float = 1.0, endpoints: frozenset[Endpoint] = ALL) -> Deployment:
    return Deployment(
        id=f"{model}#{i}",
        model=model,
        provider="openai",
        base_url="http://x/v1",
        upstream_model=model,
        endpoints=endpoints,
        weight=weight,
        allowed_fails=2,
        cooldown=10,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_unknown_model_and_unsupported_endpoint() -> None:
    r = ModelRouter([dep("emb", 0, endpoints=frozenset({Endpoint.EMBEDDING}))], monotonic=Clock())
    with pytest.raises(ModelNotFoundError):
        r.plan("nope", Endpoint.CHAT)
    with pytest.raises(InvalidRequestError) as info:
        r.plan("emb", Endpoint.CHAT)
    assert info.value.param == "model"


def test_weights_spread_first_choice() -> None:
    r = ModelRouter([dep("m", 0, weight=3), dep("m", 1, weight=1)], monotonic=Clock(), rng=random.Random(7))
    firsts = Counter(r.plan("m", Endpoint.CHAT)[0][0].id for _ in range(4000))
    share = firsts["m#0"] / 4000
    assert 0.70 < share < 0.80
    # every plan still holds every deployment, as fallbacks
    assert {d.id for d, _ in r.plan("m", Endpoint.CHAT)} == {"m#0", "m#1"}


def test_cooldown_moves_a_failing_deployment_last_until_it_expires() -> None:
    clock = Clock()
    r = ModelRouter(
        [dep("m", 0, weight=1000), dep("m", 1, weight=0.001)], monotonic=clock, rng=random.Random(1)
    )
    d0 = r.plan("m", Endpoint.CHAT)[0][0]
    assert d0.id == "m#0"
    r.record_failure(d0)
    assert r.plan("m", Endpoint.CHAT)[0][0].id == "m#0"  # one failure < allowed_fails
    r.record_failure(d0)
    plan = r.plan("m", Endpoint.CHAT)
    assert [(d.id, healthy) for d, healthy in plan] == [("m#1", True), ("m#0", False)]
    assert r.health()["m#0"]["cooling_down"] is True
    clock.now += 10.5
    assert r.plan("m", Endpoint.CHAT)[0] == (d0, True)


def test_success_resets_the_failure_count() -> None:
    r = ModelRouter([dep("m", 0), dep("m", 1)], monotonic=Clock())
    d0 = dep("m", 0)
    r.record_failure(d0)
    r.record_success(d0)
    r.record_failure(d0)
    assert r.health()["m#0"]["cooling_down"] is False


def test_a_single_deployment_is_never_benched() -> None:
    r = ModelRouter([dep("m", 0)], monotonic=Clock())
    for _ in range(5):
        r.record_failure(dep("m", 0))
    assert r.plan("m", Endpoint.CHAT) == [(dep("m", 0), True)]
