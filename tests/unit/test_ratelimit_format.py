"""The pure side of rate limiting: durations, headers and 429 messages."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import pytest

from tail_service.core.ratelimit import (
    UNLIMITED,
    Admission,
    AdmissionRequest,
    Limits,
    Priority,
    combine,
    format_duration,
    rate_limit_message,
    ratelimit_headers,
)

GO_DURATION = re.compile(r"^(?=\d)(\d+h)?(\d+m)?(\d+(\.\d+)?(ms|us|µs|ns|s))?$")


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (-5, "0s"),
        (1, "1ms"),
        (12, "12ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1200, "1.2s"),
        (1005, "1.005s"),
        (8640, "8.64s"),
        (59_999, "59.999s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (361_500, "6m1.5s"),
        (3_600_000, "1h0m0s"),
        (3_723_000, "1h2m3s"),
        (90_000_000, "25h0m0s"),
    ],
)
def test_format_duration(ms: int, text: str) -> None:
    assert format_duration(ms) == text
    assert GO_DURATION.match(text)


def test_format_duration_always_matches_the_openai_pattern() -> None:
    for ms in [*range(0, 2500, 7), *range(0, 7_300_000, 9_973)]:
        assert GO_DURATION.match(format_duration(ms)), ms


def _adm(**kw: Any) -> Admission:
    return replace(UNLIMITED, **kw)


def _req(tokens: int = 1, priority: Priority = Priority.INTERACTIVE, **limits: int) -> AdmissionRequest:
    key = Limits(**{k: v for k, v in limits.items() if not k.startswith(("m_", "t_"))})
    model = Limits(**{k[2:]: v for k, v in limits.items() if k.startswith("m_")})
    total = Limits(**{k[2:]: v for k, v in limits.items() if k.startswith("t_")})
    return AdmissionRequest("key1", "req1", "gpt-x", tokens, key, model, priority, total)


def test_headers_for_both_kinds() -> None:
    a = _adm(
        limit_requests=50,
        remaining_requests=49,
        reset_requests_ms=60_000,
        limit_tokens=1000,
        remaining_tokens=900,
        reset_tokens_ms=8640,
    )
    assert ratelimit_headers(a) == {
        "x-ratelimit-limit-requests": "50",
        "x-ratelimit-remaining-requests": "49",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "8.64s",
    }


def test_headers_omitted_for_kinds_without_a_limit() -> None:
    assert ratelimit_headers(UNLIMITED) == {}
    only_tokens = ratelimit_headers(_adm(limit_tokens=10, remaining_tokens=3, reset_tokens_ms=5))
    assert set(only_tokens) == {
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    }
    only_requests = ratelimit_headers(_adm(limit_requests=3, remaining_requests=0, reset_requests_ms=1))
    assert set(only_requests) == {
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    }


def test_requests_message() -> None:
    a = _adm(allowed=False, reason="requests", limit_requests=50, remaining_requests=0, retry_after_ms=1200)
    assert rate_limit_message(a, _req(rpm=50)) == (
        "Rate limit reached for gpt-x on requests per min (RPM): Limit 50, Used 50, Requested 1. "
        "Please try again in 1.2s."
    )


def test_tokens_message_and_too_large() -> None:
    a = _adm(
        allowed=False, reason="model_tokens", limit_tokens=1000, remaining_tokens=100, retry_after_ms=6000
    )
    assert rate_limit_message(a, _req(200, m_tpm=1000)) == (
        "Rate limit reached for gpt-x on tokens per min (TPM): Limit 1000, Used 900, Requested 200. "
        "Please try again in 6s."
    )
    big = _adm(
        allowed=False, reason="tokens", limit_tokens=1000, remaining_tokens=1000, retry_after_ms=60_000
    )
    msg = rate_limit_message(big, _req(5000, tpm=1000))
    assert msg.startswith("Request too large for gpt-x on tokens per min (TPM): Limit 1000, Requested 5000.")


def test_concurrency_messages() -> None:
    a = _adm(allowed=False, reason="concurrency", retry_after_ms=1000)
    msg = rate_limit_message(a, _req(max_concurrency=4, m_max_concurrency=2))
    assert msg.startswith("Too many concurrent requests for this API key: Limit 4 in flight.")
    assert msg.endswith("Please try again in 1s.")
    m = rate_limit_message(
        _adm(allowed=False, reason="model_concurrency", retry_after_ms=1000), _req(m_max_concurrency=2)
    )
    assert m.startswith("Too many concurrent requests for this API key on gpt-x: Limit 2 in flight.")


def test_batch_message_explains_the_headroom() -> None:
    a = _adm(allowed=False, reason="requests", limit_requests=10, remaining_requests=1, retry_after_ms=500)
    msg = rate_limit_message(a, _req(priority=Priority.BATCH, rpm=10))
    assert "Used 9, Requested 1" in msg
    assert "Batch requests leave part of every limit to interactive traffic." in msg


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ValueError):
        Limits(rpm=-1)
    with pytest.raises(ValueError):
        AdmissionRequest("", "r", "m", 1, Limits(rpm=1), Limits())
    with pytest.raises(ValueError):
        AdmissionRequest("k", "r", "m", -1, Limits(rpm=1), Limits())
    assert not AdmissionRequest("k", "r", "m", 0, Limits(), Limits()).limited
    assert AdmissionRequest("k", "r", "m", 0, Limits(), Limits(max_concurrency=1)).limited


def test_model_wide_messages_say_all_keys() -> None:
    a = _adm(
        allowed=False, reason="total_requests", limit_requests=10, remaining_requests=0, retry_after_ms=900
    )
    assert rate_limit_message(a, _req(t_rpm=10)) == (
        "Rate limit reached for gpt-x (all API keys together) on requests per min (RPM): Limit 10, "
        "Used 10, Requested 1. Please try again in 900ms."
    )
    c = _adm(allowed=False, reason="total_concurrency", retry_after_ms=1000)
    assert rate_limit_message(c, _req(t_max_concurrency=8)).startswith(
        "Too many concurrent requests for gpt-x (all API keys together): Limit 8 in flight."
    )


def test_combine_reports_the_rejection_and_the_tightest_limits() -> None:
    key_ok = _adm(limit_requests=100, remaining_requests=40, reset_requests_ms=60_000, limit_tokens=0)
    total_ok = _adm(
        limit_requests=1000,
        remaining_requests=5,
        reset_requests_ms=60_000,
        limit_tokens=9000,
        remaining_tokens=800,
        reset_tokens_ms=60_000,
    )
    both = combine(key_ok, total_ok)
    assert both.allowed and both.reason is None and both.retry_after_ms == 0
    assert (both.limit_requests, both.remaining_requests) == (1000, 5)  # the least remaining
    assert (both.limit_tokens, both.remaining_tokens) == (9000, 800)  # the only token limit
    refused = replace(total_ok, allowed=False, reason="total_tokens", remaining_tokens=10, retry_after_ms=700)
    r = combine(key_ok, refused)
    assert not r.allowed and r.reason == "total_tokens" and r.retry_after_ms == 700
    assert (r.limit_tokens, r.remaining_tokens) == (9000, 10)
    key_refused = replace(key_ok, allowed=False, reason="requests", remaining_requests=0, retry_after_ms=300)
    r2 = combine(key_refused, refused)
    assert r2.reason == "requests" and r2.retry_after_ms == 700  # the first reason, the longest wait
    assert (r2.limit_requests, r2.remaining_requests) == (100, 0)
    assert combine(UNLIMITED, UNLIMITED) == UNLIMITED
