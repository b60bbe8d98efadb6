"""The request boundary: parsed once, strictly; what goes upstream is what was validated.

A wrong JSON type for a field the spec types is a 400 ``invalid_request_error`` naming the
field, and nothing reaches the upstream: no retries, no fallback, and no cooldown for a
deployment because a client sent junk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tail_service.core.admission import Admitter
from tail_service.core.ratelimit import Admission, AdmissionRequest, Limits
from tail_service.core.routing import ModelRouter
from tail_service.core.types import Deployment, Endpoint, Principal, ProxyRequest
from tail_service.schemas.chat import ChatCompletionRequest
from tail_service.schemas.common import parse_body
from tests.conftest import RunningApp, model_entry
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.timeout(60)

USER_HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def two_deployments(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI, upstream_b: FakeOpenAI
) -> RunningApp:
    """One model on two upstreams; a deployment cools down after 2 failures in a row."""
    kw = {"allowed_fails": 2, "cooldown": 30}
    return make_app(
        [
            model_entry("gpt-test", upstream, **kw),
            model_entry("gpt-test", upstream_b, **kw),
            model_entry("embed-test", upstream, **kw),
        ]
    )


@pytest.fixture
def http(two_deployments: RunningApp) -> Iterator[httpx.Client]:
    with two_deployments.http() as client:
        yield client


def _assert_400(resp: httpx.Response, param: str) -> None:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert set(err) == {"message", "type", "param", "code"}


def _deployments(http: httpx.Client) -> dict[str, Any]:
    items: dict[str, Any] = http.get("/health").json()["dependencies"]["deployments"]["items"]
    return items


CHAT_BAD = [
    ({"stream": "true"}, "stream"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"n": 2.0}, "n"),
    ({"n": "2"}, "n"),
    ({"seed": False}, "seed"),
    ({"parallel_tool_calls": 0}, "parallel_tool_calls"),
    ({"stream": True, "stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_completion_tokens": 5.0}, "max_completion_tokens"),
    ({"temperature": "0.5"}, "temperature"),
    ({"logprobs": "false"}, "logprobs"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": 7}, "model"),
]


@pytest.mark.parametrize(("extra", "param"), CHAT_BAD, ids=[p for _, p in CHAT_BAD])
def test_chat_wrong_types_are_400_and_never_sent(
    http: httpx.Client, upstream: FakeOpenAI, upstream_b: FakeOpenAI, extra: dict[str, Any], param: str
) -> None:
    for _ in range(3):  # enough to cool down both deployments, were these counted
        resp = http.post("/v1/chat/completions", json={"model": "gpt-test", "messages": USER_HI, **extra})
        _assert_400(resp, param)
    assert upstream.requests == [] and upstream_b.requests == []
    assert not any(d["cooling_down"] or d["consecutive_fails"] for d in _deployments(http).values())
    ok = http.post("/v1/chat/completions", json={"model": "gpt-test", "messages": USER_HI, "n": 2})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "gpt-test", "prompt": "hi", "stream": "true"}, "stream"),
        ("/v1/completions", {"model": "gpt-test", "prompt": [True, 2]}, "prompt"),
        ("/v1/completions", {"model": "gpt-test", "prompt": "hi", "echo": "1"}, "echo"),
        ("/v1/embeddings", {"model": "embed-test", "input": [[1, 2.5]]}, "input"),
        ("/v1/embeddings", {"model": "embed-test", "input": [True]}, "input"),
        ("/v1/embeddings", {"model": "embed-test", "input": "x", "dimensions": "3"}, "dimensions"),
    ],
)
def test_other_endpoints_wrong_types(
    http: httpx.Client, upstream: FakeOpenAI, path: str, body: dict[str, Any], param: str
) -> None:
    resp = http.post(path, json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"].startswith(param)
    assert upstream.requests == []


def test_upstream_400s_never_cool_a_deployment_down(
    http: httpx.Client, upstream: FakeOpenAI, upstream_b: FakeOpenAI
) -> None:
    """A request the upstream refuses as the caller's fault is shown as is and not held against it."""
    for up in (upstream, upstream_b):
        up.fail_next(6, status=400)  # each may get all six
    for _ in range(6):
        resp = http.post("/v1/chat/completions", json={"model": "gpt-test", "messages": USER_HI})
        assert resp.status_code == 400, resp.text
    assert len(upstream.requests) + len(upstream_b.requests) == 6  # one attempt each: no retry, no fallback
    assert not any(d["cooling_down"] or d["consecutive_fails"] for d in _deployments(http).values())


def test_params_are_typed_from_the_validated_body() -> None:
    body = {
        "model": "m",
        "messages": USER_HI,
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 3,
        "max_tokens": 50,
        "max_completion_tokens": 20,
        "vendor_field": {"kept": True},
    }
    params = parse_body(ChatCompletionRequest, body)
    assert (params.stream, params.include_usage, params.n, params.max_output_tokens) == (True, True, 3, 20)
    assert body["vendor_field"] == {"kept": True}  # pass-through fields stay in the raw body


class _RecordingLimiter:
    """Answers every admission with "allowed" and keeps what it was asked."""

    def __init__(self) -> None:
        self.asked: list[AdmissionRequest] = []

    async def admit(self, req: AdmissionRequest) -> Admission:
        self.asked.append(req)
        return Admission(True, None, 0, 0, 0, 10_000, 9_000, 60_000)

    def settle_later(self, req: AdmissionRequest, *, used_tokens: int | None) -> None:
        pass

    async def drain(self) -> None:
        pass


class _Counter:
    def count_text(self, text: str, model: str) -> int:
        return len(text.split())

    def count_prompt(self, body: dict[str, Any], endpoint: str) -> int:
        return 7


async def test_reservation_covers_every_choice() -> None:
    dep = Deployment("m#0", "m", "openai", "http://127.0.0.1:9", "m", frozenset({Endpoint.CHAT}))
    limiter = _RecordingLimiter()
    admitter = Admitter(
        limiter, ModelRouter([dep], monotonic=lambda: 0.0), _Counter(), default_max_tokens=100
    )
    who = Principal("k", "t", tpm=10_000)
    for body, expected in [
        ({"model": "m", "messages": USER_HI, "n": 3, "max_tokens": 10}, 7 + 30),
        ({"model": "m", "messages": USER_HI, "n": 2}, 7 + 200),
        ({"model": "m", "messages": USER_HI, "max_completion_tokens": 5, "max_tokens": 99}, 7 + 5),
    ]:
        params = parse_body(ChatCompletionRequest, body)
        ticket, headers = await admitter.admit(ProxyRequest(Endpoint.CHAT, "m", body, params, principal=who))
        assert ticket is not None and headers
        assert limiter.asked[-1].tokens == expected
        assert limiter.asked[-1].key_limits == Limits(0, 10_000, 0)
