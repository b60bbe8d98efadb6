"""Exact-match response cache: keys, modes, and turning answers into streams and back.

A cached entry is the complete, non-streamed answer. A streamed request that misses is
accumulated into that form as it passes through (:class:`ChatAccumulator`), so one
entry serves both ways; a streamed hit is replayed as a well-formed SSE stream
(:func:`replay_chat`). Keys are scoped by tenant and endpoint and built from the
normalized request: JSON with sorted keys, without the fields that do not change the
answer (``stream``, ``stream_options``, ``user``). Pure functions and a protocol; the
Redis store is in :mod:`tail_service.clients.response_cache`.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any, Protocol

import orjson

from tail_service.core.types import Endpoint, ProxyRequest

#: request fields that do not change the answer
_IGNORED = frozenset({"stream", "stream_options", "user"})


class CacheMode(enum.StrEnum):
    """What the client asked of the cache (``x-tail-cache`` request header)."""

    #: serve a hit, store a miss
    USE = "use"
    #: neither read nor write
    SKIP = "skip"
    #: do not read, store the fresh answer
    REFRESH = "refresh"


class ResponseCache(Protocol):
    """Where entries live; both calls are best effort (errors mean "miss")."""

    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def set(self, key: str, value: dict[str, Any], ttl: float) -> None: ...


def cacheable(req: ProxyRequest) -> bool:
    """Chat (streamed or not), and non-streamed legacy completions and embeddings."""
    return req.endpoint is Endpoint.CHAT or not req.params.stream


def cache_key(req: ProxyRequest) -> str:
    """``tail:cache:v1:<tenant>:<endpoint>:<sha256 of the normalized request>``."""
    normalized = {k: v for k, v in req.body.items() if k not in _IGNORED}
    digest = hashlib.sha256(orjson.dumps(normalized, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"tail:cache:v1:{req.principal.tenant}:{req.endpoint.value}:{digest}"


class ChatAccumulator:
    """Rebuilds a ``chat.completion`` from the chunks of a stream."""

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: dict[str, Any] | None = None
        self.complete = False

    def feed(self, chunk: dict[str, Any]) -> None:
        if not self._head:
            self._head = {k: chunk.get(k) for k in ("id", "created", "model", "system_fingerprint")}
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            idx = choice.get("index", 0)
            acc = self._choices.setdefault(idx, {"content": [], "tool_calls": {}, "finish_reason": None})
            delta = choice.get("delta") or {}
            if delta.get("content"):
                acc["content"].append(delta["content"])
            for tc in delta.get("tool_calls") or ():
                slot = acc["tool_calls"].setdefault(
                    tc.get("index", 0), {"id": "", "name": "", "arguments": []}
                )
                slot["id"] = slot["id"] or tc.get("id") or ""
                fn = tc.get("function") or {}
                slot["name"] = slot["name"] or fn.get("name") or ""
                slot["arguments"].append(fn.get("arguments") or "")
            if choice.get("finish_reason"):
                acc["finish_reason"] = choice["finish_reason"]
        self.complete = bool(self._choices) and all(c["finish_reason"] for c in self._choices.values())

    def result(self) -> dict[str, Any] | None:
        """The completion, or ``None`` if the stream did not finish every choice."""
        if not self.complete:
            return None
        choices = []
        for idx in sorted(self._choices):
            acc = self._choices[idx]
            message: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(acc["content"]) or None,
                "refusal": None,
            }
            if acc["tool_calls"]:
                message["tool_calls"] = [
                    {
                        "id": t["id"],
                        "type": "function",
                        "function": {"name": t["name"], "arguments": "".join(t["arguments"])},
                    }
                    for _, t in sorted(acc["tool_calls"].items())
                ]
            choices.append(
                {"index": idx, "message": message, "logprobs": None, "finish_reason": acc["finish_reason"]}
            )
        out = {**self._head, "object": "chat.completion", "choices": choices}
        if self._usage:
            out["usage"] = self._usage
        return out


def replay_chat(completion: dict[str, Any], *, include_usage: bool) -> list[dict[str, Any]]:
    """A cached ``chat.completion`` as the chunks of a stream (the contract's order)."""
    head = {
        "id": completion.get("id"),
        "object": "chat.completion.chunk",
        "created": completion.get("created"),
        "model": completion.get("model"),
    }

    def chunk(idx: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": idx, "delta": delta, "finish_reason": finish}]}

    chunks: list[dict[str, Any]] = []
    for choice in completion.get("choices") or ():
        idx = choice.get("index", 0)
        message = choice.get("message") or {}
        chunks.append(chunk(idx, {"role": "assistant", "content": ""}))
        if message.get("content"):
            chunks.append(chunk(idx, {"content": message["content"]}))
        for i, tc in enumerate(message.get("tool_calls") or ()):
            fn = tc.get("function") or {}
            name = {"name": fn.get("name"), "arguments": ""}
            chunks.append(chunk(idx, {"tool_calls": [{"index": i, "id": tc.get("id"), "type": "function",
                                                      "function": name}]}))  # fmt: skip
            args = {"index": i, "function": {"arguments": fn.get("arguments") or ""}}
            chunks.append(chunk(idx, {"tool_calls": [args]}))
        chunks.append(chunk(idx, {}, choice.get("finish_reason")))
    if include_usage and completion.get("usage"):
        chunks.append({**head, "choices": [], "usage": completion["usage"]})
    return chunks
