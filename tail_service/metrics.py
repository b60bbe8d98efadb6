"""Prometheus metrics, on a registry owned by the app (no global default registry)."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from tail_service.core.usage import UsageRecord

log = logging.getLogger("tail_service.usage")


class Metrics:
    """The service's metrics; one instance per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tokens = Counter(
            "tail_tokens", "Tokens used, by model and kind", ["model", "kind"], registry=self.registry
        )
        self.usage_records = Counter(
            "tail_usage_records",
            "Usage records by outcome",
            ["model", "outcome", "estimated"],
            registry=self.registry,
        )


class MetricsUsageSink:
    """A :class:`~tail_service.core.inference.UsageSink` that counts tokens in Prometheus.

    The durable, batched usage ledger comes with the store; until then every record
    is counted here and logged at debug level.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        # Resolved label children, so a record costs dict lookups rather than
        # ``labels()`` calls (which take a lock and hash the label tuple every time).
        # Bounded: records only ever carry configured model names.
        self._tokens: dict[str, tuple[Any, Any]] = {}
        self._records: dict[tuple[str, str, bool], Any] = {}

    def record(self, rec: UsageRecord) -> None:
        tokens = self._tokens.get(rec.model)
        if tokens is None:
            tokens = self._tokens[rec.model] = (
                self._m.tokens.labels(rec.model, "prompt"),
                self._m.tokens.labels(rec.model, "completion"),
            )
        tokens[0].inc(rec.usage.prompt_tokens)
        tokens[1].inc(rec.usage.completion_tokens)
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
