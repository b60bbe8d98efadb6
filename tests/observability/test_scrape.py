"""``/metrics`` after real traffic through a whole stack: real auth-service (mTLS), real
Redis (rate limits, response cache), a fake upstream, the official openai SDK.

One gateway serves a fixed mix (chat, stream, embeddings, an upstream failure that is
retried, a cache hit, a 429, a 401); every test reads the same scrape and access log:
the counters moved as they should, no label or log line carries a key, a prompt or an
answer, ``promtool check metrics`` is clean, and the Grafana dashboard asks only for
metrics that are exposed.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tail_service.authsvc.keys import ensure_pepper_file
from tail_service.logging import log_handler
from tail_service.proto import auth_pb2
from tail_service.redis_embedded import EmbeddedRedis
from tail_service.settings import TLSFiles
from tests.conftest import UPSTREAM_KEY_ENV, model_entry, serve_app
from tests.fakes.openai_upstream import run_openai_upstream_in_thread
from tests.stack_fixtures import Stack

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tail-service.json"
MODEL = "gpt-test"
#: distinctive texts: none may appear in a label value or a log line
PROMPT = "zebra-prompt-7f3c in plain words"
STREAM_PROMPT = "okapi-stream-prompt-91ad"
CACHED_PROMPT = "narwhal-cached-prompt-55e0"
EMBED_INPUT = "quokka-embedding-input-1b2d"
BAD_KEY = "sk-tail-not-a-real-key-0123456789abcdef"


@dataclass
class Traffic:
    """What the fixed mix produced."""

    metrics: str
    access: list[dict[str, Any]]
    api_key: str
    key_id: str
    limited_key: str
    #: x-request-id -> what the request was
    request_ids: dict[str, str] = field(default_factory=dict)
    #: texts the upstream answered with (the fake echoes the prompt)
    answers: list[str] = field(default_factory=list)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(sample name, labels): value}`` of a scrape."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


def new_key(stack: Stack, **limits: int) -> tuple[str, str]:
    resp = stack.admin_auth().CreateKey(
        auth_pb2.CreateKeyRequest(name="metrics", tenant="acme", limits=auth_pb2.Limits(**limits)), timeout=5
    )
    return resp.api_key, resp.key.id


@pytest.fixture(scope="module")
def traffic(
    tmp_path_factory: pytest.TempPathFactory,
    tls_for: Callable[[str], TLSFiles],
    redis_server: EmbeddedRedis,
) -> Iterator[Traffic]:
    tmp = tmp_path_factory.mktemp("scrape")
    ensure_pepper_file(tmp / "pepper")
    stack = Stack(tmp, tls_for, 0, 0)
    stack.start_auth()
    env = pytest.MonkeyPatch()
    env.setenv(UPSTREAM_KEY_ENV, "sk-up-m")
    access = logging.getLogger("tail_service.access")
    buf = io.StringIO()
    handler = log_handler(buf, json=True)
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        with run_openai_upstream_in_thread("m", api_key="sk-up-m") as upstream:
            settings = stack.gateway_settings(
                [model_entry(MODEL, upstream), model_entry("embed-test", upstream)],
                ratelimit={"enabled": True},
                redis={"url": redis_server.url(), "timeout": 1},
            )
            with serve_app(settings) as app:
                yield run_traffic(stack, app.base_url, upstream, buf)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
        env.undo()
        if stack.auth is not None:
            stack.auth.stop(grace=0.2)


def run_traffic(stack: Stack, base_url: str, upstream: Any, buf: io.StringIO) -> Traffic:
    api_key, key_id = new_key(stack)
    limited_key, _ = new_key(stack, rpm=1)
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=30)
    t = Traffic("", [], api_key, key_id, limited_key)
    msgs = [{"role": "user", "content": PROMPT}]

    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=msgs)  # type: ignore[arg-type]
    t.request_ids[raw.headers["x-request-id"]] = "chat"
    t.answers.append(raw.parse().choices[0].message.content or "")

    stream = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": STREAM_PROMPT}],
        stream=True,
        stream_options={"include_usage": True},
    )
    t.request_ids[stream.headers["x-request-id"]] = "stream"
    t.answers.append("".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices))

    emb = client.embeddings.with_raw_response.create(model="embed-test", input=EMBED_INPUT)
    t.request_ids[emb.headers["x-request-id"]] = "embeddings"

    upstream.fail_next(1, status=500)  # the first attempt fails, the retry answers
    client.chat.completions.create(model=MODEL, messages=msgs)  # type: ignore[arg-type]

    cached = [{"role": "user", "content": CACHED_PROMPT}]
    verdicts = []
    for _ in range(40):  # the miss is stored in the background: ask until it is a hit
        r = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=cached,  # type: ignore[arg-type]
            extra_headers={"x-tail-cache": "use"},
        )
        verdicts.append(r.headers["x-tail-cache"])
        if verdicts[-1] == "hit":
            t.request_ids[r.headers["x-request-id"]] = "cache hit"
            break
        time.sleep(0.05)
    assert verdicts[0] == "miss" and verdicts[-1] == "hit", verdicts

    limited = openai.OpenAI(base_url=base_url + "/v1", api_key=limited_key, max_retries=0, timeout=30)
    limited.chat.completions.create(model=MODEL, messages=msgs)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as refused:
        limited.chat.completions.create(model=MODEL, messages=msgs)  # type: ignore[arg-type]
    t.request_ids[refused.value.response.headers["x-request-id"]] = "429"

    bad = openai.OpenAI(base_url=base_url + "/v1", api_key=BAD_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as denied:
        bad.chat.completions.create(model=MODEL, messages=msgs)  # type: ignore[arg-type]
    t.request_ids[denied.value.response.headers["x-request-id"]] = "401"

    with httpx.Client(base_url=base_url, timeout=30) as http:
        t.metrics = http.get("/metrics").text
    time.sleep(0.1)  # the /metrics request's own line is written after its response
    t.access = [orjson.loads(line) for line in buf.getvalue().splitlines()]
    return t


def test_requests_are_counted_by_route_model_deployment_and_status(traffic: Traffic) -> None:
    s = samples(traffic.metrics)
    chat = {"route": "/v1/chat/completions", "model": MODEL}
    # chat, stream, the retried chat, the cache miss, the limited key's first call
    assert value(s, "tail_requests_total", **chat, deployment="gpt-test#0", status="200") >= 5
    assert value(s, "tail_requests_total", **chat, deployment="cache", status="200") == 1
    assert value(s, "tail_requests_total", **chat, deployment="none", status="429") == 1
    # the 401 is refused before the body is read: no model yet
    assert (
        value(
            s,
            "tail_requests_total",
            route="/v1/chat/completions",
            model="none",
            deployment="none",
            status="401",
        )
        == 1
    )
    assert (
        value(
            s,
            "tail_requests_total",
            route="/v1/embeddings",
            model="embed-test",
            deployment="embed-test#0",
            status="200",
        )
        == 1
    )
    ok = value(s, "tail_request_duration_seconds_count", **chat, status_class="2xx")
    assert ok == value(s, "tail_requests_total", **chat, deployment="gpt-test#0", status="200") + 1
    assert value(s, "tail_time_to_first_token_seconds_count", model=MODEL) == 1


def test_upstream_attempts_limits_and_caches_are_counted(traffic: Traffic) -> None:
    s = samples(traffic.metrics)
    assert value(s, "tail_upstream_errors_total", deployment="gpt-test#0", kind="http_5xx") == 1
    assert value(s, "tail_upstream_duration_seconds_count", deployment="gpt-test#0", outcome="error") == 1
    assert value(s, "tail_upstream_duration_seconds_count", deployment="gpt-test#0", outcome="ok") >= 5
    assert value(s, "tail_ratelimit_rejections_total", reason="requests") == 1
    assert value(s, "tail_response_cache_lookups_total", model=MODEL, result="hit") == 1
    assert value(s, "tail_response_cache_lookups_total", model=MODEL, result="miss") >= 1
    assert value(s, "tail_auth_cache_lookups_total", result="hit") >= 5
    assert value(s, "tail_auth_cache_lookups_total", result="miss") >= 3  # two keys and the bad one
    assert value(s, "tail_ratelimit_breaker_open") == 0
    assert ("tail_ratelimit_breaker_open", frozenset()) in s
    assert value(s, "tail_deployment_cooling_down", deployment="gpt-test#0") == 0
    assert value(s, "tail_tokens_total", model=MODEL, kind="prompt") > 0
    assert value(s, "tail_tokens_total", model=MODEL, kind="completion") > 0
    assert ("tail_cost_usd_total", frozenset({("model", MODEL)})) in s


def test_no_label_value_or_log_line_carries_a_secret_or_content(traffic: Traffic) -> None:
    forbidden = [traffic.api_key, traffic.limited_key, BAD_KEY, PROMPT, STREAM_PROMPT, CACHED_PROMPT]
    forbidden += [EMBED_INPUT, "acme", *traffic.request_ids, *(a for a in traffic.answers if a)]
    labels = {
        v
        for family in text_string_to_metric_families(traffic.metrics)
        for smp in family.samples
        for v in smp.labels.values()
    }
    lines = [orjson.dumps(line).decode() for line in traffic.access]
    for text in forbidden:
        assert not any(text in v for v in labels), text
        if text not in traffic.request_ids:  # the access log names its request, of course
            assert not any(text in line for line in lines), text
    assert not any(traffic.api_key[:12] in line for line in lines)


def test_one_access_line_per_request_with_its_fields(traffic: Traffic) -> None:
    by_id = {line["request_id"]: line for line in traffic.access}
    assert len(by_id) == len(traffic.access), "one line per request"
    assert set(traffic.request_ids) <= set(by_id)
    for rid, what in traffic.request_ids.items():
        line = by_id[rid]
        assert line["logger"] == "tail_service.access" and line["level"] == "info"
        assert line["method"] == "POST" and line["ms"] > 0
        if what == "401":
            assert (line["status"], line["key_id"], line["model"]) == (401, "-", "-")
            continue
        if what == "429":
            assert line["status"] == 429 and line["model"] == MODEL
            continue
        assert line["status"] == 200
        assert line["key_id"] == traffic.key_id
        # a cache hit used no upstream tokens
        assert (line["prompt_tokens"] > 0) is (what != "cache hit")
    stream = by_id[next(r for r, w in traffic.request_ids.items() if w == "stream")]
    assert stream["ttft_ms"] <= stream["ms"] and stream["completion_tokens"] > 0
    assert stream["deployment"] == "gpt-test#0"
    hit = by_id[next(r for r, w in traffic.request_ids.items() if w == "cache hit")]
    assert hit["cache"] == "hit"


def promtool() -> str | None:
    """promtool from ``TAIL_PROMTOOL``, the venv's ``tools/`` (scripts/test.sh puts it there), or PATH."""
    candidates = [os.environ.get("TAIL_PROMTOOL", ""), str(Path(sys.prefix) / "tools" / "promtool")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    return shutil.which("promtool")


def test_promtool_check_metrics_is_clean(traffic: Traffic) -> None:
    tool = promtool()
    if tool is None:
        message = "promtool not found (scripts/test.sh installs it into $VENV/tools; or set TAIL_PROMTOOL)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [tool, "check", "metrics"], input=traffic.metrics, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


#: a PromQL identifier not followed by ``(``: a metric name (or a label, filtered below)
_IDENT = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")


def test_dashboard_asks_only_for_exposed_metrics(traffic: Traffic) -> None:
    dashboard = orjson.loads(DASHBOARD.read_bytes())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    exposed = {s.name for family in text_string_to_metric_families(traffic.metrics) for s in family.samples}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            names = {n for n in _IDENT.findall(target["expr"]) if n.startswith("tail_")}
            assert names, (panel["title"], target["expr"])
            assert names <= exposed, (panel["title"], names - exposed)
            used |= names
    # every family the operator needs has a panel
    for needed in (
        "tail_requests_total",
        "tail_request_duration_seconds_bucket",
        "tail_time_to_first_token_seconds_bucket",
        "tail_upstream_duration_seconds_bucket",
        "tail_upstream_errors_total",
        "tail_tokens_total",
        "tail_cost_usd_total",
        "tail_ratelimit_rejections_total",
        "tail_response_cache_lookups_total",
        "tail_ratelimit_breaker_open",
        "tail_deployment_cooling_down",
        "tail_auth_cache_lookups_total",
    ):
        assert needed in used, needed
