"""A gateway plus real batch-worker processes on one store, and helpers to drive batches."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import openai
import orjson
from openai.types import Batch

from tail_service.settings import Settings
from tests.conftest import RunningApp
from tests.fakes.openai_upstream import FakeOpenAI
from tests.processes import Running, run_tail

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def chat_line(custom_id: str, text: str = "hello", *, model: str = "gpt-test", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


@contextmanager
def run_worker(settings: Settings, executor_id: str = "worker-1", **batch: Any) -> Iterator[Running]:
    """A ``tail-service worker`` process on ``settings`` (the gateway's), ready to take work."""
    configured = settings.model_copy(
        update={"batch": settings.batch.model_copy(update={"executor_id": executor_id, **batch})}
    )
    env = {**os.environ, "TAIL_SETTINGS_JSON": configured.dump_for_child()}
    with run_tail(["worker"], env, ready=r"batch worker ready") as running:
        try:
            yield running
        except BaseException:
            print("worker log:\n" + "".join(running.log[-60:]))  # shown with the failure
            raise


def wait_for(
    client: openai.OpenAI,
    batch_id: str,
    until: Callable[[Batch], bool] = lambda b: b.status in TERMINAL,
    timeout: float = 60.0,
) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.1)


def submit(client: openai.OpenAI, data: bytes, endpoint: str = "/v1/chat/completions") -> Batch:
    upload = client.files.create(file=("input.jsonl", data), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )


def output_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(line) for line in client.files.content(file_id).read().splitlines()]


@dataclass
class BatchGateway:
    app: RunningApp
    upstream: FakeOpenAI

    @property
    def settings(self) -> Settings:
        return self.app.settings

    def client(self) -> openai.OpenAI:
        return self.app.strict_client()
