"""Usage accounting: one record per billable unit, and what a stream has shown so far.

The inference service writes one :class:`UsageRecord` per request (an API call, a batch
line, an agent step), whatever the outcome, to a :class:`UsageSink`: the metrics and the
ledger. :class:`StreamUsage` follows a stream's chunks so that usage can still be counted
when the upstream never reports it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from tail_service.core.types import Endpoint, TokenUsage


class Outcome(enum.StrEnum):
    """How a request ended, for the usage ledger."""

    #: answered completely
    OK = "ok"
    #: failed (upstream error, cut stream)
    ERROR = "error"
    #: the client went away first
    CANCELLED = "cancelled"


class Source(enum.StrEnum):
    """What kind of billable unit a record is."""

    API = "api"
    BATCH = "batch"
    AGENT = "agent"


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


class UsageSink(Protocol):
    """Receives one record per request. Must not block: it runs on the event loop."""

    def record(self, rec: UsageRecord) -> None: ...


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
