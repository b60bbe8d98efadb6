"""``GET /v1/usage`` (the calling key's usage) and ``GET /v1/organization/usage/completions``
(every key's, for the holder of ``usage.admin_token``): a gateway on port 0 with real
auth-service, over one store.

One test sends real traffic through the official SDK and reads it back; the others write
ledger rows with chosen times (:meth:`UsageStore.insert`) to pin bucket boundaries, empty
buckets and pagination to the second.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tail_service.proto import auth_pb2
from tail_service.redis_embedded import EmbeddedRedis
from tail_service.store.usage import UsageStore
from tests.conftest import RunningApp, model_entry, serve_app
from tests.fakes.openai_upstream import FakeOpenAI
from tests.stack_fixtures import Stack
from tests.usage.fixtures import open_store, record_row, stored_rows, wait_for

ADMIN_TOKEN = "usage-admin-" + "x" * 24
ORG = "/v1/organization/usage/completions"
#: nano-dollars per token: (prompt, completion), as the config prices below give them
PRICES = {"gpt-one": (2_000, 8_000), "gpt-two": (1_000, 4_000)}
#: a UTC midnight: rows written at T0 + offsets fall in known minutes, hours and days
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


@dataclass
class UsageGateway:
    app: RunningApp
    url: str
    key_a: str
    id_a: str
    key_b: str
    id_b: str

    def get(self, path: str, params: Any = None, token: str | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        with httpx.Client(base_url=self.app.base_url, timeout=30) as http:
            return http.get(path, params=params, headers=headers)

    def insert(self, rows: list[dict[str, Any]]) -> None:
        with open_store(self.url) as store:
            assert UsageStore(store).insert(rows) == len(rows)


def settings_for(stack: Stack, upstream: FakeOpenAI, redis_url: str, url: str, **usage: Any) -> Any:
    models = [
        model_entry(name, upstream, max_retries=0, price={"input": p / 1000, "output": c / 1000})
        for name, (p, c) in PRICES.items()
    ]
    return stack.gateway_settings(
        models,
        redis={"url": redis_url, "timeout": 1},
        store={"database_url": url},
        usage={"flush_interval": 0.05, "drain_in_http": True, **usage},
    )


@pytest.fixture
def gw(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, private_redis: EmbeddedRedis, tmp_path: Path
) -> Iterator[UsageGateway]:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    keys = [
        stack.admin_auth().CreateKey(auth_pb2.CreateKeyRequest(name=n, tenant=t), timeout=5)
        for n, t in (("a", "acme"), ("b", "globex"))
    ]
    settings = settings_for(stack, upstream, private_redis.url(), url, admin_token=ADMIN_TOKEN)
    with serve_app(settings) as app:
        yield UsageGateway(app, url, keys[0].api_key, keys[0].key.id, keys[1].api_key, keys[1].key.id)


def row(record_id: str, key_id: str, model: str, at: int, prompt: int, completion: int) -> dict[str, Any]:
    """A ledger row of ``key_id`` at unix time ``at``, costed at :data:`PRICES`."""
    p, c = PRICES[model]
    out = record_row(
        record_id,
        prompt=prompt,
        completion=completion,
        model=model,
        cost_nanos=prompt * p + completion * c,
    )
    out.update(key_id=key_id, created_at=at)
    return out


def requests_per_bucket(page: dict[str, Any]) -> list[int]:
    return [sum(r["num_model_requests"] for r in b["results"]) for b in page["data"]]


def test_real_traffic_of_two_keys_on_two_models_each_key_sees_its_own(gw: UsageGateway) -> None:
    start = int(time.time()) - 60
    plan = {(gw.key_a, "gpt-one"): 3, (gw.key_a, "gpt-two"): 2, (gw.key_b, "gpt-one"): 4}
    spent: dict[tuple[str, str], list[int]] = {}  # (key, model) -> [prompt, completion, nanos, n]
    for (key, model), n in plan.items():
        client = gw.app.client(api_key=key)
        for i in range(n):
            answer = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": " ".join(["w"] * (i + 1))}]
            )
            assert answer.usage is not None
            p, c = answer.usage.prompt_tokens, answer.usage.completion_tokens
            acc = spent.setdefault((key, model), [0, 0, 0, 0])
            acc[0] += p
            acc[1] += c
            acc[2] += p * PRICES[model][0] + c * PRICES[model][1]
            acc[3] += 1
        client.close()
    with open_store(gw.url) as store:
        wait_for(lambda: len(stored_rows(store)) >= 9, 20, "the nine records drained")
    # the default end_time is the current second, exclusive (see the test of that below)
    time.sleep(1.1)

    # the official SDK calls the key's view as any other GET
    sdk = gw.app.client(api_key=gw.key_a)
    page: Any = sdk.get(
        "/usage",
        cast_to=object,
        options={"params": {"start_time": start, "bucket_width": "1h", "group_by": ["model"]}},
    )
    sdk.close()
    assert page["object"] == "page" and page["has_more"] is False and page["next_page"] is None
    assert len(page["data"]) == 1
    bucket = page["data"][0]
    assert (bucket["object"], bucket["start_time"]) == ("bucket", start)
    results = {r["model"]: r for r in bucket["results"]}
    assert set(results) == {"gpt-one", "gpt-two"}
    for model, r in results.items():
        p, c, nanos, n = spent[(gw.key_a, model)]
        assert r == {
            "object": "organization.usage.completions.result",
            "input_tokens": p,
            "output_tokens": c,
            "input_cached_tokens": 0,
            "num_model_requests": n,
            "cost_usd": nanos / 1_000_000_000,
            "model": model,
            "api_key_id": None,
            "tenant": None,
            "source": None,
        }
    # key b sees its four requests, none of key a's
    theirs = gw.get("/v1/usage", {"start_time": start, "bucket_width": "1h"}, gw.key_b).json()
    (only,) = theirs["data"][0]["results"]
    assert only["num_model_requests"] == 4
    assert only["input_tokens"] == spent[(gw.key_b, "gpt-one")][0]
    assert only["cost_usd"] == spent[(gw.key_b, "gpt-one")][2] / 1_000_000_000
    # the organization view groups by key
    org = gw.get(ORG, {"start_time": start, "bucket_width": "1h", "group_by": "api_key_id"}, ADMIN_TOKEN)
    assert org.status_code == 200, org.text
    by_key = {r["api_key_id"]: r["num_model_requests"] for r in org.json()["data"][0]["results"]}
    assert by_key == {gw.id_a: 5, gw.id_b: 4}


def seeded(gw: UsageGateway) -> None:
    """Key a: gpt-one in minutes 0, 1 and 3 of T0; gpt-two in hour 1. Key b: gpt-one on day 1."""
    gw.insert(
        [
            row("r1", gw.id_a, "gpt-one", T0 + 10, 3, 5),
            row("r2", gw.id_a, "gpt-one", T0 + 70, 4, 6),
            row("r3", gw.id_a, "gpt-one", T0 + 3 * 60 + 59, 1, 1),
            row("r4", gw.id_a, "gpt-two", T0 + 3600, 10, 20),
            row("r5", gw.id_b, "gpt-one", T0 + 86_400 + 5, 7, 7),
            row("r6", gw.id_b, "gpt-one", T0 - 1, 100, 100),  # before every range below
        ]
    )


def test_buckets_of_a_minute_an_hour_and_a_day_include_the_empty_ones(gw: UsageGateway) -> None:
    seeded(gw)
    minutes = gw.get("/v1/usage", {"start_time": T0, "end_time": T0 + 300, "bucket_width": "1m"}, gw.key_a)
    assert minutes.status_code == 200, minutes.text
    data = minutes.json()["data"]
    assert [(b["start_time"], b["end_time"]) for b in data] == [
        (T0 + 60 * i, T0 + 60 * (i + 1)) for i in range(5)
    ]
    assert requests_per_bucket(minutes.json()) == [1, 1, 0, 1, 0]
    assert data[2]["results"] == [] and data[4]["results"] == []

    hours = gw.get(
        "/v1/usage",
        {"start_time": T0, "end_time": T0 + 3 * 3600, "bucket_width": "1h", "group_by": "model"},
        gw.key_a,
    ).json()
    assert requests_per_bucket(hours) == [3, 1, 0]
    (one,) = hours["data"][0]["results"]
    assert (one["model"], one["input_tokens"], one["output_tokens"]) == ("gpt-one", 8, 12)
    assert one["cost_usd"] == (8 * 2_000 + 12 * 8_000) / 1_000_000_000
    (two,) = hours["data"][1]["results"]  # (T0 + 3600 opens hour 1: start inclusive)
    assert (two["model"], two["cost_usd"]) == ("gpt-two", (10 * 1_000 + 20 * 4_000) / 1_000_000_000)

    # a key's days: its own four requests on day 0, nothing of key b's on day 1
    days = gw.get("/v1/usage", {"start_time": T0, "end_time": T0 + 3 * 86_400}, gw.key_a).json()
    assert requests_per_bucket(days) == [4, 0, 0]  # 1d is the default width
    # the organization's days, per key
    org = gw.get(
        ORG,
        {"start_time": T0, "end_time": T0 + 3 * 86_400, "bucket_width": "1d", "group_by": "api_key_id,model"},
        ADMIN_TOKEN,
    ).json()
    assert [
        [(r["api_key_id"], r["model"], r["num_model_requests"]) for r in b["results"]] for b in org["data"]
    ] == [
        sorted([(gw.id_a, "gpt-one", 3), (gw.id_a, "gpt-two", 1)]),
        [(gw.id_b, "gpt-one", 1)],
        [],
    ]
    total = sum(r["cost_usd"] for b in org["data"] for r in b["results"])
    expected = (3 + 4 + 1) * 2_000 + (5 + 6 + 1) * 8_000 + 10 * 1_000 + 20 * 4_000 + 14 * 2_000 + 7 * 6_000
    assert total == pytest.approx(expected / 1_000_000_000, abs=1e-12)


def test_usage_of_the_current_second_is_shown_when_end_time_is_omitted(gw: UsageGateway) -> None:
    """``end_time`` defaults to now and is exclusive; a record's ``created_at`` is whole
    seconds, so "now" has to cover the current second (``tail-service usage`` ends its
    default range at ``int(now) + 1``), or a request just answered is missing from the view."""
    while time.time() % 1 > 0.3:  # early in a second: the query below runs in the same one
        time.sleep(0.01)
    now = int(time.time())
    gw.insert([row("now", gw.id_a, "gpt-one", now, 1, 1)])
    page = gw.get("/v1/usage", {"start_time": now - 60, "bucket_width": "1h"}, gw.key_a).json()
    assert requests_per_bucket(page) == [1], page


def test_pages_cover_the_range_exactly_once(gw: UsageGateway) -> None:
    seeded(gw)
    params: dict[str, Any] = {"start_time": T0, "end_time": T0 + 300, "bucket_width": "1m", "limit": 2}
    starts: list[int] = []
    counts: list[int] = []
    pages = []
    while True:
        r = gw.get("/v1/usage", params, gw.key_a)
        assert r.status_code == 200, r.text
        page = r.json()
        pages.append(page)
        starts += [b["start_time"] for b in page["data"]]
        counts += requests_per_bucket(page)
        if not page["has_more"]:
            assert page["next_page"] is None
            break
        assert page["next_page"] == str(page["data"][-1]["end_time"])
        params = {**params, "page": page["next_page"]}
    assert [len(p["data"]) for p in pages] == [2, 2, 1]
    assert starts == [T0 + 60 * i for i in range(5)]  # each bucket once, in order
    assert counts == [1, 1, 0, 1, 0]
    assert pages[-1]["data"][-1]["end_time"] == T0 + 300


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({}, "start_time"),
        ({"start_time": ""}, "start_time"),
        ({"start_time": "-5"}, "start_time"),
        ({"start_time": "yesterday"}, "start_time"),
        ({"start_time": [str(T0), str(T0)]}, "start_time"),
        ({"start_time": T0, "bucket_width": "2h"}, "bucket_width"),
        ({"start_time": T0, "group_by": "user_id"}, "group_by"),
        ({"start_time": T0, "group_by": "model,project_id"}, "group_by"),
        ({"start_time": T0, "project_ids": "p"}, "project_ids"),
        ({"start_time": T0, "limit": "0"}, "limit"),
        ({"start_time": T0, "limit": "32"}, "limit"),  # 1d: at most 31
        ({"start_time": T0, "bucket_width": "1h", "limit": "169"}, "limit"),
        ({"start_time": T0, "limit": "ten"}, "limit"),
        ({"start_time": T0, "end_time": T0 - 60}, "end_time"),
        ({"start_time": T0, "end_time": T0}, "end_time"),
        ({"start_time": T0, "page": "abc"}, "page"),
        ({"start_time": T0, "page": str(T0 + 1)}, "page"),  # not a bucket boundary
        ({"start_time": T0, "page": str(T0 - 86_400)}, "page"),  # before the range
        ({"start_time": T0, "end_time": T0 + 86_400, "page": str(T0 + 5 * 86_400)}, "page"),  # after it
    ],
)
@pytest.mark.parametrize("view", ["key", "org"])
def test_a_bad_query_is_a_400_naming_the_parameter(
    gw: UsageGateway, view: str, params: dict[str, Any], param: str
) -> None:
    path, token = ("/v1/usage", gw.key_a) if view == "key" else (ORG, ADMIN_TOKEN)
    r = gw.get(path, params, token)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"]


def test_the_organization_view_needs_the_admin_token(
    gw: UsageGateway, stack: Stack, upstream: FakeOpenAI, private_redis: EmbeddedRedis
) -> None:
    params = {"start_time": T0}
    assert gw.get(ORG, params, ADMIN_TOKEN).status_code == 200
    for token in (None, "wrong", ADMIN_TOKEN + "x", gw.key_a):  # a key's own API key is no admin token
        r = gw.get(ORG, params, token)
        assert r.status_code == 401, (token, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    # a key's view needs the key; the admin token is no API key
    assert gw.get("/v1/usage", params).status_code == 401
    assert gw.get("/v1/usage", params, ADMIN_TOKEN).status_code == 401
    # without usage.admin_token the view is off for everyone
    off_settings = settings_for(stack, upstream, private_redis.url(), gw.url)
    with serve_app(off_settings) as off, httpx.Client(base_url=off.base_url, timeout=30) as http:
        for token in (ADMIN_TOKEN, gw.key_a):
            r = http.get(ORG, params=params, headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 403, r.text
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", "admin_view_disabled")
    # the SDK sees the same as its typed errors
    sdk = openai.OpenAI(base_url=gw.app.v1, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        sdk.get("/organization/usage/completions", cast_to=object, options={"params": params})
    sdk.close()


def test_ledger_rows_hold_no_key_and_no_prompt_or_answer_text(gw: UsageGateway, upstream: FakeOpenAI) -> None:
    marker = "zebra-" + gw.id_a[-8:]  # a word no ledger field could hold by chance
    client = gw.app.client(api_key=gw.key_a)
    client.chat.completions.create(model="gpt-one", messages=[{"role": "user", "content": f"say {marker}"}])
    stream = client.chat.completions.create(
        model="gpt-two", messages=[{"role": "user", "content": f"again {marker}"}], stream=True
    )
    assert marker in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    upstream.fail_next(1, status=500)  # a failed request is recorded too
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="gpt-one", messages=[{"role": "user", "content": f"fail {marker}"}]
        )
    client.close()
    with open_store(gw.url) as store:
        wait_for(lambda: len(stored_rows(store)) >= 3, 20, "the three records drained")
        rows = stored_rows(store)
    assert len(rows) == 3
    assert sorted(r["status"] for r in rows)[:2] == [200, 200]
    assert sorted(r["outcome"] for r in rows) == ["error", "ok", "ok"]
    assert set(rows[0]) == {
        "id",
        "request_id",
        "key_id",
        "tenant",
        "model",
        "deployment",
        "endpoint",
        "source",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cost_nanos",
        "latency_ms",
        "status",
        "outcome",
        "cache_hit",
        "estimated",
        "created_at",
    }
    secret = gw.key_a.removeprefix("sk-tail-")
    for r in rows:
        assert r["key_id"] == gw.id_a
        for name, value in r.items():
            text = str(value)
            assert marker not in text and "zebra" not in text, (name, value)
            assert gw.key_a not in text and secret[:12] not in text, (name, value)
    # nor anywhere in the store's file (the ledger is all this store holds)
    db = Path(gw.url.removeprefix("sqlite:///"))
    raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    assert b"zebra" not in raw and secret[:12].encode() not in raw
