"""Prometheus metrics, on a registry owned by the app (no global default registry).

:class:`Metrics` defines every family. Three small recorders feed it, each resolving
its label children once and caching them in a dict, so the hot path costs dict lookups
rather than ``labels()`` calls (which take a lock and hash the label tuple every time):

- :class:`RequestMetrics`: one call per HTTP request, from the request-id middleware;
- :class:`UpstreamMetrics`: one call per upstream attempt, from the model proxy
  (:class:`~tail_service.core.proxy.AttemptObserver`);
- :class:`MetricsUsageSink`: one call per usage record (tokens and cost).

State that already lives in memory (deployment cooldowns, the Redis breaker, the auth
verdict cache's hit counts) is read at scrape time by a collector: no cost per request.

Label values are bounded: configured model and deployment names, route templates,
status codes and fixed reasons/kinds. A model a client names that is not configured is
``unknown``; a request that names none is ``none``. Never a key, a request id, a tenant
or any text a client sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tail_service.core.ratelimit import REASONS
from tail_service.core.types import Deployment, RequestStats
from tail_service.core.usage import UsageRecord
from tail_service.errors import (
    ProviderConnectionError,
    ProviderError,
    ProviderHTTPError,
    ProviderNotInstalledError,
    ProviderProtocolError,
    ProviderStreamCut,
    ProviderTimeoutError,
    ProviderUnsupportedError,
)

log = logging.getLogger("tail_service.usage")

#: request and upstream durations, in seconds: from a cache hit to a long generation
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
#: time to first token, in seconds
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)
#: the reasons a 429 may carry (anything else is counted as ``other``)
REJECT_REASONS = frozenset((*REASONS, "budget", "tenant_budget"))
#: the model label of a request that named no model (``/v1/models``, a 401 before parsing)
NO_MODEL = "none"
#: the model label of a model name that is not configured
UNKNOWN_MODEL = "unknown"


class RouterState(Protocol):
    def health(self) -> dict[str, dict[str, float | int | bool]]: ...


class BreakerState(Protocol):
    @property
    def breaker_open(self) -> bool: ...

    @property
    def degraded_admissions(self) -> int: ...


class VerdictCacheState(Protocol):
    @property
    def cache_hits(self) -> int: ...

    @property
    def cache_misses(self) -> int: ...


class _StateCollector(Collector):
    """Gauges and counters read from in-memory state at scrape time."""

    def __init__(self) -> None:
        self.router: RouterState | None = None
        self.limiter: BreakerState | None = None
        self.auth: VerdictCacheState | None = None

    def describe(self) -> Iterable[Metric]:
        return ()  # the families depend on what is wired; nothing to check for clashes

    def collect(self) -> Iterator[Metric]:
        if self.router is not None:
            cooling = GaugeMetricFamily(
                "tail_deployment_cooling_down",
                "1 while a deployment is in cooldown after failures (it gets one probe attempt)",
                labels=["deployment"],
            )
            remaining = GaugeMetricFamily(
                "tail_deployment_cooldown_remaining_seconds",
                "Seconds until a deployment's cooldown ends (0: healthy)",
                labels=["deployment"],
            )
            fails = GaugeMetricFamily(
                "tail_deployment_consecutive_failures",
                "Failures in a row since a deployment's last success or cooldown",
                labels=["deployment"],
            )
            for dep_id, health in self.router.health().items():
                cooling.add_metric([dep_id], float(health["cooling_down"]))
                remaining.add_metric([dep_id], float(health["cooldown_remaining_s"]))
                fails.add_metric([dep_id], float(health["consecutive_fails"]))
            yield from (cooling, remaining, fails)
        if self.limiter is not None:
            yield GaugeMetricFamily(
                "tail_ratelimit_breaker_open",
                "1 while the Redis rate limiter's circuit breaker is open (admissions skip Redis)",
                value=float(self.limiter.breaker_open),
            )
            yield CounterMetricFamily(
                "tail_ratelimit_degraded_admissions",
                "Admissions decided without Redis (breaker open or Redis failing), per failure_mode",
                value=self.limiter.degraded_admissions,
            )
        if self.auth is not None:
            lookups = CounterMetricFamily(
                "tail_auth_cache_lookups",
                "API-key verdict cache lookups: hit (answered from memory) or miss (auth-service asked)",
                labels=["result"],
            )
            lookups.add_metric(["hit"], self.auth.cache_hits)
            lookups.add_metric(["miss"], self.auth.cache_misses)
            yield lookups


class Metrics:
    """The service's metrics; one instance per app.

    ``models`` are the configured public model names: the only model label values.
    """

    def __init__(self, models: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.models = frozenset(models)
        r = self.registry
        self.tokens = Counter(
            "tail_tokens",
            "Tokens used, by model and kind (prompt, completion, cached: prompt tokens read from "
            "the provider's prompt cache, included in prompt)",
            ["model", "kind"],
            registry=r,
        )
        self.usage_records = Counter(
            "tail_usage_records", "Usage records by outcome", ["model", "outcome", "estimated"], registry=r
        )
        self.cost = Counter(
            "tail_cost_usd", "Cost of the usage, in US dollars, by model", ["model"], registry=r
        )
        self.requests = Counter(
            "tail_requests",
            "HTTP requests by route template, model, deployment (cache: a cache hit; none: no "
            "upstream answered) and final status (a stream that failed after its first byte "
            "counts with its in-band error's status; 499: the client left)",
            ["route", "model", "deployment", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "tail_request_duration_seconds",
            "HTTP request duration, to the last byte of the response, by route, model and status class",
            ["route", "model", "status_class"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "tail_time_to_first_token_seconds",
            "Streams: seconds from the request's arrival to the first chunk sent, by model",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "tail_upstream_duration_seconds",
            "Upstream attempts by deployment and outcome (ok, error); a stream's runs to its "
            "first meaningful chunk",
            ["deployment", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "tail_upstream_errors",
            "Failed upstream attempts by deployment and kind (http_429, http_4xx, http_5xx, timeout, "
            "connection, stream_cut, protocol, unsupported, not_installed, other)",
            ["deployment", "kind"],
            registry=r,
        )
        self.ratelimit_rejections = Counter(
            "tail_ratelimit_rejections",
            "Requests refused with a 429 by admission, by the limit that refused (or budget)",
            ["reason"],
            registry=r,
        )
        self.response_cache = Counter(
            "tail_response_cache_lookups",
            "Response cache lookups by model and result (hit, miss)",
            ["model", "result"],
            registry=r,
        )
        self._state = _StateCollector()
        r.register(self._state)

    def model_label(self, model: str) -> str:
        """``model`` if it is configured, else ``unknown`` (``none`` when empty)."""
        if model in self.models:
            return model
        return UNKNOWN_MODEL if model else NO_MODEL

    def watch(
        self,
        *,
        router: RouterState | None = None,
        limiter: BreakerState | None = None,
        auth: VerdictCacheState | None = None,
    ) -> None:
        """Expose the state of these components at scrape time (the ones given)."""
        if router is not None:
            self._state.router = router
        if limiter is not None:
            self._state.limiter = limiter
        if auth is not None:
            self._state.auth = auth


def _status_class(status: int) -> str:
    return f"{status // 100}xx"


class RequestMetrics:
    """Counts one HTTP request (route, model, deployment, status), its duration, its time
    to first token and what the request stats say about the cache and rate limits."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        #: (route, raw model, deployment, status) -> (requests child, duration child, model label)
        self._children: dict[tuple[str, str, str, int], tuple[Any, Any, str]] = {}
        self._ttft: dict[str, Any] = {}
        self._cache: dict[tuple[str, str], Any] = {}
        self._rejections: dict[str, Any] = {}

    def _resolve(self, key: tuple[str, str, str, int]) -> tuple[Any, Any, str]:
        route, model, deployment, status = key
        label = self._m.model_label(model)
        children = (
            self._m.requests.labels(route, label, deployment, str(status)),
            self._m.request_duration.labels(route, label, _status_class(status)),
            label,
        )
        if label == model or not model:  # never keep client-chosen names as keys
            self._children[key] = children
        return children

    def observe(self, route: str, status: int, started: float, ended: float, stats: RequestStats) -> None:
        """Record one finished request; ``started``/``ended`` are ``perf_counter`` seconds."""
        deployment = stats.deployment or ("cache" if stats.cache == "hit" else "none")
        key = (route, stats.model, deployment, status)
        children = self._children.get(key) or self._resolve(key)
        children[0].inc()
        children[1].observe(ended - started)
        model = children[2]
        if stats.first_byte:
            ttft = self._ttft.get(model)
            if ttft is None:
                ttft = self._ttft[model] = self._m.ttft.labels(model)
            ttft.observe(stats.first_byte - started)
        if stats.cache:
            cache = self._cache.get((model, stats.cache))
            if cache is None:
                cache = self._cache[(model, stats.cache)] = self._m.response_cache.labels(model, stats.cache)
            cache.inc()
        if stats.reject_reason:
            reason = stats.reject_reason if stats.reject_reason in REJECT_REASONS else "other"
            rejected = self._rejections.get(reason)
            if rejected is None:
                rejected = self._rejections[reason] = self._m.ratelimit_rejections.labels(reason)
            rejected.inc()


def error_kind(error: ProviderError) -> str:
    """A bounded name for what went wrong in one upstream attempt."""
    if isinstance(error, ProviderHTTPError):
        if error.status == 429:
            return "http_429"
        return "http_5xx" if error.status >= 500 else "http_4xx"
    if isinstance(error, ProviderTimeoutError):
        return "timeout"
    if isinstance(error, ProviderConnectionError):
        return "connection"
    if isinstance(error, ProviderStreamCut):
        return "stream_cut"
    if isinstance(error, ProviderProtocolError):
        return "protocol"
    if isinstance(error, ProviderUnsupportedError):
        return "unsupported"
    if isinstance(error, ProviderNotInstalledError):
        return "not_installed"
    return "other"


class UpstreamMetrics:
    """The model proxy's :class:`~tail_service.core.proxy.AttemptObserver`: attempt
    durations by deployment and outcome, failures by kind."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._ok: dict[str, Any] = {}
        self._failed: dict[tuple[str, str], tuple[Any, Any]] = {}

    def attempt(self, dep: Deployment, error: ProviderError | None, seconds: float) -> None:
        if error is None:
            ok = self._ok.get(dep.id)
            if ok is None:
                ok = self._ok[dep.id] = self._m.upstream_duration.labels(dep.id, "ok")
            ok.observe(seconds)
            return
        key = (dep.id, error_kind(error))
        failed = self._failed.get(key)
        if failed is None:
            failed = self._failed[key] = (
                self._m.upstream_duration.labels(dep.id, "error"),
                self._m.upstream_errors.labels(*key),
            )
        failed[0].observe(seconds)
        failed[1].inc()


class MetricsUsageSink:
    """A :class:`~tail_service.core.inference.UsageSink` that counts tokens and cost in Prometheus.

    The durable, batched usage ledger comes with the store; until then every record
    is counted here and logged at debug level.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        # Resolved label children, so a record costs dict lookups rather than
        # ``labels()`` calls (which take a lock and hash the label tuple every time).
        # Bounded: records only ever carry configured model names.
        self._tokens: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._records: dict[tuple[str, str, bool], Any] = {}

    def record(self, rec: UsageRecord) -> None:
        tokens = self._tokens.get(rec.model)
        if tokens is None:
            tokens = self._tokens[rec.model] = (
                self._m.tokens.labels(rec.model, "prompt"),
                self._m.tokens.labels(rec.model, "completion"),
                self._m.tokens.labels(rec.model, "cached"),
                self._m.cost.labels(rec.model),
            )
        usage = rec.usage
        tokens[0].inc(usage.prompt_tokens)
        tokens[1].inc(usage.completion_tokens)
        if usage.cached_tokens:
            tokens[2].inc(usage.cached_tokens)
        if rec.cost_nanos:
            tokens[3].inc(rec.cost_nanos / 1e9)
        key = (rec.model, rec.outcome.value, rec.estimated)
        records = self._records.get(key)
        if records is None:
            records = self._records[key] = self._m.usage_records.labels(
                rec.model, rec.outcome.value, str(rec.estimated).lower()
            )
        records.inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "usage",
                extra={
                    "model": rec.model,
                    "endpoint": rec.endpoint.value,
                    "prompt_tokens": rec.usage.prompt_tokens,
                    "completion_tokens": rec.usage.completion_tokens,
                    "outcome": rec.outcome.value,
                    "estimated": rec.estimated,
                },
            )
