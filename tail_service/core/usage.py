"""Usage accounting: one record per request, and what a stream has shown so far.

The inference service writes one :class:`UsageRecord` per request, whatever the outcome,
to a :class:`UsageSink` (metrics today). :class:`StreamUsage` follows a stream's chunks so
that usage can still be counted when the upstream never reports it.
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


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """Tokens one request used. ``estimated`` when counted offline, not reported upstream."""

    request_id: str
    model: str
    endpoint: Endpoint
    usage: TokenUsage
    outcome: Outcome
    estimated: bool = False
    deployment: str | None = None


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
