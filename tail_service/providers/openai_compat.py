"""Adapter for any OpenAI-compatible upstream: OpenAI, vLLM, Ollama, LM Studio, ...

Pass-through: the request body goes upstream as the client sent it (unknown fields
included) with only ``model`` replaced and, for streams, ``stream_options.include_usage``
forced on so usage is always known. Responses are parsed once with orjson.

Transport is one pooled :class:`aiohttp.ClientSession`, injected and owned by the app.
aiohttp rather than httpx: on this hot path httpx/httpcore costs several times more
CPU per request (measured in ``docs/benchmarks.md``), which alone would exceed the
gateway's whole per-request budget.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson

from tail_service.core.types import UpstreamCall
from tail_service.errors import (
    ProviderConnectionError,
    ProviderError,
    ProviderHTTPError,
    ProviderProtocolError,
    ProviderStreamCut,
    ProviderTimeoutError,
)
from tail_service.providers.upstream_http import SSEDecoder, describe, error_message, parse_retry_after

_PATHS = {"chat": "/chat/completions", "completion": "/completions", "embeddings": "/embeddings"}


class OpenAICompatProvider:
    """Provider for OpenAI-compatible HTTP APIs (``base_url`` ends in ``/v1``)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._urls: dict[tuple[str, str], str] = {}

    def _url(self, call: UpstreamCall, op: str) -> str:
        key = (call.deployment.base_url, op)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = call.deployment.base_url.rstrip("/") + _PATHS[op]
        return url

    @staticmethod
    def _headers(call: UpstreamCall) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/json"}
        if call.request_id:
            headers["x-request-id"] = call.request_id
        for k, v in call.deployment.headers:
            headers[k] = v
        for k, v in call.forward_headers:
            headers[k] = v
        if call.api_key:
            headers["authorization"] = "Bearer " + call.api_key
        return headers

    async def _post(self, call: UpstreamCall, op: str) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=call.timeout, sock_connect=call.deployment.connect_timeout)
        try:
            async with self._session.post(
                self._url(call, op),
                data=orjson.dumps(call.body),
                headers=self._headers(call),
                timeout=timeout,
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    msg, body = error_message(resp.status, raw)
                    raise ProviderHTTPError(
                        resp.status, msg, retry_after=parse_retry_after(resp.headers), body=body
                    )
        except ProviderError:
            raise
        except TimeoutError:
            raise ProviderTimeoutError(f"no answer within {call.timeout:.1f}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ProviderConnectionError(describe(exc)) from None
        try:
            result = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ProviderProtocolError("the upstream answered with invalid JSON") from None
        if not isinstance(result, dict):
            raise ProviderProtocolError("the upstream answered with a non-object JSON body")
        return result

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        return await self._post(call, "chat")

    async def completion(self, call: UpstreamCall) -> dict[str, Any]:
        return await self._post(call, "completion")

    async def embeddings(self, call: UpstreamCall) -> dict[str, Any]:
        return await self._post(call, "embeddings")

    def chat_stream(self, call: UpstreamCall) -> AsyncGenerator[dict[str, Any], None]:
        return self._stream(call, "chat")

    def completion_stream(self, call: UpstreamCall) -> AsyncGenerator[dict[str, Any], None]:
        return self._stream(call, "completion")

    async def _stream(self, call: UpstreamCall, op: str) -> AsyncGenerator[dict[str, Any], None]:
        body = dict(call.body)
        body["stream"] = True
        opts = body.get("stream_options")
        body["stream_options"] = (
            {**opts, "include_usage": True} if isinstance(opts, dict) else {"include_usage": True}
        )
        headers = self._headers(call)
        headers["accept"] = "text/event-stream"
        # No total cap on a stream: the proxy bounds the time to the first token, and
        # sock_read bounds the silence between two chunks.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=call.deployment.connect_timeout, sock_read=call.timeout
        )
        resp: aiohttp.ClientResponse | None = None
        done = False
        try:
            try:
                resp = await self._session.post(
                    self._url(call, op), data=orjson.dumps(body), headers=headers, timeout=timeout
                )
            except TimeoutError:
                raise ProviderTimeoutError(f"no answer within {call.timeout:.1f}s") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise ProviderConnectionError(describe(exc)) from None
            if resp.status >= 400:
                raw = await resp.read()
                msg, err_body = error_message(resp.status, raw)
                raise ProviderHTTPError(
                    resp.status, msg, retry_after=parse_retry_after(resp.headers), body=err_body
                )
            async for data in _sse_data(resp):
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise ProviderProtocolError("the upstream sent an event that is not JSON") from None
                if not isinstance(chunk, dict):
                    raise ProviderProtocolError("the upstream sent an event that is not a JSON object")
                if "error" in chunk and "choices" not in chunk:
                    err = chunk["error"]
                    detail = err.get("message") if isinstance(err, dict) else err
                    raise ProviderProtocolError(f"the upstream reported an error mid-stream: {detail}")
                yield chunk
            if not done:
                raise ProviderStreamCut("the upstream closed the stream before [DONE]")
        finally:
            if resp is not None:
                if done:
                    resp.release()
                else:
                    resp.close()

    async def aclose(self) -> None:
        """The session belongs to the app, which closes it."""


async def _sse_data(resp: aiohttp.ClientResponse) -> AsyncGenerator[str, None]:
    """The ``data`` of each SSE event in the body, as it arrives."""
    decoder = SSEDecoder()
    try:
        while chunk := await resp.content.readany():
            for _event, data in decoder.feed(chunk):
                yield data
        for _event, data in decoder.close():
            yield data
    except TimeoutError:
        raise ProviderTimeoutError("the upstream stream went silent") from None
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError) as exc:
        raise ProviderStreamCut(describe(exc)) from None
