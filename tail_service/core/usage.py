"""Usage accounting: one record per billable unit, and what a stream has shown so far.

The inference service writes one :class:`UsageRecord` per request (an API call, a batch
line, an agent step), whatever the outcome, to a :class:`UsageSink`: the metrics and the
ledger. :class:`StreamUsage` follows a stream's chunks so that usage can still be counted
when the upstream never reports it.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Any, Protocol

from tail_service.core.types import Endpoint, Source, TokenUsage


class Outcome(enum.StrEnum):
    """How a request ended, for the usage ledger."""

    #: answered completely
    OK = "ok"
    #: failed (upstream error, cut stream)
    ERROR = "error"
    #: the client went away first
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One billable unit. ``estimated`` when counted offline, not reported upstream.

    ``record_id`` is unique per record (the ledger's key, so a record delivered twice is
    stored once); ``request_id`` is the client's or ours, and may repeat.
    """

    request_id: str
    model: str
    endpoint: Endpoint
    usage: TokenUsage
    outcome: Outcome
    estimated: bool = False
    deployment: str | None = None
    record_id: str = ""
    key_id: str = ""
    tenant: str = ""
    #: the cost in nano-dollars (see :mod:`tail_service.core.pricing`); 0 without a price
    cost_nanos: int = 0
    #: seconds from admission to the end of the answer
    latency_s: float = 0.0
    #: the HTTP status the unit ended with (200; the error's; 499 when the client left)
    status: int = 200
    #: answered from the response cache
    cache_hit: bool = False
    source: Source = Source.API
    #: unix time the unit ended
    created_at: float = 0.0

    def to_values(self) -> tuple[Any, ...]:
        """The record as a row of the ledger: its values in :data:`LEDGER_FIELDS` order."""
        u = self.usage
        return (
            self.record_id,
            self.request_id,
            self.key_id,
            self.tenant,
            self.model,
            self.deployment,
            self.endpoint.value,
            self.source.value,
            u.prompt_tokens,
            u.completion_tokens,
            u.cached_tokens,
            self.cost_nanos,
            round(self.latency_s * 1000),
            self.status,
            self.outcome.value,
            self.cache_hit,
            self.estimated,
            int(self.created_at),
        )

    def to_row(self) -> dict[str, Any]:
        """The record as a row of the ledger (``usage_records``), JSON-ready."""
        return dict(zip(LEDGER_FIELDS, self.to_values(), strict=True))


#: the ledger's columns (``usage_records``), in the order of :meth:`UsageRecord.to_values`
LEDGER_FIELDS = (
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
)


class UsageSink(Protocol):
    """Receives one record per billable unit. Must not block: it runs on the event loop.

    It may return an awaitable that completes once the record is durable (in the Redis
    stream of the ledger); the inference service waits for it, briefly, before the
    response's last byte, so a crash after the response loses no record."""

    def record(self, rec: UsageRecord) -> asyncio.Future[None] | None: ...


class StreamUsage:
    """What a stream has shown so far, to estimate usage if the upstream never says."""

    __slots__ = ("estimated", "text", "usage")

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.text: list[str] = []
        self.estimated = False

    def observe(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta")
            if delta is not None:
                if content := delta.get("content"):
                    self.text.append(content)
                for tc in delta.get("tool_calls") or ():
                    fn = tc.get("function") or {}
                    self.text.append(fn.get("name") or "")
                    self.text.append(fn.get("arguments") or "")
            elif text := choice.get("text"):
                self.text.append(text)


class UsageSinks:
    """Several sinks as one; what the last one that returns an awaitable returns."""

    def __init__(self, *sinks: UsageSink) -> None:
        self._sinks = sinks

    def record(self, rec: UsageRecord) -> asyncio.Future[None] | None:
        done = None
        for sink in self._sinks:
            result = sink.record(rec)
            if result is not None:
                done = result
        return done
