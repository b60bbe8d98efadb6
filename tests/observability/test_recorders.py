"""The metric recorders on their own: bounded labels, cost and cached tokens, error kinds."""

from __future__ import annotations

from prometheus_client import generate_latest

from tail_service.core.types import Deployment, Endpoint, RequestStats, TokenUsage
from tail_service.core.usage import Outcome, UsageRecord
from tail_service.errors import ProviderConnectionError, ProviderHTTPError, ProviderTimeoutError
from tail_service.metrics import Metrics, MetricsUsageSink, RequestMetrics, UpstreamMetrics, error_kind


def scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_usage_sink_counts_cached_tokens_and_cost_in_dollars() -> None:
    metrics = Metrics(["gpt-test"])
    sink = MetricsUsageSink(metrics)
    usage = TokenUsage(prompt_tokens=100, completion_tokens=20, cached_tokens=60)
    for _ in range(2):
        sink.record(UsageRecord("r", "gpt-test", Endpoint.CHAT, usage, Outcome.OK, cost_nanos=1_500_000))
    text = scrape(metrics)
    assert 'tail_tokens_total{kind="cached",model="gpt-test"} 120.0' in text
    assert 'tail_tokens_total{kind="prompt",model="gpt-test"} 200.0' in text
    assert 'tail_cost_usd_total{model="gpt-test"} 0.003' in text


def test_unconfigured_models_and_unknown_reasons_are_not_label_values() -> None:
    metrics = Metrics(["gpt-test"])
    requests = RequestMetrics(metrics)
    for i in range(3):
        stats = RequestStats(model=f"client-made-{i}", reject_reason=f"weird-{i}", cache="miss")
        requests.observe("/v1/chat/completions", 429, 1.0, 1.5, stats)
    requests.observe("/v1/models", 200, 1.0, 1.1, RequestStats())
    text = scrape(metrics)
    assert "client-made" not in text and "weird" not in text
    assert (
        'tail_requests_total{deployment="none",model="unknown",route="/v1/chat/completions",status="429"} 3.0'
        in text
    )
    assert 'tail_ratelimit_rejections_total{reason="other"} 3.0' in text
    assert 'tail_response_cache_lookups_total{model="unknown",result="miss"} 3.0' in text
    assert 'model="none",route="/v1/models",status="200"' in text
    # a client-chosen name is never kept as a cache key either
    assert not any(key[1].startswith("client-made") for key in requests._children)


def test_budget_rejections_keep_their_reason() -> None:
    metrics = Metrics(["gpt-test"])
    requests = RequestMetrics(metrics)
    for reason in ("budget", "tenant_budget", "model_tokens"):
        requests.observe(
            "/v1/chat/completions", 429, 0.0, 0.1, RequestStats(model="gpt-test", reject_reason=reason)
        )
    text = scrape(metrics)
    for reason in ("budget", "tenant_budget", "model_tokens"):
        assert f'tail_ratelimit_rejections_total{{reason="{reason}"}} 1.0' in text


def test_upstream_attempts_by_outcome_and_kind() -> None:
    metrics = Metrics(["gpt-test"])
    upstream = UpstreamMetrics(metrics)
    dep = Deployment("gpt-test#0", "gpt-test", "openai", "http://up", "m", frozenset({Endpoint.CHAT}))
    upstream.attempt(dep, None, 0.2)
    upstream.attempt(dep, ProviderHTTPError(429, "slow down", body=None), 0.01)
    upstream.attempt(dep, ProviderTimeoutError("late"), 5.0)
    text = scrape(metrics)
    assert 'tail_upstream_duration_seconds_count{deployment="gpt-test#0",outcome="ok"} 1.0' in text
    assert 'tail_upstream_duration_seconds_count{deployment="gpt-test#0",outcome="error"} 2.0' in text
    assert 'tail_upstream_errors_total{deployment="gpt-test#0",kind="http_429"} 1.0' in text
    assert 'tail_upstream_errors_total{deployment="gpt-test#0",kind="timeout"} 1.0' in text


def test_error_kinds() -> None:
    assert error_kind(ProviderHTTPError(503, "down", body=None)) == "http_5xx"
    assert error_kind(ProviderHTTPError(400, "bad", body=None)) == "http_4xx"
    assert error_kind(ProviderConnectionError("refused")) == "connection"
