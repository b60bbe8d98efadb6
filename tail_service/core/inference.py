"""Chat, legacy completions and embeddings over the model proxy, with usage accounting.

The service owns what every endpoint shares after the proxy answered: the public
model name in every response and chunk, usage that is always known (asked from the
upstream, counted offline when the upstream did not say), usage stripped when the
client did not ask for it, and one usage record per request, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import os
import struct
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

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
from tail_service.core.pricing import Pricing
from tail_service.core.proxy import ModelProxy
from tail_service.core.token_counter import COUNT_INLINE_MAX_BYTES, TokenCounter, count_prompt, count_text
from tail_service.core.types import ChunkStream, Completion, ProxyRequest, TokenUsage
from tail_service.core.usage import Outcome, StreamUsage, UsageRecord, UsageSink
from tail_service.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    TailError,
    UpstreamError,
    UpstreamRejectedError,
)

log = logging.getLogger("tail_service.inference")


def encode_base64(vector: list[float]) -> str:
    """OpenAI's base64 embedding: little-endian float32, standard padded base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


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
        *,
        pricing: Pricing | None = None,
        durable_wait: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.proxy = proxy
        self._counter = counter
        self._usage = usage
        self._admitter = admitter
        self._cache = cache
        self._cache_ttl = cache_ttl
        self._pricing = pricing or Pricing({})
        #: the longest a response waits for its usage record to be durable
        self._durable_wait = durable_wait
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        # ledger record ids: unique per process (a random prefix) and per record (a counter)
        self._id_prefix = "u" + os.urandom(8).hex() + "-"
        self._ids = itertools.count()

    async def _cached(self, req: ProxyRequest) -> tuple[str | None, dict[str, Any] | None]:
        """``(key to store under, cached answer)`` for this request's cache mode."""
        if self._cache is None or req.cache_mode == CacheMode.SKIP or not cacheable(req):
            return None, None
        key = cache_key(req)
        hit = await self._cache.get(key) if req.cache_mode == CacheMode.USE else None
        if hit is not None:
            hit["model"] = req.model
        if req.stats is not None:  # as ``x-tail-cache`` says
            req.stats.cache = "hit" if hit is not None else "miss"
        return key, hit

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background, holding a reference until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _store(self, key: str | None, value: dict[str, Any] | None) -> None:
        if key is None or value is None or self._cache is None:
            return
        self._spawn(self._cache.set(key, value, self._cache_ttl))

    async def _begin(self, req: ProxyRequest) -> _Begun:
        """Access and model checks, then admission and the cache lookup, before anything is
        sent upstream.

        Admission and lookup are issued together, so they leave for Redis in one write (one
        round trip). A hit still needs the admission: it counts toward requests per minute.
        """
        check_model_access(req.principal, req.model)
        self.proxy.router.deployments(req.model, req.endpoint)  # 404 / 400 before admission
        started = time.monotonic()
        if self._admitter is None:
            key, hit = await self._cached(req)
            return _Begun(None, _cache_header({}, key, hit), key, hit, started)
        if self._cache is None or req.cache_mode == CacheMode.SKIP or not cacheable(req):
            ticket, headers = await self._admitter.admit(req, req.priority)
            return _Begun(ticket, headers, None, None, started)
        admission = asyncio.ensure_future(self._admitter.admit(req, req.priority))
        try:
            key, hit = await self._cached(req)
        except BaseException:  # e.g. the client went away: settle what gets admitted
            admission.add_done_callback(self._settle_abandoned)
            raise
        ticket, headers = await admission
        return _Begun(ticket, _cache_header(headers, key, hit), key, hit, started)

    def _settle_abandoned(self, admission: asyncio.Future[tuple[Ticket | None, dict[str, str]]]) -> None:
        if not admission.cancelled() and admission.exception() is None:
            self._settle(admission.result()[0], TokenUsage())

    def _settle(self, ticket: Ticket | None, usage: TokenUsage) -> None:
        """Settle the admission to what was used: its tokens and their cost."""
        if self._admitter is not None and ticket is not None:
            cost = self._pricing.cost_nanos(ticket.request.model, usage)
            self._admitter.settle(ticket, usage.total_tokens, cost)

    async def _estimate(self, req: ProxyRequest, completion_text: str) -> TokenUsage:
        prompt = await count_prompt(self._counter, req)
        completion = await count_text(self._counter, completion_text, req.model) if completion_text else 0
        return TokenUsage(prompt, completion)

    def _record(
        self,
        req: ProxyRequest,
        begun: _Begun,
        usage: TokenUsage,
        outcome: Outcome,
        *,
        estimated: bool,
        deployment: str | None,
        status: int = 200,
    ) -> asyncio.Future[None] | None:
        """Write the usage record of ``req`` (cost, latency, who); what the sink returns
        completes once it is durable."""
        p = req.principal
        if req.stats is not None:
            req.stats.usage = usage
        return self._usage.record(
            UsageRecord(
                req.request_id,
                req.model,
                req.endpoint,
                usage,
                outcome,
                estimated,
                deployment,
                record_id=self._id_prefix + str(next(self._ids)),
                key_id=p.key_id,
                tenant=p.tenant,
                cost_nanos=self._pricing.cost_nanos(req.model, usage),
                latency_s=time.monotonic() - begun.started,
                status=status,
                cache_hit=begun.hit is not None,
                source=req.source,
                created_at=self._clock(),
            )
        )

    async def _durable(self, done: asyncio.Future[None] | None) -> None:
        """Wait (at most ``durable_wait``) until a usage record is durable: a record still
        on its way after that is written all the same, it just no longer holds up the reply."""
        if done is None or done.done():
            return
        # Not shielded: the future is this request's alone (the sink only completes it), so
        # a cancellation that reaches it harms nothing.
        timer = asyncio.get_running_loop().call_later(self._durable_wait, _give_up, done)
        try:
            await done
        finally:
            timer.cancel()

    async def complete(self, req: ProxyRequest) -> Completion:
        """Non-streaming chat, legacy completion or embeddings.

        An error raised after admission carries the rate-limit headers, as OpenAI's do.
        """
        begun = await self._begin(req)
        try:
            return await self._complete(req, begun)
        except TailError as exc:
            _carry_headers(exc, begun.headers)
            raise

    async def _complete(self, req: ProxyRequest, begun: _Begun) -> Completion:
        ticket, headers = begun.ticket, begun.headers
        if begun.hit is not None:
            # A hit counts toward requests per minute, not toward upstream tokens.
            self._settle(ticket, TokenUsage())
            done = self._record(req, begun, TokenUsage(), Outcome.OK, estimated=False, deployment="cache")
            cached_usage = TokenUsage.from_openai(begun.hit.get("usage")) or TokenUsage()
            await self._durable(done)
            return Completion(begun.hit, cached_usage, headers)
        try:
            result, dep = await self.proxy.call(req)
        except BaseException as exc:
            self._settle(ticket, TokenUsage())
            if _refused_here(exc):
                raise  # refused before any upstream call: nothing was used
            outcome = Outcome.ERROR if isinstance(exc, Exception) else Outcome.CANCELLED
            status = (
                exc.http_status if isinstance(exc, TailError) else (500 if outcome is Outcome.ERROR else 499)
            )
            done = self._record(
                req, begun, TokenUsage(), outcome, estimated=True, deployment=None, status=status
            )
            if outcome is Outcome.ERROR:
                await self._durable(done)
            raise
        result["model"] = req.model
        usage = TokenUsage.from_openai(result.get("usage"))
        estimated = usage is None
        try:
            if usage is None:
                usage = await self._estimate(req, _result_text(result))
                result["usage"] = usage.to_openai()
        finally:
            counted = usage or TokenUsage()
            done = self._record(req, begun, counted, Outcome.OK, estimated=estimated, deployment=dep.id)
            self._settle(ticket, counted)
        self._store(begun.cache_key, result)
        await self._durable(done)
        return Completion(result, counted, headers)

    async def open_stream(self, req: ProxyRequest) -> ChunkStream:
        """Streaming chat or legacy completion, opened up to its first chunk.

        Everything that can fail before the first chunk (access, admission, every
        deployment refusing) raises here, as an ordinary error with a status code and the
        rate-limit headers. The rest of the chunks follow in :attr:`ChunkStream.rest`.
        """
        begun = await self._begin(req)
        chunks = self._stream(req, begun)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            raise UpstreamError("The upstream stream ended without any chunk.") from None
        except BaseException as exc:
            await chunks.aclose()
            self._settle(begun.ticket, TokenUsage())  # in case the generator never started
            if isinstance(exc, TailError):
                _carry_headers(exc, begun.headers)
            raise
        return ChunkStream(first, chunks, begun.headers)

    async def _stream(self, req: ProxyRequest, begun: _Begun) -> AsyncGenerator[dict[str, Any], None]:
        """OpenAI chunks for the API to frame.

        The upstream is always asked for usage; its usage chunk is passed on only when
        the client asked (``include_usage``), and is synthesised from an offline count
        when the upstream sent none. A usage record is written however the stream ends.
        """
        ticket = begun.ticket
        if begun.hit is not None:
            self._settle(ticket, TokenUsage())
            done = self._record(req, begun, TokenUsage(), Outcome.OK, estimated=False, deployment="cache")
            for chunk in replay_chat(begun.hit, include_usage=req.params.include_usage):
                yield chunk
            await self._durable(done)
            return
        acc = ChatAccumulator() if begun.cache_key is not None else None
        state = StreamUsage()
        outcome: Outcome | None = Outcome.ERROR
        want_usage = req.params.include_usage
        last: dict[str, Any] | None = None
        finished = False
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
                state.usage = await self._estimate(req, "".join(state.text))
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
                self._store(begun.cache_key, complete)
            # recorded before the stream's end goes out, so the end implies the record
            finished = True
            await self._durable(self._finish_stream(req, begun, state, outcome, started=True))
        except (ModelNotFoundError, InvalidRequestError) as exc:
            if _refused_here(exc):
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
            if not finished:
                self._finish_stream(req, begun, state, outcome, started=last is not None)

    def _finish_stream(
        self,
        req: ProxyRequest,
        begun: _Begun,
        state: StreamUsage,
        outcome: Outcome | None,
        *,
        started: bool,
    ) -> asyncio.Future[None] | None:
        """Record the stream's usage and settle its admission, however it ended.

        Runs in the stream's ``finally`` (possibly while it is being closed), so it cannot
        await. When nothing reported usage, what the client was sent (and the prompt, if
        anything was generated at all) is counted, so no usage goes unrecorded: inline for a
        small request, in a background task for a large one. Returns what the sink returned.
        """
        ticket = begun.ticket
        if outcome is None:
            self._settle(ticket, TokenUsage())
            return None
        status = {Outcome.OK: 200, Outcome.CANCELLED: 499}.get(outcome, 502)

        def record(usage: TokenUsage, estimated: bool) -> asyncio.Future[None] | None:
            done = self._record(
                req, begun, usage, outcome, estimated=estimated, deployment=None, status=status
            )
            self._settle(ticket, usage)
            return done

        if state.usage is not None or not started:
            return record(state.usage or TokenUsage(), state.estimated or not started)
        text = "".join(state.text)
        if req.body_bytes <= COUNT_INLINE_MAX_BYTES and len(text) <= COUNT_INLINE_MAX_BYTES:
            prompt = self._counter.count_prompt(req.body, req.endpoint.value)
            return record(TokenUsage(prompt, self._counter.count_text(text, req.model) if text else 0), True)

        async def count_then_record() -> None:
            record(await self._estimate(req, text), True)

        self._spawn(count_then_record())
        return None

    async def embed(self, req: ProxyRequest) -> Completion:
        """Embeddings, returned in input order in the encoding the client asked for."""
        if req.params.dimensions is not None:
            deps = self.proxy.router.deployments(req.model, req.endpoint)
            if not all(d.supports_dimensions for d in deps):
                raise InvalidRequestError(
                    f"The model `{req.model}` does not support the `dimensions` parameter.",
                    param="dimensions",
                    code="unsupported_parameter",
                )
        answer = await self.complete(req)
        data = answer.body.get("data")
        if not isinstance(data, list) or not data:
            raise UpstreamError("The upstream returned no embeddings.", headers=dict(answer.headers))
        data.sort(key=lambda d: d.get("index", 0))
        if req.params.base64:
            for item in data:
                if isinstance(item.get("embedding"), list):
                    item["embedding"] = encode_base64(item["embedding"])
        return answer


@dataclass(frozen=True, slots=True)
class _Begun:
    """A request past its checks: the admission ticket, reply headers and cache lookup."""

    ticket: Ticket | None
    headers: dict[str, str]
    cache_key: str | None
    hit: dict[str, Any] | None
    #: ``time.monotonic()`` when the request began (its latency in the ledger)
    started: float = field(default=0.0)


def _refused_here(exc: BaseException) -> bool:
    """A request refused before any upstream call (an unknown model, a bad parameter): it
    used nothing and gets no usage record. A refusal by the upstream itself gets one."""
    return isinstance(exc, (ModelNotFoundError, InvalidRequestError)) and not isinstance(
        exc, UpstreamRejectedError
    )


def _give_up(done: asyncio.Future[None]) -> None:
    """No longer wait for a record (the sink's future is only waited on, never read)."""
    if not done.done():
        done.set_result(None)


def _cache_header(headers: dict[str, str], key: str | None, hit: dict[str, Any] | None) -> dict[str, str]:
    """``headers`` plus ``x-tail-cache: hit|miss`` when the cache was consulted."""
    if key is None:
        return headers
    return {**headers, "x-tail-cache": "hit" if hit is not None else "miss"}


def _carry_headers(exc: TailError, headers: dict[str, str]) -> None:
    """An error after admission still carries the rate-limit headers, as OpenAI's do."""
    if headers:
        exc.headers = {**headers, **exc.headers}


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
