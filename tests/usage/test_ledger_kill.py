"""A response that was sent has its usage record in Redis: ``kill -9`` of the gateway right
after the last response loses none, and a drainer started afterwards stores each once."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import openai
import pytest
import redis.asyncio as aioredis

from tail_service.clients.usage_ledger import UsageDrainer
from tail_service.redis_embedded import EmbeddedRedis
from tail_service.settings import UsageSettings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.processes import run_tail
from tests.usage.fixtures import open_store, store_url, stored_rows

MODEL = "gpt-priced"
N = 50


@pytest.mark.slow
async def test_no_record_is_lost_when_the_gateway_is_killed_after_its_last_response(
    upstream: FakeOpenAI, private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    url = store_url(tmp_path)
    cfg = tmp_path / "tail.yaml"
    cfg.write_text(
        f"""
models:
  - name: {MODEL}
    provider: openai
    base_url: {upstream.base_url}
    api_key_env: LEDGER_UPSTREAM_KEY
    max_retries: 0
    price: {{input: 2.0, output: 8.0}}
auth:
  mode: disabled
ratelimit:
  enabled: false
redis:
  url: {private_redis.url()}
store:
  database_url: {url}
usage:
  drain_in_http: false
server:
  sse_keepalive: 0
log_level: warning
"""
    )
    env = {**os.environ, "LEDGER_UPSTREAM_KEY": "sk-up-a", "TAIL_STATE_DIR": str(tmp_path / "state")}
    r = aioredis.from_url(private_redis.url())
    try:
        with run_tail(["serve", "--config", str(cfg), "--port", "0"], env) as gw:
            client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-any", max_retries=0, timeout=30)

            async def call(i: int) -> str:
                answer = await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"kill {i}"}],
                    extra_headers={"x-request-id": f"kill-{i:02d}"},
                )
                return answer.choices[0].message.content or ""

            answers = await asyncio.gather(*(call(i) for i in range(N)))
            gw.proc.kill()  # SIGKILL: no shutdown, no flush
            gw.proc.wait()
            await client.close()
        assert answers == [f"[a] kill {i}" for i in range(N)]
        in_stream = await r.xlen(UsageSettings().stream)
        assert in_stream == N, "".join(gw.log[-20:])
        with open_store(url) as store:
            assert stored_rows(store) == []  # nothing was drained before the kill
            # two drainers at once, as two replicas restarting would
            drainers = [
                UsageDrainer(private_redis.url(), store, UsageSettings(flush_interval=0.05)) for _ in range(2)
            ]
            tasks = [asyncio.create_task(d.run()) for d in drainers]
            try:
                for _ in range(500):
                    if (
                        len(await asyncio.to_thread(stored_rows, store)) >= N
                        and await r.xlen(UsageSettings().stream) == 0
                    ):
                        break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)
                rows = await asyncio.to_thread(stored_rows, store)
            finally:
                for task in tasks:
                    while not task.done():  # see test_drainer: one cancel may be swallowed
                        task.cancel()
                        await asyncio.wait([task], timeout=1.0)
        assert sorted(row["request_id"] for row in rows) == [f"kill-{i:02d}" for i in range(N)]
        assert len({row["id"] for row in rows}) == N
        assert all(row["status"] == 200 and row["cost_nanos"] > 0 for row in rows)
    finally:
        await r.aclose()
