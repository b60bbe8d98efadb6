"""Budgets hold across a batch and an agent run: the gateway, a real worker process, real
auth-service (the key's budget) and a real redis-server.

The model is priced on output tokens only, and every call produces exactly its
``max_tokens`` (the fake upstream answers ``"[a] " + prompt`` cut to the limit; a tool call
of the scripted model is ``1 + words of its arguments`` tokens), so a call's real cost
equals its worst case: settling frees nothing, and a budget of ``K`` worst cases admits
exactly ``K`` calls, however they interleave.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from tail_service.clients.ratelimit_redis import BUDGET_PREFIX
from tail_service.proto import auth_pb2
from tail_service.redis_embedded import EmbeddedRedis
from tail_service.settings import Settings
from tests.agent.scripted import agent_script
from tests.batch.fixtures import chat_line, jsonl, output_lines, run_worker, submit, wait_for
from tests.conftest import RunningApp, model_entry, serve_app
from tests.fakes.openai_upstream import FakeOpenAI
from tests.stack_fixtures import Stack
from tests.usage.fixtures import open_store, stored_rows
from tests.usage.fixtures import wait_for as wait_until

pytestmark = pytest.mark.slow

MODEL = "gpt-budget"
#: $1,000 per million output tokens: one output token costs exactly 1,000,000 nanos ($0.001)
PRICE = {"input": 0.0, "output": 1000.0}
TOKEN_NANOS = 1_000_000
#: a batch line's ``max_tokens``: its worst case, and its real cost, is $0.002
LINE_TOKENS = 2
LINE_NANOS = LINE_TOKENS * TOKEN_NANOS
CALC = {"type": "builtin", "name": "calculator"}
#: the scripted model's calculator call: ``1 + 2`` words of arguments = 3 completion tokens
CALL = 'CALL calculator {"expression": "6*7"}'
STEP_TOKENS = 3
STEP_NANOS = STEP_TOKENS * TOKEN_NANOS


@dataclass
class BudgetGateway:
    stack: Stack
    app: RunningApp
    upstream: FakeOpenAI
    redis_url: str
    store_url: str

    @property
    def settings(self) -> Settings:
        return self.app.settings

    def key(self, usd: float) -> tuple[str, str]:
        """A new key of tenant ``acme`` with a budget of ``usd`` a month: (api key, key id)."""
        created = self.stack.admin_auth().CreateKey(
            auth_pb2.CreateKeyRequest(
                name="b", tenant="acme", budget=auth_pb2.Budget(usd=usd, period="month")
            ),
            timeout=5,
        )
        return created.api_key, created.key.id

    def client(self, api_key: str) -> openai.OpenAI:
        return self.app.client(api_key=api_key, _strict_response_validation=True, timeout=60)


@pytest.fixture
def budgeted(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, private_redis: EmbeddedRedis, tmp_path: Path
) -> Iterator[BudgetGateway]:
    """A gateway and a worker on one store and one Redis; budgets and rate limits on."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    settings = stack.gateway_settings(
        [model_entry(MODEL, upstream, max_retries=0, price=PRICE)],
        ratelimit={"enabled": True},
        redis={"url": private_redis.url(), "timeout": 2},
        store={"database_url": url},
        usage={"flush_interval": 0.05},
        state_dir=tmp_path / "state",
    )
    with serve_app(settings) as app, run_worker(settings):
        yield BudgetGateway(stack, app, upstream, private_redis.url(), url)


def spent_key(key_id: str) -> str:
    """The Redis counter of a key's monthly budget (reserved plus spent, in nanos)."""
    return f"{BUDGET_PREFIX}{{{key_id}}}:m{dt.datetime.now(dt.UTC):%Y%m}"


class Sampler:
    """Reads a Redis counter every few milliseconds in a thread: the highest value seen."""

    def __init__(self, url: str, key: str) -> None:
        self._client = redis.Redis.from_url(url, decode_responses=True)
        self._key = key
        self._stop = threading.Event()
        self.highest = 0
        self.samples = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.003):
            self.highest = max(self.highest, int(self._client.get(self._key) or 0))
            self.samples += 1

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.final = int(self._client.get(self._key) or 0)
        self._client.close()


def assert_insufficient_quota(response: dict[str, Any]) -> None:
    assert response["status_code"] == 429, response
    error = response["body"]["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota"), error
    assert "this API key's budget is $0.01 per month" in error["message"]


def ledger_rows(gw: BudgetGateway, key_id: str, count: int) -> list[dict[str, Any]]:
    """The key's ledger rows once ``count`` were drained (and half a second more, so a
    record stored late or twice would show)."""
    with open_store(gw.store_url) as store:

        def mine() -> list[dict[str, Any]]:
            return [r for r in stored_rows(store) if r["key_id"] == key_id]

        wait_until(lambda: len(mine()) >= count, 30, f"{count} ledger records drained")
        threading.Event().wait(0.5)
        return mine()


def test_a_batch_runs_exactly_the_lines_its_budget_fits_and_fails_the_rest_with_429(
    budgeted: BudgetGateway,
) -> None:
    k, n = 5, 12
    api_key, key_id = budgeted.key(usd=k * LINE_NANOS / 1e9)  # $0.01
    client = budgeted.client(api_key)
    lines = [chat_line(f"line-{i:02d}", "w w w w", model=MODEL, max_tokens=LINE_TOKENS) for i in range(n)]
    with Sampler(budgeted.redis_url, spent_key(key_id)) as sampler:
        batch = wait_for(client, submit(client, jsonl(lines)).id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (n, k, n - k)
    out = output_lines(client, batch.output_file_id)
    errors = output_lines(client, batch.error_file_id)
    assert (len(out), len(errors)) == (k, n - k)
    ids = [o["custom_id"] for o in out + errors]
    assert sorted(ids) == [line["custom_id"] for line in lines]  # none lost, none twice
    for o in out:
        assert o["response"]["status_code"] == 200
        assert o["response"]["body"]["usage"]["completion_tokens"] == LINE_TOKENS
    for e in errors:
        assert e["error"] is None
        assert_insufficient_quota(e["response"])
    # a refused line is never retried: only the admitted ones reached the upstream, once
    assert len(budgeted.upstream.requests) == k
    # reserved plus spent never passed the budget; it ends exactly spent
    assert sampler.samples > 0
    assert sampler.highest <= k * LINE_NANOS
    assert sampler.final == k * LINE_NANOS
    rows = ledger_rows(budgeted, key_id, k)
    assert len(rows) == k
    assert {(r["source"], r["status"], r["cost_nanos"]) for r in rows} == {("batch", 200, LINE_NANOS)}


def test_the_sync_batch_form_answers_the_lines_over_budget_with_429_in_place(
    budgeted: BudgetGateway,
) -> None:
    k, n = 5, 9
    api_key, key_id = budgeted.key(usd=k * LINE_NANOS / 1e9)
    requests = [chat_line(f"s{i}", "w w w w", model=MODEL, max_tokens=LINE_TOKENS) for i in range(n)]
    with httpx.Client(base_url=budgeted.app.base_url, timeout=60) as http:
        auth = {"authorization": f"Bearer {api_key}"}
        r = http.post("/v1/batch", json={"requests": requests}, headers=auth)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["custom_id"] for d in data] == [q["custom_id"] for q in requests]  # input order
    ok = [d for d in data if d["response"]["status_code"] == 200]
    refused = [d for d in data if d["response"]["status_code"] != 200]
    assert (len(ok), len(refused)) == (k, n - k)
    for d in refused:
        assert_insufficient_quota(d["response"])
    client = redis.Redis.from_url(budgeted.redis_url, decode_responses=True)
    try:
        assert int(client.get(spent_key(key_id)) or 0) == k * LINE_NANOS
    finally:
        client.close()
    assert len(budgeted.upstream.requests) == k


def test_an_agent_run_ends_incomplete_for_budget_after_the_steps_it_fits(budgeted: BudgetGateway) -> None:
    s = 4
    budgeted.upstream.script = agent_script
    api_key, key_id = budgeted.key(usd=s * STEP_NANOS / 1e9)  # $0.012
    script = "\n".join([CALL] * 20)  # the model would go on calling the calculator
    with httpx.Client(base_url=budgeted.app.base_url, timeout=120) as http:
        r = http.post(
            "/v1/agentic",
            json={
                "model": MODEL,
                "input": script,
                "tools": [CALC],
                "max_completion_tokens": STEP_TOKENS,
                "max_steps": 50,
            },
            headers={"authorization": f"Bearer {api_key}"},
        )
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["status"] == "incomplete", run
    assert run["incomplete_details"] == {"reason": "budget"}
    model_steps = [st for st in run["steps"] if st["type"] == "model_call"]
    tool_steps = [st for st in run["steps"] if st["type"] == "tool_call"]
    assert len([st for st in model_steps if st["status"] == "completed"]) == s, run["steps"]
    assert run["model_calls"] == s
    assert [st["output"] for st in tool_steps] == ["42"] * s
    chat_calls = [q for q in budgeted.upstream.requests if q.path == "/v1/chat/completions"]
    assert len(chat_calls) == s  # the refused fifth call never reached the upstream
    assert run["usage"]["completion_tokens"] == s * STEP_TOKENS
    assert run["usage"]["prompt_tokens"] == sum(st["usage"]["prompt_tokens"] for st in model_steps[:s])
    assert run["usage"]["total_tokens"] == run["usage"]["prompt_tokens"] + s * STEP_TOKENS
    redis_client = redis.Redis.from_url(budgeted.redis_url, decode_responses=True)
    try:
        assert int(redis_client.get(spent_key(key_id)) or 0) == s * STEP_NANOS
    finally:
        redis_client.close()
    # the worker's drainer stored one record per model call, marked as agent traffic
    rows = ledger_rows(budgeted, key_id, s)
    assert len(rows) == s
    assert {(r["source"], r["status"], r["cost_nanos"]) for r in rows} == {("agent", 200, STEP_NANOS)}
    assert sorted(r["completion_tokens"] for r in rows) == [STEP_TOKENS] * s
