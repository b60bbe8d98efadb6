"""Edges of the HTTP layer: keep-alive comments on idle streams, and a bug's 500 envelope."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import orjson
from starlette.routing import Route

from tail_service.app import create_app
from tail_service.settings import load_settings
from tests.conftest import RunningApp, model_entry, serve_app
from tests.fakes.openai_upstream import FakeOpenAI


def test_idle_stream_gets_keepalive_comments(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI
) -> None:
    app = make_app([model_entry("gpt-test", upstream)], server={"sse_keepalive": 0.1})
    upstream.chunk_delay = 0.35
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "a b"}], "stream": True}
    with app.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as resp:
        raw = b"".join(resp.iter_bytes())
    assert resp.status_code == 200
    assert b": keepalive\n\n" in raw
    assert raw.endswith(b"data: [DONE]\n\n")
    events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    assert all(orjson.loads(e[6:])["object"] == "chat.completion.chunk" for e in events)


def test_a_bug_is_a_500_envelope_with_the_request_id(upstream_key: str) -> None:
    settings = load_settings(None, models=[], auth={"mode": "disabled"}, ratelimit={"enabled": False})
    app = create_app(settings)

    async def boom(request: object) -> None:
        raise RuntimeError("secret internals sk-should-not-leak-1234567890")

    app.router.routes.append(Route("/boom", boom, methods=["GET"]))
    with serve_app(settings, app=app) as running, httpx.Client(base_url=running.base_url) as http:
        resp = http.get("/boom")
    assert resp.status_code == 500
    rid = resp.headers["x-request-id"]
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "server_error"
    assert rid in err["message"]
    assert "secret internals" not in resp.text


def test_unknown_models_leave_no_metric_series(gateway: RunningApp) -> None:
    body = {"model": "no-such-model-xyz", "messages": [{"role": "user", "content": "x"}]}
    with gateway.http() as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 404
        assert http.post("/v1/chat/completions", json={**body, "stream": True}).status_code == 404
        ok = http.post("/v1/chat/completions", json={**body, "model": "gpt-test"})
        assert ok.status_code == 200
        metrics = http.get("/metrics").text
    assert "no-such-model-xyz" not in metrics
    assert 'tail_tokens_total{kind="prompt",model="gpt-test"}' in metrics
