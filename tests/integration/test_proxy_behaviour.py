"""Retry, fallback, cooldown, streaming failover and cancellation, seen from both ends.

The gateway runs under real uvicorn; the two fake OpenAI upstreams ``a`` and ``b`` answer
``"[a] ..."`` / ``"[b] ..."`` and record every request they get, so each test can assert
what the client saw *and* what the upstreams were sent.

To make "a is tried first" deterministic, deployment ``a`` gets an overwhelming weight
(the router draws the order by weight; the chance of ``b`` first is ~1e-12).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RunningApp, model_entry
from tests.fakes._sse import error_body
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.timeout(30)

USER_HI = [{"role": "user", "content": "hi"}]
A_FIRST = 1e6  # weight that puts deployment a first
B_LAST = 1e-6

MakeApp = Callable[..., RunningApp]


def one(make_app: MakeApp, up: FakeOpenAI, **kw: Any) -> RunningApp:
    """A gateway with model ``m`` on a single deployment."""
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 5)
    return make_app([model_entry("m", up, **kw)])


def two(make_app: MakeApp, a: FakeOpenAI, b: FakeOpenAI, a_kw: Any = None, b_kw: Any = None) -> RunningApp:
    """A gateway with model ``m`` on deployments a (tried first) then b; no retries by default."""
    base = {"max_retries": 0, "timeout": 5}
    return make_app(
        [
            model_entry("m", a, **{**base, "weight": A_FIRST, **(a_kw or {})}),
            model_entry("m", b, **{**base, "weight": B_LAST, **(b_kw or {})}),
        ]
    )


@pytest.fixture
def client_of() -> Iterator[Callable[[RunningApp], openai.OpenAI]]:
    clients: list[openai.OpenAI] = []

    def make(app: RunningApp) -> openai.OpenAI:
        clients.append(app.client())
        return clients[-1]

    yield make
    for c in clients:
        c.close()


def chat(c: openai.OpenAI, text: str = "hi") -> str:
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": text}])
    assert r.model == "m"
    return r.choices[0].message.content or ""


def assert_envelope(resp: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers.get("x-request-id")
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    assert err["code"] == code, err
    return err


def gap(up: FakeOpenAI, i: int = 0) -> float:
    """Seconds between the arrival of request i and request i+1 at ``up``."""
    return up.requests[i + 1].time - up.requests[i].time


# --------------------------------------------------------------------------------- (a) (b) retries


def test_500_then_success_is_retried_on_same_deployment(
    make_app: MakeApp, upstream: FakeOpenAI, client_of: Any
) -> None:
    app = one(make_app, upstream, max_retries=1)
    upstream.fail_next(1, 500)
    assert chat(client_of(app)) == "[a] hi"
    assert [r.fault for r in upstream.requests] == ["fail", None]


def test_retry_after_seconds_is_honoured(make_app: MakeApp, upstream: FakeOpenAI, client_of: Any) -> None:
    app = one(make_app, upstream, max_retries=1)
    upstream.fail_next(1, 429, headers={"Retry-After": "1"})
    assert chat(client_of(app)) == "[a] hi"
    assert len(upstream.requests) == 2
    assert 0.95 <= gap(upstream) < 3.0


def test_retry_after_ms_is_honoured_and_preferred(
    make_app: MakeApp, upstream: FakeOpenAI, client_of: Any
) -> None:
    app = one(make_app, upstream, max_retries=1)
    upstream.fail_next(1, 429, headers={"retry-after-ms": "600", "Retry-After": "5"})
    assert chat(client_of(app)) == "[a] hi"
    assert len(upstream.requests) == 2
    assert 0.55 <= gap(upstream) < 3.0  # 600 ms, not the 5 s of Retry-After


# -------------------------------------------------------------------------------- (c)-(e) failover


def test_503_fails_over_to_second_deployment(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b)
    upstream.fail_next(1, 503)
    assert chat(client_of(app)).startswith("[b]")
    assert [r.fault for r in upstream.requests] == ["fail"]
    assert len(upstream_b.requests) == 1
    assert upstream_b.requests[0].json["model"] == "m"


def test_connection_reset_fails_over(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b)
    upstream.reset_next(1)
    assert chat(client_of(app)) == "[b] hi"
    assert [r.fault for r in upstream.requests] == ["reset"]
    assert len(upstream_b.requests) == 1


def test_truncated_json_body_fails_over(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b)
    upstream.cut_stream_next(1)  # non-streaming: headers and half of the JSON, then close
    assert chat(client_of(app)) == "[b] hi"
    assert [r.fault for r in upstream.requests] == ["cut"]


def test_slow_deployment_times_out_and_falls_back(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b, a_kw={"timeout": 0.5})
    upstream.delay_next(1, 3)
    started = time.monotonic()
    assert chat(client_of(app)) == "[b] hi"
    assert time.monotonic() - started < 2.5
    assert [r.fault for r in upstream.requests] == ["delay"]
    assert len(upstream_b.requests) == 1


def test_slow_only_deployment_is_504(make_app: MakeApp, upstream: FakeOpenAI, client_of: Any) -> None:
    app = one(make_app, upstream, timeout=0.5)
    upstream.delay_next(1, 3)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as ei:
        chat(client_of(app))
    assert time.monotonic() - started < 2.5
    assert ei.value.status_code == 504
    assert ei.value.code == "upstream_timeout"
    assert_envelope(ei.value.response, 504, "upstream_timeout")
    assert len(upstream.requests) == 1


def test_slow_stream_start_falls_back(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b, a_kw={"timeout": 0.5})
    upstream.delay_next(1, 3)
    c = client_of(app)
    started = time.monotonic()
    with c.chat.completions.stream(model="m", messages=USER_HI) as s:
        final = s.get_final_completion()
    assert time.monotonic() - started < 2.5
    assert final.choices[0].message.content == "[b] hi"
    assert len(upstream_b.requests) == 1


# -------------------------------------------------------------------------------- (f) final errors


def test_all_deployments_500_is_502(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b)
    upstream.fail_next(1, 500)
    upstream_b.fail_next(1, 500)
    with pytest.raises(openai.InternalServerError) as ei:
        chat(client_of(app))
    assert ei.value.status_code == 502
    assert ei.value.code == "upstream_error"
    assert_envelope(ei.value.response, 502, "upstream_error")
    assert len(upstream.requests) == len(upstream_b.requests) == 1


def test_429_everywhere_is_503_with_retry_after(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b)
    upstream.fail_next(1, 429, headers={"Retry-After": "7"})
    upstream_b.fail_next(1, 429, headers={"Retry-After": "7"})
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as ei:
        chat(client_of(app))
    assert time.monotonic() - started < 3  # no retries configured: nothing to sleep for
    assert ei.value.status_code == 503
    assert_envelope(ei.value.response, 503, "upstream_unavailable")
    retry_after = ei.value.response.headers.get("retry-after")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1
    assert len(upstream.requests) == len(upstream_b.requests) == 1


def test_upstream_400_is_shown_and_not_retried(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b, a_kw={"max_retries": 2})
    upstream.fail_next(1, 400)
    with pytest.raises(openai.BadRequestError) as ei:
        chat(client_of(app))
    assert "Fake upstream error 400." in ei.value.message
    err = assert_envelope(ei.value.response, 400, None)
    assert err["type"] == "invalid_request_error"
    assert len(upstream.requests) == 1  # no retry ...
    assert upstream_b.requests == []  # ... and no fallback: the caller's fault is the same everywhere


def test_upstream_400_keeps_code_and_param(make_app: MakeApp, upstream: FakeOpenAI, client_of: Any) -> None:
    """Clients key on ``code`` (contract §2), e.g. ``context_length_exceeded``."""
    app = one(make_app, upstream, max_retries=2)
    msg = "This model's maximum context length is 10 tokens. However, your messages resulted in 99 tokens."
    upstream.fail_next(
        1, 400, body=error_body(msg, "invalid_request_error", "context_length_exceeded", "messages")
    )
    with pytest.raises(openai.BadRequestError) as ei:
        chat(client_of(app))
    assert len(upstream.requests) == 1
    assert msg in ei.value.message
    assert ei.value.code == "context_length_exceeded"
    assert ei.value.param == "messages"


def test_stream_upstream_400_is_json_error_at_create(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b, a_kw={"max_retries": 2})
    upstream.fail_next(1, 400)
    with pytest.raises(openai.BadRequestError) as ei:
        client_of(app).chat.completions.create(model="m", messages=USER_HI, stream=True)
    assert "Fake upstream error 400." in ei.value.message
    assert_envelope(ei.value.response, 400, None)
    assert len(upstream.requests) == 1 and upstream_b.requests == []


def test_stream_all_deployments_failing_is_json_502_at_create(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b)
    upstream.fail_next(1, 500)
    upstream_b.reset_next(1)
    with pytest.raises(openai.InternalServerError) as ei:
        client_of(app).chat.completions.create(model="m", messages=USER_HI, stream=True)
    assert ei.value.status_code == 502
    assert ei.value.response.headers["content-type"].startswith("application/json")
    assert ei.value.code in {"upstream_error", "upstream_connection_error"}
    assert len(upstream.requests) == len(upstream_b.requests) == 1


def test_non_json_200_fails_over(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b)
    upstream.fail_next(1, 200, body="<html>proxy login</html>", headers={"Content-Type": "text/html"})
    assert chat(client_of(app)) == "[b] hi"
    assert len(upstream.requests) == 1


def test_upstream_401_is_502_auth_error_without_retry(
    make_app: MakeApp, upstream: FakeOpenAI, client_of: Any
) -> None:
    app = one(make_app, upstream, max_retries=2)
    upstream.fail_next(1, 401)
    with pytest.raises(openai.InternalServerError) as ei:
        chat(client_of(app))
    assert ei.value.status_code == 502
    assert ei.value.code == "upstream_auth_error"
    err = assert_envelope(ei.value.response, 502, "upstream_auth_error")
    assert "sk-up-a" not in err["message"]
    assert len(upstream.requests) == 1


def test_upstream_401_fails_over_without_retry(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b, a_kw={"max_retries": 2})
    upstream.fail_next(1, 401)
    assert chat(client_of(app)) == "[b] hi"
    assert len(upstream.requests) == 1
    assert len(upstream_b.requests) == 1


# ------------------------------------------------------------------------------ (g) (h) routing


def test_cooldown_skips_failed_deployment(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b, a_kw={"allowed_fails": 1, "cooldown": 30})
    c = client_of(app)
    with app.http() as http:
        assert (
            http.get("/health").json()["dependencies"]["deployments"]["items"]["m#0"]["cooling_down"] is False
        )
        upstream.fail_next(1, 500)
        assert chat(c) == "[b] hi"
        assert len(upstream.requests) == 1
        for _ in range(10):
            assert chat(c) == "[b] hi"  # a would be first by weight, but it is cooling down
        assert len(upstream.requests) == 1
        assert len(upstream_b.requests) == 11
        health = http.get("/health").json()
    deployments = health["dependencies"]["deployments"]
    assert deployments["status"] == "degraded"
    assert deployments["items"]["m#0"]["cooling_down"] is True
    assert 0 < deployments["items"]["m#0"]["cooldown_remaining_s"] <= 30
    assert deployments["items"]["m#1"]["cooling_down"] is False
    assert health["status"] == "degraded"


def test_weights_split_traffic(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = make_app([model_entry("m", upstream, weight=3), model_entry("m", upstream_b, weight=1)])
    c = client_of(app)
    answers = [chat(c)[:3] for _ in range(200)]
    a, b = answers.count("[a]"), answers.count("[b]")
    assert a + b == 200
    assert 120 <= a <= 180, (a, b)  # expected 150; sd ~6
    assert len(upstream.requests) == a and len(upstream_b.requests) == b


# ------------------------------------------------------------------------ (i)-(l) streaming


@pytest.mark.parametrize(
    "inject",
    [
        lambda up: up.fail_next(1, 500),
        lambda up: up.reset_next(1),
        lambda up: up.cut_stream_next(1, after_chunks=1),  # only the role chunk got through
        lambda up: up.error_event_next(1, after_chunks=1),
        lambda up: up.cut_stream_next(1, after_chunks=0),
    ],
    ids=["500", "reset", "cut-after-role", "error-after-role", "cut-before-any"],
)
def test_stream_failure_before_content_fails_over_invisibly(
    make_app: MakeApp,
    upstream: FakeOpenAI,
    upstream_b: FakeOpenAI,
    client_of: Any,
    inject: Callable[[FakeOpenAI], None],
) -> None:
    app = two(make_app, upstream, upstream_b)
    inject(upstream)
    c = client_of(app)
    chunks = list(c.chat.completions.create(model="m", messages=USER_HI, stream=True))
    roles = [ch.choices[0].delta.role for ch in chunks if ch.choices and ch.choices[0].delta.role]
    assert roles == ["assistant"]  # a's held-back role chunk is never shown
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "[b] hi"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert len({ch.id for ch in chunks}) == 1
    assert len(upstream.requests) == 1 and upstream.requests[0].fault is not None
    assert len(upstream_b.requests) == 1

    # The same through the stream helper: a clean, complete answer from b.
    inject(upstream)
    with c.chat.completions.stream(model="m", messages=USER_HI) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.role == "assistant"
    assert final.choices[0].message.content == "[b] hi"
    assert len(upstream.requests) == 2 and len(upstream_b.requests) == 2


def _raw_sse(app: RunningApp, body: dict[str, Any]) -> tuple[httpx.Response, list[str]]:
    with app.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as resp:
        data = resp.read().decode()
    events = []
    for block in data.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if lines:
            assert all(ln.startswith("data: ") for ln in lines), lines
            events.append("\n".join(ln[6:] for ln in lines))
    return resp, events


LONG = [{"role": "user", "content": "one two three four five six"}]


def test_stream_cut_after_content_is_an_error(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b)
    upstream.cut_stream_next(2, after_chunks=3)  # role, "[a]", " one", then the connection drops
    c = client_of(app)
    got: list[str] = []
    with pytest.raises(openai.APIError) as ei:
        for ch in c.chat.completions.create(model="m", messages=LONG, stream=True):
            got.extend(choice.delta.content or "" for choice in ch.choices)
    assert ei.value.message
    assert "".join(got) == "[a] one"  # what a sent before dying; b is never mixed in

    resp, events = _raw_sse(app, {"model": "m", "messages": LONG, "stream": True})
    assert resp.status_code == 200
    errors = [i for i, ev in enumerate(events) if ev.startswith('{"error":')]
    assert len(errors) == 1, events
    err = json.loads(events[errors[0]])["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["code"] == "upstream_stream_cut"
    assert all(ev == "[DONE]" for ev in events[errors[0] + 1 :])  # nothing after the error but [DONE]
    chunks = [json.loads(ev) for ev in events[: errors[0]]]
    assert not any(choice.get("finish_reason") for ch in chunks for choice in ch["choices"])
    assert upstream_b.requests == []  # no failover once content was sent


def test_stream_error_event_mid_stream_raises(
    make_app: MakeApp, upstream: FakeOpenAI, upstream_b: FakeOpenAI, client_of: Any
) -> None:
    app = two(make_app, upstream, upstream_b)
    upstream.error_event_next(1, after_chunks=3)
    got: list[str] = []
    with pytest.raises(openai.APIError) as ei:
        for ch in client_of(app).chat.completions.create(model="m", messages=LONG, stream=True):
            got.extend(choice.delta.content or "" for choice in ch.choices)
    assert not isinstance(ei.value, openai.APIStatusError)  # in-band, after the 200
    assert "The server had an error processing your request" in ei.value.message
    assert "".join(got) == "[a] one"
    assert upstream_b.requests == []


def test_stream_usage_counted_when_upstream_omits_it(
    make_app: MakeApp, upstream: FakeOpenAI, client_of: Any
) -> None:
    app = one(make_app, upstream)
    upstream.omit_usage = True
    c = client_of(app)
    chunks = list(
        c.chat.completions.create(
            model="m", messages=LONG, stream=True, stream_options={"include_usage": True}
        )
    )
    assert upstream.requests[-1].json["stream_options"]["include_usage"] is True
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens > 0 and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(ch.usage is None and ch.choices for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1

    plain = list(c.chat.completions.create(model="m", messages=LONG, stream=True))
    assert all(ch.usage is None and ch.choices for ch in plain)

    legacy = list(
        c.completions.create(model="m", prompt="say hi", stream=True, stream_options={"include_usage": True})
    )
    assert legacy[-1].choices == [] and legacy[-1].usage is not None
    assert legacy[-1].usage.prompt_tokens > 0


def test_non_stream_usage_counted_when_upstream_omits_it(
    make_app: MakeApp, upstream: FakeOpenAI, client_of: Any
) -> None:
    app = one(make_app, upstream)
    upstream.fail_next(  # a 200 answer without "usage"
        1,
        200,
        body={
            "id": "chatcmpl-nousage",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hello there friend", "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
        },
    )
    r = client_of(app).chat.completions.create(model="m", messages=LONG)
    assert r.choices[0].message.content == "hello there friend"
    assert r.usage is not None
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


# ------------------------------------------------------------------------------ (m) (n) disconnects


def test_client_disconnect_mid_stream_cancels_upstream(make_app: MakeApp, upstream: FakeOpenAI) -> None:
    app = one(make_app, upstream)
    upstream.chunk_delay = 0.2
    body = {"model": "m", "messages": [{"role": "user", "content": " ".join(["word"] * 40)}], "stream": True}
    with app.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            first = next(ln for ln in resp.iter_lines() if ln.startswith("data: "))
            assert json.loads(first[6:])["object"] == "chat.completion.chunk"
        # leaving the block closes the connection mid-stream
        assert upstream.cancel_seen_sync.wait(5), "the gateway kept the upstream stream open"
    assert [r.path for r in upstream.cancelled] == ["/v1/chat/completions"]


def test_client_timeout_cancels_non_stream_upstream(make_app: MakeApp, upstream: FakeOpenAI) -> None:
    app = one(make_app, upstream, timeout=10)
    upstream.delay_next(1, 5)
    body = {"model": "m", "messages": USER_HI}
    with httpx.Client(base_url=app.base_url, timeout=httpx.Timeout(5, read=0.5)) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json=body)
        gave_up = time.monotonic()
    assert upstream.cancel_seen_sync.wait(2), "the gateway kept waiting on the upstream"
    assert time.monotonic() - gave_up < 2
    assert [r.fault for r in upstream.cancelled] == ["delay"]
