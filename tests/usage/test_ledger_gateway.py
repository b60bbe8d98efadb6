"""The usage ledger end to end: gateways served by uvicorn on port 0, the official openai
SDK, a real redis-server, real auth-service (mTLS) and one store the replicas share."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tail_service.proto import auth_pb2
from tail_service.redis_embedded import EmbeddedRedis
from tail_service.settings import load_settings
from tests.conftest import RunningApp, model_entry, serve_app
from tests.fakes.openai_upstream import FakeOpenAI
from tests.stack_fixtures import Stack
from tests.usage.fixtures import open_store, store_url, stored_rows, wait_for

MODEL = "gpt-priced"
#: USD per million tokens: in nano-dollars, 2,000 per prompt token and 8,000 per output token
PRICE = {"input": 2.0, "output": 8.0}
N = 1000


def prompt_of(i: int) -> str:
    """Prompts of 1 to 7 words, so the records' token counts differ from request to request."""
    return " ".join(f"w{i}" for _ in range(1 + i % 7))


def tokens_by_model(app: RunningApp) -> dict[str, float]:
    """``tail_tokens_total`` of one replica, ``{"<model>/<kind>": value}``."""
    text = httpx.get(app.base_url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "tail_tokens_total":
                out[f"{s.labels['model']}/{s.labels['kind']}"] = s.value
    return out


async def test_a_thousand_requests_over_two_replicas_give_exactly_a_thousand_exact_records(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    created = stack.admin_auth().CreateKey(auth_pb2.CreateKeyRequest(name="ledger", tenant="acme"), timeout=5)
    url = store_url(tmp_path)
    settings = stack.gateway_settings(
        [model_entry(MODEL, upstream, max_retries=0, price=PRICE)],
        redis={"url": private_redis.url(), "timeout": 1},
        store={"database_url": url},
        usage={"flush_interval": 0.05, "drain_in_http": True},  # no worker here: the replicas drain
    )
    with serve_app(settings) as one, serve_app(settings) as two:
        replicas = [one, two]
        clients = [
            openai.AsyncOpenAI(base_url=app.v1, api_key=created.api_key, max_retries=0, timeout=60)
            for app in replicas
        ]
        gate = asyncio.Semaphore(100)

        async def call(i: int) -> Any:
            async with gate:
                return await clients[i % 2].chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": prompt_of(i)}],
                    extra_headers={"x-request-id": f"ledger-{i:04d}"},
                )

        answers = await asyncio.gather(*(call(i) for i in range(N)))
        for client in clients:
            await client.close()
        with open_store(url) as store:
            took = await asyncio.to_thread(
                wait_for, lambda: len(stored_rows(store)) >= N, 30, "every record drained"
            )
            await asyncio.sleep(0.5)  # a record stored twice or late would show now
            rows = await asyncio.to_thread(stored_rows, store)
        metrics = [tokens_by_model(app) for app in replicas]

    assert len(rows) == N, (len(rows), took)
    by_request = {row["request_id"]: row for row in rows}
    assert len(by_request) == N  # one record per request, none twice
    assert len({row["id"] for row in rows}) == N
    assert len(upstream.requests) == N
    for i, answer in enumerate(answers):
        row = by_request[f"ledger-{i:04d}"]
        usage = answer.usage
        assert usage is not None
        # what the upstream reported (the fake counts one token per prompt word)
        assert usage.prompt_tokens == 1 + i % 7
        assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (
            usage.prompt_tokens,
            usage.completion_tokens,
            0,
        )
        assert row["cost_nanos"] == usage.prompt_tokens * 2_000 + usage.completion_tokens * 8_000
        expected = {
            "key_id": created.key.id,
            "tenant": "acme",
            "model": MODEL,
            "deployment": f"{MODEL}#0",
            "endpoint": "chat",
            "source": "api",
            "status": 200,
            "outcome": "ok",
            "cache_hit": False,
            "estimated": False,
        }
        assert {k: row[k] for k in expected} == expected, row
        assert row["latency_ms"] >= 0
    prompt = sum(row["prompt_tokens"] for row in rows)
    completion = sum(row["completion_tokens"] for row in rows)
    summed: collections.Counter[str] = collections.Counter()
    for m in metrics:
        summed.update(m)
    assert summed[f"{MODEL}/prompt"] == prompt
    assert summed[f"{MODEL}/completion"] == completion
    # both replicas served (and counted) half of the calls
    assert all(m[f"{MODEL}/prompt"] > 0 for m in metrics)


def test_unpriced_models_are_listed_in_health(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI
) -> None:
    app = make_app(
        [
            model_entry(MODEL, upstream, price=PRICE),  # configured
            model_entry("gpt-4o-2024-08-06", upstream),  # built-in table, by prefix
            model_entry("house-model", upstream, upstream_model="gpt-4.1-mini"),  # by upstream name
            model_entry("mystery-b", upstream, upstream_model="mystery-upstream"),
            model_entry("mystery-a", upstream),
        ]
    )
    health = httpx.get(app.base_url + "/health", timeout=10).json()
    usage = health["dependencies"]["usage"]
    assert usage["unpriced_models"] == ["mystery-a", "mystery-b"]
    assert "no price" in usage["warning"]


def test_records_reach_the_store_directly_while_redis_is_down(
    upstream: FakeOpenAI, upstream_key: str, private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    url = store_url(tmp_path)
    settings = load_settings(
        None,
        # a model limit: every admission asks Redis, so its failures open the breaker
        models=[model_entry(MODEL, upstream, max_retries=0, price=PRICE, rpm=100_000)],
        auth={"mode": "disabled"},
        ratelimit={"enabled": True},
        redis={"url": private_redis.url(), "timeout": 0.1, "breaker_failures": 2, "breaker_reset": 60},
        store={"database_url": url},
        usage={"flush_interval": 0.05, "drain_in_http": True},
        server={"sse_keepalive": 0},
        state_dir=tmp_path / "state",
    )
    with serve_app(settings) as app, open_store(url) as store:
        client = app.client()

        def chat(text: str) -> None:
            answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
            assert answer.choices[0].message.content == f"[a] {text}"

        for i in range(5):
            chat(f"before {i}")
        wait_for(lambda: len(stored_rows(store)) == 5, 10, "the records sent through Redis")
        private_redis.stop()
        sent = 0

        def breaker_open() -> bool:
            nonlocal sent
            chat(f"while opening {sent}")  # fail-open: answered all the same
            sent += 1
            redis = httpx.get(app.base_url + "/health", timeout=10).json()["dependencies"]["redis"]
            return bool(redis.get("breaker") == "open")

        wait_for(breaker_open, 20, "the breaker opened")
        for i in range(20):
            chat(f"breaker open {i}")
        total = 5 + sent + 20
        wait_for(lambda: len(stored_rows(store)) >= total, 10, "the records written straight to the store")
        rows = stored_rows(store)
    assert len(rows) == total
    assert len({row["request_id"] for row in rows}) == total
    contents = sorted(r.json["messages"][0]["content"] for r in upstream.requests)
    assert len(contents) == total
    assert all(row["status"] == 200 and row["cost_nanos"] > 0 for row in rows)
