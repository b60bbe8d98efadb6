"""Chat, legacy completions and embeddings over the model proxy, with usage accounting.

The service owns what every endpoint shares after the proxy answered: the public
model name in every response and chunk, usage that is always known (asked from the
upstream, counted offline when the upstream did not say), usage stripped when the
client did not ask for it, and one usage record per request, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import logging
import struct
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol

from tail_service.core.admission import Admitter, Ticket
from tail_service.core.auth import check_model_access
from tail_service.core.cache import (
    CacheMode,
    ChatAccumulator,
    ResponseCache,
    cache_key,
    cacheable,
    replay_chat,
)
from tail_service.core.proxy import ModelProxy
from tail_service.core.token_counter import TokenCounter
from tail_service.core.types import Endpoint, ProxyRequest, TokenUsage
from tail_service.errors import InvalidRequestError, ModelNotFoundError, UpstreamError

log = logging.getLogger("tail_service.inference")


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


def encode_base64(vector: list[float]) -> str:
    """OpenAI's base64 embedding: little-endian float32, standard padded base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


class _StreamState:
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


class InferenceService:
    """The endpoints' logic. Stateless apart from its collaborators."""

    def __init__(
        self,
        proxy: ModelProxy,
        counter: TokenCounter,
        usage: UsageSink,
        admitter: Admitter | None = None,
        cache: ResponseCache | None = None,
        cache_ttl: float = 300.0,
    ) -> None:
        self.proxy = proxy
        self._counter = counter
        self._usage = usage
        self._admitter = admitter
        self._cache = cache
        self._cache_ttl = cache_ttl
        self._stores: set[asyncio.Task[None]] = set()

    async def _cached(self, req: ProxyRequest) -> tuple[str | None, dict[str, Any] | None]:
        """``(key to store under, cached answer)`` for this request's cache mode."""
        if self._cache is None or req.cache_mode == CacheMode.SKIP or not cacheable(req):
            return None, None
        key = cache_key(req)
        hit = await self._cache.get(key) if req.cache_mode == CacheMode.USE else None
        req.reply_headers["x-tail-cache"] = "hit" if hit is not None else "miss"
        if hit is not None:
            hit["model"] = req.model
        return key, hit

    def _store(self, key: str | None, value: dict[str, Any] | None) -> None:
        if key is None or value is None or self._cache is None:
            return
        task = asyncio.get_running_loop().create_task(self._cache.set(key, value, self._cache_ttl))
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)

    async def _begin(self, req: ProxyRequest) -> tuple[Ticket | None, str | None, dict[str, Any] | None]:
        """Access and model checks, then admission and the cache lookup, before anything is
        sent upstream: ``(ticket, key to store under, cached answer)``.

        Admission and lookup are issued together, so they leave for Redis in one write (one
        round trip). A hit still needs the admission: it counts toward requests per minute.
        """
        check_model_access(req.principal, req.model)
        self.proxy.router.deployments(req.model, req.endpoint)  # 404 / 400 before admission
        if self._admitter is None:
            key, hit = await self._cached(req)
            return None, key, hit
        if self._cache is None or req.cache_mode == CacheMode.SKIP or not cacheable(req):
            return await self._admitter.admit(req), None, None
        admission = asyncio.ensure_future(self._admitter.admit(req))
        try:
            key, hit = await self._cached(req)
        except BaseException:  # e.g. the client went away: settle what gets admitted
            admission.add_done_callback(self._settle_abandoned)
            raise
        return await admission, key, hit

    def _settle_abandoned(self, admission: asyncio.Future[Ticket | None]) -> None:
        if not admission.cancelled() and admission.exception() is None:
            self._settle(admission.result(), 0)

    def _settle(self, ticket: Ticket | None, used_tokens: int) -> None:
        if self._admitter is not None:
            self._admitter.settle(ticket, used_tokens)

    def _estimate(self, req: ProxyRequest, completion_text: str) -> TokenUsage:
        prompt = self._counter.count_prompt(req.body, req.endpoint.value)
        completion = self._counter.count_text(completion_text, req.model) if completion_text else 0
        return TokenUsage(prompt, completion)

    def _record(
        self,
        req: ProxyRequest,
        usage: TokenUsage,
        outcome: Outcome,
        *,
        estimated: bool,
        deployment: str | None,
    ) -> None:
        self._usage.record(
            UsageRecord(req.request_id, req.model, req.endpoint, usage, outcome, estimated, deployment)
        )

    async def complete(self, req: ProxyRequest) -> dict[str, Any]:
        """Non-streaming chat, legacy completion or embeddings."""
        ticket, cache_key_, hit = await self._begin(req)
        if hit is not None:
            # A hit counts toward requests per minute, not toward upstream tokens.
            self._settle(ticket, 0)
            self._record(req, TokenUsage(), Outcome.OK, estimated=False, deployment="cache")
            return hit
        try:
            result, dep = await self.proxy.call(req)
        except (ModelNotFoundError, InvalidRequestError):
            self._settle(ticket, 0)
            raise  # refused before any upstream call: nothing was used
        except BaseException as exc:
            self._settle(ticket, 0)
            outcome = Outcome.ERROR if isinstance(exc, Exception) else Outcome.CANCELLED
            self._record(req, TokenUsage(), outcome, estimated=True, deployment=None)
            raise
        result["model"] = req.model
        usage = TokenUsage.from_openai(result.get("usage"))
        estimated = usage is None
        if usage is None:
            usage = self._estimate(req, _result_text(result))
            result["usage"] = usage.to_openai()
        self._record(req, usage, Outcome.OK, estimated=estimated, deployment=dep.id)
        self._settle(ticket, usage.total_tokens)
        self._store(cache_key_, result)
        return result

    async def stream(self, req: ProxyRequest) -> AsyncGenerator[dict[str, Any], None]:
        """Streaming chat or legacy completion: OpenAI chunks for the API to frame.

        The upstream is always asked for usage; its usage chunk is passed on only when
        the client asked (``include_usage``), and is synthesised from an offline count
        when the upstream sent none. A usage record is written however the stream ends.
        """
        ticket, cache_key_, hit = await self._begin(req)
        if hit is not None:
            self._settle(ticket, 0)
            self._record(req, TokenUsage(), Outcome.OK, estimated=False, deployment="cache")
            for chunk in replay_chat(hit, include_usage=req.include_usage):
                yield chunk
            return
        acc = ChatAccumulator() if cache_key_ is not None else None
        state = _StreamState()
        outcome: Outcome | None = Outcome.ERROR
        want_usage = req.include_usage
        last: dict[str, Any] | None = None
        try:
            async for chunk in self.proxy.stream(req):
                chunk["model"] = req.model
                last = chunk
                if acc is not None:
                    acc.feed(chunk)
                if (u := chunk.get("usage")) is not None:
                    state.usage = TokenUsage.from_openai(u)
                    if not want_usage:
                        if not chunk.get("choices"):
                            continue
                        chunk.pop("usage")
                elif want_usage:
                    chunk["usage"] = None
                state.observe(chunk)
                yield chunk
            if last is None:
                raise UpstreamError(
                    "The upstream stream ended without any chunk.", code="upstream_stream_cut"
                )
            if state.usage is None and want_usage:
                state.usage = self._estimate(req, "".join(state.text))
                state.estimated = True
                yield {
                    "id": last.get("id"),
                    "object": last.get("object"),
                    "created": last.get("created"),
                    "model": req.model,
                    "choices": [],
                    "usage": state.usage.to_openai(),
                }
            outcome = Outcome.OK
            if acc is not None and (complete := acc.result()) is not None:
                if "usage" not in complete and state.usage is not None:
                    complete["usage"] = state.usage.to_openai()
                self._store(cache_key_, complete)
        except (ModelNotFoundError, InvalidRequestError):
            outcome = None  # refused before any upstream call: nothing to record
            raise
        except GeneratorExit:
            outcome = Outcome.CANCELLED
            raise
        except BaseException as exc:
            if not isinstance(exc, Exception):
                outcome = Outcome.CANCELLED
            raise
        finally:
            if outcome is not None:
                used = self._finish_stream(req, state, outcome, started=last is not None)
            else:
                used = 0
            self._settle(ticket, used)

    def _finish_stream(
        self, req: ProxyRequest, state: _StreamState, outcome: Outcome, *, started: bool
    ) -> int:
        """Record the stream's usage; returns its total tokens (to settle the admission)."""
        usage = state.usage
        estimated = state.estimated
        if usage is None:
            # Nothing reported: count what the client was sent (and the prompt, if
            # anything was generated at all), so no usage goes unrecorded.
            usage = self._estimate(req, "".join(state.text)) if started else TokenUsage()
            estimated = True
        self._record(req, usage, outcome, estimated=estimated, deployment=None)
        return usage.total_tokens

    async def embed(self, req: ProxyRequest) -> dict[str, Any]:
        """Embeddings, returned in input order in the encoding the client asked for."""
        if req.body.get("dimensions") is not None:
            deps = self.proxy.router.deployments(req.model, req.endpoint)
            if not all(d.supports_dimensions for d in deps):
                raise InvalidRequestError(
                    f"The model `{req.model}` does not support the `dimensions` parameter.",
                    param="dimensions",
                    code="unsupported_parameter",
                )
        result = await self.complete(req)
        data = result.get("data")
        if not isinstance(data, list) or not data:
            raise UpstreamError("The upstream returned no embeddings.")
        data.sort(key=lambda d: d.get("index", 0))
        if req.body.get("encoding_format") == "base64":
            for item in data:
                if isinstance(item.get("embedding"), list):
                    item["embedding"] = encode_base64(item["embedding"])
        return result


def _result_text(result: dict[str, Any]) -> str:
    parts: list[str] = []
    for choice in result.get("choices") or ():
        msg = choice.get("message")
        if msg is not None:
            parts.append(msg.get("content") or "")
            for tc in msg.get("tool_calls") or ():
                fn = tc.get("function") or {}
                parts.append(fn.get("name") or "")
                parts.append(fn.get("arguments") or "")
        else:
            parts.append(choice.get("text") or "")
    return "".join(parts)
