"""The OpenAI Batch API end to end: the official SDK against a gateway, a real worker
process (DBOS on SQLite) and a fake upstream."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletion

from tests.batch.fixtures import (
    BatchGateway,
    chat_line,
    jsonl,
    output_lines,
    run_worker,
    submit,
    wait_for,
)
from tests.conftest import RunningApp, model_entry
from tests.fakes.openai_upstream import REJECT_CONTENT, FakeOpenAI
from tests.processes import Running

pytestmark = pytest.mark.slow


@pytest.fixture
def gw(make_app: Callable[..., RunningApp], upstream: FakeOpenAI) -> BatchGateway:
    app = make_app([model_entry("gpt-test", upstream), model_entry("embed-test", upstream)])
    return BatchGateway(app, upstream)


@pytest.fixture
def worker(gw: BatchGateway) -> Iterator[Running]:
    with run_worker(gw.settings) as running:
        yield running


def test_sdk_flow_output_lines_are_chat_completions(gw: BatchGateway, worker: Running) -> None:
    client = gw.client()
    lines = [chat_line(f"req-{i}", f"hello {i}") for i in range(40)]
    created = submit(client, jsonl(lines))
    assert created.status == "validating"
    assert created.expires_at == created.created_at + 86_400
    batch = wait_for(client, created.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        40,
        40,
        0,
    )
    for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
        assert getattr(batch, stamp) is not None, stamp
    assert batch.failed_at is None and batch.cancelled_at is None and batch.error_file_id is None
    assert batch.model == "gpt-test"
    assert batch.usage is not None and batch.usage.input_tokens > 0 and batch.usage.output_tokens > 0
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    out = output_lines(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(line["custom_id"] for line in lines)
    for o in out:
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200 and o["response"]["request_id"]
        completion = ChatCompletion.model_validate(o["response"]["body"])
        n = o["custom_id"].split("-")[1]
        assert completion.choices[0].message.content == f"[a] hello {n}"
    meta = client.files.retrieve(batch.output_file_id or "")
    assert meta.purpose == "batch_output" and meta.filename.endswith(".jsonl")
    with pytest.raises(openai.ConflictError):  # a finished batch cannot be cancelled
        client.batches.cancel(batch.id)
    # every line reached the upstream exactly once
    assert len([r for r in gw.upstream.requests if r.path == "/v1/chat/completions"]) == 40


def test_rejected_lines_go_to_the_error_file_and_the_rest_succeed(gw: BatchGateway, worker: Running) -> None:
    client = gw.client()
    lines = [chat_line(f"ok-{i}") for i in range(10)]
    lines.insert(3, chat_line("upstream-rejects", REJECT_CONTENT))
    lines.insert(7, chat_line("bad-type", n=2.5))
    lines.insert(8, chat_line("unknown-model", model="no-such-model"))
    batch = wait_for(client, submit(client, jsonl(lines)).id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (10, 3)
    errors = {e["custom_id"]: e for e in output_lines(client, batch.error_file_id)}
    assert set(errors) == {"upstream-rejects", "bad-type", "unknown-model"}
    assert errors["upstream-rejects"]["response"]["status_code"] == 400
    assert errors["bad-type"]["response"]["status_code"] == 400
    assert errors["bad-type"]["response"]["body"]["error"]["param"] == "n"
    assert errors["unknown-model"]["response"]["status_code"] == 404
    assert all(e["error"] is None for e in errors.values())
    assert len(output_lines(client, batch.output_file_id)) == 10


def test_embeddings_batch(gw: BatchGateway, worker: Running) -> None:
    client = gw.client()
    lines = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "embed-test", "input": f"t{i}"},
        }
        for i in range(5)
    ]
    batch = wait_for(client, submit(client, jsonl(lines), "/v1/embeddings").id)
    assert batch.status == "completed"
    out = output_lines(client, batch.output_file_id)
    assert len(out) == 5 and all(o["response"]["body"]["object"] == "list" for o in out)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            jsonl([chat_line("a")])
            + b"{not json\n"
            + jsonl([{**chat_line("b"), "url": "/v1/embeddings"}, chat_line("a")]),
            [(2, "invalid_json_line"), (3, "invalid_url"), (4, "duplicate_custom_id")],
        ),
        (
            jsonl(
                [
                    {**chat_line("a"), "method": "GET"},
                    {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions"},
                ]
            ),
            [(1, "invalid_value"), (2, "missing_required_parameter")],
        ),
        (jsonl([[1, 2]]), [(1, "invalid_json_line")]),
        (b"\n\n", [(None, "empty_file")]),
    ],
)
def test_an_invalid_input_file_fails_with_line_numbers(
    gw: BatchGateway, worker: Running, content: bytes, expected: list[tuple[int | None, str]]
) -> None:
    client = gw.client()
    batch = wait_for(client, submit(client, content).id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.data is not None
    assert [(e.line, e.code) for e in batch.errors.data] == expected
    assert batch.output_file_id is None and batch.in_progress_at is None
    assert gw.upstream.requests == []


def test_more_lines_than_the_limit_fails(make_app: Callable[..., RunningApp], upstream: FakeOpenAI) -> None:
    app = make_app([model_entry("gpt-test", upstream)], batch={"max_lines": 3})
    with run_worker(app.settings):
        client = app.strict_client()
        batch = wait_for(client, submit(client, jsonl([chat_line(f"r{i}") for i in range(5)])).id)
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data is not None
    assert [(e.line, e.code) for e in batch.errors.data] == [(4, "too_many_requests")]


def test_create_rejects_bad_requests_with_openai_errors(gw: BatchGateway) -> None:
    client = gw.client()
    upload = client.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
    other = client.files.create(file=("notes.txt", b"hi"), purpose="user_data")
    cases: list[tuple[dict[str, Any], int, str | None]] = [
        (
            {"input_file_id": upload.id, "endpoint": "/v1/moderations", "completion_window": "24h"},
            400,
            "endpoint",
        ),
        (
            {"input_file_id": upload.id, "endpoint": "/v1/chat/completions", "completion_window": "1h"},
            400,
            "completion_window",
        ),
        (
            {"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
            404,
            "input_file_id",
        ),
        (
            {"input_file_id": other.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
            400,
            "input_file_id",
        ),
        ({"endpoint": "/v1/chat/completions", "completion_window": "24h"}, 400, "input_file_id"),
        (
            {
                "input_file_id": upload.id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"k": 1},
            },
            400,
            "metadata.k",
        ),
    ]
    with gw.app.http() as http:
        for body, status, param in cases:
            r = http.post("/v1/batches", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["param"] == param, r.json()
        assert http.get("/v1/batches/batch_nope").status_code == 404
        assert http.post("/v1/batches/batch_nope/cancel").status_code == 404
        assert http.get("/v1/batches?limit=0").status_code == 400
        assert http.get("/v1/batches?limit=x").status_code == 400


def test_idempotency_key_returns_the_same_batch(gw: BatchGateway) -> None:
    client = gw.client()
    upload = client.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
    args: dict[str, Any] = {
        "input_file_id": upload.id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    first = client.batches.create(**args, extra_headers={"Idempotency-Key": "k-1"})
    again = client.batches.create(**args, extra_headers={"Idempotency-Key": "k-1"})
    assert again.id == first.id
    other = client.batches.create(**args, extra_headers={"Idempotency-Key": "k-2"})
    assert other.id != first.id
    with pytest.raises(openai.ConflictError):
        client.batches.create(**{**args, "metadata": {"x": "y"}}, extra_headers={"Idempotency-Key": "k-1"})
    ids = [b.id for b in client.batches.list(limit=1)]
    assert ids == [other.id, first.id]  # newest first, every page followed


def test_cancel_mid_run_keeps_partial_results(gw: BatchGateway) -> None:
    gw.upstream.latency = 0.2
    client = gw.client()
    lines = [chat_line(f"r{i}") for i in range(200)]
    with run_worker(gw.settings, chunk_lines=20, worker_concurrency=1, line_concurrency=4):
        created = submit(client, jsonl(lines))
        wait_for(
            client, created.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 8
        )
        cancelling = client.batches.cancel(created.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        batch = wait_for(client, created.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    assert batch.request_counts is not None
    done, failed = batch.request_counts.completed, batch.request_counts.failed
    assert 8 <= done < 200 and done + failed == 200
    out = output_lines(client, batch.output_file_id)
    err = output_lines(client, batch.error_file_id)
    assert len(out) == done and len(err) == failed
    assert {e["error"]["code"] for e in err} == {"batch_cancelled"}
    assert sorted(o["custom_id"] for o in out + err) == sorted(line["custom_id"] for line in lines)


def test_expiry_keeps_partial_results(make_app: Callable[..., RunningApp], upstream: FakeOpenAI) -> None:
    upstream.latency = 0.2
    app = make_app([model_entry("gpt-test", upstream)], batch={"completion_window_seconds": 6})
    client = app.strict_client()
    lines = [chat_line(f"r{i}") for i in range(200)]
    with run_worker(app.settings, chunk_lines=20, worker_concurrency=1, line_concurrency=4):
        batch = wait_for(client, submit(client, jsonl(lines)).id)
    assert batch.status == "expired" and batch.expired_at is not None
    assert batch.request_counts is not None
    done, failed = batch.request_counts.completed, batch.request_counts.failed
    assert 0 < done < 200 and done + failed == 200
    err = output_lines(client, batch.error_file_id)
    assert {e["error"]["code"] for e in err} == {"batch_expired"}
    assert all(e["response"] is None for e in err)
    out = output_lines(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out + err) == sorted(line["custom_id"] for line in lines)


# -- POST /v1/batch -----------------------------------------------------------------------------


def test_sync_batch_answers_in_input_order(gw: BatchGateway) -> None:
    requests = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-test", "messages": [{"role": "user", "content": f"q{i}"}]},
        }
        for i in range(30)
    ]
    requests[5]["body"]["messages"][0]["content"] = REJECT_CONTENT
    requests[9]["body"]["n"] = "two"
    requests[12]["custom_id"] = requests[11]["custom_id"]  # allowed here: answers keep their places
    requests.append(
        {
            "custom_id": "emb",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "embed-test", "input": "x"},
        }
    )
    with gw.app.http() as http:
        r = http.post("/v1/batch", json={"requests": requests})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    assert [d["custom_id"] for d in body["data"]] == [q["custom_id"] for q in requests]
    statuses = [d["response"]["status_code"] for d in body["data"]]
    assert statuses[5] == 400 and statuses[9] == 400
    assert body["data"][9]["response"]["body"]["error"]["param"] == "n"
    assert all(s == 200 for i, s in enumerate(statuses) if i not in (5, 9))
    assert body["data"][0]["response"]["body"]["choices"][0]["message"]["content"] == "[a] q0"
    assert body["data"][-1]["response"]["body"]["object"] == "list"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({}, "requests"),
        ({"requests": []}, "requests"),
        ({"requests": "x"}, "requests"),
        (
            {"requests": [{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}]},
            "requests[0].method",
        ),
        (
            {"requests": [{"custom_id": "a", "method": "POST", "url": "/v1/files", "body": {}}]},
            "requests[0].url",
        ),
        ({"requests": [{"custom_id": "a", "method": "POST", "url": "/v1/embeddings"}]}, "requests[0].body"),
        (
            {"requests": [{"custom_id": 5, "method": "POST", "url": "/v1/embeddings", "body": {}}]},
            "requests[0].custom_id",
        ),
    ],
)
def test_sync_batch_bad_envelope_is_400(gw: BatchGateway, payload: dict[str, Any], param: str) -> None:
    with gw.app.http() as http:
        r = http.post("/v1/batch", json=payload)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert gw.upstream.requests == []


def test_sync_batch_size_limit(make_app: Callable[..., RunningApp], upstream: FakeOpenAI) -> None:
    app = make_app([model_entry("gpt-test", upstream)], batch={"sync_max_requests": 3})
    line = {"method": "POST", "url": "/v1/embeddings", "body": {"model": "gpt-test", "input": "x"}}
    with httpx.Client(base_url=app.base_url) as http:
        r = http.post(
            "/v1/batch", content=orjson.dumps({"requests": [{**line, "custom_id": str(i)} for i in range(4)]})
        )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "too_many_requests"
    assert upstream.requests == []
